"""Checkpoint formats: dtype names, quantization-format detection, and the MXFP4 (E2M1)
packer used by the synthetic checkpoints.

The four quantization formats (see ``shared/reference/formats.md`` section 3):

- ``"bf16"``: no quantization.
- ``"fp8-block"``: ``quant_method: fp8`` with ``weight_block_size`` (DeepSeek-V3).
- ``"ct-int4"``: compressed-tensors ``pack-quantized`` W4A16, group 32 (Kimi-K2.5).
- ``"quark-mxfp4"``: Quark fp4 per-group-32 with e8m0 scales (amd/Kimi-K2.5-MXFP4).
"""

from __future__ import annotations

from typing import Any

import torch

from .config import QUANT_FORMATS as QUANT_FORMATS
from .config import QuantSpec, checkpoint_names, quant_of
from .errors import UnsupportedFormatError
from .registry import FORMATS

#: safetensors dtype spelling -> torch dtype
TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "U16": torch.uint16,
    "I16": torch.int16,
    "U32": torch.uint32,
    "I32": torch.int32,
    "U64": torch.uint64,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}


def layer_index(name: str) -> int | None:
    """``i`` of the first ``layers.{i}.`` in a tensor or parameter name, else ``None``."""
    parts = name.split(".")
    for k, p in enumerate(parts[:-1]):
        if p == "layers" and parts[k + 1].isdigit():
            return int(parts[k + 1])
    return None


def quantization_config(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``quantization_config`` of a config: at the top level (where the exporters
    write it for the Kimi-K2.5 wrapper) or inside ``text_config``."""
    if not isinstance(config, dict):
        return None
    qc = config.get("quantization_config")
    if qc is None and isinstance(config.get("text_config"), dict):
        qc = config["text_config"].get("quantization_config")
    return qc


#: The validated :class:`~kimi_loader.config.QuantSpec` of a ``config.json`` dict.
quant_spec = quant_of


def detect_quant_format(config: dict[str, Any] | None, *, file: str | None = None) -> str:
    """Returns one of :data:`QUANT_FORMATS` for a ``config.json`` dict.

    Raises :class:`UnsupportedFormatError` for a quantization method or variant this
    library cannot load (naming what it found), :class:`ConfigError` for a malformed one.
    """
    return quant_spec(config, file=file).method


#: checkpoint suffixes that mark a linear's storage format (every format's, once)
_FORMAT_SUFFIXES = tuple(dict.fromkeys(s for f in FORMATS.values() for s in f.suffixes if s != "weight_shape"))


def stored_suffixes(ck: Any, name: str) -> dict[str, str]:
    """Suffix -> safetensors dtype of the tensors checkpoint ``ck`` stores for the linear
    whose checkpoint name is ``name`` (``{}``: none)."""
    return {s: ck.tensor_info(f"{name}.{s}").st_dtype for s in _FORMAT_SUFFIXES if f"{name}.{s}" in ck}


def format_matching(stored: dict[str, str]) -> Any:
    """The :class:`~kimi_loader.registry.Format` a linear stored as ``stored`` (suffix ->
    dtype) is in, or ``None``."""
    return next((f for f in FORMATS.values() if f.matches(stored)), None)


class ModuleFormats:
    """The storage format of every linear, decided in one place.

    With a checkpoint, a module's format comes from its own tensors (the first
    :class:`~kimi_loader.registry.Format` that :meth:`~kimi_loader.registry.Format.matches`
    them: ``weight_packed`` I32 -> ct-int4; ``weight`` F8_E4M3 -> fp8-block; ``weight`` U8 +
    ``weight_scale`` -> quark-mxfp4; a float ``weight`` -> bf16), cross-checked with the
    config: a quantized tensor of another method than the config's is refused. So a
    linear that an exporter left in BF16 without listing it anywhere loads as BF16.
    Without a checkpoint, the config decides (``ignore`` / ``exclude`` /
    ``modules_to_not_convert`` lists, with or without the wrapper prefix).

    ``module`` names are canonical (``model.layers.3.mlp.experts.0.gate_proj``,
    ``lm_head``); the checkpoint may prefix them with ``language_model.``.
    """

    def __init__(self, spec: QuantSpec, checkpoint: Any = None) -> None:
        self.spec = spec
        self.checkpoint = checkpoint

    def _stored(self, module: str) -> dict[str, str] | None:
        for name in checkpoint_names(module):
            found = stored_suffixes(self.checkpoint, name)
            if found:
                return found
        return None

    def of(self, module: str) -> str:
        """The format of linear ``module``."""
        configured = self.spec.module_format(module)
        if self.checkpoint is None:
            return configured
        stored = self._stored(module)
        if stored is None:
            return configured  # absent: the planner reports it missing
        found = format_matching(stored)
        fmt = None if found is None else found.name
        if fmt is None:
            raise UnsupportedFormatError(
                f"linear '{module}' is stored as {sorted(stored.items())}, which is no format this library knows",
                file=getattr(self.checkpoint, "index_path", None),
                tensor=f"{module}.weight",
            )
        if fmt != "bf16" and fmt != self.spec.method:
            raise UnsupportedFormatError(
                f"linear '{module}' is stored as {fmt} but the config's quantization is {self.spec.method}",
                file=getattr(self.checkpoint, "index_path", None),
                tensor=f"{module}.weight",
            )
        return fmt


#: The 16 E2M1 (fp4) values by code; codes 8..15 are the negatives of 0..7.
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def e2m1_codes(values: torch.Tensor) -> torch.Tensor:
    """Maps values that are exactly representable in E2M1 to their 4-bit codes (uint8).

    Raises ``ValueError`` if any value is not an E2M1 value.
    """
    v = values.float()
    mag = v.abs()
    table = E2M1_VALUES[:8].to(v.device)
    idx = torch.searchsorted(table, mag.contiguous())
    idx = idx.clamp(max=7)
    if not torch.equal(table[idx], mag):
        raise ValueError("values are not exactly representable in E2M1")
    return (idx | (torch.signbit(v).to(torch.int64) << 3)).to(torch.uint8)


def pack_mxfp4(values: torch.Tensor) -> torch.Tensor:
    """Packs a ``[rows, cols]`` tensor of E2M1 values into uint8 ``[rows, cols // 2]``:
    two values per byte, the even element in the low nibble (the Quark / OCP layout)."""
    if values.dim() != 2 or values.shape[1] % 2:
        raise ValueError(f"expected [rows, even cols], got {tuple(values.shape)}")
    codes = e2m1_codes(values)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
