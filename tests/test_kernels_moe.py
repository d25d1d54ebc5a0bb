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
from conftest import BF16_TOL, QUANTS, on_gpu
from kimi_loader.kernels.moe import TILES, moe_w4, moe_w4_reference
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


def _moe_inputs(tokens, experts, top_k, hidden, inter, scale_dtype, act, seed) -> tuple:
    """Random activations, routing and experts (quantized by the real quantizers):
    ``(x, ids, weights, w13, s13, w2, s2, fmt)`` on the CPU."""
    g = torch.Generator().manual_seed(seed)
    w13, s13 = _experts(experts, 2 * inter, hidden, 32, scale_dtype, g)
    w2, s2 = _experts(experts, hidden, inter, 32, scale_dtype, g)
    x = torch.randn(tokens, hidden, generator=g).to(act)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g)
    return x, ids, weights, w13, s13, w2, s2, "quark-mxfp4" if scale_dtype is None else "ct-int4"


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float().cpu() - want.float().cpu()).abs().max() / want.float().cpu().abs().max()).item()


@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "hidden", "inter", "scale_dtype", "act"),
    [
        (1, 8, 2, 64, 32, torch.bfloat16, torch.float32),  # decode, Kimi's bf16 scales
        (5, 16, 8, 96, 64, torch.bfloat16, torch.float32),  # top-8, odd token count
        (3, 4, 1, 128, 96, torch.float32, torch.float32),
        (7, 8, 4, 64, 64, torch.float16, torch.float16),  # fp16 activations and scales
        (1, 8, 2, 64, 32, None, torch.float32),  # MXFP4 (e8m0 scales)
        (6, 16, 8, 128, 64, None, torch.float16),
        (40, 8, 4, 64, 32, torch.bfloat16, torch.float32),  # prefill: several 16-pair blocks per expert
        (33, 24, 2, 64, 64, torch.bfloat16, torch.float16),  # experts without pairs, partial blocks
    ],
)
@pytest.mark.parametrize("grouped", [False, True])
def test_moe_w4_matches_the_torch_reference(tokens, experts, top_k, hidden, inter, scale_dtype, act, grouped):
    x, ids, weights, w13, s13, w2, s2, fmt = _moe_inputs(
        tokens, experts, top_k, hidden, inter, scale_dtype, act, tokens * 100 + experts
    )
    want = moe_w4_reference(x, ids, weights, w13, s13, w2, s2, fmt)
    got = moe_w4(x, ids, weights, w13, s13, w2, s2, fmt, grouped=grouped)
    assert got.dtype == act and got.shape == want.shape and torch.isfinite(got).all()
    assert _rel_err(got, want) < (1e-5 if act == torch.float32 else 2e-3)


@on_gpu
@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "hidden", "inter", "scale_dtype"),
    [
        (1, 16, 8, 256, 128, torch.bfloat16),  # decode, top-8, Kimi's bf16 scales
        (8, 64, 8, 512, 256, torch.bfloat16),
        (64, 64, 8, 512, 256, None),  # MXFP4
        (256, 384, 8, 256, 128, torch.bfloat16),  # Kimi-K2.5's 384 experts, a prefill batch
        (3, 8, 2, 96, 64, torch.float32),  # odd widths, float32 scales
    ],
)
@pytest.mark.parametrize("grouped", [False, True])
def test_moe_w4_bf16_on_the_gpu_matches_the_float32_reference(
    tokens, experts, top_k, hidden, inter, scale_dtype, grouped
):
    """bf16 activations on the GPU (the 16-bit ``tl.dot`` of the grouped kernel is
    tensor-core ``mma`` there) against the float32 reference on the CPU of the same
    bf16 inputs: within two bf16 epsilons of the largest output."""
    x, ids, weights, w13, s13, w2, s2, fmt = _moe_inputs(
        tokens, experts, top_k, hidden, inter, scale_dtype, torch.bfloat16, tokens + experts
    )
    want = moe_w4_reference(x.float(), ids, weights, w13, s13, w2, s2, fmt)
    dev = [t.cuda() for t in (x, ids, weights, w13, s13, w2, s2)]
    got = moe_w4(*dev, fmt, grouped=grouped)
    assert got.device.type == "cuda" and got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert _rel_err(got, want) < BF16_TOL


