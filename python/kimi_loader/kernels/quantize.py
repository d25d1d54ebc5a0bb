"""Quantize-on-sync on the device: bf16 / fp16 / fp32 weights ``[out, in]`` -> ct-int4
(both rules), MXFP4 and FP8-block (float32 scales), one Triton launch per weight.

Each kernel reproduces its torch reference in :mod:`kimi_loader.quant` bit for bit (the
Rust CPU quantizers do too): the same float32 operations in the same order, divisions
correctly rounded (``div_rn``, as torch divides tensors on every device), quotients
rounded to the dtype torch would compute them in, rounding to integers half to even, and
the E2M1 / e4m3fn encodings done with integer bit operations. bf16 inputs are read as
their bits and widened exactly, so the Triton interpreter (``TRITON_INTERPRET=1``, how the
tests run these on CPU tensors) computes what a GPU computes. A weight holding NaN or an
infinity is refused with :class:`~kimi_loader.InvalidArgumentError` naming it, as the
references do.

:func:`kimi_loader.quant.quantize_int4` / ``quantize_mxfp4`` / ``quantize_fp8_block``
send device tensors here; the references stay the oracle (``quantize_*_torch``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..errors import InvalidArgumentError
from ._device import on_device
from .dequant import EXACT, _bf16_to_f32, _round_bf16

__all__ = ["quantize_fp8_block", "quantize_int4", "quantize_mxfp4", "takes"]

_IN = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}
_ROWS = 16  # weight rows per program (int4, MXFP4)


def takes(w: torch.Tensor, group: int = 2) -> bool:
    """Whether these kernels take ``w``: a 2-D bf16 / fp16 / fp32 tensor whose groups
    are a power of two of at least 2 columns (the tile width of a program)."""
    return w.dim() == 2 and w.dtype in _IN and group >= 2 and group & (group - 1) == 0


@triton.jit
def _load_f32(ptr, offs, mask, IN: tl.constexpr):
    """float32 values of a bf16 (``IN`` 1, read as int16 bits) / fp16 / fp32 weight."""
    if IN == 1:
        return _bf16_to_f32(tl.load(ptr + offs, mask=mask, other=0).to(tl.uint16, bitcast=True))
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _as_dtype(v, DT: tl.constexpr):
    """float32 ``v`` rounded to the dtype ``DT`` (1 bf16, 2 fp16, 3 fp32), as float32."""
    if DT == 1:
        return _round_bf16(v)
    if DT == 2:
        return v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def _rne(x):
    """Rounds float32 ``x`` (small integers' range) to the nearest integer, ties to even.
    The floor is an integer truncation corrected by one below zero (the GPU's ``floor``
    flushes subnormals to zero)."""
    t = x.to(tl.int32)  # toward zero
    f = (t - (t.to(tl.float32) > x).to(tl.int32)).to(tl.float32)
    d = x - f
    odd = (f.to(tl.int32) & 1) != 0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _nonfinite(bad, v, mask):
    """Counts the non-finite values of ``v`` (where ``mask``) into ``bad`` (one int32)."""
    n = tl.sum(tl.where(mask & ((v != v) | (tl.abs(v) == float("inf"))), 1, 0), axis=None)
    if n > 0:
        tl.atomic_add(bad, n)


@triton.jit
def _pack_pairs(codes, ROWS: tl.constexpr, G: tl.constexpr):
    """``[ROWS, G]`` 4-bit codes -> ``[ROWS, G // 2]`` bytes, the even column in the low
    nibble (ct-int4's int32 words and MXFP4's bytes alike, on a little-endian device)."""
    pairs = tl.reshape(codes, (ROWS, G // 2, 2))
    shift = tl.arange(0, 2)[None, None, :] * 4
    return tl.sum(pairs << shift, axis=2).to(tl.uint8)


@triton.jit
def _int4_kernel(
    w,
    packed,
    scale,
    bad,
    OUT,
    IN_COLS,
    GROUP: tl.constexpr,
    IN: tl.constexpr,
    SDT: tl.constexpr,
    QDT: tl.constexpr,
    QAT: tl.constexpr,
    ROWS: tl.constexpr,
):
    """One program: ``ROWS`` rows x one group. ``QDT``: the dtype torch divides in (the
    promotion of the weight's and the scale's); the QAT rule divides in float32."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    grp = tl.program_id(1)
    c = grp * GROUP + tl.arange(0, GROUP)
    rmask = r < OUT
    m = rmask[:, None] & (c[None, :] < IN_COLS)
    offs = r[:, None].to(tl.int64) * IN_COLS + c[None, :]
    g = _load_f32(w, offs, m, IN)
    _nonfinite(bad, g, m)
    if QAT:
        s = tl.math.div_rn(tl.max(tl.abs(g), axis=1), tl.full((ROWS,), 7.0, tl.float32))
        s = tl.maximum(s, 1e-5)
    else:
        lo = tl.minimum(tl.min(g, axis=1), 0.0)
        hi = tl.maximum(tl.max(g, axis=1), 0.0)
        s = tl.math.div_rn(tl.maximum(tl.abs(lo), tl.abs(hi)), tl.full((ROWS,), 7.5, tl.float32))
        s = tl.where(s == 0.0, 1.1920928955078125e-07, s)
    s = _as_dtype(s, SDT)  # the stored scale
    quot = tl.math.div_rn(g, tl.broadcast_to(s[:, None], (ROWS, GROUP)))
    if not QAT:
        quot = _as_dtype(quot, QDT)
    # a scale that underflowed to 0 in its dtype (fp16) makes 0 / 0: NaN, which torch
    # turns into 0 when it converts to int8 (and GPUs' max / min would drop it): 0 here
    quot = tl.where(quot != quot, 0.0, quot)
    if QAT:
        q = tl.minimum(tl.maximum(_rne(quot), -7.0), 7.0)
    else:
        q = _rne(tl.minimum(tl.maximum(quot, -8.0), 7.0))
    codes = (q.to(tl.int32) + 8) & 0xF
    cols = grp * (GROUP // 2) + tl.arange(0, GROUP // 2)
    row_bytes = IN_COLS // 2
    tl.store(
        packed + r[:, None].to(tl.int64) * row_bytes + cols[None, :],
        _pack_pairs(codes, ROWS, GROUP),
        mask=rmask[:, None],
    )
    groups = IN_COLS // GROUP
    sp = scale + r.to(tl.int64) * groups + grp
    if SDT == 1:
        tl.store(sp, (s.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.int16, bitcast=True), mask=rmask)
    elif SDT == 2:
        tl.store(sp, s.to(tl.float16), mask=rmask)
    else:
        tl.store(sp, s, mask=rmask)


@triton.jit
def _mxfp4_kernel(w, packed, scale, bad, OUT, IN_COLS, GROUP: tl.constexpr, IN: tl.constexpr, ROWS: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    grp = tl.program_id(1)
    c = grp * GROUP + tl.arange(0, GROUP)
    rmask = r < OUT
    m = rmask[:, None] & (c[None, :] < IN_COLS)
    g = _load_f32(w, r[:, None].to(tl.int64) * IN_COLS + c[None, :], m, IN)
    _nonfinite(bad, g, m)
    amax = tl.max(tl.abs(g), axis=1)
    # the absmax rounded to a power of two with E2M1's one mantissa bit; exponent - 2
    ef = (((amax.to(tl.uint32, bitcast=True) + (1 << 21)) >> 23) & 0xFF).to(tl.int32)
    e8 = tl.where(ef == 0, 0, tl.where(ef == 255, 255, tl.maximum(ef - 2, 0)))
    bits = tl.where(e8 == 0, 1 << 22, e8.to(tl.uint32) << 23)  # 2^(e8 - 127), 2^-127 subnormal
    s = tl.where(e8 == 255, float("inf"), bits.to(tl.float32, bitcast=True))
    x = tl.math.div_rn(g, tl.broadcast_to(s[:, None], (ROWS, GROUP)))
    x = tl.minimum(tl.maximum(x, -6.0), 6.0)
    mag = tl.abs(x)
    # the nearest E2M1 magnitude (0, .5, 1, 1.5, 2, 3, 4, 6): count the midpoints passed;
    # a value on a midpoint goes to the even code
    idx = (
        (mag > 0.25).to(tl.int32)
        + (mag > 0.75).to(tl.int32)
        + (mag > 1.25).to(tl.int32)
        + (mag > 1.75).to(tl.int32)
        + (mag > 2.5).to(tl.int32)
        + (mag > 3.5).to(tl.int32)
        + (mag > 5.0).to(tl.int32)
        + ((mag == 0.75) | (mag == 1.75) | (mag == 3.5)).to(tl.int32)
    )
    codes = idx | tl.where(x < 0.0, 8, 0)
    cols = grp * (GROUP // 2) + tl.arange(0, GROUP // 2)
    tl.store(
        packed + r[:, None].to(tl.int64) * (IN_COLS // 2) + cols[None, :],
        _pack_pairs(codes, ROWS, GROUP),
        mask=rmask[:, None],
    )
    tl.store(scale + r.to(tl.int64) * (IN_COLS // GROUP) + grp, e8.to(tl.uint8), mask=rmask)


@triton.jit
def _e4m3_code(v):
    """float32 ``v`` in [-448, 448] -> its e4m3fn byte, rounded to nearest even (as
    torch converts)."""
    bits = v.to(tl.uint32, bitcast=True)
    sign = (bits >> 31) << 7
    mb = bits & 0x7FFFFFFF
    # normal: keep 3 mantissa bits, rounding (with carry into the exponent); rebias 127 -> 7
    normal = ((mb + 0x7FFFF + ((mb >> 20) & 1)) >> 20) - (120 << 3)
    # subnormal (below 2^-6): the nearest multiple of 2^-9
    sub = _rne(mb.to(tl.float32, bitcast=True) * 512.0).to(tl.uint32)
    return (sign | tl.where(mb >= 0x3C800000, normal, sub)).to(tl.uint8)


@triton.jit
def _fp8_kernel(w, q, inv, bad, OUT, IN_COLS, BR, BC, IN: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr):
    """One program: one ``BR x BC`` tile (``TR x TC``, powers of two, covering it)."""
    tr = tl.program_id(0)
    tc = tl.program_id(1)
    r = tr * BR + tl.arange(0, TR)
    c = tc * BC + tl.arange(0, TC)
    m = ((r < OUT) & (r < tr * BR + BR))[:, None] & ((c < IN_COLS) & (c < tc * BC + BC))[None, :]
    offs = r[:, None].to(tl.int64) * IN_COLS + c[None, :]
    x = _load_f32(w, offs, m, IN)
    _nonfinite(bad, x, m)
    amax = tl.max(tl.max(tl.where(m, tl.abs(x), 0.0), axis=1), axis=0)
    one = tl.full((), 1.0, tl.float32)
    # torch evaluates ``448 / amax`` (a number over a tensor) as ``reciprocal(amax) * 448``
    s = tl.where(amax > 0.0, tl.math.div_rn(one, tl.where(amax > 0.0, amax, one)) * 448.0, one)
    tl.store(inv + tr * tl.cdiv(IN_COLS, BC) + tc, tl.math.div_rn(one, s))
    y = tl.minimum(tl.maximum(x * s, -448.0), 448.0)
    tl.store(q + offs, _e4m3_code(y), mask=m)


def _checked(bad: torch.Tensor, what: str) -> None:
    if int(bad.item()):
        raise InvalidArgumentError(f"{what}: holds NaN or infinite values; refusing to quantize it", tensor=what)


def _promoted(w: torch.Tensor, scale_dtype: torch.dtype) -> int:
    """The dtype code torch divides ``w`` by a ``scale_dtype`` scale in."""
    return _IN[torch.promote_types(w.dtype, scale_dtype)]


def _source(w: torch.Tensor, what: str) -> tuple[torch.Tensor, int, int]:
    if w.dim() != 2 or w.dtype not in _IN:
        raise InvalidArgumentError(f"{what}: a 2-D bf16 / fp16 / fp32 weight is needed, got {w.dtype} {list(w.shape)}")
    w = w.contiguous()
    return (w.view(torch.int16) if w.dtype == torch.bfloat16 else w), w.shape[0], w.shape[1]


def _grouped(w: torch.Tensor, group: int, what: str) -> tuple[torch.Tensor, int, int]:
    src, out, inp = _source(w, what)
    if not takes(w, group) or inp % group:
        raise InvalidArgumentError(
            f"{what}: {w.shape[1]} input columns in groups of {group}: the device quantizers take power-of-two "
            "groups that divide the columns",
            tensor=what,
        )
    return src, out, inp


def quantize_int4(
    w: torch.Tensor,
    *,
    group: int,
    rule: str = "compressed-tensors",
    scale_dtype: torch.dtype = torch.bfloat16,
    what: str = "",
) -> dict[str, torch.Tensor]:
    """``w`` ``[out, in]`` -> ``weight_packed`` int32 ``[out, in/8]``, ``weight_scale``
    ``[out, in/group]`` (bf16 / fp16 / fp32), ``weight_shape``; on ``w``'s device. Rules
    as :func:`kimi_loader.quant.quantize_int4_torch`, which this equals bit for bit."""
    from ..quant import INT4_RULES

    if rule not in INT4_RULES:
        raise InvalidArgumentError(f"int4 quantization rule must be one of {INT4_RULES}, got {rule!r}")
    if scale_dtype not in _IN:
        raise InvalidArgumentError(f"{what}: scale dtype {scale_dtype} is not bf16 / fp16 / fp32", tensor=what)
    src, out, inp = _grouped(w, group, what)
    if group % 8:
        raise InvalidArgumentError(f"{what}: int4 groups of {group} columns do not fill int32 words", tensor=what)
    packed = torch.empty(out, inp // 8, dtype=torch.int32, device=w.device)
    scale = torch.empty(out, inp // group, dtype=scale_dtype, device=w.device)
    bad = torch.zeros(1, dtype=torch.int32, device=w.device)
    with on_device(what or "quantize_int4", w=w):
        if out and inp:
            _int4_kernel[(triton.cdiv(out, _ROWS), inp // group)](
                src,
                packed.view(torch.uint8),
                scale.view(torch.int16) if scale_dtype == torch.bfloat16 else scale,
                bad,
                out,
                inp,
                GROUP=group,
                IN=_IN[w.dtype],
                SDT=_IN[scale_dtype],
                QDT=_promoted(w, scale_dtype),
                QAT=rule == "int4-qat",
                ROWS=_ROWS,
                **EXACT,
            )
    _checked(bad, what)
    return {
        "weight_packed": packed,
        "weight_scale": scale,
        "weight_shape": torch.tensor([out, inp], dtype=torch.int32, device=w.device),
    }


def quantize_mxfp4(w: torch.Tensor, *, group: int = 32, what: str = "") -> dict[str, torch.Tensor]:
    """``w`` ``[out, in]`` -> ``weight`` uint8 ``[out, in/2]`` and ``weight_scale`` e8m0
    bytes ``[out, in/group]``; equals :func:`kimi_loader.quant.quantize_mxfp4_torch`."""
    src, out, inp = _grouped(w, group, what)
    packed = torch.empty(out, inp // 2, dtype=torch.uint8, device=w.device)
    scale = torch.empty(out, inp // group, dtype=torch.uint8, device=w.device)
    bad = torch.zeros(1, dtype=torch.int32, device=w.device)
    with on_device(what or "quantize_mxfp4", w=w):
        if out and inp:
            _mxfp4_kernel[(triton.cdiv(out, _ROWS), inp // group)](
                src, packed, scale, bad, out, inp, GROUP=group, IN=_IN[w.dtype], ROWS=_ROWS, **EXACT
            )
    _checked(bad, what)
    return {"weight": packed, "weight_scale": scale}


def quantize_fp8_block(
    w: torch.Tensor, *, block: tuple[int, int] = (128, 128), what: str = ""
) -> dict[str, torch.Tensor]:
    """``w`` ``[out, in]`` -> ``weight`` float8_e4m3fn and float32 ``weight_scale_inv``
    ``[ceil(out/br), ceil(in/bc)]``; equals :func:`kimi_loader.quant.quantize_fp8_block_torch`
    with float32 scales."""
    src, out, inp = _source(w, what)
    br, bc = block
    if br < 1 or bc < 1:
        raise InvalidArgumentError(f"{what}: FP8 block {block} must be positive", tensor=what)
    ob, ib = math.ceil(out / br), math.ceil(inp / bc)
    q = torch.empty(out, inp, dtype=torch.float8_e4m3fn, device=w.device)
    inv = torch.empty(ob, ib, dtype=torch.float32, device=w.device)
    bad = torch.zeros(1, dtype=torch.int32, device=w.device)
    with on_device(what or "quantize_fp8_block", w=w):
        if ob and ib:
            _fp8_kernel[(ob, ib)](
                src,
                q.view(torch.uint8),
                inv,
                bad,
                out,
                inp,
                br,
                bc,
                IN=_IN[w.dtype],
                TR=triton.next_power_of_2(br),
                TC=triton.next_power_of_2(bc),
                **EXACT,
            )
    _checked(bad, what)
    return {"weight": q, "weight_scale_inv": inv}
