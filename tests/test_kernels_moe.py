"""The fused 4-bit (ct-int4, MXFP4) MoE kernels (Triton; per pair for decode, grouped by
expert with tl.dot for prefill) against their torch reference, on fresh random
inputs of several shapes, under TRITON_INTERPRET=1 on CPU (fp32 / fp16 activations; the
interpreter computes bf16 wrongly), outputs poisoned first. Tolerances: fp32 1e-5
relative (summation order only), fp16 2e-3."""

from __future__ import annotations

import pytest
import torch

from kimi_loader.errors import InvalidArgumentError

pytest.importorskip("triton")
from kimi_loader.kernels.moe import moe_w4, moe_w4_reference
from kimi_loader.quant import quantize_int4, quantize_mxfp4


def _experts(e: int, rows: int, cols: int, group: int, scale_dtype, g) -> tuple[torch.Tensor, torch.Tensor]:
    """``e`` random experts quantized by the real quantizers (``scale_dtype`` None: MXFP4)."""
    if scale_dtype is None:
        parts = [quantize_mxfp4(torch.randn(rows, cols, generator=g) * 0.1) for _ in range(e)]
        return torch.stack([p["weight"] for p in parts]), torch.stack([p["weight_scale"] for p in parts])
    parts = [
        quantize_int4(torch.randn(rows, cols, generator=g) * 0.1, group=group, scale_dtype=scale_dtype)
        for _ in range(e)
    ]
    return torch.stack([p["weight_packed"] for p in parts]), torch.stack([p["weight_scale"] for p in parts])


@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "hidden", "inter", "group", "scale_dtype", "act"),
    [
        (1, 8, 2, 64, 32, 32, torch.bfloat16, torch.float32),  # decode, Kimi's bf16 scales
        (5, 16, 8, 96, 64, 32, torch.bfloat16, torch.float32),  # top-8, odd token count
        (3, 4, 1, 128, 96, 32, torch.float32, torch.float32),
        (7, 8, 4, 64, 64, 32, torch.float16, torch.float16),  # fp16 activations and scales
        (1, 8, 2, 64, 32, 32, None, torch.float32),  # MXFP4 (e8m0 scales)
        (6, 16, 8, 128, 64, 32, None, torch.float16),
        (40, 8, 4, 64, 32, 32, torch.bfloat16, torch.float32),  # prefill: several 16-pair blocks per expert
        (33, 24, 2, 64, 64, 32, torch.bfloat16, torch.float16),  # experts without pairs, partial blocks
    ],
)
@pytest.mark.parametrize("grouped", [False, True])
def test_moe_w4_matches_the_torch_reference(tokens, experts, top_k, hidden, inter, group, scale_dtype, act, grouped):
    g = torch.Generator().manual_seed(tokens * 100 + experts)
    w13, s13 = _experts(experts, 2 * inter, hidden, group, scale_dtype, g)
    w2, s2 = _experts(experts, hidden, inter, group, scale_dtype, g)
    x = torch.randn(tokens, hidden, generator=g).to(act)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g)
    fmt = "quark-mxfp4" if scale_dtype is None else "ct-int4"
    want = moe_w4_reference(x, ids, weights, w13, s13, w2, s2, fmt)
    got = moe_w4(x, ids, weights, w13, s13, w2, s2, fmt, grouped=grouped)
    assert got.dtype == act and got.shape == want.shape and torch.isfinite(got).all()
    tol = 1e-5 if act == torch.float32 else 2e-3
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    assert err < tol, err


def test_moe_w4_refuses_mismatched_experts():
    g = torch.Generator().manual_seed(0)
    w13, s13 = _experts(2, 64, 64, 32, torch.bfloat16, g)
    w2, s2 = _experts(2, 32, 32, 32, torch.bfloat16, g)  # wrong hidden size
    x = torch.randn(1, 64)
    with pytest.raises(InvalidArgumentError, match="do not match"):
        moe_w4(x, torch.tensor([[0]]), torch.ones(1, 1), w13, s13, w2, s2)
    with pytest.raises(InvalidArgumentError, match="fmt"):
        moe_w4(x, torch.tensor([[0]]), torch.ones(1, 1), w13, s13, w2, s2, "nf4")


