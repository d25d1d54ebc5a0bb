"""RL hot-reload: in place, incremental, all-or-nothing, over torch.distributed."""

from __future__ import annotations

import os
import re
import shutil

import pytest
import torch
from reference import as_bytes, rewrite
from safetensors.torch import save_file

import kimi_loader
from conftest import QUANTS
from kimi_loader.errors import CheckpointIOError, HeaderError, MissingTensorError, ShapeMismatchError
from kimi_loader.loader import IncompleteLoadError
from kimi_loader.rl import WeightUpdater
from kimi_loader.synth import make_checkpoint

IDS = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(2))


def _free_port() -> int:
    """A free loopback TCP port for a process group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(tmp_path, worker, *extra) -> tuple[str, str, str]:
    """Bf16 checkpoints ``a`` (seed 0) and ``b`` (seed 1), then ``worker(rank, port, a, b,
    out, *extra)`` on two spawned ranks; returns ``(a, b, out)`` (the receiver's output
    path prefix)."""
    import torch.multiprocessing as mp

    a = make_checkpoint(tmp_path / "a", quant="bf16", seed=0)
    b = make_checkpoint(tmp_path / "b", quant="bf16", seed=1)
    out = os.fspath(tmp_path / "recv")
    mp.start_processes(worker, args=(_free_port(), a, b, out, *extra), nprocs=2, join=True, start_method="spawn")
    return a, b, out


def _snapshot(model) -> dict[str, torch.Tensor]:
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    out.update({n: b.detach().clone() for n, b in model.named_buffers()})
    return out


def _addresses(model) -> dict[str, int]:
    out = {n: p.data_ptr() for n, p in model.named_parameters()}
    out.update({n: b.data_ptr() for n, b in model.named_buffers()})
    return out


def _assert_unchanged(model, snap) -> None:
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert torch.equal(as_bytes(t), as_bytes(snap[n])), n


@pytest.mark.parametrize("quant", QUANTS)
def test_update_from_disk_equals_a_fresh_load_in_place(tmp_path, quant):
    a = make_checkpoint(tmp_path / "a", quant=quant, seed=0)
    b = make_checkpoint(tmp_path / "b", quant=quant, seed=1)
    model = kimi_loader.from_pretrained(a)
    addresses = _addresses(model)
    updater = WeightUpdater(model, baseline=a)
    report = updater.update_from_disk(b)
    assert report.version == 1 and model.weights_version == 1 and not report.replanned
    assert torch.equal(model(IDS), kimi_loader.from_pretrained(b)(IDS))
    assert _addresses(model) == addresses  # every parameter and w_kc / w_vc in place
    again = updater.update_from_disk(b)
    assert again.version == 2 and again.changed_tensors == 0 and again.bytes_changed == 0


def test_delta_update_copies_only_the_changed_experts(tmp_path):
    a = make_checkpoint(tmp_path / "a", quant="ct-int4", seed=0)
    p = "language_model.model.layers.1.mlp.experts"
    ck = kimi_loader.open(a)
    change = {}
    for e in (1, 3):
        name = f"{p}.{e}.down_proj.weight_packed"
        change[name] = ck.get_tensor(name) ^ 0x11111111
    b = rewrite(a, tmp_path / "b", change=change)
    model = kimi_loader.from_pretrained(a)
    report = WeightUpdater(model, baseline=a).update_from_disk(b)
    assert report.changed_tensors == 2
    assert report.bytes_changed == sum(t.numel() * t.element_size() for t in change.values())
    assert report.layers_post_processed == [1]
    assert torch.equal(model(IDS), kimi_loader.from_pretrained(b)(IDS))


def test_post_load_runs_only_for_the_changed_layer(tmp_path):
    a = make_checkpoint(tmp_path / "a", quant="bf16", seed=0)
    name = "language_model.model.layers.2.self_attn.kv_b_proj.weight"
    b = rewrite(a, tmp_path / "b", change={name: kimi_loader.open(a).get_tensor(name) * 2})
    model = kimi_loader.from_pretrained(a)
    model.language_model.post_load_calls.clear()
    report = WeightUpdater(model, baseline=a).update_from_disk(b)
    assert report.layers_post_processed == [2] and model.language_model.post_load_calls == [[2]]
    assert torch.equal(model(IDS), kimi_loader.from_pretrained(b)(IDS))


def test_update_from_tensors_and_names_subsets(tmp_path):
    a = make_checkpoint(tmp_path / "a", quant="bf16", seed=0)
    b = make_checkpoint(tmp_path / "b", quant="bf16", seed=1)
    model = kimi_loader.from_pretrained(a)
    updater = WeightUpdater(model, baseline=a)
    ckb = kimi_loader.open(b)
    gate = "language_model.model.layers.1.mlp.experts.2.gate_proj.weight"
    report = updater.update_from_tensors([(gate, ckb.get_tensor(gate))])
    assert report.changed_tensors == 1
    w13 = model.language_model.model.layers[1].mlp.experts.w13_weight
    assert torch.equal(w13[2, :32], ckb.get_tensor(gate).float())
    assert not report.replanned  # a subset replays the compiled plan (ops of absent tensors drop out)
    # `names` picks a subset of a full new checkpoint
    norm = "language_model.model.norm.weight"
    report = updater.update_from_disk(b, names=[norm])
    assert report.changed_tensors == 1 and torch.equal(
        model.language_model.model.norm.weight, ckb.get_tensor(norm).float()
    )
    report = updater.update_from_disk(b)
    assert torch.equal(model(IDS), kimi_loader.from_pretrained(b)(IDS))


# -- all-or-nothing ----------------------------------------------------------------------
@pytest.fixture
def loaded(tmp_path):
    a = make_checkpoint(tmp_path / "a", quant="ct-int4", seed=0)
    b = make_checkpoint(tmp_path / "b", quant="ct-int4", seed=1)
    model = kimi_loader.from_pretrained(a)
    return a, b, model, WeightUpdater(model, baseline=a), _snapshot(model)


def test_failed_updates_leave_the_model_bitwise_unchanged(loaded, tmp_path):
    _a, b, model, updater, snap = loaded
    ck = kimi_loader.open(b)
    name = "language_model.model.layers.1.self_attn.o_proj.weight"
    cases = [
        (rewrite(b, tmp_path / "shape", change={name: torch.zeros(64, 32, dtype=torch.bfloat16)}), ShapeMismatchError),
        (
            rewrite(b, tmp_path / "half", drop={"language_model.model.layers.2.mlp.experts.5.up_proj.weight_scale"}),
            MissingTensorError,
        ),
    ]
    # an unknown name
    extra = tmp_path / "extra.safetensors"
    save_file({"language_model.model.layers.1.mlp.mystery.weight": torch.zeros(2)}, extra)
    with pytest.raises(IncompleteLoadError, match="mystery"):
        updater.update_from_disk(extra)
    _assert_unchanged(model, snap)
    for path, err in cases:
        with pytest.raises(err):
            updater.update_from_disk(path)
        _assert_unchanged(model, snap)
    # a corrupt shard
    corrupt = shutil.copytree(b, tmp_path / "corrupt")
    shard = os.path.join(corrupt, ck.files[0].rsplit("/", 1)[1])
    with open(shard, "r+b") as f:
        f.seek(8)
        f.write(b"]]]]")
    with pytest.raises(HeaderError):
        updater.update_from_disk(corrupt)
    _assert_unchanged(model, snap)
    assert updater.version == 0


def test_a_shard_truncated_during_an_update_is_an_error_not_a_crash(loaded, tmp_path):
    _a, b, model, updater, snap = loaded
    path = shutil.copytree(b, tmp_path / "t")
    ck = kimi_loader.open(path)  # validated, then the trainer's file shrinks underneath
    for f in ck.files:
        os.truncate(f, 4096)
    with pytest.raises(CheckpointIOError, match="truncated"):
        updater.update_from_disk(ck)
    _assert_unchanged(model, snap)


def test_a_shard_replaced_by_rename_during_an_update_serves_the_old_bytes(loaded, tmp_path):
    _a, b, model, updater, _snap = loaded
    path = shutil.copytree(b, tmp_path / "r")
    ck = kimi_loader.open(path)
    want = kimi_loader.from_pretrained(b)(IDS)
    for f in ck.files:  # the trainer publishes new files by rename
        os.rename(f, f + ".old")
        shutil.copy(f + ".old", f)
        with open(f, "r+b") as fh:
            fh.seek(-4, 2)
            fh.write(b"\xff\xff\xff\xff")
    updater.update_from_disk(ck)
    assert torch.equal(model(IDS), want)


# -- torch.distributed -------------------------------------------------------------------
def _worker(rank: int, world: int, port: int, a: str, b: str, out: str) -> None:
    import torch.distributed as dist

    from kimi_loader.rl import broadcast_weights

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        if rank == 0:
            broadcast_weights(b, bucket_bytes=64 << 10)
        else:
            tp_size = world - 1
            ck = kimi_loader.open(a)
            model = kimi_loader.models.for_config(ck.config, tp_rank=rank - 1, tp_size=tp_size)
            kimi_loader.load_weights(model, ck, tp_rank=rank - 1, tp_size=tp_size)
            WeightUpdater(model, tp_rank=rank - 1, tp_size=tp_size, baseline=ck).update_from_distributed()
            torch.save({n: p for n, p in model.named_parameters()}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_broadcast_from_a_trainer_rank(tmp_path, world):

    import torch.multiprocessing as mp

    a = make_checkpoint(tmp_path / "a", quant="bf16", seed=0, moe_intermediate_size=64)
    b = make_checkpoint(tmp_path / "b", quant="bf16", seed=1, moe_intermediate_size=64)
    port = _free_port()
    mp.start_processes(
        _worker, args=(world, port, a, b, os.fspath(tmp_path)), nprocs=world, join=True, start_method="spawn"
    )
    tp_size = world - 1
    ck = kimi_loader.open(b)
    for rank in range(1, world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        want = kimi_loader.models.for_config(ck.config, tp_rank=rank - 1, tp_size=tp_size)
        kimi_loader.load_weights(want, ck, tp_rank=rank - 1, tp_size=tp_size)
        for n, p in want.named_parameters():
            assert torch.equal(as_bytes(got[n]), as_bytes(p)), n


@pytest.mark.parametrize("keep_staging", [True, False])
def test_kept_staging_is_reused_and_releasable(tmp_path, keep_staging):
    a = make_checkpoint(tmp_path / "a", quant="bf16", seed=0)
    b = make_checkpoint(tmp_path / "b", quant="bf16", seed=1)
    model = kimi_loader.from_pretrained(a)
    updater = WeightUpdater(model, baseline=a, keep_staging=keep_staging)
    updater.update_from_disk(b)
    assert torch.equal(model(IDS), kimi_loader.from_pretrained(b)(IDS))
    arena = updater._arena
    if keep_staging:
        assert arena is not None and arena.numel() > 0
    else:
        assert arena is None  # nothing kept between updates
    updater.update_from_disk(a)  # same size: the same buffer (or again none)
    assert updater._arena is arena
    if keep_staging:
        assert updater._arena.data_ptr() == arena.data_ptr()
    assert torch.equal(model(IDS), kimi_loader.from_pretrained(a)(IDS))
    updater.release_staging()
    assert updater._arena is None


def test_update_from_tensors_reads_memory_in_place_and_names_dtype_errors(tmp_path, monkeypatch):
    """No temporary file, no copy of CPU tensors: the tensors are the plan's sources for
    the call and released after it; a dtype change names the tensor, the parameter and
    both dtypes (it used to say 'shape mismatch: [64] vs [64]' about a temporary file)."""
    import tempfile

    a = make_checkpoint(tmp_path / "a", quant="bf16", seed=0)
    b = make_checkpoint(tmp_path / "b", quant="bf16", seed=1)
    ckb = kimi_loader.open(b)
    monkeypatch.setattr(tempfile, "TemporaryDirectory", None)  # any use of a temp dir fails
    model = kimi_loader.from_pretrained(a)
    up = WeightUpdater(model)  # no baseline: the first update compiles the plan from memory
    up.update_from_tensors((n, ckb.get_tensor(n)) for n in ckb.keys())
    assert torch.equal(model(IDS), kimi_loader.from_pretrained(b)(IDS))
    with pytest.raises(kimi_loader.InvalidArgumentError, match="released"):
        up._compiled.core.hash_tensors([ckb.keys()[0]])  # the plan kept names, not memory
    norm = "language_model.model.norm.weight"
    with pytest.raises(kimi_loader.ShapeMismatchError) as e:
        up.update_from_tensors([(norm, ckb.get_tensor(norm).float())])
    msg = str(e.value)
    assert "<update_from_tensors>" in msg and f"'{norm}'" in msg and "norm.weight" in msg.split("'" + norm + "'")[1]
    assert "BF16" in msg and "F32" in msg and e.value.tensor == norm
    assert "dtype mismatch" in msg and "shape mismatch" not in msg, msg  # (the shape is right)
    # quantize= without knowing the stored formats is refused
    fresh = WeightUpdater(kimi_loader.from_pretrained(a))
    with pytest.raises(kimi_loader.InvalidArgumentError, match="baseline"):
        fresh.update_from_tensors([(norm, ckb.get_tensor(norm))], quantize=True)
    with pytest.raises(kimi_loader.InvalidArgumentError, match="quantize must be"):
        up.update_from_tensors([(norm, ckb.get_tensor(norm))], quantize="nf4")


def test_every_sync_entry_point_takes_a_state_dict_and_names_what_is_not_a_pair(tmp_path):
    """``update_from_tensors``, ``share_tensors`` and ``broadcast_weights`` take what a
    trainer has at hand: a ``state_dict`` (a mapping), ``named_parameters()`` (pairs of
    parameters that require grad) or a list; anything else is an InvalidArgumentError
    naming the item or the tensor, checked before anything is sent or written."""
    from kimi_loader.rl import broadcast_weights, share_tensors

    a = make_checkpoint(tmp_path / "a", quant="bf16", seed=0)
    b = make_checkpoint(tmp_path / "b", quant="bf16", seed=1)
    ckb = kimi_loader.open(b)
    state = {n: ckb.get_tensor(n) for n in ckb.keys()}  # a trainer's HF-named state_dict
    model = kimi_loader.from_pretrained(a)
    up = WeightUpdater(model, baseline=a)
    report = up.update_from_tensors(state)
    assert report.changed_tensors > 0 and torch.equal(model(IDS), kimi_loader.from_pretrained(b)(IDS))
    params = ((n, torch.nn.Parameter(t)) for n, t in state.items())  # as named_parameters() gives them
    assert up.update_from_tensors(params).changed_tensors == 0
    norm = "language_model.model.norm.weight"
    bad = [
        (("not", "pairs"), "item 0 is not a \\(name, tensor\\) pair, got str"),
        ([(norm,)], "item 0 is not a \\(name, tensor\\) pair, got tuple"),
        ([(norm, torch.ones(64).numpy())], f"tensor '{norm}' must be a torch.Tensor with data, got ndarray"),
        ({norm: torch.empty(64, device="meta")}, "got a meta tensor"),
        ([(7, torch.ones(64))], "tensor name must be a str, got 7"),
        (torch.ones(3), "item 0 is not a \\(name, tensor\\) pair, got Tensor"),
        (42, "pairs or a mapping of them, got int"),
    ]
    snap = _snapshot(model)
    for value, msg in bad:
        for call in (up.update_from_tensors, share_tensors, broadcast_weights):
            with pytest.raises(kimi_loader.InvalidArgumentError, match=msg):
                call(value)
    _assert_unchanged(model, snap)


# -- streamed updates (metadata first, bucket by bucket) ---------------------------------
def _stream_worker(rank: int, world: int, port: int, a: str, b: str, out: str, mode: str) -> None:
    """Rank 0 streams checkpoint ``b`` (mode ``kill-*``: dies after two buckets, of the
    last receiver with ``@pull``; ``bad``: one tensor with a wrong shape), twice when it
    completes; ranks 1.. are TP receivers holding ``a``, that write what they observed to
    ``out/rank{r}.pt``. ``@pull``: :func:`send_weights` (each receiver sent what it asks
    for) to receivers that also split the experts (EP, the serving layout: each reads
    half of them), else :func:`broadcast_weights` to TP receivers."""
    import datetime
    import json

    import torch.distributed as dist

    from kimi_loader.rl import broadcast_weights, send_weights

    mode, _, via = mode.partition("@")
    twice = mode.partition("+")[0] in ("atomic", "streaming")

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    tp_group = dist.new_group(list(range(1, world)))  # the receivers' TP group (every rank makes it)
    if rank == 0:
        ck = kimi_loader.open(b)
        items = [(n, ck.get_tensor(n)) for n in ck.keys()]
        if mode == "bad":
            items[5] = (items[5][0], torch.zeros(3, 3, dtype=items[5][1].dtype))
        send = send_weights if via == "pull" else broadcast_weights
        if mode.startswith("kill"):
            what = "send" if via == "pull" else "broadcast"
            real, sent = getattr(dist, what), [0]

            def dying(t, *args, **kw):
                sent[0] += via != "pull" or kw.get("dst") == world - 1
                if sent[0] > 2:
                    import time

                    time.sleep(2)  # (let the receivers drain buckets 1-2 before the sockets reset)
                    os._exit(3)  # the trainer dies mid-stream
                return real(t, *args, **kw)

            setattr(dist, what, dying)
        for _ in range(2 if twice else 1):
            try:
                send(items, bucket_bytes=32 << 10)
                assert mode != "bad" and not mode.startswith("fail-last"), "the sender was not told of a failure"
            except kimi_loader.PeerUpdateError as e:  # (the receivers' vote)
                assert e.ranks == (list(range(1, world)) if mode == "bad" else [world - 1]), (mode, e.ranks)
        dist.destroy_process_group()
        return
    tp = world - 1
    par = dict(tp_rank=rank - 1, tp_size=tp) | (dict(ep_size=tp) if via in ("pull", "ep") else {})
    ck = kimi_loader.open(a)
    model = kimi_loader.models.for_config(ck.config, **par)
    kimi_loader.load_weights(model, ck, **par)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mode, _, executor = mode.partition("+")
    up = WeightUpdater(model, **par, baseline=ck, executor=executor or "auto")
    if mode.startswith("fail-last") and rank == world - 1:  # this rank fails applying its first bucket

        def failing(*_args, **_kw):
            raise kimi_loader.PlanError("injected failure")

        up._plan_for = failing
    result: dict = {"mode": mode}
    try:
        report = up.update_from_distributed(atomic=not mode.endswith("streaming"))
        result["changed"] = report.changed_tensors
        result["bytes_changed"] = report.bytes_changed
        result["bytes_staged"] = report.bytes_staged
        result["bytes_received"] = report.bytes_received
        result["executor"] = report.executor
        if twice:  # the same again: nothing changed
            again = up.update_from_distributed(atomic=not mode.endswith("streaming"))
            result["again"] = [again.changed_tensors, again.bytes_received]
    except kimi_loader.KimiLoaderError as e:
        result["error"] = type(e).__name__
        result["message"] = str(e)
    result["unchanged"] = all(torch.equal(as_bytes(p), as_bytes(before[n])) for n, p in model.named_parameters())
    result["consistent"] = model.language_model.weights_consistent
    result["version"] = up.version
    model.process_group = tp_group  # the sharded runtime's collectives run among the receivers
    try:
        if mode == "fail-last-streaming":  # (one rank refuses to run: the other's collectives would wait)
            raise kimi_loader.InconsistentWeightsError("not run")
        result["logits_finite"] = bool(torch.isfinite(model(IDS)).all())
        result["runs"] = True
    except kimi_loader.InconsistentWeightsError:
        result["runs"] = False
    torch.save({n: p for n, p in model.named_parameters()}, os.path.join(out, f"rank{rank}.pt"))
    if mode.startswith("kill"):
        # a subset after the break leaves a mix of versions: still refused; the whole old
        # checkpoint again (complete: every tensor presented) restores it bit for bit,
        # the tensors the broken stream wrote included (their hashes were forgotten)
        name = next(n for n in ck.keys() if n.endswith("norm.weight"))
        up.update_from_tensors({name: ck.get_tensor(name)})
        result["partial_consistent"] = model.language_model.weights_consistent
        up.update_from_disk(ck)
        result["rollback_consistent"] = model.language_model.weights_consistent
        result["rollback_equal"] = all(
            torch.equal(as_bytes(p), as_bytes(before[n])) for n, p in model.named_parameters()
        )
        result["rollback_logits_finite"] = bool(torch.isfinite(model(IDS)).all())
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)
    if not mode.startswith("kill"):
        dist.destroy_process_group()
    else:
        # The trainer is dead: tearing the process group down at interpreter exit can
        # abort inside gloo (a peer gone mid-connection, seen once as SIGABRT in CI-like
        # runs). Everything observed is on disk already; leave without that teardown.
        os._exit(0)


def _run_stream(tmp_path, mode: str, world: int = 3) -> tuple[str, str, list[dict]]:
    import json

    import torch.multiprocessing as mp

    a = make_checkpoint(tmp_path / "a", quant="bf16", seed=0, moe_intermediate_size=64)
    b = make_checkpoint(tmp_path / "b", quant="bf16", seed=1, moe_intermediate_size=64)
    port = _free_port()
    ctx = mp.start_processes(
        _stream_worker,
        args=(world, port, a, b, os.fspath(tmp_path), mode),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    for p in ctx.processes:
        p.join(timeout=240)
        assert not p.is_alive(), "a rank hung"
    codes = [p.exitcode for p in ctx.processes]
    for r in range(world):  # a rank's traceback, if it failed (the sender's, unless killed)
        if codes[r] not in (0, 3) and os.path.exists(ctx.error_files[r]):
            raise AssertionError(open(ctx.error_files[r], "rb").read()[-3000:])
    assert codes[1:] == [0] * (world - 1), codes
    assert codes[0] == (3 if mode.startswith("kill") else 0), codes
    return a, b, [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(1, world)]


@pytest.mark.parametrize(
    "mode", ["atomic", "streaming", "atomic+triton", "streaming+triton", "atomic@pull", "streaming+triton@pull"]
)
def test_a_streamed_update_equals_a_direct_load(tmp_path, mode):
    """``+triton``: the buckets are applied where they arrived by the device executor
    (the NCCL path of a GPU model; here gloo buckets and the Triton interpreter), staged
    in the device's memory for ``atomic``. ``@pull``: each receiver is sent only what it
    reads and does not hold (its TP half of what changed; nothing the second time)."""
    _a, b, results = _run_stream(tmp_path, mode)
    ck = kimi_loader.open(b)
    stream = sum(-(-ck.tensor_info(n).nbytes // 64) * 64 for n in ck.keys())  # every bucket of a broadcast
    pull = mode.endswith("@pull")
    for rank, res in enumerate(results, start=1):
        assert "error" not in res and res["changed"] > 0 and res["consistent"] and res["runs"] and res["version"] == 2
        if pull:  # half the experts (their aligned bytes), and the rest
            experts = sum(-(-ck.tensor_info(n).nbytes // 64) * 64 for n in ck.keys() if ".experts." in n)
            assert res["bytes_received"] == stream - experts // 2, (res, stream, experts)
            assert res["again"] == [0, 0], res
        else:
            assert res["bytes_received"] == stream and res["again"] == [0, stream], (res, stream)
        # atomic: this rank's changed bytes were held back (16-byte aligned on the device), never the model
        assert res["executor"] == ("triton" if "+triton" in mode else "cpu"), res
        staged = res["bytes_staged"]
        if mode.startswith("atomic"):
            assert res["bytes_changed"] <= staged <= res["bytes_changed"] + 16 * res["changed"], res
        else:
            assert staged == 0, res
        got = torch.load(tmp_path / f"rank{rank}.pt")
        par = dict(tp_rank=rank - 1, tp_size=2) | (dict(ep_size=2) if pull else {})
        want = kimi_loader.models.for_config(ck.config, **par)
        kimi_loader.load_weights(want, ck, **par)
        for n, p in want.named_parameters():
            assert torch.equal(as_bytes(got[n]), as_bytes(p)), n


@pytest.mark.parametrize(
    "mode",
    [
        "kill-atomic",
        "kill-streaming",
        "kill-atomic+triton",
        "kill-streaming+triton",
        "kill-atomic@pull",
        "kill-streaming@pull",
    ],
)
def test_a_stream_broken_by_a_dead_trainer(tmp_path, mode):
    """atomic: every receiver's model is bitwise unchanged; streaming: the receivers that
    applied a bucket are marked inconsistent (version not bumped) and refuse to run, and
    still do after an update of a subset; an update presenting every tensor (the old
    checkpoint again) makes them whole and consistent. ``@pull``: the receivers are
    served one after the other; the trainer dies serving the last, after the first got
    its whole part: the first is left as the others are (it waits for the group's vote
    before committing; a streaming one marks itself inconsistent), not at a version the
    others do not hold."""
    _a, _b, results = _run_stream(tmp_path, mode)
    if mode.endswith("@pull"):  # the first receiver had its whole part: the group's vote broke
        assert results[0]["error"] == "CheckpointIOError", results[0]
        m = re.search(r"broke after (\d+) of (\d+) buckets", results[0]["message"])
        assert m and m[1] == m[2] != "0", results[0]
    for res in results[1:] if mode.endswith("@pull") else results:
        assert res["error"] == "CheckpointIOError" and "broke after 2 of" in res["message"], res
    for res in results:
        assert res["version"] == 0
        if mode.startswith("kill-atomic"):
            assert res["unchanged"] and res["consistent"] and res["runs"]
        else:
            assert not res["unchanged"] and not res["consistent"] and not res["runs"]
            assert not res["partial_consistent"], res  # (a subset update used to mark it consistent)
        assert res["rollback_consistent"] and res["rollback_equal"] and res["rollback_logits_finite"], res


def test_a_stream_that_does_not_fit_the_plan_is_refused_before_a_byte_lands(tmp_path):
    _a, _b, results = _run_stream(tmp_path, "bad")
    for res in results:
        assert res["error"] == "ShapeMismatchError" and "[3, 3]" in res["message"], res
        assert res["unchanged"] and res["runs"] and res["version"] == 0


@pytest.mark.parametrize("mode", ["atomic", "streaming", "atomic@pull"])
def test_a_stream_one_rank_fails_is_committed_by_none(tmp_path, mode):
    """The last receiver fails applying a bucket: the other, which received and staged
    all of it, commits nothing (the group's vote; before, it committed, and the group
    served two versions), or, streaming, marks itself inconsistent. The sender is told
    which rank failed."""
    _a, _b, results = _run_stream(tmp_path, f"fail-last{'' if '@' in mode else '@ep'}".replace("@", f"-{mode}@", 1))
    first, last = results
    assert last["error"] == "PlanError" and "injected" in last["message"], last
    assert first["error"] == "PeerUpdateError" and "[2]" in first["message"], first
    for res in results:
        assert res["version"] == 0, res
    if mode.startswith("atomic"):
        assert "the model is unchanged" in first["message"], first
        assert all(res["unchanged"] and res["consistent"] and res["runs"] for res in results), results
    else:  # the first applied every bucket, the last none: the first refuses to run
        assert not first["unchanged"] and not first["consistent"], first
        assert last["unchanged"] and last["consistent"], last


def test_stage_then_commit_is_execute_atomic_in_two_halves(tmp_path):
    from kimi_loader.loader import plan_for

    a = make_checkpoint(tmp_path / "a", quant="ct-int4", seed=0)
    b = make_checkpoint(tmp_path / "b", quant="ct-int4", seed=1)
    model = kimi_loader.from_pretrained(a)
    snap = _snapshot(model)
    planned = plan_for(model, kimi_loader.open(b))
    plan = planned.plan
    which = list(range(len(plan)))
    dests = [planned.dests[n] for n in plan.dest_names()]
    targets = {d: dests[d] for d in set(plan.op_dests())}
    need = plan.staged_bytes(which)
    assert need == plan.bytes_written
    with pytest.raises(kimi_loader.InvalidArgumentError, match="staging arena"):
        plan.stage(which, torch.empty(need - 1, dtype=torch.uint8))
    arena = torch.empty(need, dtype=torch.uint8)
    plan.stage(which, arena)
    _assert_unchanged(model, snap)  # staging touches no destination
    plan.commit(which, targets, arena)
    model.post_load_weights()
    assert torch.equal(model(IDS), kimi_loader.from_pretrained(b)(IDS))
    with pytest.raises(kimi_loader.InvalidArgumentError, match="given twice"):
        plan.commit([0, 0], targets, arena)


@pytest.mark.parametrize("quant", ["ct-int4", "fp8-block"])
def test_host_staged_ops_committed_by_runs_equal_the_rust_executor(tmp_path, quant):
    """How host sources reach a model on a GPU (which the Rust executor cannot write):
    the ops staged on the host in destination order, then one copy per run of bytes
    contiguous in the arena and a destination. Exercised here into host destinations
    against ``Plan.execute_atomic``: a shuffled 60% subset of the ops (ragged runs), then
    every op, where each destination is one run."""
    from kimi_loader.loader import plan_for
    from kimi_loader.rl import _HostStaged

    a = make_checkpoint(tmp_path / "a", quant=quant, seed=0)
    b = make_checkpoint(tmp_path / "b", quant=quant, seed=1)
    want, got = kimi_loader.from_pretrained(a), kimi_loader.from_pretrained(a)
    ckb = kimi_loader.open(b)
    for part in (0.6, 1.0):
        plans = [plan_for(m, ckb) for m in (want, got)]
        plan = plans[0].plan
        n = len(plan)
        which = torch.randperm(n, generator=torch.Generator().manual_seed(n))[: int(n * part)].tolist()
        dests = [[p.dests[name] for name in p.plan.dest_names()] for p in plans]
        op_dests = plan.op_dests()
        plan.execute_atomic(which, {op_dests[k]: dests[0][op_dests[k]] for k in which})
        staged = _HostStaged(plans[1].plan, which)
        assert staged.arena.numel() == plan.staged_bytes(which)
        staged.copy_runs(dests[1])
        for (name, x), (_, y) in zip(want.named_parameters(), got.named_parameters(), strict=True):
            assert torch.equal(as_bytes(x), as_bytes(y)), (part, name)
    assert len(staged.runs()) == len(set(op_dests))  # every op staged: a copy per destination


def test_staging_bound_for_a_gpu_is_pinned_or_pageable_when_refused(tmp_path):
    """Host bytes bound for a GPU are staged page-locked (asynchronous copies at the
    pinned rate); where the driver refuses (here without a GPU: no driver), the same
    bytes in pageable memory, and the kept arena is not reallocated on every update to
    try again."""
    from kimi_loader.loader import host_buffer

    buf = host_buffer(64, pinned=True)
    assert (buf.numel(), buf.dtype, buf.is_pinned()) == (64, torch.uint8, torch.cuda.is_available())
    a = make_checkpoint(tmp_path / "a", quant="ct-int4", seed=0)
    up = WeightUpdater(kimi_loader.from_pretrained(a), baseline=a)
    first = up._staging(100, True)
    assert first.numel() >= 100 and first.is_pinned() == torch.cuda.is_available()
    assert up._staging(80, True).data_ptr() == first.data_ptr()  # (kept, whichever it is)
    assert up._staging(200, False).numel() >= 200  # (grown when too small)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("executor", ["auto", "cpu", "triton"])
def test_a_model_on_the_gpu_updates_from_host_memory_and_disk(tmp_path, executor):
    """A rollout engine on a GPU updated from host memory (a trainer's CPU state dict)
    and from a checkpoint on disk, by each executor: ``cpu`` and ``auto`` stage on the
    host and copy in runs, ``triton`` moves the sources to the GPU first (a GPU kernel
    never reads a host pointer); a checkpoint on disk goes through the host whatever
    the executor. Equal to a fresh load; the same checkpoint again changes nothing."""
    a = make_checkpoint(tmp_path / "a", quant="ct-int4", seed=0)
    b = make_checkpoint(tmp_path / "b", quant="ct-int4", seed=1)
    ckb = kimi_loader.open(b)
    want = kimi_loader.from_pretrained(b)
    for how in ("tensors", "disk"):
        model = kimi_loader.from_pretrained(a, device="cuda")
        up = WeightUpdater(model, baseline=a, executor=executor)
        if how == "tensors":
            report = up.update_from_tensors({n: ckb.get_tensor(n) for n in ckb.keys()})
        else:
            report = up.update_from_disk(b)
        # (a checkpoint on disk goes through the host whatever the executor)
        assert report.executor == ("triton" if executor == "triton" and how == "tensors" else "cpu"), (how, report)
        for n, p in want.named_parameters():
            assert torch.equal(as_bytes(dict(model.named_parameters())[n].cpu()), as_bytes(p)), (how, n)
        up.update_from_disk(b)  # (device sources are not hashed: after this one, the host hashes are known)
        assert up.update_from_disk(b).changed_tensors == 0
        assert up._arena is not None and up._arena.is_pinned(), how  # (bytes for a GPU: page-locked)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_model_spread_over_two_gpus_updates_through_the_host(tmp_path):
    """Odd layers on cuda:1, the rest on cuda:0: the device executor writes one device,
    so GPU tensors and a checkpoint on disk both go through the host and are copied a
    destination at a time (before: "the destinations are on several devices")."""
    a = make_checkpoint(tmp_path / "a", quant="ct-int4", seed=0)
    b = make_checkpoint(tmp_path / "b", quant="ct-int4", seed=1)
    ckb = kimi_loader.open(b)
    want = kimi_loader.from_pretrained(b)
    for how in ("tensors", "disk"):
        model = kimi_loader.from_pretrained(a)
        for n, p in model.named_parameters():
            layer = int(n.split("layers.")[1].split(".")[0]) if "layers." in n else 0
            p.data = p.data.to(f"cuda:{layer % 2}")
        up = WeightUpdater(model, baseline=a)
        if how == "tensors":
            report = up.update_from_tensors({n: ckb.get_tensor(n).to("cuda:0") for n in ckb.keys()})
        else:
            report = up.update_from_disk(b)
        assert report.executor == "cpu", report
        got = dict(model.named_parameters())
        for n, p in want.named_parameters():
            assert torch.equal(as_bytes(got[n].cpu()), as_bytes(p)), (how, n)


def _memory_worker(rank: int, port: int, a: str, b: str, out: str, atomic: bool) -> None:
    import json
    import threading
    import time

    import psutil
    import torch.distributed as dist

    from kimi_loader.rl import broadcast_weights

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    if rank == 0:
        ck = kimi_loader.open(b)
        broadcast_weights([(n, ck.get_tensor(n)) for n in ck.keys()], bucket_bytes=4 << 20)
    else:
        model = kimi_loader.from_pretrained(a, dtype=torch.bfloat16)
        up = WeightUpdater(model, baseline=a)
        proc = psutil.Process()
        before = peak = proc.memory_info().rss
        stop = False

        def sample() -> None:
            nonlocal peak
            while not stop:
                peak = max(peak, proc.memory_info().rss)
                time.sleep(0.0005)

        th = threading.Thread(target=sample)
        th.start()
        report = up.update_from_distributed(atomic=atomic)
        stop = True
        th.join()
        with open(out, "w") as fh:
            json.dump({"extra": peak - before, "changed": report.bytes_changed}, fh)
    dist.destroy_process_group()


def test_streamed_receiver_memory_does_not_grow_with_the_model(tmp_path):
    """The receive-all path held ~2x the checkpoint per receiver. Measured on two model
    sizes (8x apart): streaming needs about two 4 MiB buckets plus post-load temporaries,
    atomic the changed bytes it stages plus as much."""
    import json

    import torch.multiprocessing as mp

    extra = {}
    for layers in (2, 12):
        shape = dict(quant="bf16", hidden_size=256, moe_intermediate_size=256, n_routed_experts=16, vocab_size=2048)
        a = make_checkpoint(tmp_path / f"a{layers}", seed=0, num_hidden_layers=layers, **shape)
        b = make_checkpoint(tmp_path / f"b{layers}", seed=1, num_hidden_layers=layers, **shape)
        size = kimi_loader.open(a).data_bytes
        for atomic in (False, True):
            port = _free_port()
            out = os.fspath(tmp_path / "mem.json")
            mp.start_processes(
                _memory_worker, args=(port, a, b, out, atomic), nprocs=2, join=True, start_method="spawn"
            )
            extra[(layers, atomic)] = (json.loads(open(out).read()), size)
    (small, s_size), (large, l_size) = extra[(2, False)], extra[(12, False)]
    assert l_size > 5 * s_size > 0
    slack = 32 << 20  # allocator and post-load temporaries
    assert large["extra"] < 2 * (4 << 20) + slack < l_size, (small, large, l_size)
    for layers in (2, 12):
        got, size = extra[(layers, True)]
        assert got["extra"] < got["changed"] + 2 * (4 << 20) + slack, (layers, got)
    # what atomic holds beyond the changed bytes does not grow with the model either (a
    # fresh buffer per bucket among the kept staging fragmented the heap: +30 MB at 12 layers)
    over = {layers: extra[(layers, True)][0]["extra"] - extra[(layers, True)][0]["changed"] for layers in (2, 12)}
    assert over[12] - over[2] < 2 * (4 << 20), over


def _quantize_worker(rank: int, port: int, a: str, b: str, out: str, executor: str) -> None:
    import torch.distributed as dist

    from kimi_loader.rl import broadcast_weights

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    if rank == 0:
        ck = kimi_loader.open(b)
        broadcast_weights([(n, ck.get_tensor(n)) for n in ck.keys()], bucket_bytes=64 << 10)
    else:
        model = kimi_loader.from_pretrained(a)
        up = WeightUpdater(model, baseline=a, executor=executor)
        first = up.update_from_distributed(quantize=True)
        assert first.executor == ("triton" if executor == "triton" else "cpu")
        torch.save({n: p for n, p in model.named_parameters()}, out)
        assert first.changed_tensors > 0
    dist.destroy_process_group()


@pytest.mark.parametrize("executor", ["auto", "triton"])
def test_a_streamed_bf16_update_into_an_int4_model_quantizes_as_update_from_tensors(tmp_path, executor):

    import torch.multiprocessing as mp

    a = make_checkpoint(tmp_path / "a", quant="ct-int4", seed=0)
    b = make_checkpoint(tmp_path / "b", quant="bf16", seed=1)  # the trainer's bf16 weights
    port = _free_port()
    out = os.fspath(tmp_path / "streamed.pt")
    mp.start_processes(_quantize_worker, args=(port, a, b, out, executor), nprocs=2, join=True, start_method="spawn")
    ckb = kimi_loader.open(b)
    want = kimi_loader.from_pretrained(a)
    WeightUpdater(want, baseline=a).update_from_tensors([(n, ckb.get_tensor(n)) for n in ckb.keys()], quantize=True)
    got = torch.load(out)
    experts = want.language_model.model.layers[1].mlp.experts
    assert experts.format == "ct-int4"
    for n, p in want.named_parameters():
        assert torch.equal(as_bytes(got[n]), as_bytes(p)), n


def _odd_sizes_worker(rank: int, port: int, a: str, b: str, out: str, executor: str) -> None:
    """The trainer sends its tensors in its own order: a 66-byte bf16 norm weight first,
    then an fp32 bias, which a packed bucket would put 2 bytes past a 4-byte boundary."""
    import torch.distributed as dist

    from kimi_loader.rl import broadcast_weights

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    if rank == 0:
        ck = kimi_loader.open(b)
        first = [n for n in ck.keys() if n.endswith("q_a_layernorm.weight") or n.endswith("e_score_correction_bias")]
        names = sorted(first, key=lambda n: "bias" in n) + [n for n in ck.keys() if n not in first]
        broadcast_weights([(n, ck.get_tensor(n)) for n in names], bucket_bytes=1 << 20)
    else:
        model = kimi_loader.from_pretrained(a)
        report = WeightUpdater(model, baseline=a, executor=executor).update_from_distributed(atomic=False)
        torch.save({n: p for n, p in model.named_parameters()}, out)
        assert report.changed_tensors > 0
    dist.destroy_process_group()


@pytest.mark.parametrize("executor", ["cpu", "triton"])
def test_tensors_of_any_byte_size_in_any_order_stream(tmp_path, executor):
    """Each tensor starts a 64-byte boundary of its bucket (the receiver views the bucket
    as each tensor's dtype, the device executor reads it with wide loads): odd byte sizes
    (``q_lora_rank`` 33: 66-byte norm weights) before fp32 tensors arrive intact."""
    import torch.multiprocessing as mp

    a = make_checkpoint(tmp_path / "a", quant="bf16", seed=0, q_lora_rank=33)
    b = make_checkpoint(tmp_path / "b", quant="bf16", seed=1, q_lora_rank=33)
    out = os.fspath(tmp_path / "streamed.pt")
    args = (_free_port(), a, b, out, executor)
    mp.start_processes(_odd_sizes_worker, args=args, nprocs=2, join=True, start_method="spawn")
    want, got = kimi_loader.from_pretrained(b), torch.load(out)
    for n, p in want.named_parameters():
        assert torch.equal(as_bytes(got[n]), as_bytes(p)), n


def _device_hash_worker(rank: int, port: int, a: str, b: str, out: str, executor: str) -> None:
    """Rank 0 streams ``b`` three times with ``kl64`` hashes (once more unchanged, then
    with one tensor changed); rank 1 applies each and saves what it saw."""
    import json

    import torch.distributed as dist

    from kimi_loader.rl import broadcast_weights

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ck = kimi_loader.open(b)
    items = [(n, ck.get_tensor(n).clone()) for n in ck.keys()]
    norm = next(k for k, (n, _) in enumerate(items) if n.endswith("layers.0.input_layernorm.weight"))
    if rank == 0:
        for k in range(3):
            if k == 2:
                items[norm] = (items[norm][0], items[norm][1] + 1)
            broadcast_weights(items, bucket_bytes=64 << 10, hash="device")
    else:
        model = kimi_loader.from_pretrained(a)
        up = WeightUpdater(model, baseline=a, executor=executor)
        changed = [up.update_from_distributed().changed_tensors for _ in range(3)]
        torch.save({n: p for n, p in model.named_parameters()}, out + ".pt")
        with open(out + ".json", "w") as fh:
            json.dump({"changed": changed, "tensors": len(items)}, fh)
    dist.destroy_process_group()


def _unit_delta_worker(rank: int, port: int, a: str, b: str, out: str, atomic: bool) -> None:
    """Rank 0 streams ``b``; rank 1, a transformers model that dequantizes FP8 on load,
    holds ``a`` and applies the stream."""
    import json

    import torch.distributed as dist

    from kimi_loader.models.hf import empty_model
    from kimi_loader.rl import broadcast_weights

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    if rank == 0:
        ck = kimi_loader.open(b)
        broadcast_weights([(n, ck.get_tensor(n)) for n in ck.keys()], bucket_bytes=16 << 10)
    else:
        model = empty_model(a)
        kimi_loader.load_weights(model, a)
        report = WeightUpdater(model, baseline=a).update_from_distributed(atomic=atomic)
        torch.save({n: p for n, p in model.named_parameters()}, out + ".pt")
        with open(out + ".json", "w") as fh:
            json.dump([report.changed_tensors, report.bytes_changed], fh)
    dist.destroy_process_group()


@pytest.mark.parametrize("atomic", [True, False])
def test_a_streamed_quantized_weight_whose_scale_did_not_change(tmp_path, atomic):
    """A dequantizing op reads a weight and its scale: a delta where only the FP8 weight
    changed (its scale equal, as after a small step) sends the pair. It used to send the
    weight alone, and the receiver failed mid-stream ("weight_scale_inv not found"),
    leaving the trainer blocked (atomic=False: some buckets applied). Equal to a direct
    load; the tensors the plan does not read (the MTP layer) are neither sent to the plan
    nor counted as changed."""
    import json

    import torch.multiprocessing as mp

    from kimi_loader.models.hf import empty_model

    a = make_checkpoint(tmp_path / "a", preset="deepseek-v3-tiny", quant="fp8-block", seed=0)
    name = "model.layers.0.self_attn.o_proj.weight"
    w = kimi_loader.open(a).get_tensor(name)
    b = rewrite(a, tmp_path / "b", change={name: (w.view(torch.uint8) ^ 0x80).view(w.dtype)})  # signs flipped
    out = os.fspath(tmp_path / "recv")
    mp.start_processes(
        _unit_delta_worker, args=(_free_port(), a, b, out, atomic), nprocs=2, join=True, start_method="spawn"
    )
    want = empty_model(b)
    kimi_loader.load_weights(want, b)
    got = torch.load(out + ".pt")
    for n, p in want.named_parameters():
        assert torch.equal(as_bytes(got[n]), as_bytes(p)), n
    changed, nbytes = json.loads(open(out + ".json").read())
    assert changed == 1 and nbytes == w.numel() * 2, (changed, nbytes)  # (one bf16 destination)


@pytest.mark.parametrize("executor", ["auto", "triton"])
def test_a_stream_hashed_on_the_device_skips_what_the_receiver_holds(tmp_path, executor):
    """kl64 (the device hash a GPU trainer sends): the first stream into a model loaded
    from disk (xxh3 hashes) rewrites every tensor; the same weights again change nothing;
    one changed tensor is the only one applied; the result is a direct update's."""
    import json

    a, b, out = _two_ranks(tmp_path, _device_hash_worker, executor)
    seen = json.loads(open(out + ".json").read())
    assert seen["changed"] == [seen["tensors"], 0, 1], seen
    ckb = kimi_loader.open(b)
    items = {n: ckb.get_tensor(n).clone() for n in ckb.keys()}
    norm = next(n for n in items if n.endswith("layers.0.input_layernorm.weight"))
    items[norm] = items[norm] + 1
    want = kimi_loader.from_pretrained(a)
    WeightUpdater(want, baseline=a).update_from_tensors(list(items.items()))
    got = torch.load(out + ".pt")
    for n, p in want.named_parameters():
        assert torch.equal(as_bytes(got[n]), as_bytes(p)), n


def _ipc_engine(conn, a: str, out: str, device: str) -> None:
    """A colocated engine: receives share_tensors payloads over a pipe and applies them."""
    import json

    model = kimi_loader.from_pretrained(a, device=device)
    up = WeightUpdater(model, baseline=a)
    seen: dict = {}
    report = up.update_from_ipc(conn.recv_bytes())
    seen["changed"] = report.changed_tensors
    seen["executor"] = report.executor
    torch.save({n: p.cpu() for n, p in model.named_parameters()}, out + ".pt")
    conn.send_bytes(b"applied")
    for k in ("garbage", "used"):  # a payload that is none; one whose host arena was handed over already
        try:
            up.update_from_ipc(conn.recv_bytes())
            seen[k] = "applied"
        except kimi_loader.KimiLoaderError as e:
            seen[k] = type(e).__name__
    saved = torch.load(out + ".pt")
    seen["unchanged"] = all(torch.equal(as_bytes(p.cpu()), as_bytes(saved[n])) for n, p in model.named_parameters())
    with open(out + ".json", "w") as fh:
        json.dump(seen, fh)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
        ),
    ],
)
def test_a_colocated_engine_updates_from_shared_tensors(tmp_path, device):
    """share_tensors -> update_from_ipc across processes (host tensors: one shared memory
    arena read in place; GPU tensors: CUDA IPC handles, applied on the device): the
    engine's model equals a direct update; a payload that is none is refused, and a used
    host payload too (its file descriptor was handed over), the model untouched; CUDA
    IPC handles open again (the same weights: nothing changes)."""
    import json
    import multiprocessing

    from kimi_loader.rl import share_tensors

    a = make_checkpoint(tmp_path / "a", quant="bf16", seed=0)
    b = make_checkpoint(tmp_path / "b", quant="bf16", seed=1)
    ckb = kimi_loader.open(b)
    items = [(n, ckb.get_tensor(n).to(device, copy=True)) for n in ckb.keys()]
    out = os.fspath(tmp_path / "engine")
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    engine = ctx.Process(target=_ipc_engine, args=(there, a, out, device))
    engine.start()
    payload = share_tensors(items)
    here.send_bytes(payload)
    assert here.recv_bytes() == b"applied"
    here.send_bytes(b"not a payload")
    here.send_bytes(payload)  # its file descriptor was handed over with the first use
    engine.join(timeout=120)
    assert engine.exitcode == 0
    seen = json.loads(open(out + ".json").read())
    used = "CheckpointIOError" if device == "cpu" else "applied"
    executor = "cpu" if device == "cpu" else "triton"
    assert seen == {
        "changed": len(items),
        "executor": executor,
        "garbage": "InvalidArgumentError",
        "used": used,
        "unchanged": True,
    }
    want = kimi_loader.from_pretrained(a)
    WeightUpdater(want, baseline=a).update_from_tensors([(n, t.cpu()) for n, t in items])
    got = torch.load(out + ".pt")
    for n, p in want.named_parameters():
        assert torch.equal(as_bytes(got[n]), as_bytes(p)), n


