"""The device executor (Triton, batched per op kind) against the Rust CPU executor, bit
for bit, on every op kind it runs: whole and sliced copies, conversions. Runs under
TRITON_INTERPRET=1 on CPU tensors (fp16 / fp32: the interpreter computes bf16 wrongly)."""

from __future__ import annotations

import pytest
import torch
from reference import as_bytes

import kimi_loader
from kimi_loader import _core
from kimi_loader.loader import plan_for
from kimi_loader.models import for_config
from kimi_loader.reader import Checkpoint

pytest.importorskip("triton")
from kimi_loader.kernels import plan_exec


def _memory_checkpoint(path: str, float_dtype: torch.dtype) -> tuple[Checkpoint, dict]:
    ck = kimi_loader.open(path)
    tensors = {n: ck.get_tensor(n) for n in ck.keys()}
    tensors = {n: (t.to(float_dtype) if t.dtype == torch.bfloat16 else t.clone()) for n, t in tensors.items()}
    mem = _core.from_tensors("<test>", list(tensors), list(tensors.values()))
    return Checkpoint(mem), ck.config


@pytest.mark.parametrize(
    ("source", "model_dtype", "tp"),
    [
        (torch.float16, torch.float32, 1),  # convert f16 -> f32 (and f32 biases: copies)
        (torch.float16, torch.float16, 2),  # copies, row and column slices of TP rank 1
        (torch.float32, torch.float16, 2),  # convert f32 -> f16, sliced
    ],
)
def test_device_executor_equals_the_cpu_executor(synth_dir, source, model_dtype, tp):
    ck, config = _memory_checkpoint(synth_dir("kimi-k2.5-tiny", "bf16"), source)
    model = for_config(config, dtype=model_dtype, device="meta", tp_rank=tp - 1, tp_size=tp)
    planned = plan_for(model, ck)
    plan = planned.plan
    kinds = plan.op_counts()
    assert set(kinds) <= {"copy", "convert"} and kinds
    names = plan.dest_names()
    which = list(range(len(plan)))
    shapes = {n: (t.shape, t.dtype) for n, t in planned.dests.items()}
    ref = [torch.full(shapes[n][0], float("nan"), dtype=shapes[n][1]) for n in names]
    got = [torch.full(shapes[n][0], float("nan"), dtype=shapes[n][1]) for n in names]
    plan.execute({i: t for i, t in enumerate(ref)})
    plan_exec.execute(plan, which, got)
    for n, a, b in zip(names, ref, got, strict=True):
        assert torch.equal(as_bytes(a), as_bytes(b)), n
    assert not any(torch.isnan(t).any() for t in got if t.is_floating_point())  # every element written


def test_stage_then_commit_on_the_device_equals_execute(synth_dir):
    """Staging writes only the arena (the destinations stay poisoned, bit for bit), sized
    to the ops' output bytes; one commit of two stages equals executing the ops."""
    ck, config = _memory_checkpoint(synth_dir("kimi-k2.5-tiny", "bf16"), torch.float16)
    model = for_config(config, dtype=torch.float32, device="meta", tp_rank=1, tp_size=2)
    planned = plan_for(model, ck)
    plan = planned.plan
    names = plan.dest_names()
    shapes = {n: (t.shape, t.dtype) for n, t in planned.dests.items()}
    ref = [torch.full(shapes[n][0], float("nan"), dtype=shapes[n][1]) for n in names]
    got = [torch.full(shapes[n][0], float("nan"), dtype=shapes[n][1]) for n in names]
    plan.execute({i: t for i, t in enumerate(ref)})
    ops = list(range(len(plan)))
    first, second = ops[::2], ops[1::2]
    staged = [plan_exec.stage(plan, first, got), plan_exec.stage(plan, second, got)]
    assert all(bool(torch.isnan(t).all()) for t in got)  # nothing written yet
    out_bytes = sum(op[3] for op in plan.ops())
    assert out_bytes <= sum(s.nbytes for s in staged) <= out_bytes + 16 * len(ops)
    plan_exec.commit(staged)
    for n, a, b in zip(names, ref, got, strict=True):
        assert torch.equal(as_bytes(a), as_bytes(b)), n
    assert plan_exec.stage(plan, [], got).nbytes == 0
    plan_exec.commit([])  # nothing to do


@pytest.mark.parametrize("quant", ["ct-int4", "quark-mxfp4", "fp8-block"])
@pytest.mark.parametrize("out", [torch.float32, torch.float16])
def test_device_dequantization_equals_the_cpu_executor(synth_dir, quant, out):
    """Dense destinations (transformers' model): every quantized weight is a dequantizing
    op; the kernel's bytes equal the Rust executor's (bf16 scales decoded with integer
    operations, so the interpreter computes them exactly)."""
    _dequantization_equals_the_cpu_executor(synth_dir, quant, out)


