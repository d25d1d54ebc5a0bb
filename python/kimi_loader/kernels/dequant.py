"""Dequantization on the device: ct-int4, MXFP4 and FP8-block weights (any leading dims,
e.g. stacked experts ``[E, out, in]``) -> bf16 / fp16 / fp32, one Triton launch per
tensor, and the exact value decoders every kernel here shares.

The results equal :func:`kimi_loader.quant.dequantize` (the format registry's reference
rule) bit for bit: ct-int4 ``(q - 8) * scale`` rounded to the scale's dtype, MXFP4
``e2m1 * 2^(e - 127)``, FP8 ``e4m3 * scale_inv`` in float32 (scales F32 / BF16 / F16 or
e8m0 bytes). The bf16, e8m0 and e4m3 decodes use integer bit operations, so they are
exact under the Triton interpreter too.

Every kernel meant to be bit exact (these, the device executor's, the quantizers) is
launched with :data:`EXACT`: no contraction of a multiply and an add into one fused
multiply-add (``fma`` rounds once where torch and the CPU round twice). The interpreter
never fuses; the CUDA backend does unless told not to (``tests/compile_for_gpu.py``
compiles every launch for sm_90 and counts the ``fma`` instructions left in the PTX).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import InvalidArgumentError
from ._device import on_device

__all__ = ["EXACT", "FAST", "dequantize", "dequantize_reference", "scale_code"]

#: launch options of the bit-exact kernels: IEEE operations as written, none fused
EXACT = {"enable_fp_fusion": False}
#: launch options of the tolerance-tested kernels (MoE, routing, MLA decode): multiply-adds
#: fused, said explicitly (Triton fuses by default up to 3.9; 3.10 turns the default off)
FAST = {"enable_fp_fusion": True}


# -- exact decoders (shared by plan_exec and moe) -----------------------------------------
@triton.jit
def _bf16_to_f32(u16):
    return (u16.to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _round_bf16(v):
    """float32 -> the nearest bf16 value (ties to even), as float32; NaN stays NaN (a
    GPU's NaN is 0x7FFFFFFF, which the rounding carry would make -0)."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(v != v, (bits | 0x00400000) & 0xFFFF0000, rounded).to(tl.float32, bitcast=True)


@triton.jit
def _e8m0(e):
    bits = tl.where(e == 0, 1 << 22, e.to(tl.uint32) << 23)
    v = bits.to(tl.float32, bitcast=True)
    return tl.where(e == 255, float("nan"), v)


@triton.jit
def _e4m3(b):
    """An e4m3fn byte's value as float32, built from its bits (no ``exp2``: the GPU's is an
    approximation, and flushes subnormals to zero)."""
    b = b.to(tl.int32)
    sign = tl.where((b & 0x80) != 0, -1.0, 1.0)
    exp = (b >> 3) & 0xF
    man = b & 7
    normal = (((exp + 120) << 23) | (man << 20)).to(tl.float32, bitcast=True)  # (1 + m/8) * 2^(exp - 7)
    sub = man.to(tl.float32) * 0.001953125  # m * 2^-9
    v = tl.where(exp == 0, sub, normal)
    v = tl.where((exp == 15) & (man == 7), float("nan"), v)
    return sign * v


@triton.jit
def _e2m1(code):
    """An E2M1 code's value as float32, built from its bits, the sign bit too: Triton 3.6
    (3.9 does not) compiles a float's unary minus to ``0 - v``, which makes code 8 (-0) +0."""
    mag = (code & 7).to(tl.int32)
    e = mag >> 1
    m = mag & 1
    v = tl.where(e == 0, m.to(tl.float32) * 0.5, (((e + 126) << 23) | (m << 22)).to(tl.float32, bitcast=True))
    return (v.to(tl.uint32, bitcast=True) | ((code & 8).to(tl.uint32) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _scale_at(ptr, idx, mask, SDT: tl.constexpr):
    """Scales at element indices ``idx`` of a scale tensor at byte pointer ``ptr``, as
    float32: ``SDT`` 1 bf16, 2 fp16, 3 fp32, 4 e8m0 bytes."""
    if SDT == 1:
        return _bf16_to_f32(tl.load(ptr.to(tl.pointer_type(tl.uint16)) + idx, mask=mask, other=0))
    elif SDT == 2:
        return tl.load(ptr.to(tl.pointer_type(tl.float16)) + idx, mask=mask, other=0).to(tl.float32)
    elif SDT == 3:
        return tl.load(ptr.to(tl.pointer_type(tl.float32)) + idx, mask=mask, other=0)
    else:
        return _e8m0(tl.load(ptr.to(tl.pointer_type(tl.uint8)) + idx, mask=mask, other=0))


@triton.jit
def _int4_value(code, s, SDT: tl.constexpr):
    """ct-int4: ``(code - 8) * s`` rounded to the scale's dtype, as float32."""
    v = (code - 8).to(tl.float32) * s
    if SDT == 1:
        v = _round_bf16(v)
    elif SDT == 2:
        v = v.to(tl.float16).to(tl.float32)
    return v


# -- the dequantization kernel ------------------------------------------------------------
@triton.jit
def _dequant(
    w,
    s,
    out,
    ROWS,
    COLS,
    W_ROW,
    S_ROW,
    S_MAT,
    BR,
    BC,
    FMT: tl.constexpr,
    SDT: tl.constexpr,
    DST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Matrix ``program_id(2)`` of a stack; a block of rows x columns. ``w`` bytes
    (``W_ROW`` per row), ``s`` bytes of scales (``S_ROW`` elements per row of the grid,
    ``S_MAT`` per matrix), grid cells of ``BR`` x ``BC`` values."""
    mat = tl.program_id(2).to(tl.int64)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = (r[:, None] < ROWS) & (c[None, :] < COLS)
    row_at = w + (mat * ROWS + r[:, None]).to(tl.int64) * W_ROW
    sidx = mat * S_MAT + (r[:, None] // BR) * S_ROW + c[None, :] // BC
    sc = _scale_at(s, sidx, m, SDT)
    if FMT == 3:
        v = _e4m3(tl.load(row_at + c[None, :], mask=m, other=0)) * sc
    else:
        byte = tl.load(row_at + c[None, :] // 2, mask=m, other=0).to(tl.int32)
        code = (byte >> ((c[None, :] % 2) * 4)) & 0xF
        if FMT == 1:
            v = _int4_value(code, sc, SDT)
        else:
            v = _e2m1(code) * sc
    o = out + (mat * ROWS + r[:, None]).to(tl.int64) * COLS + c[None, :]
    tl.store(o, v.to(DST), mask=m)


_DATA = {"ct-int4": ("weight_packed", "weight_scale", 1), "quark-mxfp4": ("weight", "weight_scale", 2)}
_DATA["fp8-block"] = ("weight", "weight_scale_inv", 3)
_OUT = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def scale_code(scale: torch.Tensor) -> int:
    """The kernels' code of a scale dtype: 1 bf16, 2 fp16, 3 fp32, 4 e8m0 (uint8 bytes)."""
    if scale.element_size() == 1:
        return 4
    code = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}.get(scale.dtype)
    if code is None:
        raise InvalidArgumentError(f"scales of dtype {scale.dtype} are not supported")
    return code


def dequantize(
    fmt: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype, fp8_block: tuple[int, int] = (128, 128)
) -> torch.Tensor:
    """Dense weight ``[..., out, in]`` in ``dtype`` of a linear (or a stack of them) stored
    as ``tensors`` (suffix -> tensor) in ``fmt``, computed on the tensors' device; plain
    formats are converted. Same arguments and result as :func:`kimi_loader.quant.dequantize`."""
    if fmt not in _DATA:
        return dequantize_reference(fmt, tensors, dtype, fp8_block)
    if dtype not in _OUT:
        raise InvalidArgumentError(f"dequantize to {dtype}: bfloat16, float16 or float32 only")
    data_key, scale_key, code = _DATA[fmt]
    try:
        w, s = tensors[data_key], tensors[scale_key]
    except KeyError as e:
        raise InvalidArgumentError(f"{fmt} dequantization needs {data_key!r} and {scale_key!r}") from e
    if w.dim() < 2 or s.dim() != w.dim() or w.shape[:-2] != s.shape[:-2]:
        raise InvalidArgumentError(f"{fmt}: {data_key} {list(w.shape)} and {scale_key} {list(s.shape)} do not match")
    lead = w.shape[:-2]
    rows = w.shape[-2]
    cols = w.shape[-1] * {1: 8, 2: 2, 3: 1}[code]
    if code == 3:
        br, bc = fp8_block
        want = [-(-rows // br), -(-cols // bc)]
    else:
        br, bc = 1, cols // max(s.shape[-1], 1)
        want = [rows, cols // bc if bc else 0]
    if list(s.shape[-2:]) != want or bc < 1:
        raise InvalidArgumentError(
            f"{fmt}: {scale_key} {list(s.shape)} is not the scale grid of a {rows} x {cols} weight ({want})"
        )
    n = 1
    for d in lead:
        n *= d
    out = torch.empty(*lead, rows, cols, dtype=dtype, device=w.device)
    if out.numel() == 0:
        return out
    wb = w.contiguous().view(torch.uint8)
    sb = s.contiguous().view(torch.uint8) if s.element_size() == 1 else s.contiguous()
    block_r, block_c = 16, 64
    with on_device(fmt, **{data_key: w, scale_key: s}):
        _dequant[(triton.cdiv(rows, block_r), triton.cdiv(cols, block_c), n)](
            wb,
            sb,
            out,
            rows,
            cols,
            wb.shape[-1],
            want[1],
            want[0] * want[1],
            br,
            bc,
            FMT=code,
            SDT=scale_code(s),
            DST=_OUT[dtype],
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            **EXACT,
        )
    return out


def dequantize_reference(
    fmt: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype, fp8_block: tuple[int, int] = (128, 128)
) -> torch.Tensor:
    """The reference: the format registry's torch rule (:func:`kimi_loader.quant.dequantize`)."""
    from ..quant import dequantize as reference

    return reference(fmt, tensors, dtype, fp8_block)