def _nccl_worker(rank: int, port: int, a: str, b: str, out: str) -> None:
    """Rank 0 (GPU 0) streams ``b`` from GPU memory; rank 1 (GPU 1) holds ``a`` there and
    applies it twice: atomic, then (the same weights again) streaming."""
    import json

    import torch.distributed as dist

    from kimi_loader.rl import broadcast_weights

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    if rank == 0:
        ck = kimi_loader.open(b)
        items = [(n, ck.get_tensor(n).cuda()) for n in ck.keys()]
        broadcast_weights(items, bucket_bytes=1 << 20)
        broadcast_weights(items, bucket_bytes=1 << 20)
    else:
        model = kimi_loader.from_pretrained(a, device="cuda")
        up = WeightUpdater(model, baseline=a)
        first = up.update_from_distributed(atomic=True)
        second = up.update_from_distributed(atomic=False)
        torch.save({n: p.cpu() for n, p in model.named_parameters()}, out + ".pt")
        with open(out + ".json", "w") as fh:
            json.dump([first.executor, first.changed_tensors, second.changed_tensors], fh)
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (NCCL: one rank per GPU)")
def test_an_nccl_stream_from_gpu_memory_equals_a_direct_load(tmp_path):
    """NCCL end to end: kl64 hashes and buckets on the trainer's GPU, applied on the
    receiver's GPU by the device executor (staged there for atomic=True); the same
    weights again change nothing; the result equals a direct load."""
    import json

    _a, b, out = _two_ranks(tmp_path, _nccl_worker)
    executor, first, second = json.loads(open(out + ".json").read())
    assert executor == "triton" and first > 0 and second == 0
    want = kimi_loader.from_pretrained(b)
    got = torch.load(out + ".pt")
    for n, p in want.named_parameters():
        assert torch.equal(as_bytes(got[n]), as_bytes(p)), n