@pytest.mark.parametrize("tile", [4, 16])
def test_row_tiles_ending_mid_tile(synth_dir, tile, monkeypatch):
    """Ops of 1001, 102 and 50 rows (an odd vocabulary; 3 heads of 16 + 18; a 32 + 18
    latent), dequantized (FP8, with 128-row scale blocks cut short) and converted, in the
    tile a GPU runs (4 rows a step) and the interpreter's (16): the same bytes as the CPU
    executor, every element written."""
    monkeypatch.setattr(plan_exec, "_tile_rows", lambda device: tile)
    odd = dict(vocab_size=1001, num_attention_heads=3, num_key_value_heads=3, qk_rope_head_dim=18)
    rows = _dequantization_equals_the_cpu_executor(synth_dir, "fp8-block", torch.float32, **odd)
    assert {1001, 102, 50} <= rows


def _dequantization_equals_the_cpu_executor(synth_dir, quant: str, out: torch.dtype, **shape) -> set[int]:
    """The row counts of the ops compared."""
    from kimi_loader.models.hf import empty_model

    path = synth_dir("deepseek-v3-tiny", quant, **shape)
    mem, _ = _memory_checkpoint(path, torch.bfloat16)  # (bf16 stays bf16: only copies of it)
    hf = empty_model(path, dtype=out, device="meta")
    planned = plan_for(hf, mem)
    plan = planned.plan
    counts = plan.op_counts()
    assert any(k.startswith("dequant") for k in counts), counts
    names = plan.dest_names()
    which = [k for k, d in enumerate(plan.op_dests()) if planned.dests[names[d]].dtype == out]
    shapes = {n: (t.shape, t.dtype) for n, t in planned.dests.items()}
    ref = [torch.full(shapes[n][0], float("nan"), dtype=shapes[n][1]) for n in names]
    got = [torch.full(shapes[n][0], float("nan"), dtype=shapes[n][1]) for n in names]
    plan.execute({i: t for i, t in enumerate(ref)})
    plan_exec.execute(plan, which, got)
    done = {plan.op_dests()[k] for k in which}
    for d in done:
        assert torch.equal(as_bytes(ref[d]), as_bytes(got[d])), names[d]
        assert not torch.isnan(got[d]).any(), names[d]  # every element written
    table, _ = plan_exec._table(plan, which, got)
    return set((table[:, 4] - table[:, 3]).tolist())


def test_device_executor_checks_every_destination_before_a_launch(synth_dir):
    """A destination too small for its ops, or of another element size, is refused before
    anything runs (it would be written out of bounds or reinterpreted)."""
    ck, config = _memory_checkpoint(synth_dir("kimi-k2.5-tiny", "bf16"), torch.float16)
    model = for_config(config, dtype=torch.float16, device="meta")
    planned = plan_for(model, ck)
    plan, names = planned.plan, planned.plan.dest_names()
    shapes = {n: (t.shape, t.dtype) for n, t in planned.dests.items()}
    good = [torch.zeros(shapes[n][0], dtype=shapes[n][1]) for n in names]
    which = list(range(len(plan)))
    for bad in (torch.zeros(3, dtype=torch.float16), torch.zeros(shapes[names[0]][0], dtype=torch.float32)):
        dests = [bad, *good[1:]]
        with pytest.raises(kimi_loader.InvalidArgumentError, match="destination 0"):
            plan_exec.execute(plan, which, dests)
        assert not any(t.any() for t in good[1:])  # nothing ran


def test_device_executor_refuses_file_sources(synth_dir):
    from kimi_loader.models.hf import empty_model

    path = synth_dir("deepseek-v3-tiny", "ct-int4")
    hf = empty_model(path, dtype=torch.float32, device="meta")
    planned = plan_for(hf, kimi_loader.open(path))
    with pytest.raises(kimi_loader.UnsupportedFormatError, match="handed over in memory"):
        planned.plan.op_table(list(range(len(planned.plan))))


