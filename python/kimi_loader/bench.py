"""``kimi-loader bench DIR``: open / plan / read / load figures for the user's own
checkpoint on their machine, each next to ``safetensors`` doing the same work and, for
reads, the ceiling (a copy of the same bytes from the page cache into memory that is
already faulted in).

The peers: ``open`` = ``safe_open`` of every shard (headers parsed); ``read`` =
``safe_open(...).get_tensor(name).clone()`` per tensor (safetensors hands out lazily
mapped tensors: the clone makes it touch every byte into fresh memory, as ours does);
``load`` = ``load_file`` + ``clone`` of every shard (the bytes in fresh memory, without
building a model; ours is ``kimi_loader.from_pretrained(dtype=torch.bfloat16)``: the
serving model built in fresh memory, loaded, post-load run).

The contenders run interleaved (round after round), so that drifting machine noise hits
them alike; best and median are reported. The page cache is warm after the first round:
these are not cold-disk figures. Reads touch at most ``max_bytes`` of tensors (storage
order), the load runs only when the whole checkpoint fits ``max_bytes``.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = ["interleaved", "run"]


def interleaved(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, tuple[float, float]]:
    """Runs the contenders in turn, ``repeat`` rounds. Returns label -> (best, median)
    seconds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for label, fn in fns.items():
            gc.collect()
            t = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t)
    return {k: (min(v), statistics.median(v)) for k, v in times.items()}


def _stage(
    name: str, timed: dict[str, tuple[float, float]], nbytes: int | None, peers: tuple[str, ...]
) -> dict[str, Any]:
    best, median = timed["kimi_loader"]
    out: dict[str, Any] = {"stage": name, "bytes": nbytes, "kimi_loader": {"best_s": best, "median_s": median}}
    for p in peers:
        pb, pm = timed[p]
        # ratio > 1: kimi_loader is that many times faster (medians, the noise-robust one)
        out[p] = {"best_s": pb, "median_s": pm, "ratio_median": pm / median if median else None}
    return out


def run(path: str, *, repeat: int = 5, max_bytes: int = 2 << 30, threads: int | None = None) -> dict[str, Any]:
    """Measures and returns the figures (see the module doc)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .reader import open as open_checkpoint

    ck = open_checkpoint(path, threads=threads)
    files = ck.files
    stages: list[dict[str, Any]] = []

    def st_open() -> None:
        for f in files:
            with safe_open(f, framework="pt") as h:
                h.keys()

    stages.append(
        _stage(
            "open",
            interleaved(
                {"kimi_loader": lambda: open_checkpoint(path, threads=threads), "safetensors": st_open}, repeat
            ),
            None,
            ("safetensors",),
        )
    )

    if ck.config is not None:
        from .loader import plan_for
        from .models import for_config

        model = for_config(ck.config, device="meta", checkpoint=ck)
        timed = interleaved({"kimi_loader": lambda: plan_for(model, ck, threads=threads)}, repeat)
        stages.append(_stage("plan", timed, None, ()))
        del model

    names: list[str] = []
    by_file: dict[str, list[str]] = {}  # the same names, per shard (safetensors opens each)
    nbytes = 0
    for info in sorted(ck.infos(), key=lambda i: (i.file, i.offset)):
        if nbytes + info.nbytes > max_bytes and names:
            break
        names.append(info.name)
        by_file.setdefault(info.file, []).append(info.name)
        nbytes += info.nbytes
    views = {n: ck.get_tensor(n) for n in names}
    faulted = {n: torch.empty_like(v).zero_() for n, v in views.items()}

    def st_read() -> None:
        kept: list[torch.Tensor] = []  # all alive at once, as read_tensors' result (freed memory is not fresh)
        for f, ns in by_file.items():
            with safe_open(f, framework="pt") as h:
                for n in ns:
                    kept.append(h.get_tensor(n).clone())  # safetensors maps lazily: touch every byte

    def ceiling() -> None:
        for n, v in views.items():
            faulted[n].copy_(v)

    ceiling()  # the source pages are in memory before the first round
    timed = interleaved(
        {"kimi_loader": lambda: ck.read_tensors(names), "safetensors": st_read, "ceiling": ceiling}, repeat
    )
    stages.append(_stage("read", timed, nbytes, ("safetensors", "ceiling")))
    views.clear()  # the ceiling's buffers go before the load
    faulted.clear()

    if ck.config is not None and ck.data_bytes <= max_bytes:
        from . import from_pretrained

        def st_load() -> None:
            kept: list[torch.Tensor] = []
            for f in files:
                kept.extend(t.clone() for t in load_file(f).values())

        timed = interleaved(
            {
                "kimi_loader": lambda: from_pretrained(path, dtype=torch.bfloat16, threads=threads),
                "safetensors": st_load,
            },
            repeat,
        )
        stages.append(_stage("load", timed, ck.data_bytes, ("safetensors",)))
    skipped = None if ck.data_bytes <= max_bytes else f"load: the checkpoint is over --max-bytes ({max_bytes:,})"
    return {
        "checkpoint": ck.index_path or files[0],
        "tensors": len(ck),
        "bytes": ck.data_bytes,
        "threads": threads,
        "repeat": repeat,
        "stages": stages,
        "skipped": skipped,
    }


def format_figures(r: dict[str, Any]) -> str:
    lines = [
        f"checkpoint  {r['checkpoint']}  ({r['tensors']} tensors, {r['bytes'] / 1e9:.3f} GB); "
        f"best / median of {r['repeat']} interleaved rounds",
        f"  {'stage':<6} {'kimi_loader':>22}  {'GB/s':>6}   peers (ratio of medians: >1 = kimi_loader faster)",
    ]
    for s in r["stages"]:
        k = s["kimi_loader"]
        rate = f"{s['bytes'] / k['median_s'] / 1e9:6.2f}" if s["bytes"] else "     -"
        peers = []
        for p in ("safetensors", "ceiling"):
            if p in s:
                peers.append(f"{p} {s[p]['median_s'] * 1e3:.1f} ms ({s[p]['ratio_median']:.2f}x)")
        lines.append(
            f"  {s['stage']:<6} {k['best_s'] * 1e3:9.1f} / {k['median_s'] * 1e3:9.1f} ms  {rate}   "
            + ("; ".join(peers) or "-")
        )
    if r["skipped"]:
        lines.append(f"  skipped {r['skipped']}")
    return "\n".join(lines)