def test_broadcast_weights_checks_its_hash_option():
    from kimi_loader.rl import broadcast_weights, send_weights

    for send in (broadcast_weights, send_weights):
        with pytest.raises(kimi_loader.InvalidArgumentError, match="hash must be"):
            send([("x", torch.zeros(1))], hash="md5")
        with pytest.raises(kimi_loader.InvalidArgumentError, match="not initialized"):  # (was torch's ValueError)
            send([("x", torch.zeros(1))])


@pytest.mark.parametrize("quant", QUANTS)
def test_the_seven_reload_failure_classes(tmp_path, quant):
    """vLLM's list of what goes wrong when weights are reloaded, each checked in every
    format: stable addresses (derived buffers too), refreshed derived values, the loader's
    lifecycle, state preserved, routing / sharding per rank, name mapping (the Kimi
    wrapper's names) and cache coherence."""
    a = make_checkpoint(tmp_path / "a", quant=quant, seed=0)
    b = make_checkpoint(tmp_path / "b", quant=quant, seed=1)
    model, fresh = kimi_loader.from_pretrained(a), kimi_loader.from_pretrained(b)
    cache = model.new_cache()
    model(IDS, cache)  # the runtime and a KV cache warmed on the old weights
    addresses = _addresses(model)
    up = WeightUpdater(model, baseline=a)
    report = up.update_from_disk(b)  # (name mapping: the checkpoint's language_model.* names)
    # 1. stable addresses, w_kc / w_vc included
    assert _addresses(model) == addresses
    # 2. derived values refreshed: w_kc / w_vc (and every buffer) as a fresh load computes them
    want = dict(fresh.named_buffers())
    for n, buf in model.named_buffers():
        assert torch.equal(as_bytes(buf), as_bytes(want[n])), n
    # 7. cache coherence: new forwards see the new weights; a KV cache of the old ones is refused
    assert torch.equal(model(IDS), fresh(IDS))
    with pytest.raises(kimi_loader.InvalidArgumentError, match="stale"):
        model(IDS[:, :1], cache)
    # 4. state preserved: a one-tensor update leaves every other parameter as it was
    snap = _snapshot(model)
    norm = "language_model.model.norm.weight"
    again = up.update_from_tensors([(norm, torch.ones(64, dtype=kimi_loader.open(a).tensor_info(norm).dtype))])
    for n, t in model.named_parameters():
        if n != "language_model.model.norm.weight":
            assert torch.equal(as_bytes(t), as_bytes(snap[n])), n
    # 3. lifecycle: the compiled plan is replayed, the version counts every update
    assert not report.replanned and not again.replanned
    assert up.version == 2 == model.weights_version == model.language_model.weights_version
    # 5. routing and sharding per rank: an expert-parallel rank's update (its experts
    # only; quantization groups keep tiny TP slices from every format) equals loading it
    layout = kimi_loader.ParallelLayout.of(0, 1, 1, 2, independent=True)
    ck_b = kimi_loader.open(b)
    rank = kimi_loader.models.for_config(kimi_loader.open(a).config, parallel=layout)
    kimi_loader.load_weights(rank, a)
    WeightUpdater(rank, baseline=a).update_from_disk(b)
    direct = kimi_loader.models.for_config(ck_b.config, parallel=layout)
    kimi_loader.load_weights(direct, ck_b)
    for (n, p), (_, q) in zip(rank.named_parameters(), direct.named_parameters(), strict=True):
        assert torch.equal(as_bytes(p), as_bytes(q)), n


