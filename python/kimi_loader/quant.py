"""Reference dequantizers (and the quantizers of quantize-on-sync) in torch: the CPU
runtime path and the oracle for kernels.

Each works on a single linear (``[out, ...]``) or a stack of them (``[E, out, ...]``) and
reproduces the reference libraries bit for bit (tests compare with compressed-tensors):

- ct-int4: ``(q - 8) * scale`` computed in the scale's dtype (compressed-tensors).
- Quark MXFP4: ``e2m1(code) * 2^(e - 127)``; ``e = 255`` is NaN (OCP MX).
- FP8 block: ``float(w) * scale_inv[r // br, c // bc]`` in float32.

Quantizers (``w`` ``[out, in]`` in the trainer's dtype -> the stored tensors), for
:meth:`kimi_loader.WeightUpdater.update_from_tensors` with ``quantize=``:

- ct-int4, rule ``"compressed-tensors"``: compressed-tensors' symmetric group quantizer
  (``scale = max(|min(w, 0)|, max(w, 0)) / 7.5`` in float32, 0 -> float32 eps, stored in
  the scale dtype; ``q = clamp(round(w / scale), -8, 7)`` in ``w``'s dtype).
- ct-int4, rule ``"int4-qat"``: the Kimi int4 QAT rule (``scale = max(absmax / 7, 1e-5)``
  in float32, stored in the scale dtype; ``q = clamp(round(w / scale), -7, 7)`` in float32
  with the stored scale, so that ``q * scale`` is what the server computes).
- MXFP4: the OCP MX rule as compressed-tensors / Quark compute it (the group's absmax
  rounded to a power of two with E2M1's mantissa, shared exponent ``floor(log2) - 2``;
  elements rounded to the nearest E2M1 value, ties to even, saturating at 6).
- FP8 block: transformers' FineGrainedFP8 (``scale_inv = absmax / 448`` per block, 1 for
  an all-zero block, ``q = fp8(clamp(w * (448 / absmax)))``; ue8m0 scales rounded up to
  a power of two first).
"""

from __future__ import annotations

from typing import Any

import torch

from .formats import E2M1_VALUES

__all__ = [
    "INT4_RULES",
    "dequant_fp8_block",
    "dequant_int4",
    "dequant_mxfp4",
    "dequantize",
    "pack_int4",
    "quantize_fp8_block",
    "quantize_fp8_block_torch",
    "quantize_int4",
    "quantize_int4_torch",
    "quantize_mxfp4",
    "quantize_mxfp4_torch",
    "unpack_int4",
]

#: the int4 quantization rules of quantize-on-sync
INT4_RULES = ("compressed-tensors", "int4-qat")


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


# -- quantizers (quantize-on-sync) --------------------------------------------------------
def _finite(w: torch.Tensor, what: str) -> None:
    from .errors import InvalidArgumentError

    if not bool(torch.isfinite(w).all()):
        raise InvalidArgumentError(f"{what}: holds NaN or infinite values; refusing to quantize it", tensor=what)


def _grouped(w: torch.Tensor, group: int, what: str) -> tuple[int, int]:
    """``[out, in]`` of a weight quantized per group of ``group`` input columns, checked:
    finite, and ``in`` a multiple of the group."""
    from .errors import InvalidArgumentError

    out, inp = w.shape
    if group < 1 or inp % group:
        raise InvalidArgumentError(f"{what}: {inp} input columns are not a multiple of the group {group}", tensor=what)
    _finite(w, what)
    return out, inp


def _rust_takes(w: torch.Tensor) -> bool:
    """Whether the Rust quantizers take ``w``: a 2-D bf16 / float32 CPU tensor."""
    return w.device.type == "cpu" and w.dim() == 2 and w.dtype in (torch.bfloat16, torch.float32)


def _device_kernels(w: torch.Tensor, group: int = 2) -> Any:
    """The Triton quantizers (:mod:`kimi_loader.kernels.quantize`) when ``w`` lives on a
    device they take (a GPU; power-of-two groups), else ``None`` (the torch reference)."""
    if w.device.type == "cpu":
        return None
    try:
        from .kernels import quantize as kernels
    except ImportError:  # no Triton for this device: the torch reference runs there
        return None
    return kernels if kernels.takes(w, group) and w.shape[1] % group == 0 else None


def _even_groups(w: torch.Tensor, group: int, what: str) -> tuple[int, int]:
    """``[out, in]`` of a weight the Rust quantizers cut into groups of ``group`` (even)
    input columns, checked (finiteness is checked in Rust, in the same pass)."""
    from .errors import InvalidArgumentError

    out, inp = w.shape
    if group < 2 or group % 2 or inp % group:
        raise InvalidArgumentError(f"{what}: {inp} input columns are not a multiple of the group {group}", tensor=what)
    return out, inp


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 ``[..., in]`` in -8..7 -> int32 ``[..., in/8]`` (value + 8 in bits
    ``[4j, 4j+4)``; the inverse of :func:`unpack_int4`)."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    b = (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()
    return b.view(torch.int32)


