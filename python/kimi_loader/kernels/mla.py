"""MLA decode attention in the absorbed form, over the latent cache, for any head count.

Per sequence ``b`` and head ``h`` (one program each, so 8 heads per GPU at TP 8 cost 8
programs, not 64 padded ones): the query is already absorbed (``q_nope @ w_kc``, width
``kv_lora_rank``) and carries its roped part; every cached token ``s < seq_lens[b]``
scores ``(q_nope . latent[s] + q_rope . k_rope[s]) * scale``; the output is the
softmax-weighted sum of ``latent`` (width ``kv_lora_rank``; ``w_vc`` is applied after).
Online softmax in float32 over blocks of the cache; sequences of different lengths share
one padded cache ``[B, S_max, ...]``.

Reference: :func:`mla_decode_reference` (the same in torch, per sequence).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import InvalidArgumentError
from ._device import on_device
from .dequant import FAST

__all__ = ["mla_decode", "mla_decode_reference"]


@triton.jit
def _mla_decode(
    q_nope,
    q_rope,
    latent,
    k_rope,
    seq_lens,
    out,
    scale,
    H,
    S,
    L: tl.constexpr,
    R: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # offsets in int64: a batch's cache runs past 2^31 elements (64 sequences of 66k tokens
    # x 512), where int32 offsets wrap around and read another sequence's memory
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    n = tl.load(seq_lens + b)
    lo = tl.arange(0, BLOCK_L)
    ro = tl.arange(0, BLOCK_R)
    qn = tl.load(q_nope + (b * H + h) * L + lo, mask=lo < L, other=0.0).to(tl.float32)
    qr = tl.load(q_rope + (b * H + h) * R + ro, mask=ro < R, other=0.0).to(tl.float32)
    m = float("-inf")
    den = 0.0
    acc = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for s0 in range(0, n, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        smask = s < n
        lat = tl.load(
            latent + (b * S + s)[:, None] * L + lo[None, :], mask=smask[:, None] & (lo < L)[None, :], other=0.0
        ).to(tl.float32)
        kr = tl.load(
            k_rope + (b * S + s)[:, None] * R + ro[None, :], mask=smask[:, None] & (ro < R)[None, :], other=0.0
        ).to(tl.float32)
        score = (tl.sum(lat * qn[None, :], axis=1) + tl.sum(kr * qr[None, :], axis=1)) * scale
        score = tl.where(smask, score, float("-inf"))
        m_new = tl.maximum(m, tl.max(score, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(score - m_new)
        den = den * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * lat, axis=0)
        m = m_new
    tl.store(out + (b * H + h) * L + lo, acc / den, mask=lo < L)


def mla_decode(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``q_nope`` ``[B, H, L]`` (absorbed), ``q_rope`` ``[B, H, R]``, ``latent`` ``[B, S, L]``,
    ``k_rope`` ``[B, S, R]``, ``seq_lens`` ``[B]`` (each in 1..S) -> ``[B, H, L]`` in
    ``q_nope``'s dtype."""
    b, h, lat = q_nope.shape
    rope = q_rope.shape[-1]
    s = latent.shape[1]
    if latent.shape != (b, s, lat) or k_rope.shape != (b, s, rope) or q_rope.shape[:2] != (b, h):
        raise InvalidArgumentError("query and cache shapes do not match")
    lens = seq_lens.to(device=q_nope.device, dtype=torch.int32).contiguous()  # (host lengths welcome)
    if len(lens) != b or bool((lens < 1).any()) or bool((lens > s).any()):
        raise InvalidArgumentError(f"seq_lens must be {b} lengths in 1..{s}")
    out = torch.empty(b, h, lat, dtype=torch.float32, device=q_nope.device)
    with on_device("mla_decode", q_nope=q_nope, q_rope=q_rope, latent=latent, k_rope=k_rope):
        _mla_decode[(b, h)](
            q_nope.contiguous(),
            q_rope.contiguous(),
            latent.contiguous(),
            k_rope.contiguous(),
            lens,
            out,
            float(scale),
            h,
            s,
            L=lat,
            R=rope,
            BLOCK_L=triton.next_power_of_2(lat),
            BLOCK_R=triton.next_power_of_2(rope),
            BLOCK_S=16,
            **FAST,
        )
    return out.to(q_nope.dtype)


def mla_decode_reference(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The same in torch, one sequence at a time, in float32."""
    out = torch.empty(q_nope.shape, dtype=torch.float32, device=q_nope.device)
    for i, n in enumerate(seq_lens.tolist()):
        lat, kr = latent[i, :n].float(), k_rope[i, :n].float()
        scores = (q_nope[i].float() @ lat.t() + q_rope[i].float() @ kr.t()) * scale  # [H, n]
        out[i] = torch.softmax(scores, dim=-1) @ lat
    return out.to(q_nope.dtype)
