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

from .errors import UnsupportedFormatError

QUANT_FORMATS = ("bf16", "fp8-block", "ct-int4", "quark-mxfp4")

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
    """The ``quantization_config`` of a config, looking inside ``text_config`` too."""
    if not config:
        return None
    qc = config.get("quantization_config")
    if qc is None and isinstance(config.get("text_config"), dict):
        qc = config["text_config"].get("quantization_config")
    return qc


def detect_quant_format(config: dict[str, Any] | None, *, file: str | None = None) -> str:
    """Returns one of :data:`QUANT_FORMATS` for a ``config.json`` dict.

    Raises :class:`UnsupportedFormatError` for a quantization method or variant this
    library cannot load (naming what it found).
    """
    qc = quantization_config(config)
    if not qc:
        return "bf16"

    def unsupported(why: str) -> UnsupportedFormatError:
        return UnsupportedFormatError(f"{file or 'config.json'}: unsupported quantization: {why}",
                                      file=file)

    method = qc.get("quant_method")
    if method == "fp8":
        block = qc.get("weight_block_size")
        if not (isinstance(block, (list, tuple)) and len(block) == 2):
            raise unsupported(f"fp8 without a 2-D weight_block_size (got {block!r})")
        return "fp8-block"
    if method == "compressed-tensors":
        if qc.get("format") != "pack-quantized":
            raise unsupported(f"compressed-tensors format {qc.get('format')!r} (only pack-quantized)")
        for name, group in (qc.get("config_groups") or {}).items():
            w = group.get("weights") or {}
            if w.get("num_bits") != 4 or w.get("type", "int") != "int":
                raise unsupported(f"compressed-tensors group {name!r} is not int4 ({w.get('num_bits')} bits)")
        return "ct-int4"
    if method == "quark":
        weight = (qc.get("global_quant_config") or {}).get("weight") or {}
        if weight.get("dtype") != "fp4":
            raise unsupported(f"quark weight dtype {weight.get('dtype')!r} (only fp4 / MXFP4)")
        return "quark-mxfp4"
    raise unsupported(f"quant_method {method!r}")


#: The 16 E2M1 (fp4) values by code; codes 8..15 are the negatives of 0..7.
E2M1_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
)


def e2m1_codes(values: torch.Tensor) -> torch.Tensor:
    """Maps values that are exactly representable in E2M1 to their 4-bit codes (uint8).

    Raises ``ValueError`` if any value is not an E2M1 value.
    """
    v = values.float()
    mag = v.abs()
    table = E2M1_VALUES[:8]
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