def test_quantize_on_sync_refuses_a_source_of_the_wrong_shape(tmp_path):
    """A bf16 weight whose shape is not the stored linear's was quantized with a group
    derived from it (a ZeroDivisionError for a narrow one); now it is refused, naming it,
    before anything is quantized or copied."""
    a = make_checkpoint(tmp_path / "a", quant="ct-int4", seed=0)
    model = kimi_loader.from_pretrained(a)
    snap = _snapshot(model)
    up = WeightUpdater(model, baseline=a)
    name = "language_model.model.layers.1.mlp.experts.0.gate_proj.weight"
    for shape in ((32, 1), (64, 32)):
        with pytest.raises(ShapeMismatchError, match=name) as e:
            up.update_from_tensors([(name, torch.zeros(shape, dtype=torch.bfloat16))], quantize=True)
        assert e.value.expected == (32, 64) and e.value.found == shape
    _assert_unchanged(model, snap)
    assert up.version == 0


def test_quantize_on_sync_after_a_checkpoint_rewrote_the_quantized_parts(tmp_path):
    """bf16 weights synced into an int4 model (quantize-on-sync), the int4 checkpoint
    loaded over them (a rollback), then the same bf16 weights again: they are quantized
    and written again. The source hashes of the first sync used to skip them as
    unchanged, leaving the rollback's experts in place."""
    a = make_checkpoint(tmp_path / "a", quant="ct-int4", seed=0)
    b = make_checkpoint(tmp_path / "b", quant="bf16", seed=1)
    ckb = kimi_loader.open(b)
    trainer = {n: ckb.get_tensor(n) for n in ckb.keys()}
    model = kimi_loader.from_pretrained(a)
    up = WeightUpdater(model, baseline=a)
    up.update_from_tensors(trainer, quantize=True)
    want = _snapshot(model)
    assert up.update_from_tensors(trainer, quantize=True).changed_tensors == 0  # (unchanged: skipped)
    up.update_from_disk(a)
    experts = "language_model.model.layers.1.mlp.experts.w13_weight_packed"
    assert not torch.equal(as_bytes(dict(model.named_parameters())[experts]), as_bytes(want[experts]))
    assert up.update_from_tensors(trainer, quantize=True).changed_tensors > 0
    _assert_unchanged(model, want)


