"""kimi_loader: load Kimi-K2.5 / DeepSeek-V3 safetensors checkpoints fast and correctly.

Quickstart::

    import kimi_loader
    with kimi_loader.open("/path/to/checkpoint") as ckpt:
        print(ckpt.quant_format, len(ckpt))
        w = ckpt.get_tensor("model.embed_tokens.weight")   # zero-copy view

See ``README.md`` for the command line (``kimi-loader inspect``) and the formats.
"""

from . import errors, formats
from ._core import __version__
from .errors import (
    CheckpointIOError,
    CheckpointNotFoundError,
    HeaderError,
    IndexMismatchError,
    InvalidArgumentError,
    KimiLoaderError,
    MissingTensorError,
    ShapeMismatchError,
    UnsupportedFormatError,
)
from .formats import QUANT_FORMATS, detect_quant_format
from .loader import IncompleteLoadError as IncompleteLoadError
from .loader import LoadReport as LoadReport
from .loader import load_weights as load_weights
from .models.deepseek_v3 import fusion_decision
from .reader import Checkpoint, TensorInfo, open  # noqa: A004


def determine_num_fused_shared_experts(config: dict, checkpoint: Checkpoint | None = None) -> tuple[int, str]:
    """``(count, reason)``: whether the shared expert is fused into the routed experts.
    ``config`` is a ``config.json`` dict (Kimi-K2.5 wrapper or DeepSeek-V3). With a
    ``checkpoint``, the shared and routed experts' storage is read from its tensors."""
    from .inspect import text_config_of

    tc = text_config_of(config)
    quant = detect_quant_format(config)
    if checkpoint is None:
        return fusion_decision(tc, quant, tc)
    def stored(fragment: str) -> str:
        names = [k for k in checkpoint.keys() if fragment in k and "gate_proj" in k]
        return ",".join(sorted(f"{n.rsplit('.', 1)[1]}:{checkpoint.tensor_info(n).st_dtype}" for n in names))
    return fusion_decision(tc, quant, tc, shared_format=stored(".mlp.shared_experts.") or "none",
                           routed_format=stored(".mlp.experts.0.") or "none")

__all__ = [
    "QUANT_FORMATS",
    "Checkpoint",
    "CheckpointIOError",
    "CheckpointNotFoundError",
    "HeaderError",
    "IndexMismatchError",
    "InvalidArgumentError",
    "KimiLoaderError",
    "MissingTensorError",
    "ShapeMismatchError",
    "TensorInfo",
    "UnsupportedFormatError",
    "__version__",
    "detect_quant_format",
    "errors",
    "formats",
    "open",
]
