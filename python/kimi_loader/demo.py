"""``make demo``: generate the built-in tiny Kimi-K2.5 checkpoint, inspect it, read every
tensor and compare the read throughput with safetensors."""

from __future__ import annotations

import os
import sys
import time

from . import open as open_checkpoint
from .inspect import format_summary, summarize
from .synth import make_checkpoint


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else os.path.join(".demo", "kimi-k2.5-tiny-ct-int4")
    print(f"== generating the tiny Kimi-K2.5 checkpoint (ct-int4) in {path}")
    make_checkpoint(path, preset="kimi-k2.5-tiny", quant="ct-int4")

    print("\n== kimi-loader inspect")
    with open_checkpoint(path) as ck:
        print(format_summary(summarize(ck)))

    print("\n== read every tensor into fresh memory")
    from safetensors import safe_open

    t = time.perf_counter()
    with open_checkpoint(path) as ck:
        ours = ck.read_tensors()
        nbytes = ck.data_bytes
        files = ck.files
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    theirs = {}
    for f in files:
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                theirs[k] = h.get_tensor(k).clone()
    t_theirs = time.perf_counter() - t
    same = all(ours[k].view(-1).view(dtype=__import__("torch").uint8).equal(
        theirs[k].view(-1).view(dtype=__import__("torch").uint8)) for k in theirs) and len(ours) == len(theirs)
    print(f"  kimi_loader  {len(ours)} tensors, {nbytes / 1e6:.2f} MB in {t_ours * 1e3:7.1f} ms "
          f"({nbytes / t_ours / 1e9:.2f} GB/s)")
    print(f"  safetensors  {len(theirs)} tensors, {nbytes / 1e6:.2f} MB in {t_theirs * 1e3:7.1f} ms "
          f"({nbytes / t_theirs / 1e9:.2f} GB/s)")
    print(f"  ratio {t_theirs / t_ours:.2f}x; bytes identical: {same}")
    print("\n(tiny checkpoint: these timings are dominated by per-call overhead; `make bench` "
          "measures throughput on ~1.5 GB)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
