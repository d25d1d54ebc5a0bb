"""RL hot-reload on a ~0.35 GB bf16 DeepSeek-V3-layout checkpoint (serving layout, bf16):

1. a full update (every tensor changed) vs a fresh ``from_pretrained`` of the same
   checkpoint;
2. a ~5% delta update (a few experts changed) vs the full update: goal proportional to
   the changed bytes;
(streamed gloo updates, memory and quantize-on-sync: ``bench_rl_scale.py``.)

Run: ``make bench`` or ``python benches/bench_update.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import torch
from safetensors.torch import load_file, save_file

import kimi_loader
from _common import CACHE, checkpoint, ds_shape, interleaved, row, warm
from kimi_loader.rl import WeightUpdater

SHAPE = ds_shape(quant="bf16", n_routed_experts=8, n_group=4, topk_group=2)


def delta_checkpoint(src: str, fraction: float) -> tuple[str, int]:
    """A copy of `src` whose first experts' weights are perturbed, about `fraction` of the bytes."""
    dst = os.path.join(CACHE, f"update-delta-{fraction}")
    ck = kimi_loader.open(src)
    target = fraction * ck.data_bytes
    chosen, size = [], 0
    for info in sorted(ck.infos(), key=lambda i: i.name):
        if ".mlp.experts." in info.name and size < target:
            chosen.append(info.name)
            size += info.nbytes
    if not os.path.exists(os.path.join(dst, ".complete")):
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        index = json.load(open(os.path.join(dst, "model.safetensors.index.json")))
        for f in sorted({index["weight_map"][n] for n in chosen}):
            t = load_file(os.path.join(dst, f))
            for n in chosen:
                if n in t:
                    t[n] = t[n] * 1.5
            save_file(t, os.path.join(dst, f), metadata={"format": "pt"})
        open(os.path.join(dst, ".complete"), "w").close()
    warm(dst)
    return dst, size


def main() -> None:
    a = checkpoint("update-a", seed=0, **SHAPE)
    b = checkpoint("update-b", seed=1, **SHAPE)
    d, delta_bytes = delta_checkpoint(a, 0.05)
    model = kimi_loader.from_pretrained(a, dtype=torch.bfloat16)
    updater = WeightUpdater(model, baseline=a)
    state = {"at": "a"}

    def full() -> None:  # alternate a <-> b: every tensor changes every time
        nxt = "b" if state["at"] == "a" else "a"
        updater.update_from_disk(b if nxt == "b" else a)
        state["at"] = nxt

    def fresh() -> None:
        kimi_loader.from_pretrained(b, dtype=torch.bfloat16)

    total = kimi_loader.open(a).data_bytes
    res = interleaved({"fresh": fresh, "full": full}, repeat=5)
    print(f"hot-reload, {total / 1e9:.2f} GB bf16 checkpoint into the serving layout (best of 5 interleaved rounds)")
    print(
        row(
            "fresh kimi_loader.from_pretrained",
            res["fresh"][0],
            res["fresh"][0],
            f"median {res['fresh'][1] * 1e3:.0f} ms",
            res["fresh"][1],
            res["fresh"][1],
        )
    )
    print(
        row(
            "full update in place (all tensors changed)",
            res["full"][0],
            res["fresh"][0],
            f"median {res['full'][1] * 1e3:.0f} ms",
            res["full"][1],
            res["fresh"][1],
        )
    )
    # a delta update a -> d, timed on its own (then back to a, untimed)
    times = []
    for _ in range(5):
        if state["at"] != "a":
            updater.update_from_disk(a)
            state["at"] = "a"
        t = time.perf_counter()
        r = updater.update_from_disk(d)
        times.append(time.perf_counter() - t)
        updater.update_from_disk(a)
    best = min(times)
    print(
        row(
            f"delta update ({delta_bytes / total * 100:.1f}% of the bytes changed), found by hashing",
            best,
            res["full"][0],
            f"wrote {r.bytes_changed / 1e6:.1f} MB, hashed {r.bytes_hashed / 1e6:.0f} MB",
        )
    )
    ck_a, ck_d = kimi_loader.open(a), kimi_loader.open(d)
    changed = [n for n in ck_d.keys() if not torch.equal(ck_d.get_tensor(n), ck_a.get_tensor(n))]
    times = []
    for _ in range(5):
        t = time.perf_counter()
        r = updater.update_from_disk(d, names=changed)
        times.append(time.perf_counter() - t)
        updater.update_from_disk(a, names=changed)
    print(
        row(
            "same delta, the trainer names the changed tensors",
            min(times),
            res["full"][0],
            f"wrote {r.bytes_changed / 1e6:.1f} MB, hashed {r.bytes_hashed / 1e6:.0f} MB",
        )
    )


if __name__ == "__main__":
    main()
