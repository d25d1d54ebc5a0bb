"""Fused MoE for decode and small prefill batches, reading ct-int4 or MXFP4 experts in
checkpoint layout (W4A16): no repacking, so hot-reloads stay plain byte copies.

Weights as the serving layout holds them: ``w13_weight_packed`` int32 ``[E, 2I, H/8]``
(each expert's gate rows, then its up rows; value + 8 in bits ``4j..4j+4`` of a word),
``w13_weight_scale`` ``[E, 2I, H/group]``, ``w2_weight_packed`` ``[E, H, I/8]``,
``w2_weight_scale`` ``[E, H, I/group]``. Dequantization is compressed-tensors'
``(q - 8) * scale`` rounded to the scale's dtype (bf16 decoded with integer operations,
so the Triton interpreter computes it exactly); products accumulate in float32.

Two launches: ``gate_up`` (one program per (token, slot) x block of ``I``: ``silu(gate) *
up``), then ``down`` (one program per (token, slot) x block of ``H``, scaled by the
routing weight); the ``K`` slots of a token are summed by one ``sum``. MXFP4 experts
(``w13_weight`` uint8 ``[E, 2I, H/2]`` + e8m0 scales) are read the same way.
Reference: :func:`moe_w4_reference` (dense dequantization + ``torch`` matmuls).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import InvalidArgumentError
from ..models.runtime import route_noaux_tc as _runtime_route
from ._device import on_device
from .dequant import FAST, _e2m1, _int4_value, _scale_at, scale_code

__all__ = ["moe_w4", "moe_w4_reference", "route_noaux_tc", "route_noaux_tc_reference"]


@triton.jit
def _w4(packed_row, scale_row, k, mask, SDT: tl.constexpr, GROUP: tl.constexpr, FMT: tl.constexpr):
    """Dequantized 4-bit values at columns ``k`` of one weight row (float32): ct-int4
    (``FMT`` 1: int32 words, ``(q - 8) * scale`` in the scale's dtype) or MXFP4 (``FMT`` 2:
    bytes of two E2M1 codes, times ``2^(e - 127)``)."""
    if FMT == 2:
        byte = tl.load(packed_row + k // 2, mask=mask, other=0).to(tl.int32)
        code = (byte >> ((k % 2) * 4)) & 0xF
        return _e2m1(code) * _scale_at(scale_row, k // GROUP, mask, 4)
    word = tl.load(packed_row + k // 8, mask=mask, other=0)
    q = (word >> ((k % 8) * 4)) & 0xF
    return _int4_value(q, _scale_at(scale_row, k // GROUP, mask, SDT), SDT)


@triton.jit
def _gate_up(
    x,
    ids,
    packed,
    scale,
    out,
    H,
    INTER,
    WORDS,
    GROUPS,
    K: tl.constexpr,
    GROUP: tl.constexpr,
    SDT: tl.constexpr,
    FMT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pair = tl.program_id(0).to(tl.int64)  # token * K + slot (int64: x hidden passes 2^31 at ~37k tokens)
    nb = tl.program_id(1)
    t = pair // K
    e = tl.load(ids + pair).to(tl.int64)
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < INTER
    gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
    up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < H
        xv = tl.load(x + t * H + k, mask=kmask, other=0.0).to(tl.float32)
        m2 = nmask[:, None] & kmask[None, :]
        g_rows = (e * 2 * INTER + n)[:, None]
        u_rows = (e * 2 * INTER + INTER + n)[:, None]
        wg = _w4(packed + g_rows * WORDS, scale + g_rows * GROUPS, k[None, :], m2, SDT, GROUP, FMT)
        wu = _w4(packed + u_rows * WORDS, scale + u_rows * GROUPS, k[None, :], m2, SDT, GROUP, FMT)
        gate += tl.sum(wg * xv[None, :], axis=1)
        up += tl.sum(wu * xv[None, :], axis=1)
    h = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out + pair * INTER + n, h, mask=nmask)


@triton.jit
def _down(
    h,
    ids,
    weights,
    packed,
    scale,
    out,
    H,
    INTER,
    WORDS,
    GROUPS,
    GROUP: tl.constexpr,
    SDT: tl.constexpr,
    FMT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pair = tl.program_id(0).to(tl.int64)
    nb = tl.program_id(1)
    e = tl.load(ids + pair).to(tl.int64)
    w = tl.load(weights + pair).to(tl.float32)
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < H
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, INTER, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < INTER
        hv = tl.load(h + pair * INTER + k, mask=kmask, other=0.0)
        rows = (e * H + n)[:, None]
        wd = _w4(
            packed + rows * WORDS, scale + rows * GROUPS, k[None, :], nmask[:, None] & kmask[None, :], SDT, GROUP, FMT
        )
        acc += tl.sum(wd * hv[None, :], axis=1)
    tl.store(out + pair * H + n, acc * w, mask=nmask)


@triton.jit
def _dot(a, w, DOT: tl.constexpr):
    """``a [M, K] @ w [N, K]^T`` accumulated in float32: in the activations' 16-bit dtype
    (``DOT`` 1 bf16, 2 fp16; the dequantized weights are values of the scale's dtype) or
    in IEEE float32 (``DOT`` 3; never TF32)."""
    if DOT == 1:
        return tl.dot(a.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
    if DOT == 2:
        return tl.dot(a.to(tl.float16), tl.trans(w.to(tl.float16)))
    return tl.dot(a, tl.trans(w), input_precision="ieee")


@triton.jit
def _gate_up_grouped(
    x,
    order,
    blk_expert,
    blk_start,
    blk_count,
    packed,
    scale,
    out,
    H,
    INTER,
    WORDS,
    GROUPS,
    K: tl.constexpr,
    GROUP: tl.constexpr,
    SDT: tl.constexpr,
    FMT: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program: up to ``BLOCK_M`` (token, slot) pairs routed to one expert x a block
    of ``I``: the expert's weight tile is read once for all of them."""
    b = tl.program_id(0)
    e = tl.load(blk_expert + b).to(tl.int64)
    if e >= 0:
        cnt = tl.load(blk_count + b)
        m = tl.arange(0, BLOCK_M)
        mmask = m < cnt
        # int64: (token, slot) x hidden passes 2^31 from ~37k prefill tokens at top-8
        pair = tl.load(order + tl.load(blk_start + b) + m, mask=mmask, other=0).to(tl.int64)
        tok = pair // K
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < INTER
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        g_rows = (e * 2 * INTER + n)[:, None]
        u_rows = (e * 2 * INTER + INTER + n)[:, None]
        for k0 in range(0, H, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < H
            xv = tl.load(x + tok[:, None] * H + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            m2 = nmask[:, None] & kmask[None, :]
            wg = _w4(packed + g_rows * WORDS, scale + g_rows * GROUPS, k[None, :], m2, SDT, GROUP, FMT)
            wu = _w4(packed + u_rows * WORDS, scale + u_rows * GROUPS, k[None, :], m2, SDT, GROUP, FMT)
            gate += _dot(xv.to(tl.float32), wg, DOT)
            up += _dot(xv.to(tl.float32), wu, DOT)
        h = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(out + pair[:, None] * INTER + n[None, :], h, mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _down_grouped(
    h,
    order,
    blk_expert,
    blk_start,
    blk_count,
    weights,
    packed,
    scale,
    out,
    H,
    INTER,
    WORDS,
    GROUPS,
    GROUP: tl.constexpr,
    SDT: tl.constexpr,
    FMT: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0)
    e = tl.load(blk_expert + b).to(tl.int64)
    if e >= 0:
        cnt = tl.load(blk_count + b)
        m = tl.arange(0, BLOCK_M)
        mmask = m < cnt
        # int64: (token, slot) x hidden passes 2^31 from ~37k prefill tokens at top-8
        pair = tl.load(order + tl.load(blk_start + b) + m, mask=mmask, other=0).to(tl.int64)
        w = tl.load(weights + pair, mask=mmask, other=0.0).to(tl.float32)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < H
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        rows = (e * H + n)[:, None]
        for k0 in range(0, INTER, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < INTER
            hv = tl.load(h + pair[:, None] * INTER + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            wd = _w4(
                packed + rows * WORDS,
                scale + rows * GROUPS,
                k[None, :],
                nmask[:, None] & kmask[None, :],
                SDT,
                GROUP,
                FMT,
            )
            acc += _dot(hv, wd, DOT)
        tl.store(out + pair[:, None] * H + n[None, :], acc * w[:, None], mask=mmask[:, None] & nmask[None, :])


#: weight tiles ``(BLOCK_N, BLOCK_K)`` of the MoE kernels compiled for sm_90 without
#: spilling (test_kernels_compile) and timed by benches/bench_kernels.py; the default
#: first (64 x 64 and 64 x 128 spill on sm_90 even with 8 warps)
TILES = ((32, 32), (32, 128), (16, 128), (16, 256))
#: (token, slot) pairs per program of the grouped kernels (tl.dot's smallest M)
_BLOCK_M = 16
#: from this many (token, slot) pairs on, the grouped kernels run (below: one program per pair)
GROUPED_FROM = 32


def _expert_blocks(ids: torch.Tensor, experts: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """The (token, slot) pairs sorted by expert and cut into blocks of at most ``block_m``
    pairs of one expert: ``(order, block expert (-1: unused), first pair in order, pairs)``,
    on the device without a host sync (the block count is bounded by ``pairs / block_m +
    experts``)."""
    flat = ids.reshape(-1).to(torch.int64)
    order = torch.argsort(flat, stable=True).to(torch.int32)
    counts = torch.bincount(flat, minlength=experts)[:experts]
    per = (counts + block_m - 1) // block_m
    ends = torch.cumsum(per, 0)
    bound = -(-flat.numel() // block_m) + experts
    b = torch.arange(bound, device=ids.device)
    expert = torch.searchsorted(ends, b, right=True)
    valid = expert < experts
    e = expert.clamp(max=experts - 1)
    local = b - (ends[e] - per[e])
    first = (torch.cumsum(counts, 0) - counts)[e] + local * block_m
    count = torch.clamp(counts[e] - local * block_m, max=block_m)
    return (
        order,
        torch.where(valid, e, -1).to(torch.int32),
        first.to(torch.int32),
        torch.where(valid, count, 0).to(torch.int32),
    )


def moe_w4(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    fmt: str = "ct-int4",
    grouped: bool | None = None,
    *,
    tile: tuple[int, int] = (32, 32),
) -> torch.Tensor:
    """``sum_k topk_weights[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t))`` with ``e =
    topk_ids[t, k]``, for ``x`` ``[T, H]``; returns ``[T, H]`` in ``x``'s dtype. ``fmt``:
    ``"ct-int4"`` (``w13`` int32 ``[E, 2I, H/8]``, scales bf16 / f16 / f32) or
    ``"quark-mxfp4"`` (``w13`` uint8 ``[E, 2I, H/2]``, e8m0 uint8 scales, group 32).

    ``grouped``: ``False``, one program per (token, slot) pair (decode: every expert
    tile is read by the pairs that chose it); ``True``, the pairs sorted by expert and
    blocks of 16 pairs of one expert multiplied with ``tl.dot`` (prefill: an expert's
    tile is read once per 16 pairs); ``None``: grouped from :data:`GROUPED_FROM` pairs.
    ``tile``: ``(BLOCK_N, BLOCK_K)`` of both kernels' weight tiles, powers of two from 16
    (:data:`TILES`: those checked for the GPU and timed there)."""
    ok = isinstance(tile, (tuple, list)) and len(tile) == 2 and all(type(b) is int for b in tile)
    if not ok or any(b < 16 or b & (b - 1) for b in tile):
        raise InvalidArgumentError(f"tile must be two powers of two from 16, got {tile!r}")
    per = {"ct-int4": 8, "quark-mxfp4": 2}.get(fmt)
    if per is None:
        raise InvalidArgumentError(f"fmt must be 'ct-int4' or 'quark-mxfp4', got {fmt!r}")
    t, hidden = x.shape
    k = topk_ids.shape[1]
    e, two_i, row = w13.shape
    inter = two_i // 2
    group = hidden // w13_scale.shape[-1]
    if row * per != hidden or w2.shape != (e, hidden, inter // per) or inter // w2_scale.shape[-1] != group:
        raise InvalidArgumentError("expert tensors do not match x / each other")
    with on_device(
        "moe_w4",
        x=x,
        topk_ids=topk_ids,
        topk_weights=topk_weights,
        w13=w13,
        w13_scale=w13_scale,
        w2=w2,
        w2_scale=w2_scale,
    ):
        sdt = scale_code(w13_scale)
        code = 2 if fmt == "quark-mxfp4" else 1
        x = x.contiguous()
        ids = topk_ids.to(torch.int32).contiguous()
        h = torch.empty(t * k, inter, dtype=torch.float32, device=x.device)
        block_n, block_k = tile
        # both launches; tiles above 32 x 32 take 8 warps (with 4 they spill on sm_90)
        warps = 4 if block_n * block_k <= 1024 else 8
        meta = dict(GROUP=group, SDT=sdt, FMT=code, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, **FAST)
        if grouped or (grouped is None and t * k >= GROUPED_FROM):
            blocks = _expert_blocks(ids, e, _BLOCK_M)
            dot = {torch.bfloat16: 1, torch.float16: 2}.get(x.dtype, 3)
            grid = len(blocks[1])
            _gate_up_grouped[(grid, triton.cdiv(inter, block_n))](
                x, *blocks, w13, w13_scale, h, hidden, inter, w13.shape[-1], w13_scale.shape[-1],
                K=k, DOT=dot, BLOCK_M=_BLOCK_M, **meta,
            )  # fmt: skip
            partial = torch.empty(t * k, hidden, dtype=torch.float32, device=x.device)
            _down_grouped[(grid, triton.cdiv(hidden, block_n))](
                h, *blocks, topk_weights.to(torch.float32).contiguous(), w2, w2_scale, partial, hidden, inter,
                w2.shape[-1], w2_scale.shape[-1], DOT=dot, BLOCK_M=_BLOCK_M, **meta,
            )  # fmt: skip
            return partial.view(t, k, hidden).sum(1).to(x.dtype)
        _gate_up[(t * k, triton.cdiv(inter, block_n))](
            x,
            ids,
            w13,
            w13_scale,
            h,
            hidden,
            inter,
            w13.shape[-1],
            w13_scale.shape[-1],
            K=k,
            **meta,
        )
        partial = torch.empty(t * k, hidden, dtype=torch.float32, device=x.device)
        _down[(t * k, triton.cdiv(hidden, block_n))](
            h,
            ids,
            topk_weights.to(torch.float32).contiguous(),
            w2,
            w2_scale,
            partial,
            hidden,
            inter,
            w2.shape[-1],
            w2_scale.shape[-1],
            **meta,
        )
        return partial.view(t, k, hidden).sum(1).to(x.dtype)


def moe_w4_reference(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    fmt: str = "ct-int4",
) -> torch.Tensor:
    """The same in torch: each expert dequantized densely (:func:`kimi_loader.quant.dequantize`,
    the format's reference rule), the matmuls in float32."""
    from ..quant import dequantize

    data = "weight_packed" if fmt == "ct-int4" else "weight"
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    xf = x.float()
    for e in topk_ids.unique().tolist():
        tok, slot = torch.where(topk_ids == e)
        d13 = dequantize(fmt, {data: w13[e], "weight_scale": w13_scale[e]}, torch.float32)
        d2 = dequantize(fmt, {data: w2[e], "weight_scale": w2_scale[e]}, torch.float32)
        gate, up = (xf[tok] @ d13.t()).chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ d2.t()
        out.index_add_(0, tok, y * topk_weights[tok, slot, None].float())
    return out.to(x.dtype)


# -- routing -------------------------------------------------------------------------------
@triton.jit
def _route(
    logits,
    bias,
    ids,
    weights,
    E,
    scaling,
    GS: tl.constexpr,  # experts per group
    NG: tl.constexpr,  # groups (a power of two here: padded)
    NG_REAL,
    TOPK_GROUP: tl.constexpr,
    K: tl.constexpr,
    RENORM: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    t = tl.program_id(0)
    g = tl.arange(0, NG)[:, None]
    j = tl.arange(0, BLOCK_G)[None, :]
    e = g * GS + j
    valid = (j < GS) & (g < NG_REAL)
    x = tl.load(logits + t * E + e, mask=valid, other=0.0).to(tl.float32)
    score = 1.0 / (1.0 + tl.exp(-x))
    choice = tl.where(valid, score + tl.load(bias + e, mask=valid, other=0.0).to(tl.float32), float("-inf"))
    # each group's score: the sum of its two best choices
    best = tl.max(choice, axis=1)
    at = tl.argmax(choice, axis=1)
    second = tl.max(tl.where(j == at[:, None], float("-inf"), choice), axis=1)
    group_score = tl.where(tl.arange(0, NG) < NG_REAL, best + second, float("-inf"))
    keep = tl.zeros((NG,), dtype=tl.int1)
    for _ in range(TOPK_GROUP):
        pick = tl.argmax(group_score, axis=0)
        keep = keep | (tl.arange(0, NG) == pick)
        group_score = tl.where(tl.arange(0, NG) == pick, float("-inf"), group_score)
    choice = tl.where(keep[:, None], choice, float("-inf"))
    flat_choice = tl.reshape(choice, (NG * BLOCK_G,))
    flat_score = tl.reshape(score, (NG * BLOCK_G,))
    flat_e = tl.reshape(e, (NG * BLOCK_G,))
    total = 0.0
    for k in range(K):
        pick = tl.argmax(flat_choice, axis=0)
        hit = tl.arange(0, NG * BLOCK_G) == pick
        w = tl.sum(tl.where(hit, flat_score, 0.0), axis=0)
        tl.store(ids + t * K + k, tl.sum(tl.where(hit, flat_e, 0), axis=0))
        tl.store(weights + t * K + k, w)
        total += w
        flat_choice = tl.where(hit, float("-inf"), flat_choice)
    if RENORM:
        for k in range(K):
            w = tl.load(weights + t * K + k)
            tl.store(weights + t * K + k, w / (total + 1e-20) * scaling)
    else:
        for k in range(K):
            w = tl.load(weights + t * K + k)
            tl.store(weights + t * K + k, w * scaling)


def route_noaux_tc(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 / Kimi-K2 routing: sigmoid scores, plus the correction bias to choose;
    groups ranked by the sum of their two best choices, the best ``topk_group`` kept
    (the others masked to -inf), the ``top_k`` best experts among them; weights are the
    scores (without the bias), renormalized and scaled. Returns ``(ids int32 [T, K],
    weights float32 [T, K])``, one program per token."""
    t, e = router_logits.shape
    if e % n_group or topk_group > n_group or top_k > e:
        raise InvalidArgumentError(f"{e} experts, {n_group} groups, topk_group={topk_group}, top_k={top_k}")
    gs = e // n_group
    ids = torch.empty(t, top_k, dtype=torch.int32, device=router_logits.device)
    weights = torch.empty(t, top_k, dtype=torch.float32, device=router_logits.device)
    with on_device("route_noaux_tc", router_logits=router_logits, correction_bias=correction_bias):
        _route[(t,)](
            router_logits.contiguous(),
            correction_bias.contiguous(),
            ids,
            weights,
            e,
            float(routed_scaling_factor),
            GS=gs,
            NG=triton.next_power_of_2(n_group),
            NG_REAL=n_group,
            TOPK_GROUP=topk_group,
            K=top_k,
            RENORM=renormalize,
            BLOCK_G=triton.next_power_of_2(gs),
            **FAST,
        )
    return ids, weights


#: the kernel's reference: the CPU runtime's routing (transformers' computation)
route_noaux_tc_reference = _runtime_route
