"""Issue #10's crashes and hangs, each run in a subprocess with a timeout (a crash is a
non-zero exit or a signal, a hang is the timeout), and the argument checks at the
public entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kimi_loader
from kimi_loader.errors import InvalidArgumentError, KimiLoaderError


def _run(code: str, timeout: float = 120, **env) -> str:
    """Runs ``code`` in a fresh interpreter; fails on a crash, a hang or a non-zero exit."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_threads_racing_one_updater_and_release_mid_update(synth_dir):
    a, b = synth_dir("kimi-k2.5-tiny", "ct-int4"), synth_dir("kimi-k2.5-tiny", "ct-int4", seed=1)
    out = _run(f"""
        import threading, torch, kimi_loader
        from kimi_loader.rl import WeightUpdater
        model = kimi_loader.from_pretrained({a!r})
        up = WeightUpdater(model, baseline={a!r})
        errors = []
        def work(paths):
            try:
                for p in paths:
                    up.update_from_disk(p)
            except Exception as e:
                errors.append(repr(e))
        def release():
            for _ in range(200):
                up.release_staging()
        ts = [threading.Thread(target=work, args=([{b!r}, {a!r}] * 3,)) for _ in range(3)]
        ts.append(threading.Thread(target=release))
        for t in ts: t.start()
        for t in ts: t.join()
        assert not errors, errors
        ref = kimi_loader.from_pretrained({a!r})
        ids = torch.arange(12).reshape(2, 6)
        assert torch.equal(model(ids), ref(ids))  # every thread's last update was back to a
        print(up.version)
    """)
    assert int(out) == 18


@pytest.mark.parametrize(
    "change",
    ["p.data = torch.zeros(4, dtype=p.dtype)", "p.data = p.data.to(torch.float16)", "model.to(torch.bfloat16)"],
)
def test_parameter_changed_after_planning_is_refused(synth_dir, change):
    a, b = synth_dir("kimi-k2.5-tiny", "bf16"), synth_dir("kimi-k2.5-tiny", "bf16", seed=1)
    _run(f"""
        import torch, kimi_loader
        from kimi_loader.rl import WeightUpdater
        from kimi_loader.errors import InvalidArgumentError
        model = kimi_loader.from_pretrained({a!r})
        up = WeightUpdater(model, baseline={a!r})
        p = model.language_model.model.layers[0].self_attn.o_proj.weight
        {change}
        before = {{n: t.clone() for n, t in model.state_dict().items()}}
        try:
            up.update_from_disk({b!r})
        except InvalidArgumentError as e:
            assert "resized or cast" in str(e), e
        else:
            raise SystemExit("no error")
        assert up.version == 0
        for n, t in model.state_dict().items():  # nothing was written
            assert torch.equal(t, before[n]), n
    """)


def test_broadcast_reads_with_pread_so_truncation_is_an_error(synth_dir, tmp_path):
    """A shard truncated after open: broadcast_weights raises CheckpointIOError (it
    reads with pread), where a view through the map would die of SIGBUS."""
    import shutil

    path = tmp_path / "ck"
    shutil.copytree(synth_dir("kimi-k2.5-tiny", "bf16"), path)
    _run(f"""
        import os, torch, torch.distributed as dist, kimi_loader
        from kimi_loader.errors import CheckpointIOError
        from kimi_loader.rl import broadcast_weights
        port = {29500 + os.getpid() % 1000}
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{{port}}", rank=0, world_size=1)
        ck = kimi_loader.open({os.fspath(path)!r})
        for f in ck.files:
            os.truncate(f, os.path.getsize(f) // 2)
        try:
            broadcast_weights(ck)
        except CheckpointIOError as e:
            print("ok", e)
        else:
            raise SystemExit("no error")
    """)


def test_read_after_fork_does_not_hang(synth_dir):
    path = synth_dir("kimi-k2.5-tiny", "bf16")
    _run(
        f"""
        import os, kimi_loader
        ck = kimi_loader.open({path!r})
        ck.read_tensors()  # the parent's pool exists now
        pid = os.fork()
        if pid == 0:
            n = len(kimi_loader.open({path!r}).read_tensors())
            os._exit(0 if n > 0 else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
    """,
        timeout=60,
    )