@pytest.mark.parametrize("tile", TILES[1:])
@pytest.mark.parametrize("grouped", [False, True])
def test_moe_w4_other_weight_tiles_match_the_reference(tile, grouped):
    """The tiles bench_kernels times on a GPU compute the same (hidden 96 and 64: tiles
    wider than a row, partial last tiles)."""
    x, ids, weights, w13, s13, w2, s2, fmt = _moe_inputs(9, 8, 4, 96, 64, torch.bfloat16, torch.float32, 7)
    want = moe_w4_reference(x, ids, weights, w13, s13, w2, s2, fmt)
    got = moe_w4(x, ids, weights, w13, s13, w2, s2, fmt, grouped=grouped, tile=tile)
    assert _rel_err(got, want) < 1e-5


def test_moe_w4_refuses_mismatched_experts():
    g = torch.Generator().manual_seed(0)
    w13, s13 = _experts(2, 64, 64, 32, torch.bfloat16, g)
    w2, s2 = _experts(2, 32, 32, 32, torch.bfloat16, g)  # wrong hidden size
    x = torch.randn(1, 64)
    with pytest.raises(InvalidArgumentError, match="do not match"):
        moe_w4(x, torch.tensor([[0]]), torch.ones(1, 1), w13, s13, w2, s2)
    with pytest.raises(InvalidArgumentError, match="fmt"):
        moe_w4(x, torch.tensor([[0]]), torch.ones(1, 1), w13, s13, w2, s2, "nf4")
    w2, s2 = _experts(2, 64, 32, 32, torch.bfloat16, g)
    for tile in ((32, 48), (8, 32), (32,), None, (32, "32"), (32.0, 32)):
        with pytest.raises(InvalidArgumentError, match="tile"):
            moe_w4(x, torch.tensor([[0]]), torch.ones(1, 1), w13, s13, w2, s2, tile=tile)


ROUTING = [
    (1, 8, 1, 1, 2, True),  # the tiny presets
    (6, 64, 8, 4, 8, True),  # DeepSeek-V3's shape of routing (256 / 8 / 4 / 8), scaled down
    (3, 384, 1, 1, 8, True),  # Kimi-K2.5: 384 experts, one group, top-8
    (4, 48, 6, 3, 4, False),  # non-power-of-two groups, no renormalization
]


def _check_routing(tokens, experts, n_group, topk_group, top_k, renorm, device, rtol) -> None:
    """The kernel picks the reference's experts (in any order), each with its weight
    within ``rtol``."""
    from kimi_loader.kernels.moe import route_noaux_tc, route_noaux_tc_reference

    g = torch.Generator().manual_seed(experts + tokens)
    logits = torch.randn(tokens, experts, generator=g).to(device)
    bias = (torch.randn(experts, generator=g) * 0.1).to(device)
    kw = dict(top_k=top_k, n_group=n_group, topk_group=topk_group, routed_scaling_factor=2.5, renormalize=renorm)
    ids, w = route_noaux_tc(logits, bias, **kw)
    rids, rw = route_noaux_tc_reference(logits, bias, **kw)
    assert ids.device == logits.device
    for t in range(tokens):
        got = dict(zip(ids[t].tolist(), w[t].tolist(), strict=True))
        want = dict(zip(rids[t].tolist(), rw[t].tolist(), strict=True))
        assert got.keys() == want.keys(), t
        for e, v in want.items():
            assert abs(got[e] - v) <= rtol * max(1.0, abs(v)), (t, e)


@pytest.mark.parametrize(("tokens", "experts", "n_group", "topk_group", "top_k", "renorm"), ROUTING)
def test_noaux_tc_routing_matches_the_reference(tokens, experts, n_group, topk_group, top_k, renorm):
    _check_routing(tokens, experts, n_group, topk_group, top_k, renorm, "cpu", 1e-6)


@on_gpu
@pytest.mark.parametrize(("tokens", "experts", "n_group", "topk_group", "top_k", "renorm"), ROUTING)
def test_noaux_tc_routing_on_the_gpu_matches_the_reference(tokens, experts, n_group, topk_group, top_k, renorm):
    """The same on CUDA tensors (kernel and reference both on the GPU); 1e-5: the GPU's
    ``exp`` in the kernel's sigmoid is not torch's."""
    _check_routing(tokens, experts, n_group, topk_group, top_k, renorm, "cuda", 1e-5)


