"""kimi_loader: load Kimi-K2.5 / DeepSeek-V3 safetensors checkpoints fast and correctly.

Quickstart::

    import kimi_loader
    with kimi_loader.open("/path/to/checkpoint") as ckpt:
        print(ckpt.quant_format, len(ckpt))
        w = ckpt.get_tensor("model.embed_tokens.weight")   # zero-copy view

See ``README.md`` for the command line (``kimi-loader inspect``) and the formats.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import errors
from ._core import __version__
from .config import QUANT_FORMATS
from .errors import (
    CheckpointIOError,
    CheckpointNotFoundError,
    ConfigError,
    HeaderError,
    IncompleteLoadError,
    InconsistentWeightsError,
    IndexMismatchError,
    InternalError,
    InvalidArgumentError,
    KimiLoaderError,
    MissingTensorError,
    PeerUpdateError,
    PlanError,
    ShapeMismatchError,
    UnsupportedFormatError,
)

if TYPE_CHECKING:  # imported on first use (below): `import kimi_loader` does not import torch
    from . import formats, parallel
    from .formats import detect_quant_format
    from .loader import LoadReport, load_weights
    from .parallel import ParallelLayout
    from .reader import Checkpoint, TensorInfo, load_file, open  # noqa: A004
    from .rl import UpdateReport, WeightUpdater

#: public name -> the module that defines it (imported when the name is first used)
_LAZY = {
    "detect_quant_format": "formats",
    "LoadReport": "loader",
    "load_weights": "loader",
    "ParallelLayout": "parallel",
    "Checkpoint": "reader",
    "TensorInfo": "reader",
    "load_file": "reader",
    "open": "reader",
    "UpdateReport": "rl",
    "WeightUpdater": "rl",
}
#: submodules reachable as attributes (``kimi_loader.models.for_config``) without an import
_SUBMODULES = (
    "bench config formats hooks inspect loader models parallel presets quant reader registry rl rules synth"
).split()


def __getattr__(name: str) -> Any:
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)  # (the import binds the attribute)
    if name not in _LAZY:
        raise AttributeError(f"module 'kimi_loader' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


def determine_num_fused_shared_experts(config: dict, checkpoint: Checkpoint | None = None) -> tuple[int, str]:
    """``(count, reason)``: whether the shared expert is fused into the routed experts.
    ``config`` is a ``config.json`` dict (Kimi-K2.5 wrapper or DeepSeek-V3). With a
    ``checkpoint``, the shared and routed experts' storage is read from its tensors."""
    from .config import parse_config
    from .formats import ModuleFormats, quant_spec
    from .models.deepseek_v3 import fusion_decision, fusion_for

    if checkpoint is None:  # the config alone decides (it may be partial)
        text = config.get("text_config")
        tc: dict = text if isinstance(text, dict) else config
        return fusion_decision(tc, quant_spec(config).method, config)
    mc = parse_config(config)
    return fusion_for(mc, ModuleFormats(mc.quant, checkpoint))


def from_pretrained(
    path,
    *,
    device: str = "cpu",
    dtype=None,
    tp_rank: int = 0,
    tp_size: int = 1,
    ep_rank: int | None = None,
    ep_size: int = 1,
    threads: int | None = None,
    progress=None,
    kernels: str | None = None,
    process_group=None,
    text_only: bool = False,
):
    """Builds the serving-layout model from ``config.json`` on the meta device,
    materializes it on ``device``, loads it with :func:`load_weights` and runs
    ``post_load_weights``. ``dtype`` (default float32) is the compute dtype of dense
    weights; quantized weights stay in their checkpoint format. ``kernels``: ``"torch"``
    (the reference runtime) or ``"triton"`` (routing and the 4-bit MoE as Triton kernels,
    :mod:`kimi_loader.kernels`); default ``"triton"`` on a GPU, else ``"torch"``. A sharded
    model (``tp_size > 1``) runs in one process per TP rank with ``torch.distributed``
    collectives over ``process_group`` (default: the world group; see
    :mod:`kimi_loader.models.runtime`). A Kimi-K2.5 checkpoint loads whole (vision tower
    and projector too; ``model(input_ids, pixel_values=..., image_grid_thw=...)``);
    ``text_only=True`` skips the vision tensors by a declared, reported rule."""
    import torch

    from .loader import load_weights
    from .models import for_config, materialize
    from .reader import open as open_checkpoint

    ckpt = open_checkpoint(path, threads=threads)
    if ckpt.config is None:
        raise UnsupportedFormatError(f"{path}: no config.json", file=str(path))
    model = for_config(
        ckpt.config,
        dtype=dtype or torch.float32,
        device="meta",
        tp_rank=tp_rank,
        tp_size=tp_size,
        ep_rank=ep_rank,
        ep_size=ep_size,
        checkpoint=ckpt,
        text_only=text_only,
    )
    if kernels is None:
        kernels = "triton" if torch.device(device).type == "cuda" else "torch"
    if kernels not in ("torch", "triton"):
        raise InvalidArgumentError(f"kernels must be 'torch' or 'triton', got {kernels!r}")
    lm = getattr(model, "language_model", model)
    lm.kernels = kernels
    lm.process_group = process_group
    materialize(model, device)
    load_weights(
        model,
        ckpt,
        tp_rank=tp_rank,
        tp_size=tp_size,
        ep_rank=ep_rank,
        ep_size=ep_size,
        threads=threads,
        progress=progress,
    )
    return model


__all__ = [
    "QUANT_FORMATS",
    "Checkpoint",
    "CheckpointIOError",
    "CheckpointNotFoundError",
    "ConfigError",
    "HeaderError",
    "IncompleteLoadError",
    "InconsistentWeightsError",
    "IndexMismatchError",
    "InternalError",
    "InvalidArgumentError",
    "KimiLoaderError",
    "LoadReport",
    "MissingTensorError",
    "ParallelLayout",
    "PeerUpdateError",
    "PlanError",
    "ShapeMismatchError",
    "TensorInfo",
    "UnsupportedFormatError",
    "UpdateReport",
    "WeightUpdater",
    "__version__",
    "detect_quant_format",
    "determine_num_fused_shared_experts",
    "errors",
    "formats",
    "from_pretrained",
    "load_file",
    "load_weights",
    "open",
    "parallel",
]