def test_weight_updater_with_the_triton_executor_equals_the_cpu_one(tmp_path):
    """`executor="triton"` (the device executor; here on CPU tensors in the interpreter)
    updates the model to the same bytes as the CPU executor, deltas included."""
    from kimi_loader.rl import WeightUpdater
    from kimi_loader.synth import make_checkpoint

    a = make_checkpoint(tmp_path / "a", quant="bf16", seed=0)
    b = make_checkpoint(tmp_path / "b", quant="bf16", seed=1)
    ckb = kimi_loader.open(b)
    tensors = [
        (n, ckb.get_tensor(n).to(torch.float16) if ckb.get_tensor(n).dtype == torch.bfloat16 else ckb.get_tensor(n))
        for n in ckb.keys()
    ]
    models = {}
    for executor in ("cpu", "triton"):
        model = kimi_loader.from_pretrained(a, dtype=torch.float32)
        # a float16 trainer (the interpreter computes bf16 wrongly): the plan is compiled
        # from the first update itself
        up = WeightUpdater(model, executor=executor)
        report = up.update_from_tensors(tensors)
        assert report.changed_tensors == report.tensors > 80 and up.version == 1
        # a delta: one tensor changed, found by its hash, applied by the same executor
        norm = "language_model.model.norm.weight"
        report = up.update_from_tensors([(norm, torch.full((64,), 0.5, dtype=torch.float16))])
        assert report.changed_tensors == 1 and report.layers_post_processed == []
        models[executor] = model
    for (n, p), (_, q) in zip(models["cpu"].state_dict().items(), models["triton"].state_dict().items(), strict=True):
        assert torch.equal(as_bytes(p), as_bytes(q)), n
    with pytest.raises(kimi_loader.InvalidArgumentError, match="executor"):
        WeightUpdater(models["cpu"], executor="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_update_from_cuda_tensors_runs_on_the_device(tmp_path):
    """On a GPU: CUDA sources into a CUDA model, bf16, through the Triton executor (no
    host round trip), equal to the CPU executor's result moved to the GPU."""
    from kimi_loader.rl import WeightUpdater
    from kimi_loader.synth import make_checkpoint

    a = make_checkpoint(tmp_path / "a", quant="bf16", seed=0)
    b = make_checkpoint(tmp_path / "b", quant="bf16", seed=1)
    ckb = kimi_loader.open(b)
    want = kimi_loader.from_pretrained(a, dtype=torch.bfloat16)
    WeightUpdater(want, baseline=a).update_from_tensors([(n, ckb.get_tensor(n)) for n in ckb.keys()])
    model = kimi_loader.from_pretrained(a, dtype=torch.bfloat16, device="cuda")
    up = WeightUpdater(model, baseline=a)
    report = up.update_from_tensors([(n, ckb.get_tensor(n).cuda()) for n in ckb.keys()])
    assert report.bytes_hashed == 0 and report.changed_tensors > 0
    for (n, p), (_, q) in zip(want.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(as_bytes(p), as_bytes(q.cpu())), n


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quantize_on_sync_on_the_device_equals_the_host(tmp_path):
    """On a GPU: bf16 CUDA weights quantized on the device into an int4 CUDA model equal
    the host path (same quantizer, bit-exact with compressed-tensors)."""
    from kimi_loader.rl import WeightUpdater
    from kimi_loader.synth import make_checkpoint

    a = make_checkpoint(tmp_path / "a", quant="ct-int4", seed=0)
    b = make_checkpoint(tmp_path / "b", quant="bf16", seed=1)
    ckb = kimi_loader.open(b)
    host = kimi_loader.from_pretrained(a, dtype=torch.bfloat16)
    WeightUpdater(host, baseline=a).update_from_tensors([(n, ckb.get_tensor(n)) for n in ckb.keys()], quantize=True)
    dev = kimi_loader.from_pretrained(a, dtype=torch.bfloat16, device="cuda")
    WeightUpdater(dev, baseline=a).update_from_tensors(
        [(n, ckb.get_tensor(n).cuda()) for n in ckb.keys()], quantize=True
    )
    for (n, p), (_, q) in zip(host.state_dict().items(), dev.state_dict().items(), strict=True):
        assert torch.equal(as_bytes(p), as_bytes(q.cpu())), n


def test_ops_taller_than_a_cuda_grid_are_refused_before_any_launch(tmp_path, monkeypatch):
    """A launch's second grid axis is an op's blocks of 16 rows, and CUDA allows 65535
    blocks there: an op of more rows (a 1-D tensor of over a million elements is one
    element a row) would fail at its launch on a GPU, after the launches of other op
    kinds had written the model. It is refused before the first launch, naming the
    tensor, on every device (the limit lowered here to the tiny model's 256-row embedding)."""
    from kimi_loader.rl import WeightUpdater
    from kimi_loader.synth import make_checkpoint

    assert plan_exec.MAX_OP_ROWS == 65535 * 16
    a = make_checkpoint(tmp_path / "a", quant="bf16", seed=0)
    b = make_checkpoint(tmp_path / "b", quant="bf16", seed=1)
    ckb = kimi_loader.open(b)
    model = kimi_loader.from_pretrained(a)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    monkeypatch.setattr(plan_exec, "MAX_OP_ROWS", 255)
    up = WeightUpdater(model, baseline=a, executor="triton")
    with pytest.raises(kimi_loader.UnsupportedFormatError, match="256 rows, more than the device executor's 255") as e:
        up.update_from_tensors([(n, ckb.get_tensor(n)) for n in ckb.keys()])
    assert e.value.tensor in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")
    for n, p in model.state_dict().items():
        assert torch.equal(as_bytes(p), as_bytes(before[n])), n
    monkeypatch.setattr(plan_exec, "MAX_OP_ROWS", 256)
    assert up.update_from_tensors([(n, ckb.get_tensor(n)) for n in ckb.keys()]).changed_tensors > 0
