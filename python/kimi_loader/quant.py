"""Reference dequantizers in torch: the CPU runtime path and the oracle for kernels.

Each works on a single linear (``[out, ...]``) or a stack of them (``[E, out, ...]``) and
reproduces the reference libraries bit for bit (tests compare with compressed-tensors):

- ct-int4: ``(q - 8) * scale`` computed in the scale's dtype (compressed-tensors).
- Quark MXFP4: ``e2m1(code) * 2^(e - 127)``; ``e = 255`` is NaN (OCP MX).
- FP8 block: ``float(w) * scale_inv[r // br, c // bc]`` in float32.
"""

from __future__ import annotations

import torch

from .formats import E2M1_VALUES

__all__ = ["dequant_fp8_block", "dequant_int4", "dequant_mxfp4", "dequantize", "unpack_int4"]


def _nibbles(packed_bytes: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., n]`` -> codes ``[..., 2n]``, the low nibble first."""
    return torch.stack((packed_bytes & 0xF, packed_bytes >> 4), dim=-1).reshape(*packed_bytes.shape[:-1], -1)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[..., in/8]`` (value + 8 in bits ``[4j, 4j+4)`` of each word) -> int8
    ``[..., in]``. Assumes a little-endian host, like the checkpoints."""
    return (_nibbles(packed.contiguous().view(torch.uint8)).to(torch.int16) - 8).to(torch.int8)


def dequant_int4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """ct-int4 ``weight_packed`` + ``weight_scale`` ``[..., in/group]`` -> dense."""
    q = unpack_int4(packed)
    group = q.shape[-1] // scale.shape[-1]
    out = q.to(scale.dtype) * scale.repeat_interleave(group, dim=-1)
    return out.to(dtype or scale.dtype)


def dequant_mxfp4(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Quark MXFP4 ``weight`` uint8 ``[..., in/2]`` + e8m0 ``weight_scale`` ``[..., in/32]``."""
    vals = E2M1_VALUES.to(weight.device)[_nibbles(weight).long()]
    exp = scale.to(torch.int32)
    s = torch.where(exp == 255, torch.nan, torch.exp2((exp - 127).to(torch.float32)))
    group = vals.shape[-1] // scale.shape[-1]
    return (vals * s.repeat_interleave(group, dim=-1)).to(dtype)


def dequant_fp8_block(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """FP8 block ``weight`` ``[..., out, in]`` + ``weight_scale_inv`` ``[..., ceil(out/br), ceil(in/bc)]``."""
    rows, cols = weight.shape[-2:]
    grid = scale_inv.float().repeat_interleave(block[0], dim=-2)[..., :rows, :]
    grid = grid.repeat_interleave(block[1], dim=-1)[..., :cols]
    return (weight.float() * grid).to(dtype)


def dequantize(
    fmt: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype, fp8_block: tuple[int, int] = (128, 128)
) -> torch.Tensor:
    """Dense weight of a linear stored as ``tensors`` (suffix -> tensor) in format ``fmt``
    (see :mod:`kimi_loader.registry`)."""
    from .registry import format_of

    return format_of(fmt).dequantize(tensors, dtype, fp8_block)
