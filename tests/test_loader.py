"""load_weights into the serving layouts: every rule, every format, TP/EP, fusion,
wrappers, strict completeness."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from reference import as_bytes, expected_params, rewrite

import kimi_loader
from conftest import QUANTS, on_gpu
from kimi_loader import IncompleteLoadError, ShapeMismatchError, UnsupportedFormatError
from kimi_loader.models import DeepseekV3ForCausalLM, KimiK25ForConditionalGeneration, for_config


def _load(path, **kw):
    ck = kimi_loader.open(path)
    model = for_config(
        ck.config,
        **{
            k: v
            for k, v in kw.items()
            if k in ("tp_rank", "tp_size", "ep_rank", "ep_size", "num_fused_shared_experts", "dtype")
        },
    )
    report = kimi_loader.load_weights(model, ck)  # the ranks come from the model
    return ck, model, report


def _assert_matches_reference(ck, model, **ranks):
    target = getattr(model, "language_model", model)
    want = expected_params(ck, model, **ranks)
    got = kimi_loader.loader.destinations(target)
    assert set(want) == set(got)
    for name, w in want.items():
        assert got[name].shape == w.shape, name
        assert torch.equal(as_bytes(got[name]), as_bytes(w)), name


@pytest.mark.parametrize("preset", ["kimi-k2.5-tiny", "deepseek-v3-tiny"])
@pytest.mark.parametrize("quant", QUANTS)
def test_serving_layout_every_format(synth_dir, preset, quant):
    ck, model, report = _load(synth_dir(preset, quant))
    _assert_matches_reference(ck, model)
    assert report.unused == [] and report.missing == []
    assert report.bytes_written == sum(
        t.numel() * t.element_size() for t in kimi_loader.loader.destinations(model).values()
    )
    if preset == "kimi-k2.5-tiny":  # the whole model: the vision tower too, as stored
        assert report.ignored == {}
        vision = {n: p for n, p in model.named_parameters() if n.startswith(("vision_tower.", "mm_projector."))}
        assert len(vision) == 35
        for name, p in vision.items():
            assert torch.equal(p, ck.get_tensor(name).to(p.dtype)), name
    else:
        assert list(report.ignored) == ["MTP layer (num_nextn_predict_layers=1 after num_hidden_layers=4): not loaded"]


def test_float32_destination_converts_bf16(synth_dir):
    ck, model, report = _load(synth_dir("deepseek-v3-tiny", "bf16"), dtype=torch.float32)
    assert model.model.layers[0].self_attn.kv_b_proj.weight.dtype == torch.float32
    _assert_matches_reference(ck, model)
    assert report.op_counts["convert"] > 0


@pytest.mark.parametrize("quant", ["bf16", "ct-int4", "quark-mxfp4"])
@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_ranks_reassemble_to_the_full_load(synth_dir, quant, tp):
    # int4 / MXFP4 groups of 32 must not straddle ranks: w2's input dim is 128 here
    path = synth_dir("kimi-k2.5-tiny", quant, moe_intermediate_size=128)
    ck, full, _ = _load(path)
    ranks = [_load(path, tp_rank=r, tp_size=tp)[1] for r in range(tp)]
    for r, m in enumerate(ranks):
        _assert_matches_reference(ck, m, tp_rank=r, tp_size=tp)
    fl, rl = full.language_model.model, [m.language_model.model for m in ranks]
    cat = torch.cat
    # column-parallel: q_b_proj, kv_b_proj, embed rows; row-parallel: o_proj columns
    assert torch.equal(cat([m.layers[1].self_attn.q_b_proj.weight for m in rl]), fl.layers[1].self_attn.q_b_proj.weight)
    assert torch.equal(cat([m.layers[0].self_attn.o_proj.weight for m in rl], 1), fl.layers[0].self_attn.o_proj.weight)
    assert torch.equal(cat([m.embed_tokens.weight for m in rl]), fl.embed_tokens.weight)
    # replicated: the fused qkv_a projection and norms
    assert all(
        torch.equal(
            m.layers[1].self_attn.fused_qkv_a_proj_with_mqa.weight,
            fl.layers[1].self_attn.fused_qkv_a_proj_with_mqa.weight,
        )
        for m in rl
    )
    # MoE: w1/w3 split on the output dim (each half separately), w2 on the input dim
    suffix = {"bf16": "weight", "ct-int4": "weight_packed", "quark-mxfp4": "weight"}[quant]
    w13 = [getattr(m.layers[2].mlp.experts, f"w13_{suffix}") for m in rl]
    half = w13[0].shape[1] // 2
    full_w13 = getattr(fl.layers[2].mlp.experts, f"w13_{suffix}")
    assert torch.equal(cat([cat([w[:, :half] for w in w13], 1), cat([w[:, half:] for w in w13], 1)], 1), full_w13)
    w2 = [getattr(m.layers[2].mlp.experts, f"w2_{suffix}") for m in rl]
    assert torch.equal(cat(w2, 2), getattr(fl.layers[2].mlp.experts, f"w2_{suffix}"))


def test_a_split_that_would_cut_quantization_groups_is_refused(synth_dir):
    path = synth_dir("kimi-k2.5-tiny", "ct-int4")  # w2 input dim 32: one int4 group per row
    ck = kimi_loader.open(path)
    # refused when the model is built, before any byte is read
    with pytest.raises(kimi_loader.InvalidArgumentError, match=r"moe_intermediate_size \(32\).*moe_tp_size=2.*group"):
        for_config(ck.config, tp_rank=0, tp_size=2)


@pytest.mark.parametrize("ep", [2, 4])
def test_expert_parallel_ranks_hold_their_experts(synth_dir, ep):
    path = synth_dir("kimi-k2.5-tiny", "ct-int4")
    _, full, _ = _load(path)
    ranks = []
    for r in range(ep):
        ck_r, m, report = _load(path, ep_rank=r, ep_size=ep)
        _assert_matches_reference(ck_r, m, ep_rank=r, ep_size=ep)
        # a rank reads only its experts: 2 MoE layers x 3 projections x 3 tensors per foreign expert
        assert report.other_rank == 2 * 9 * (8 - 8 // ep)
        ranks.append(m.language_model.model)
    for name in ("w13_weight_packed", "w13_weight_scale", "w2_weight_packed", "w2_weight_scale"):
        got = torch.cat([getattr(m.layers[1].mlp.experts, name) for m in ranks])
        assert torch.equal(got, getattr(full.language_model.model.layers[1].mlp.experts, name)), name


@pytest.mark.parametrize(("tp", "ep"), [(2, 2), (4, 2), (4, 4), (1, 2), (2, 4)])
def test_tp_and_ep_with_engine_semantics(synth_dir, tp, ep):
    """EP inside the TP group (SGLang / vLLM): max(tp, ep) ranks; experts split ep ways and
    sliced tp / ep ways; with ep > tp, data-parallel attention (ep_rank given)."""
    path = synth_dir("deepseek-v3-tiny", "bf16")
    seen = set()
    for rank in range(max(tp, ep)):
        kw = dict(tp_rank=rank % tp, tp_size=tp, ep_size=ep) | (dict(ep_rank=rank) if ep > tp else {})
        ck, m, _ = _load(path, **kw)
        par = m.parallel
        assert par.moe_tp_size == max(tp // ep, 1)
        seen.add((par.ep_rank, par.moe_tp_rank))
        _assert_matches_reference(ck, m)
    assert len(seen) == max(tp // ep, 1) * ep  # every expert slice is held by some rank


def test_tp_and_ep_as_independent_axes(synth_dir):
    from kimi_loader.parallel import ParallelLayout

    path = synth_dir("deepseek-v3-tiny", "bf16")
    for tp_rank in range(2):
        for ep_rank in range(2):
            layout = ParallelLayout.of(tp_rank, 2, ep_rank, 2, independent=True)
            ck = kimi_loader.open(path)
            model = for_config(ck.config, parallel=layout)
            kimi_loader.load_weights(model, ck)
            assert model.parallel.moe_tp_size == 2
            _assert_matches_reference(ck, model)


def test_rank_reads_only_the_bytes_it_keeps(synth_dir):
    path = synth_dir("kimi-k2.5-tiny", "bf16")
    *_, full = _load(path)
    *_, half = _load(path, ep_rank=0, ep_size=2)
    assert half.bytes_read < full.bytes_read and half.bytes_read == half.bytes_written


# -- shared-expert fusion: the regression that motivated the project --------------------
def test_384_expert_compressed_tensors_checkpoint_is_not_fused_and_loads(synth_dir):
    path = synth_dir("kimi-k2.5-tiny", "ct-int4", n_routed_experts=384, num_hidden_layers=2)
    ck = kimi_loader.open(path)
    count, reason = kimi_loader.determine_num_fused_shared_experts(ck.config, ck)
    assert count == 0 and "compressed" in reason
    ck, model, report = _load(path)
    assert report.fused_shared_experts == 0 and report.fusion_reason == reason
    _assert_matches_reference(ck, model)


def test_forcing_fusion_on_a_bf16_shared_expert_fails_loudly(synth_dir):
    path = synth_dir("kimi-k2.5-tiny", "ct-int4", n_routed_experts=384, num_hidden_layers=2)
    ck = kimi_loader.open(path)
    model = for_config(ck.config, num_fused_shared_experts=1)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(UnsupportedFormatError) as ei:
        kimi_loader.load_weights(model, ck)
    msg = str(ei.value)
    assert "language_model.model.layers.1.mlp.shared_experts.down_proj.weight" in msg
    assert "weight_packed" in msg and ei.value.tensor.startswith("language_model.model.layers.1.mlp.shared_experts.")
    assert all(torch.equal(as_bytes(a), as_bytes(b)) for a, b in zip(before, model.parameters(), strict=True))


def test_384_expert_quark_checkpoint_is_fused_into_slot_384(synth_dir):
    path = synth_dir("kimi-k2.5-tiny", "quark-mxfp4", n_routed_experts=384, num_hidden_layers=2)
    ck = kimi_loader.open(path)
    assert kimi_loader.determine_num_fused_shared_experts(ck.config, ck)[0] == 1
    ck, model, report = _load(path)
    assert report.fused_shared_experts == 1
    experts = model.language_model.model.layers[1].mlp.experts
    assert experts.w13_weight.shape[0] == 385 and not hasattr(
        model.language_model.model.layers[1].mlp, "shared_experts"
    )
    p = "language_model.model.layers.1.mlp.shared_experts."
    for suffix in ("weight", "weight_scale"):
        want13 = torch.cat([ck.get_tensor(p + f"gate_proj.{suffix}"), ck.get_tensor(p + f"up_proj.{suffix}")])
        assert torch.equal(getattr(experts, f"w13_{suffix}")[384], want13)
        assert torch.equal(getattr(experts, f"w2_{suffix}")[384], ck.get_tensor(p + f"down_proj.{suffix}"))
    _assert_matches_reference(ck, model)
    # under expert parallelism the fused shared expert is kept on every rank, after its experts
    for r in range(2):
        ck_r, m, _ = _load(path, ep_rank=r, ep_size=2)
        e = m.language_model.model.layers[1].mlp.experts
        assert e.w13_weight.shape[0] == 193 and torch.equal(e.w13_weight[192], experts.w13_weight[384])
        _assert_matches_reference(ck_r, m, ep_rank=r, ep_size=2)


def test_quark_checkpoint_with_bf16_shared_expert_is_not_fused(synth_dir):
    path = synth_dir(
        "kimi-k2.5-tiny", "quark-mxfp4", n_routed_experts=384, num_hidden_layers=2, shared_expert_quant="bf16"
    )
    ck = kimi_loader.open(path)
    count, reason = kimi_loader.determine_num_fused_shared_experts(ck.config, ck)
    assert count == 0 and "shared expert is stored as" in reason
    ck, model, _ = _load(path)
    _assert_matches_reference(ck, model)


def test_fusion_rule_table():
    decide = kimi_loader.determine_num_fused_shared_experts
    base = {"n_shared_experts": 1}
    assert decide({**base, "n_routed_experts": 8})[0] == 0
    assert decide({**base, "n_routed_experts": 256})[0] == 1
    assert decide({"n_shared_experts": 2, "n_routed_experts": 256})[0] == 0
    assert decide({**base, "n_routed_experts": 384})[0] == 0
    quark = {"quant_method": "quark", "global_quant_config": {"weight": {"dtype": "fp4"}}, "exclude": []}
    assert decide({"text_config": {**base, "n_routed_experts": 384, "quantization_config": quark}})[0] == 1
    quark_bf16_shared = {**quark, "exclude": ["re:.*shared_experts.*"]}
    assert decide({"text_config": {**base, "n_routed_experts": 384, "quantization_config": quark_bf16_shared}})[0] == 0


# -- wrappers ----------------------------------------------------------------------------
def test_wrapper_forwards_hooks_and_post_load(synth_dir):
    path = synth_dir("kimi-k2.5-tiny", "ct-int4")
    ck = kimi_loader.open(path)
    model = KimiK25ForConditionalGeneration(ck.config)
    inner = model.language_model
    assert model.stacked_params_mapping == inner.stacked_params_mapping
    assert model.expert_params_mapping == inner.expert_params_mapping and len(inner.expert_params_mapping) == 24
    kimi_loader.load_weights(model, ck)
    assert inner.post_load_calls == [None]
    _assert_matches_reference(ck, model)


def test_a_wrapper_that_does_not_forward_its_hooks_fails_loudly(synth_dir):
    """The public bug: a wrapper without forwarding lost the fused and expert mappings and
    the load silently skipped them. Here it cannot be silent."""

    class BrokenWrapper(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.language_model = DeepseekV3ForCausalLM(config["text_config"])

        def weight_rules(self):
            return self.language_model.weight_rules()

    path = synth_dir("kimi-k2.5-tiny", "ct-int4")
    ck = kimi_loader.open(path)
    with pytest.raises(IncompleteLoadError) as ei:
        kimi_loader.load_weights(BrokenWrapper(ck.config), ck)
    assert ei.value.unused and ei.value.missing
    assert "would not be written" in str(ei.value) and "would not be used" in str(ei.value)


def test_mapping_defaults_when_the_inner_model_lacks_them():
    class Inner(torch.nn.Module):
        pass

    class Wrapper(kimi_loader.hooks.ForwardsWeightHooks, torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.language_model = Inner()

    w = Wrapper()
    assert w.stacked_params_mapping == [] and w.expert_params_mapping == []
    assert w.mutate_weight_preload("x") == "x" and w.custom_scale_remap("y") == "y"
    assert w.post_load_weights() is None  # a no-op, not an AttributeError

    calls = []
    w.language_model.post_load_weights = lambda: calls.append("inner") or "done"
    w.language_model.stacked_params_mapping = [("a", "b", 0)]
    assert w.post_load_weights() == "done" and calls == ["inner"]  # forwarded when present
    assert w.stacked_params_mapping == [("a", "b", 0)]


# -- strict completeness -----------------------------------------------------------------
@pytest.mark.parametrize(
    "drop",
    [
        "language_model.model.layers.1.mlp.experts.3.up_proj.weight_packed",
        "language_model.model.layers.2.mlp.experts.0.gate_proj.weight_scale",
        "language_model.model.layers.0.mlp.gate_proj.weight",
        "language_model.model.layers.1.self_attn.kv_b_proj.weight",
        "language_model.model.layers.2.mlp.gate.e_score_correction_bias",
        "language_model.lm_head.weight",
    ],
)
def test_removing_any_tensor_fails_naming_it(synth_dir, tmp_path, drop):
    path = rewrite(synth_dir("kimi-k2.5-tiny", "ct-int4"), tmp_path / "ck", drop={drop})
    ck = kimi_loader.open(path)
    model = for_config(ck.config)
    sentinel = [p.data.fill_(0) if p.is_floating_point() else p.data.zero_() for p in model.parameters()]
    with pytest.raises(IncompleteLoadError) as ei:
        kimi_loader.load_weights(model, ck)
    assert f"'{drop}'" in str(ei.value), str(ei.value)
    assert all(not p.any() for p in sentinel)  # untouched: nothing was copied
    report = kimi_loader.load_weights(model, ck, strict=False)
    assert report.missing and report.missing[0][3] == drop


def test_an_extra_unknown_tensor_fails_naming_it(synth_dir, tmp_path):
    extra = "language_model.model.layers.1.mlp.mystery.weight"
    path = rewrite(synth_dir("kimi-k2.5-tiny", "bf16"), tmp_path / "ck", add={extra: torch.zeros(2)})
    with pytest.raises(IncompleteLoadError, match=extra.replace(".", r"\.")) as ei:
        _load(path)
    assert ei.value.unused[0][0] == extra


def test_a_shape_mismatch_names_both_shapes(synth_dir, tmp_path):
    name = "language_model.model.layers.1.self_attn.o_proj.weight"
    path = rewrite(
        synth_dir("kimi-k2.5-tiny", "bf16"), tmp_path / "ck", change={name: torch.zeros(64, 60, dtype=torch.bfloat16)}
    )
    ck = kimi_loader.open(path)
    model = for_config(ck.config)
    with pytest.raises(ShapeMismatchError) as ei:
        kimi_loader.load_weights(model, ck)
    msg = str(ei.value)
    assert name in msg and "[64, 60]" in msg and "[64, 64]" in msg


def test_progress_callback_and_bar(synth_dir, capsys):
    path = synth_dir("kimi-k2.5-tiny", "bf16")
    seen = []
    ck = kimi_loader.open(path)
    report = kimi_loader.load_weights(for_config(ck.config), ck, progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1] == (report.bytes_written, report.bytes_written)
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(seen))
    # on a terminal, progress=True draws a tqdm bar in bytes with the rate
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    code = (
        "import kimi_loader; from kimi_loader.models import for_config; "
        f"ck = kimi_loader.open({path!r}); kimi_loader.load_weights(for_config(ck.config), ck, progress=True)"
    )
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    proc = subprocess.run([sys.executable, "-c", code], stderr=follower, stdout=subprocess.DEVNULL, timeout=120)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 1 << 16)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.returncode == 0 and b"loading" in out and b"B/s" in out, out[-500:]
    assert set(report.seconds) == {"open", "plan", "copy", "post_load", "total"}


def test_meta_destinations_are_rejected(synth_dir):
    ck = kimi_loader.open(synth_dir("kimi-k2.5-tiny", "bf16"))
    with pytest.raises(kimi_loader.InvalidArgumentError, match="meta"):
        kimi_loader.load_weights(for_config(ck.config, device="meta"), ck)


@pytest.mark.parametrize("staging_bytes", [4096, 64 << 10, 1 << 30])
def test_staged_path_gives_the_same_weights(synth_dir, staging_bytes):
    """The pipeline used for CUDA destinations (batches of destinations through two staging
    arenas; destinations larger than an arena get their own buffer), exercised on CPU."""
    path = synth_dir("kimi-k2.5-tiny", "ct-int4")
    ck = kimi_loader.open(path)
    direct, staged = for_config(ck.config), for_config(ck.config)
    kimi_loader.load_weights(direct, ck)
    seen = []
    kimi_loader.load_weights(staged, ck, staging_bytes=staging_bytes, progress=lambda d, t: seen.append(d))
    for (n, a), (_, b) in zip(direct.named_parameters(), staged.named_parameters(), strict=True):
        assert torch.equal(as_bytes(a), as_bytes(b)), n
    assert seen[-1] == sum(t.numel() * t.element_size() for t in kimi_loader.loader.destinations(staged).values())


@on_gpu
def test_cuda_destinations(synth_dir):
    path = synth_dir("kimi-k2.5-tiny", "ct-int4")
    ck = kimi_loader.open(path)
    cpu, gpu = for_config(ck.config), for_config(ck.config, device="cuda")
    kimi_loader.load_weights(cpu, ck)
    kimi_loader.load_weights(gpu, ck, staging_bytes=64 << 10)
    for (n, a), (_, b) in zip(cpu.named_parameters(), gpu.named_parameters(), strict=True):
        assert torch.equal(as_bytes(a), as_bytes(b.cpu())), n


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_destinations_spread_over_two_gpus(synth_dir):
    """A model spread over GPUs in one process (odd layers on cuda:1, the rest on
    cuda:0, cuda:0 current): each destination's copies run on its own device's
    stream and an arena is rewritten only when both devices' copies from it are done
    (with one stream, cuda:1's copies were unordered with the arena's reuse)."""
    path = synth_dir("kimi-k2.5-tiny", "ct-int4")
    ck = kimi_loader.open(path)
    cpu, spread = for_config(ck.config), for_config(ck.config)
    for n, p in spread.named_parameters():  # odd layers on cuda:1 (a pipeline-style device_map)
        layer = int(n.split("layers.")[1].split(".")[0]) if "layers." in n else 0
        p.data = p.data.to(f"cuda:{layer % 2}")
    torch.cuda.set_device(0)
    kimi_loader.load_weights(cpu, ck)
    kimi_loader.load_weights(spread, ck, staging_bytes=64 << 10)
    for (n, a), (_, b) in zip(cpu.named_parameters(), spread.named_parameters(), strict=True):
        assert torch.equal(as_bytes(a), as_bytes(b.cpu())), n


def test_execute_refuses_ops_without_a_buffer(synth_dir):
    from kimi_loader.loader import plan_for

    ck = kimi_loader.open(synth_dir("kimi-k2.5-tiny", "bf16"))
    plan = plan_for(for_config(ck.config), ck).plan
    with pytest.raises(kimi_loader.InvalidArgumentError, match="no buffer given"):
        plan.execute({}, 0, 1)
    with pytest.raises(kimi_loader.InvalidArgumentError, match="tensors for"):
        plan.execute([None], 0, 1)


def test_execute_checks_the_live_buffers(synth_dir):
    """The extension takes tensors, not addresses, and checks each against the plan at
    the call: a destination too small, cast, non-contiguous, off-CPU or sharing memory
    with another, a repeated op index, or something that is not a tensor is refused
    before any byte is written."""
    from kimi_loader.loader import plan_for

    ck = kimi_loader.open(synth_dir("kimi-k2.5-tiny", "bf16"))
    planned = plan_for(for_config(ck.config), ck, need_memory=True)
    plan, names = planned.plan, planned.plan.dest_names()
    op_dest = plan.op_dests()
    d0, d1 = op_dest[0], next(d for d in op_dest if d != op_dest[0])
    t0 = planned.dests[names[d0]]
    before = t0.clone()
    bad = {
        "holds": t0.new_empty(t0.numel() // 2),
        "float16": torch.empty(t0.shape, dtype=torch.float16),  # same bytes, another dtype
        "contiguous": torch.empty(*t0.shape[::-1], dtype=t0.dtype).t() if t0.dim() == 2 else None,
        "torch.Tensor": 12345,
        "device": t0.to("meta"),
    }
    for why, t in bad.items():
        if t is None:
            continue
        with pytest.raises(kimi_loader.InvalidArgumentError, match=why):
            plan.execute({d0: t}, 0, 1)
    k1 = op_dest.index(d1)
    with pytest.raises(kimi_loader.InvalidArgumentError, match="share memory"):
        plan.execute({d0: t0, d1: t0.view(-1).view(torch.uint8)[: planned.dests[names[d1]].nbytes]}, 0, k1 + 1)
    with pytest.raises(kimi_loader.InvalidArgumentError, match="given twice"):
        plan.execute_atomic([0, 0], {d0: t0})
    with pytest.raises(kimi_loader.InvalidArgumentError, match="out of range"):
        plan.execute_atomic([len(plan)], {d0: t0})
    assert torch.equal(as_bytes(t0), as_bytes(before))  # (uninitialized memory may hold NaNs)


def test_logging_and_progress_off_a_terminal(synth_dir, capsys, caplog):
    """The report goes to the `kimi_loader` logger; progress=True writes no frames when
    stderr is not a terminal (a log file); a strict=False load that loads nothing warns."""
    import logging

    path = synth_dir("kimi-k2.5-tiny", "bf16")
    ck = kimi_loader.open(path)
    calls = []
    with caplog.at_level(logging.INFO, logger="kimi_loader"):
        kimi_loader.load_weights(for_config(ck.config, text_only=True), ck, progress=True)
        kimi_loader.load_weights(for_config(ck.config, text_only=True), ck, progress=lambda d, t: calls.append((d, t)))
    assert "\r" not in capsys.readouterr().err
    assert calls and calls[-1][0] == calls[-1][1] > 0
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    reports = [m for m in infos if m.startswith("loaded ")]
    assert len(reports) == 2 and "tensors used" in reports[0] and "bytes" in reports[0]
    # the decisions made on the user's behalf are logged too: fusion, and what was ignored
    assert sum(m.startswith("shared-expert fusion: ") for m in infos) == 2
    plan = kimi_loader.loader.plan_for(for_config(ck.config, text_only=True), ck).plan
    reasons = {r for _, r in plan.ignored()}
    assert reasons and all(any(m.startswith("ignored ") and r in m for m in infos) for r in reasons)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="kimi_loader"):
        kimi_loader.load_weights(for_config(ck.config, text_only=True), ck)
    debug = {r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG}
    assert {f"ignored {n}: {r}" for n, r in plan.ignored()} <= debug

    class Unrelated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kimi_loader"):
        kimi_loader.load_weights(Unrelated(), ck, strict=False)
    assert any("nothing will be loaded" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("tied", [False, True])
def test_materialize_is_to_empty_without_its_import_cost(tied):
    # the same parameters and buffers (names, shapes, strides, dtypes, device, tying)
    # as torch's own to_empty
    from kimi_loader.models import materialize
    from kimi_loader.synth import text_config

    cfg = text_config("deepseek-v3-tiny", tie_word_embeddings=tied)
    a = materialize(for_config(cfg, device="meta", dtype=torch.bfloat16), "cpu")
    b = for_config(cfg, device="meta", dtype=torch.bfloat16).to_empty(device="cpu")
    sa, sb = a.state_dict(keep_vars=True), b.state_dict(keep_vars=True)
    assert list(sa) == list(sb)
    for k in sa:
        x, y = sa[k], sb[k]
        assert (x.shape, x.stride(), x.dtype, x.device, type(x)) == (y.shape, y.stride(), y.dtype, y.device, type(y)), k
    assert (a.lm_head.weight is a.model.embed_tokens.weight) == tied
    assert all(p.device.type == "cpu" for p in a.parameters())


def test_from_pretrained_does_not_pay_for_sympy(synth_dir):
    # torch.empty_like on a meta tensor imports sympy and ~480 more modules (0.3-0.5 s)
    # the first time: a third of a whole first load of a 1.5 GB checkpoint
    import subprocess
    import sys

    path = synth_dir("deepseek-v3-tiny", "bf16")
    code = (
        "import sys, torch, kimi_loader\n"
        f"kimi_loader.from_pretrained({path!r}, dtype=torch.bfloat16)\n"
        "print('sympy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("quant", ["bf16", "ct-int4"])
def test_prefault_and_huge_page_settings_load_the_same_bytes(synth_dir, quant, tmp_path):
    # fault-in advice (per chunk, on by default) and huge pages (opt-in) never change
    # what lands: each setting in a fresh process, float32 (converted) and bf16 loads
    import subprocess
    import sys

    path = synth_dir("kimi-k2.5-tiny", quant)
    code = (
        "import sys, torch, kimi_loader\n"
        "for dt in (torch.bfloat16, torch.float32):\n"
        f"    m = kimi_loader.from_pretrained({path!r}, dtype=dt)\n"
        "    torch.save(m.state_dict(), sys.argv[1] + str(dt))\n"
    )
    outs = []
    for i, env in enumerate(
        [
            {"KIMI_LOADER_PREFAULT": "0"},
            {},
            {"KIMI_LOADER_HUGE_PAGES": "1"},
            {"KIMI_LOADER_PREFAULT": "0", "KIMI_LOADER_HUGE_PAGES": "1"},
        ]
    ):
        f = str(tmp_path / f"s{i}-")
        subprocess.run([sys.executable, "-c", code, f], check=True, env={**os.environ, **env})
        outs.append([torch.load(f + str(dt)) for dt in (torch.bfloat16, torch.float32)])
    for other in outs[1:]:
        for sa, sb in zip(outs[0], other, strict=True):
            assert list(sa) == list(sb)
            assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_realsize_preset_has_kimi_k25s_tensor_shapes():
    # the per-tensor shapes of Kimi-K2.5's published checkpoint (text model), as the
    # serving model built from the preset's config expects them
    from kimi_loader.synth import text_config

    model = for_config(text_config("kimi-k2.5-realsize"), device="meta", dtype=torch.bfloat16)
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sd["model.embed_tokens.weight"] == (163840, 7168)
    assert sd["lm_head.weight"] == (163840, 7168)
    attn = "model.layers.1.self_attn."
    assert sd[attn + "fused_qkv_a_proj_with_mqa.weight"] == (1536 + 576, 7168)
    assert sd[attn + "q_b_proj.weight"] == (12288, 1536)
    assert sd[attn + "kv_b_proj.weight"] == (16384, 512)
    assert sd[attn + "o_proj.weight"] == (7168, 8192)
    assert sd["model.layers.0.mlp.gate_up_proj.weight"] == (2 * 18432, 7168)
    assert sd["model.layers.1.mlp.gate.weight"][1] == 7168
    assert sd["model.layers.1.mlp.experts.w13_weight"][1:] == (2 * 2048, 7168)  # gate and up rows stacked
    assert sd["model.layers.1.mlp.experts.w2_weight"][1:] == (7168, 2048)