def test_what_counts_as_presenting_every_tensor_again():
    """After a broken ``atomic=False`` stream, the model is consistent again once an update
    presents every tensor the stream announced: a module's weight counts in any of its
    forms (unquantized ``.weight`` for quantize-on-sync, or its quantized parts)."""
    from kimi_loader.rl import _covers

    needed = {"m.experts.0.w1.weight_packed", "m.experts.0.w1.weight_scale", "m.norm.weight", "m.gate.e_bias"}
    assert _covers(needed, ["m.experts.0.w1.weight", "m.norm.weight", "m.gate.e_bias"])
    assert _covers(needed, [*needed, "m.other.weight"])
    assert not _covers(needed, ["m.experts.0.w1.weight", "m.norm.weight"])  # the bias is missing
    assert not _covers(needed, ["m.experts.0.w1.weight_packed", "m.experts.0.w1.weight_scale", "m.gate.e_bias"])
    assert _covers({"m.experts.0.w1.weight"}, ["m.experts.0.w1.weight_packed", "m.experts.0.w1.weight_scale"])
    assert _covers(set(), [])


def test_an_empty_update_changes_nothing_from_every_entry_point(tmp_path):
    """A trainer's delta can be empty (nothing changed this step): from memory, a state
    dict, shared memory or a subset of a checkpoint, it is an update that changes nothing
    (it used to be an InvalidArgumentError from memory and a no-op from disk)."""
    from kimi_loader.rl import share_tensors

    a = make_checkpoint(tmp_path / "a", quant="ct-int4", seed=0)
    model = kimi_loader.from_pretrained(a)
    up = WeightUpdater(model, baseline=a)
    snap = _snapshot(model)
    for update in (
        lambda: up.update_from_tensors([]),
        lambda: up.update_from_tensors({}, quantize=True),
        lambda: up.update_from_ipc(share_tensors([])),
        lambda: up.update_from_disk(a, names=[]),
    ):
        version = up.version
        report = update()
        assert (report.tensors, report.changed_tensors, report.bytes_changed) == (0, 0, 0), report
        assert report.version == up.version == version + 1
    _assert_unchanged(model, snap)