def _check_triton_runtime(path, device, rtol, monkeypatch) -> None:
    """The runtime on ``device`` through the Triton routing, fused 4-bit MoE and MLA decode
    kernels (float32) against the torch runtime on the CPU: logits within ``rtol`` of
    the largest, for a prefill and a decode step, and the same greedy tokens."""
    import kimi_loader
    import kimi_loader.kernels.moe as kernels

    calls = []
    real = kernels.moe_w4
    monkeypatch.setattr(
        kernels, "moe_w4", lambda x, ids, *a, **k: calls.append(x.shape[0] * ids.shape[1]) or real(x, ids, *a, **k)
    )
    # a 2 x 20-token prefill takes the grouped kernels, the decode steps the per-pair ones
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(5))
    ref = kimi_loader.from_pretrained(path, kernels="torch")
    tri = kimi_loader.from_pretrained(path, kernels="triton", device=device)
    assert tri.language_model.kernels == "triton"
    assert {p.device.type for p in tri.parameters()} == {torch.device(device).type}
    want, got = ref(ids), tri(ids.to(device))
    assert calls and min(calls) >= kernels.GROUPED_FROM  # the kernels ran (grouped), once per MoE layer
    cache_t, cache_r = tri.new_cache(), ref.new_cache()
    tri(ids.to(device), cache_t), ref(ids, cache_r)
    step = ids[:, -1:]
    got_step, want_step = tri(step.to(device), cache_t), ref(step, cache_r)  # one decode token, MLA kernel
    assert _rel_err(got_step, want_step) < rtol
    assert _rel_err(got, want) < rtol
    assert torch.equal(tri.generate(ids[:1].to(device), 4).cpu(), ref.generate(ids[:1], 4))  # the MLA kernel
    assert min(calls) < kernels.GROUPED_FROM  # (and the per-pair MoE kernels)


@pytest.mark.parametrize("quant", ["ct-int4", "quark-mxfp4"])
def test_from_pretrained_with_triton_kernels_matches_the_torch_runtime(synth_dir, quant, monkeypatch):
    """End to end under the interpreter, float32: < 1e-5 relative (summation order)."""
    import kimi_loader

    path = synth_dir("kimi-k2.5-tiny", quant)
    _check_triton_runtime(path, "cpu", 1e-5, monkeypatch)
    with pytest.raises(kimi_loader.InvalidArgumentError, match="kernels"):
        kimi_loader.from_pretrained(path, kernels="cuda")


@on_gpu
@pytest.mark.parametrize("quant", ["ct-int4", "quark-mxfp4"])
def test_from_pretrained_on_the_gpu_matches_the_torch_runtime(synth_dir, quant, monkeypatch):
    """The same on the GPU, float32 (cuBLAS and the kernels sum in other orders than the
    CPU): < 1e-4 relative."""
    _check_triton_runtime(synth_dir("kimi-k2.5-tiny", quant), "cuda", 1e-4, monkeypatch)


@on_gpu
@pytest.mark.parametrize("quant", QUANTS)
def test_from_pretrained_bf16_on_the_gpu(synth_dir, quant):
    """``from_pretrained(device="cuda", dtype=torch.bfloat16)``: the Triton kernels by
    default, every parameter on the GPU, logits against the float32 torch runtime on the
    CPU. Per token, the median error is within four bf16 epsilons of the largest logit;
    single tokens may be further off (a bf16 rounding can flip a top-k routing choice, as
    it does for the torch runtime in bf16 on the CPU), so no bound is put on the worst."""
    import kimi_loader

    path = synth_dir("kimi-k2.5-tiny", quant)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(5))
    want = kimi_loader.from_pretrained(path)(ids)
    model = kimi_loader.from_pretrained(path, device="cuda", dtype=torch.bfloat16)
    assert model.language_model.kernels == "triton"
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    got = model(ids.cuda())
    assert got.device.type == "cuda" and torch.isfinite(got).all()
    per_token = (got.float().cpu() - want).abs().amax(-1) / want.abs().max()
    assert per_token.median().item() < 2 * BF16_TOL, per_token
    out = model.generate(ids[:1].cuda(), 4)
    assert out.shape == (1, 24) and torch.equal(out[:, :20].cpu(), ids[:1]) and int(out.max()) < 256


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
