"""Open + parse + validate the ~210k-tensor ``kimi-k2.5-fullcount`` checkpoint:
kimi_loader.open vs safetensors.safe_open over every shard listing keys.

Run: ``make bench`` or ``python benches/bench_open.py``.
"""

from __future__ import annotations

import sys

from safetensors import safe_open

import kimi_loader
from _common import checkpoint, interleaved, row


def main() -> None:
    path = checkpoint("fullcount-ct-int4", preset="kimi-k2.5-fullcount", quant="ct-int4")
    with kimi_loader.open(path) as ck:
        files, n = ck.files, len(ck)

    def ours() -> None:
        with kimi_loader.open(path) as c:
            assert len(c) == n

    def ours_1t() -> None:
        with kimi_loader.open(path, threads=1) as c:
            assert len(c) == n

    def ours_keys() -> None:
        with kimi_loader.open(path) as c:
            assert len(c.keys()) == n

    def safetensors_keys() -> None:
        total = 0
        for f in files:
            with safe_open(f, framework="pt") as h:
                total += len(h.keys())
        assert total == n

    ours()
    safetensors_keys()  # warm the page cache for both
    base_label = "safetensors safe_open + keys(), every shard"
    results = interleaved(
        {
            base_label: safetensors_keys,
            "kimi_loader.open (index cross-checked)": ours,
            "kimi_loader.open + keys()": ours_keys,
            "kimi_loader.open, threads=1": ours_1t,
        }
    )
    print(
        f"open + parse + validate: {n} tensors in {len(files)} shards "
        f"(threads={kimi_loader._core.resolve_threads()}; best of 15 interleaved rounds)"
    )
    base = results[base_label][0]
    for label, (best, med) in results.items():
        print(row(label, best, base, f"median {med * 1e3:.1f} ms", med, results[base_label][1]))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