def test_a_models_own_state_dict_is_refused_naming_a_fused_parameter(tmp_path):
    """Another runtime's ``state_dict()`` names fused parameters (``fused_qkv_a_proj_with_mqa``,
    ``experts.w13_weight_packed``) that no checkpoint has: refused by name before anything
    is read (it failed on a fused shape, or on the first dtype), the model unchanged."""
    a = make_checkpoint(tmp_path / "a", quant="ct-int4", seed=0)
    model = kimi_loader.from_pretrained(a, dtype=torch.bfloat16)
    up = WeightUpdater(model, baseline=a)
    snap = _snapshot(model)
    with pytest.raises(kimi_loader.InvalidArgumentError, match="is a parameter of the model") as e:
        up.update_from_tensors(model.state_dict())
    assert e.value.tensor in dict(model.named_parameters()) and e.value.tensor not in kimi_loader.open(a).keys()
    _assert_unchanged(model, snap)
    assert up.version == 0


def test_a_failed_post_load_step_leaves_the_model_refused_until_rewritten(tmp_path, monkeypatch):
    """The weights are written, then ``post_load_weights`` fails (a GPU out of memory
    building ``w_kc``, Ctrl-C): the derived buffers are stale, so the model is marked
    inconsistent and refuses to run (it ran on stale ``w_kc`` / ``w_vc``), and the same
    update again rewrites those tensors and redoes the step (their hashes were kept,
    so it was a no-op)."""
    a = make_checkpoint(tmp_path / "a", quant="ct-int4", seed=0)
    b = make_checkpoint(tmp_path / "b", quant="ct-int4", seed=1)
    model = kimi_loader.from_pretrained(a)
    up = WeightUpdater(model, baseline=a)

    def out_of_memory(self, layers=None):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(type(model.language_model), "post_load_weights", out_of_memory)
    with pytest.raises(RuntimeError, match="simulated") as e:
        up.update_from_disk(b)
    assert "refuses to run until an update presents those tensors again" in "".join(e.value.__notes__)
    assert not model.language_model.weights_consistent
    with pytest.raises(kimi_loader.InconsistentWeightsError):
        model(IDS)
    monkeypatch.undo()
    report = up.update_from_disk(b)
    assert report.changed_tensors > 0 and report.layers_post_processed, report
    assert model.language_model.weights_consistent
    assert torch.equal(model(IDS), kimi_loader.from_pretrained(b)(IDS))
