"""Shared helpers for the benchmarks: cached synthetic checkpoints and timing."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("KIMI_LOADER_BENCH_DIR", os.path.join(ROOT, ".bench"))


#: a ~1.45 GB bf16 DeepSeek-V3-layout checkpoint with vLLM's 576-wide MLA latent
#: (bench_first_load, bench_vllm)
DS_1G6 = dict(
    preset="deepseek-v3-tiny",
    kv_lora_rank=512,
    qk_rope_head_dim=64,
    hidden_size=1024,
    moe_intermediate_size=512,
    n_routed_experts=64,
    num_hidden_layers=8,
    num_shards=8,
)


def ds_shape(**overrides) -> dict:
    """The benchmarks' DeepSeek-V3-layout model: 12 layers (the first dense), 1024 wide,
    MLA at a quarter of V3's widths, an 8192 vocabulary, no MTP layer, in 8 shards;
    ``overrides`` on top (experts, groups, quantization)."""
    return (
        dict(
            preset="deepseek-v3-tiny",
            num_shards=8,
            hidden_size=1024,
            intermediate_size=2048,
            moe_intermediate_size=512,
            num_hidden_layers=12,
            first_k_dense_replace=1,
            vocab_size=8192,
            num_attention_heads=8,
            num_key_value_heads=8,
            q_lora_rank=256,
            kv_lora_rank=128,
            qk_nope_head_dim=64,
            qk_rope_head_dim=32,
            v_head_dim=64,
            num_nextn_predict_layers=0,
        )
        | overrides
    )


def checkpoint(name: str, **kwargs) -> str:
    """A synthetic checkpoint generated once into the bench cache and reused."""
    import shutil

    from kimi_loader.synth import SYNTH_VERSION, make_checkpoint

    path = os.path.join(CACHE, name)
    done = os.path.join(path, ".complete")
    # what was asked for and what the generator writes: a cached checkpoint made by an
    # older generator or with other arguments is made again
    want = json.dumps({"synth": SYNTH_VERSION, **kwargs}, sort_keys=True)
    if not os.path.exists(done) or open(done).read() != want:
        shutil.rmtree(path, ignore_errors=True)
        make_checkpoint(path, **kwargs)
        with open(done, "w") as f:
            f.write(want)
    warm(path)  # whatever an earlier benchmark evicted
    return path


def warm(*paths: str, evict_others: bool = False) -> None:
    """Reads every file of the checkpoint folders once, so that timings start from a warm
    page cache. ``evict_others`` also drops every other bench checkpoint's pages from the
    page cache (``POSIX_FADV_DONTNEED``), for loads into fresh memory: they then start
    with the same free memory whatever ran before. Without it the kernel has to reclaim a
    cache page for each fault once earlier benchmarks filled memory, and a first float32
    load varied 2.5x between runs (0.7 s with free memory, 1.3-4 s with 5 of 24 GiB
    free)."""
    keep = {os.path.realpath(p) for p in paths}
    if evict_others and os.path.isdir(CACHE):
        for d in os.listdir(CACHE):
            other = os.path.realpath(os.path.join(CACHE, d))
            if other not in keep and os.path.isdir(other):
                for f in os.listdir(other):
                    if not os.path.isfile(os.path.join(other, f)):
                        continue
                    fd = os.open(os.path.join(other, f), os.O_RDONLY)
                    try:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    finally:
                        os.close(fd)
    for p in paths:
        for f in os.listdir(p):
            with open(os.path.join(p, f), "rb") as fh:
                while fh.read(1 << 24):
                    pass


def best_of(fn: Callable[[], object], repeat: int = 5) -> tuple[float, float]:
    """(best, median) wall time of ``fn`` over ``repeat`` runs, in seconds."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], repeat: int = 15) -> dict[str, tuple[float, float]]:
    """Runs the contenders in turn, ``repeat`` rounds, so that machine noise that drifts
    over time hits all of them alike. Returns label -> (best, median) seconds (the same
    timer as ``kimi-loader bench``)."""
    from kimi_loader.bench import interleaved as run_interleaved

    return run_interleaved(fns, repeat)


#: ``make bench`` points this at one JSON-lines file per run; ``benches/results.py``
#: turns it into the dated results files (unset: figures are only printed)
RECORD = os.environ.get("KIMI_LOADER_BENCH_RECORD")
_SECTION = [""]


def section(title: str) -> None:
    """Names the figures recorded from here on (labels repeat between sections)."""
    _SECTION[0] = title