@pytest.mark.parametrize(
    ("tokens", "experts", "n_group", "topk_group", "top_k", "renorm"),
    [
        (1, 8, 1, 1, 2, True),  # the tiny presets
        (6, 64, 8, 4, 8, True),  # DeepSeek-V3's shape of routing (256 / 8 / 4 / 8), scaled down
        (3, 384, 1, 1, 8, True),  # Kimi-K2.5: 384 experts, one group, top-8
        (4, 48, 6, 3, 4, False),  # non-power-of-two groups, no renormalization
    ],
)
def test_noaux_tc_routing_matches_the_reference(tokens, experts, n_group, topk_group, top_k, renorm):
    from kimi_loader.kernels.moe import route_noaux_tc, route_noaux_tc_reference

    g = torch.Generator().manual_seed(experts + tokens)
    logits = torch.randn(tokens, experts, generator=g)
    bias = torch.randn(experts, generator=g) * 0.1
    kw = dict(top_k=top_k, n_group=n_group, topk_group=topk_group, routed_scaling_factor=2.5, renormalize=renorm)
    ids, w = route_noaux_tc(logits, bias, **kw)
    rids, rw = route_noaux_tc_reference(logits, bias, **kw)
    for t in range(tokens):  # the same experts (order is free), each with its weight
        got = dict(zip(ids[t].tolist(), w[t].tolist(), strict=True))
        want = dict(zip(rids[t].tolist(), rw[t].tolist(), strict=True))
        assert got.keys() == want.keys(), t
        for e, v in want.items():
            assert abs(got[e] - v) <= 1e-6 * max(1.0, abs(v)), (t, e)


@pytest.mark.parametrize("quant", ["ct-int4", "quark-mxfp4"])
def test_from_pretrained_with_triton_kernels_matches_the_torch_runtime(synth_dir, quant, monkeypatch):
    """End to end: the runtime's MoE through the Triton routing and fused 4-bit kernels,
    and its decode steps through the MLA kernel (interpreter, float32), give the torch
    runtime's logits (< 1e-5 relative) and the same greedy tokens."""
    import kimi_loader
    import kimi_loader.kernels.moe as kernels

    calls = []
    real = kernels.moe_w4
    monkeypatch.setattr(
        kernels, "moe_w4", lambda x, ids, *a, **k: calls.append(x.shape[0] * ids.shape[1]) or real(x, ids, *a, **k)
    )
    path = synth_dir("kimi-k2.5-tiny", quant)
    # a 2 x 20-token prefill takes the grouped kernels, the decode steps the per-pair ones
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(5))
    ref = kimi_loader.from_pretrained(path, kernels="torch")
    tri = kimi_loader.from_pretrained(path, kernels="triton")
    assert tri.language_model.kernels == "triton"
    want, got = ref(ids), tri(ids)
    assert calls and min(calls) >= kernels.GROUPED_FROM  # the kernels ran (grouped), once per MoE layer
    cache_t, cache_r = tri.new_cache(), ref.new_cache()
    tri(ids, cache_t), ref(ids, cache_r)
    step = ids[:, -1:]
    got_step, want_step = tri(step, cache_t), ref(step, cache_r)  # one decode token, MLA kernel
    assert ((got_step - want_step).abs().max() / want_step.abs().max()).item() < 1e-5
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    assert torch.equal(tri.generate(ids[:1], 4), ref.generate(ids[:1], 4))  # decode steps: the MLA kernel
    assert min(calls) < kernels.GROUPED_FROM  # (and the per-pair MoE kernels)
    with pytest.raises(kimi_loader.InvalidArgumentError, match="kernels"):
        kimi_loader.from_pretrained(path, kernels="cuda")


def test_expert_blocks_cover_every_pair_once():
    """The grouped kernels' work list: blocks of at most 16 pairs of one expert, every
    (token, slot) pair in exactly one block, unused blocks marked -1 (no host sync: the
    list has its upper-bound length)."""
    from kimi_loader.kernels.moe import _expert_blocks

    g = torch.Generator().manual_seed(3)
    for tokens, experts, top_k in [(1, 8, 2), (40, 8, 4), (100, 384, 8), (33, 24, 2)]:
        ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
        order, expert, first, count = _expert_blocks(ids, experts, 16)
        assert len(expert) == -(-tokens * top_k // 16) + experts
        seen = []
        for e, f, c in zip(expert.tolist(), first.tolist(), count.tolist(), strict=True):
            if e < 0:
                assert c == 0
                continue
            assert 0 < c <= 16
            pairs = order[f : f + c].tolist()
            assert all(ids.reshape(-1)[p] == e for p in pairs)
            seen += pairs
        assert sorted(seen) == list(range(tokens * top_k))