def quantize_int4(
    w: torch.Tensor, *, group: int, rule: str = "compressed-tensors", scale_dtype: torch.dtype = torch.bfloat16, what=""
) -> dict[str, torch.Tensor]:
    """``w`` ``[out, in]`` -> ``weight_packed`` int32, ``weight_scale``, ``weight_shape``.

    CPU bf16 / float32 weights with bf16 / float32 scales are quantized in Rust, in
    parallel with the GIL released; GPU weights by a Triton kernel
    (:func:`kimi_loader.kernels.quantize.quantize_int4`); everything else by
    :func:`quantize_int4_torch`, the reference both equal bit for bit."""
    from .errors import InvalidArgumentError

    if rule not in INT4_RULES:
        raise InvalidArgumentError(f"int4 quantization rule must be one of {INT4_RULES}, got {rule!r}")
    kernels = _device_kernels(w, group)
    if kernels is not None and group % 8 == 0 and scale_dtype in (torch.bfloat16, torch.float16, torch.float32):
        return kernels.quantize_int4(w, group=group, rule=rule, scale_dtype=scale_dtype, what=what)
    if not _rust_takes(w) or scale_dtype not in (torch.bfloat16, torch.float32) or w.shape[1] % 8:
        return quantize_int4_torch(w, group=group, rule=rule, scale_dtype=scale_dtype, what=what)
    from . import _core

    out, inp = _even_groups(w, group, what)
    packed = torch.empty(out, inp // 8, dtype=torch.int32)
    scale = torch.empty(out, inp // group, dtype=scale_dtype)
    _core.quantize_int4(w.contiguous(), packed, scale, group, rule, what)
    return {
        "weight_packed": packed,
        "weight_scale": scale,
        "weight_shape": torch.tensor([out, inp], dtype=torch.int32),
    }


def quantize_int4_torch(
    w: torch.Tensor, *, group: int, rule: str = "compressed-tensors", scale_dtype: torch.dtype = torch.bfloat16, what=""
) -> dict[str, torch.Tensor]:
    """:func:`quantize_int4` in torch ops, on any device: the reference."""
    from .errors import InvalidArgumentError

    if rule not in INT4_RULES:
        raise InvalidArgumentError(f"int4 quantization rule must be one of {INT4_RULES}, got {rule!r}")
    out, inp = _grouped(w, group, what)
    g = w.reshape(out, inp // group, group)
    gf = g.float()
    if rule == "compressed-tensors":
        lo = torch.minimum(gf.amin(-1), torch.zeros((), device=w.device))
        hi = torch.maximum(gf.amax(-1), torch.zeros((), device=w.device))
        s = torch.maximum(lo.abs(), hi.abs()) / torch.tensor(7.5, device=w.device)
        s = torch.where(s == 0, torch.tensor(torch.finfo(torch.float32).eps, device=w.device), s)
        scale = s.to(scale_dtype)
        q = torch.round(torch.clamp(g / scale.unsqueeze(-1), -8, 7))
    else:
        # a 0-dim tensor on the weight's device, not a Python number: CUDA multiplies by the
        # reciprocal of a CPU scalar divisor, which is not always the quotient
        scale = torch.clamp(gf.abs().amax(-1) / torch.tensor(7.0, device=w.device), min=1e-5).to(scale_dtype)
        q = torch.clamp(torch.round(gf / scale.float().unsqueeze(-1)), -7, 7)
    q8 = q.to(torch.int8).reshape(out, inp)
    return {
        "weight_packed": pack_int4(q8),
        "weight_scale": scale.contiguous(),
        "weight_shape": torch.tensor([out, inp], dtype=torch.int32, device=w.device),
    }


def _round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value, ties to even, saturating at 6 (x float32)."""
    mag = x.abs()
    # the midpoints between consecutive E2M1 magnitudes; at a tie, the even one wins
    bounds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device=x.device)
    idx = torch.bucketize(mag, bounds, right=False)  # mag == bound -> the lower value
    up_at_tie = torch.tensor([False, True, False, True, False, True, False], device=x.device)  # 0.75->1 ...
    tie = (idx < 7) & (mag == bounds[idx.clamp(max=6)])
    idx = idx + (tie & up_at_tie[idx.clamp(max=6)]).to(idx.dtype)
    return E2M1_VALUES[:8].to(x.device)[idx] * torch.sign(x)


def quantize_mxfp4(w: torch.Tensor, *, group: int = 32, what="") -> dict[str, torch.Tensor]:
    """``w`` ``[out, in]`` -> ``weight`` uint8 (two E2M1 codes a byte, low nibble first)
    and ``weight_scale`` uint8 (e8m0).

    CPU bf16 / float32 weights are quantized in Rust (rows in parallel, GIL released), GPU
    weights by a Triton kernel; others by :func:`quantize_mxfp4_torch`, the reference
    both equal bit for bit."""
    kernels = _device_kernels(w, group)
    if kernels is not None:
        return kernels.quantize_mxfp4(w, group=group, what=what)
    if not _rust_takes(w):
        return quantize_mxfp4_torch(w, group=group, what=what)
    from . import _core

    out, inp = _even_groups(w, group, what)
    packed = torch.empty(out, inp // 2, dtype=torch.uint8)
    scale = torch.empty(out, inp // group, dtype=torch.uint8)
    _core.quantize_mxfp4(w.contiguous(), packed, scale, group, what)
    return {"weight": packed, "weight_scale": scale}


def quantize_mxfp4_torch(w: torch.Tensor, *, group: int = 32, what="") -> dict[str, torch.Tensor]:
    """:func:`quantize_mxfp4` in torch ops, on any device: the reference."""
    from .formats import pack_mxfp4

    out, inp = _grouped(w, group, what)
    g = w.float().reshape(out, inp // group, group)
    amax = torch.maximum(g.amin(-1).clamp(max=0).abs(), g.amax(-1).clamp(min=0))
    # round to a power of two with E2M1's 1 mantissa bit: add half an E2M1 ulp, keep sign + exponent
    bits = amax.view(torch.int32)
    p2 = ((bits + (1 << 21)) & (0xFF << 23)).view(torch.float32)  # amax >= 0: no sign bit
    e = 127 + torch.floor(torch.log2(p2)) - 2
    e8 = torch.round(torch.clamp(e, 0, 255)).to(torch.uint8)
    scale = torch.exp2(e8.to(torch.int32).float() - 127)
    vals = _round_e2m1(torch.clamp(g / scale.unsqueeze(-1), -6.0, 6.0)).reshape(out, inp)
    return {"weight": pack_mxfp4(vals), "weight_scale": e8.contiguous()}


def quantize_fp8_block(
    w: torch.Tensor, *, block: tuple[int, int] = (128, 128), scale_dtype: torch.dtype = torch.float32, what=""
) -> dict[str, torch.Tensor]:
    """``w`` ``[out, in]`` -> ``weight`` float8_e4m3fn and ``weight_scale_inv``
    ``[ceil(out/br), ceil(in/bc)]`` (float32, or e8m0 rounded up to a power of two).

    CPU bf16 / float32 weights with float32 scales are quantized in Rust (blocks of rows
    in parallel, GIL released), GPU weights with float32 scales by a Triton kernel;
    others by :func:`quantize_fp8_block_torch`, the reference both equal bit for bit."""
    kernels = _device_kernels(w)
    if kernels is not None and scale_dtype == torch.float32 and min(block) >= 1:
        return kernels.quantize_fp8_block(w, block=block, what=what)
    if not _rust_takes(w) or scale_dtype != torch.float32 or min(block) < 1:
        return quantize_fp8_block_torch(w, block=block, scale_dtype=scale_dtype, what=what)
    import math

    from . import _core

    out, inp = w.shape
    br, bc = block
    q = torch.empty(out, inp, dtype=torch.float8_e4m3fn)
    inv = torch.empty(math.ceil(out / br), math.ceil(inp / bc), dtype=torch.float32)
    _core.quantize_fp8_block(w.contiguous(), q, inv, br, bc, what)
    return {"weight": q, "weight_scale_inv": inv}


def quantize_fp8_block_torch(
    w: torch.Tensor, *, block: tuple[int, int] = (128, 128), scale_dtype: torch.dtype = torch.float32, what=""
) -> dict[str, torch.Tensor]:
    """:func:`quantize_fp8_block` in torch ops, on any device: the reference."""
    import math

    _finite(w, what)
    out, inp = w.shape
    br, bc = block
    ob, ib = math.ceil(out / br), math.ceil(inp / bc)
    padded = torch.zeros(ob * br, ib * bc, device=w.device)
    padded[:out, :inp] = w.float()
    tiles = padded.reshape(ob, br, ib, bc)
    fmax = torch.finfo(torch.float8_e4m3fn).max
    amax = tiles.abs().amax(dim=(1, 3))
    scales = torch.where(amax > 0, fmax / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.ones_like(amax))
    inv = (1.0 / scales).to(torch.float32)
    if scale_dtype == torch.float8_e8m0fnu:
        inv = torch.pow(2.0, torch.ceil(torch.log2(inv.clamp(min=torch.finfo(torch.float32).tiny)))).to(scale_dtype)
        scales = 1.0 / inv.to(torch.float32)
    else:
        inv = inv.to(scale_dtype)
    q = torch.clamp(tiles * scales[:, None, :, None], -fmax, fmax).to(torch.float8_e4m3fn)
    return {"weight": q.reshape(ob * br, ib * bc)[:out, :inp].contiguous(), "weight_scale_inv": inv.contiguous()}
