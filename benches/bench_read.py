"""Read every tensor of a ~1.2 GB bf16 checkpoint from a warm page cache into fresh memory,
touching every byte: kimi_loader vs safetensors vs a plain memcpy (numpy) of the same bytes.

Run: ``make bench`` or ``python benches/bench_read.py``.
"""

from __future__ import annotations

import gc

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import kimi_loader
from _common import best_of, checkpoint, ds_shape, row

# DeepSeek-V3 layout, bf16, ~1.2 GB in 8 shards
SHAPE = ds_shape(quant="bf16", n_routed_experts=32)


def main() -> None:
    path = checkpoint("read-bf16-1.2g", **SHAPE)
    with kimi_loader.open(path) as ck:
        files, total, n = ck.files, ck.data_bytes, len(ck)

    def ours() -> None:
        with kimi_loader.open(path) as c:
            out = c.read_tensors()
        assert len(out) == n

    def st_load_file_copy() -> None:
        out = {}
        for f in files:
            for k, t in load_file(f).items():
                out[k] = t.clone()  # into fresh memory, every byte touched
        assert len(out) == n

    def st_load_file() -> None:
        out = {}
        for f in files:
            out.update(load_file(f))
        assert len(out) == n

    def st_get_tensor_copy() -> None:
        out = {}
        for f in files:
            with safe_open(f, framework="pt") as h:
                for k in h.keys():
                    t = h.get_tensor(k)
                    out[k] = torch.empty_like(t).copy_(t)
        assert len(out) == n

    src = np.ones(total, dtype=np.uint8)  # the same number of bytes, already in memory

    def memcpy() -> None:
        dst = np.empty_like(src)
        np.copyto(dst, src)

    for f in (ours, st_load_file_copy, memcpy):  # warm the page cache and allocator
        f()
    gc.collect()
    print(
        f"read every tensor into fresh memory: {n} tensors, {total / 1e9:.2f} GB in {len(files)} shards "
        f"(threads={kimi_loader._core.resolve_threads()}, warm page cache)"
    )
    base, base_med = best_of(memcpy, 5)
    print(
        row(
            "numpy memcpy of the same bytes (1 thread)",
            base,
            base,
            f"{total / base / 1e9:5.2f} GB/s",
            base_med,
            base_med,
        )
    )
    for label, fn in [
        ("kimi_loader read_tensors (parallel pread)", ours),
        ("safetensors load_file + clone", st_load_file_copy),
        ("safetensors safe_open get_tensor + copy_", st_get_tensor_copy),
        ("safetensors load_file (no extra copy)", st_load_file),
    ]:
        gc.collect()
        t, med = best_of(fn, 5)
        print(row(label, t, base, f"{total / t / 1e9:5.2f} GB/s  (x of memcpy throughput)", med, base_med))


if __name__ == "__main__":
    main()
