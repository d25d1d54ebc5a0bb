"""Shared helpers for the benchmarks: cached synthetic checkpoints and timing."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("KIMI_LOADER_BENCH_DIR", os.path.join(ROOT, ".bench"))


def checkpoint(name: str, **kwargs) -> str:
    """A synthetic checkpoint generated once into the bench cache and reused."""
    from kimi_loader.synth import make_checkpoint

    path = os.path.join(CACHE, name)
    done = os.path.join(path, ".complete")
    if not os.path.exists(done):
        make_checkpoint(path, **kwargs)
        open(done, "w").close()
    return path


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


def row(label: str, seconds: float, baseline: float | None = None, extra: str = "") -> str:
    ratio = f"{baseline / seconds:7.2f}x" if baseline else "        "
    return f"  {label:<44} {seconds * 1e3:9.1f} ms  {ratio}  {extra}"