def test_fifo_is_refused_not_waited_on(tmp_path):
    fifo, index = tmp_path / "model.safetensors", tmp_path / "other" / "model.safetensors.index.json"
    index.parent.mkdir()
    os.mkfifo(fifo)
    os.mkfifo(index)
    _run(
        f"""
        import kimi_loader
        from kimi_loader.errors import KimiLoaderError
        for p, why in (({os.fspath(fifo)!r}, "regular file"), ({os.fspath(index)!r}, "regular file"),
                       ({os.fspath(tmp_path)!r}, "")):
            try:
                kimi_loader.open(p)
            except KimiLoaderError as e:
                assert why in str(e), e
            else:
                raise SystemExit("opened a FIFO")
    """,
        timeout=30,
    )


def test_index_with_256k_shard_names_parses_in_linear_time(tmp_path):
    """Quadratic parsing took 120 s here; linear takes well under a second (the timeout
    only catches the quadratic behaviour, it is not a benchmark)."""
    n = 256 * 1024
    index = {"metadata": {}, "weight_map": {f"t.{i}": f"model-{i:06d}-of-{n:06d}.safetensors" for i in range(n)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    _run(
        f"""
        import kimi_loader
        from kimi_loader.errors import KimiLoaderError
        try:
            kimi_loader.open({os.fspath(tmp_path)!r})
        except KimiLoaderError as e:
            assert "model-000000-of-262144.safetensors" in str(e), e
    """,
        timeout=30,
    )


@pytest.mark.parametrize("threads", [-1, 0, "4", 4.0, True, 10_000])
def test_bad_thread_counts_are_typed_errors(synth_dir, threads):
    path = synth_dir("kimi-k2.5-tiny", "bf16")
    with pytest.raises(InvalidArgumentError, match="threads"):
        kimi_loader.open(path, threads=threads)
    with pytest.raises(InvalidArgumentError, match="threads"):
        kimi_loader.load_weights(kimi_loader.models.for_config(kimi_loader.open(path).config), path, threads=threads)


def test_many_thread_counts_do_not_leak_threads(synth_dir):
    import psutil

    path = synth_dir("kimi-k2.5-tiny", "bf16")
    proc = psutil.Process()
    kimi_loader.open(path, threads=2)
    for n in range(1, 41):
        kimi_loader.open(path, threads=n)
    assert proc.num_threads() < 4 * 40 + 64  # at most 4 pools of <= 40 threads are alive


@pytest.mark.parametrize(
    "call",
    [
        "open(None)",
        "open(b'x')",
        "open([])",
        "open([1])",
        "ck.get_tensor(5)",
        "ck.tensor_info(None)",
        "ck.read_tensors([5])",
    ],
)
def test_bad_arguments_are_typed_errors(synth_dir, call):
    ck = kimi_loader.open(synth_dir("kimi-k2.5-tiny", "bf16"))
    with pytest.raises(InvalidArgumentError):
        eval(call, {"open": kimi_loader.open, "ck": ck})


def test_update_from_tensors_refuses_what_is_not_a_cpu_tensor(synth_dir):
    from kimi_loader.rl import WeightUpdater

    path = synth_dir("kimi-k2.5-tiny", "bf16")
    model = kimi_loader.from_pretrained(path)
    up = WeightUpdater(model, baseline=path)
    name = "language_model.model.norm.weight"
    for bad in (torch.zeros(64, device="meta"), __import__("numpy").zeros(64), "x"):
        with pytest.raises(KimiLoaderError, match=name):
            up.update_from_tensors([(name, bad)])
    assert up.version == 0


def test_ctrl_c_interrupts_a_load_between_batches(synth_dir):
    """SIGINT during a load raises KeyboardInterrupt at the next batch boundary; the load
    stops there (no further batches, no post-load step), as any failed load does."""
    path = synth_dir("kimi-k2.5-tiny", "bf16")
    _run(
        f"""
        import signal, kimi_loader
        from kimi_loader.models import for_config
        # (a shell's background job starts with SIGINT ignored, and Python keeps it so)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        ck = kimi_loader.open({path!r})
        model = for_config(ck.config, dtype=__import__("torch").float32)
        calls = []
        def progress(done, total):
            calls.append(done)
            if len(calls) == 2:
                signal.raise_signal(signal.SIGINT)
        try:
            kimi_loader.load_weights(model, ck, progress=progress)
        except KeyboardInterrupt:
            pass
        else:
            raise SystemExit("not interrupted")
        assert len(calls) == 2, calls
        assert model.language_model.post_load_calls == []
    """,
        timeout=60,
    )