def record(label: str, best_s: float | None, median_s: float | None = None, **extra: object) -> None:
    """Adds one figure of this benchmark (the script's name) to the run's record."""
    if not RECORD:
        return
    bench = os.path.splitext(os.path.basename(sys.argv[0]))[0]
    entry = {"bench": bench, "section": _SECTION[0], "label": label, "best_s": best_s, "median_s": median_s, **extra}
    with open(RECORD, "a") as f:
        f.write(json.dumps(entry) + "\n")


def row(
    label: str,
    seconds: float,
    baseline: float | None = None,
    extra: str = "",
    median: float | None = None,
    base_median: float | None = None,
) -> str:
    """One printed line (time, ratio baseline / seconds: > 1 is faster than the
    baseline), also recorded (see :func:`record`) with its median where given."""
    ratio = f"{baseline / seconds:7.2f}x" if baseline else "        "
    record(
        label,
        seconds,
        median,
        ratio_best=baseline / seconds if baseline else None,
        ratio_median=base_median / median if base_median and median else None,
    )
    return f"  {label:<44} {seconds * 1e3:9.1f} ms  {ratio}  {extra}"


def gpu_results_path(kind: str, date: str) -> str:
    """``gpu-<kind>-<date>.json`` in ``$KIMI_LOADER_GPU_RESULTS`` (``benches/gpu_check.sh``
    sets it), else in ``benches/results``."""
    where = os.environ.get("KIMI_LOADER_GPU_RESULTS") or os.path.join(ROOT, "benches", "results")
    return os.path.join(where, f"gpu-{kind}-{date}.json")


def write_gpu_results(kind: str, results: dict) -> str:
    """Writes a GPU benchmark's figures (with ``results["date"]``) to
    :func:`gpu_results_path` and returns the path."""
    path = gpu_results_path(kind, results["date"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        json.dump(results, fh, indent=1)
    os.replace(path + ".tmp", path)  # never a half-written file, even when killed
    return path


class SavedDict(dict):
    """The figures of a GPU run, written out (``save()``) on every assignment, to this
    dict or to one nested in it: a run stopped midway (a time limit, a failed check)
    keeps every figure it measured."""

    def __init__(self, save: Callable[[], object]) -> None:
        super().__init__()
        self._save = save

    def __setitem__(self, key, value) -> None:
        if isinstance(value, dict) and not isinstance(value, SavedDict):
            nested = SavedDict(self._save)
            dict.update(nested, value)
            value = nested
        super().__setitem__(key, value)
        self._save()


def device_timer(device):
    """``timed(fn, repeat)``: the median seconds of ``fn`` on ``device`` (CUDA events on a
    GPU, after one warm-up call)."""
    import torch

    def timed(fn, repeat: int = 10) -> float:
        fn()
        times = []
        for _ in range(repeat):
            if device.type == "cuda":
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        times.sort()
        return times[len(times) // 2]

    return timed


def gpu_main(kind: str, run: Callable, argv: list[str] | None = None) -> int:
    """The command line of a GPU benchmark: ``--smoke`` runs ``run(cpu, True, out)``
    under the Triton interpreter (nothing measured, nothing written); otherwise, on CUDA,
    ``run(cuda, False, out)`` fills ``out`` (``out["rows"]``, a dict per figure), written
    to ``gpu-<kind>-<date>.json`` as each figure comes in; an exception is recorded
    there (``out["error"]``) and makes the exit status 1. Without CUDA it says so and
    exits 0."""
    import datetime
    import traceback

    import torch

    argv = sys.argv[1:] if argv is None else argv
    name = f"bench gpu-{kind}"
    if "--smoke" in argv:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        print(f"{name} --smoke: tiny sizes on the CPU (Triton interpreter); nothing measured")
        run(torch.device("cpu"), True, {"rows": {}})
        return 0
    if not torch.cuda.is_available():
        print(f"{name}: no CUDA device here; nothing measured (run `make gpu-check` on a GPU machine)")
        return 0
    out = SavedDict(lambda: write_gpu_results(kind, out))
    out.update(gpu=torch.cuda.get_device_name(), date=datetime.date.today().isoformat())
    out["rows"] = {}
    try:
        run(torch.device("cuda"), False, out)
    except Exception as e:
        traceback.print_exc()
        out["error"] = f"{type(e).__name__}: {e}"  # (saved, as every assignment)
        print(f"{name}: failed after {len(out['rows'])} figures; those are in {gpu_results_path(kind, out['date'])}")
        return 1
    print(f"wrote {gpu_results_path(kind, out['date'])}")
    return 0
