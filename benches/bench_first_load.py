"""The first load, the one every user and engine does: into memory no one has touched yet.

Each run is a fresh process (timed after its imports), contenders interleaved round after
round, warm page cache, best and median. For each destination kind, ours next to

- the **torch fault+copy floor**: the same build, every destination first faulted in by
  torch's multi-threaded ``zero_()``, then the same load (what engines do by hand when a
  loader is slow on fresh memory); ratio >= 1.0 is the bar of issue #16;
- for ``from_pretrained`` bf16 also the issue's literal bar, ``torch.empty(n).zero_()`` +
  reading the shard bytes into it, and the ceiling (the same read into memory already
  faulted in);
- peers reading the same bytes into fresh memory: safetensors (``load_file`` + ``clone``:
  it maps lazily), fastsafetensors (``device="cpu"``, ``nogds=True``), transformers'
  ``from_pretrained``.

Checkpoints: a 1.45 GB bf16 DeepSeek-V3-layout one (with vLLM's 576-wide latent), its
ct-int4 twin (dequantized to bf16 on load), and ``kimi-k2.5-realsize`` (Kimi-K2.5's real
per-tensor shapes, ct-int4, 5.9 GB). Then the plan and a no-change update at Kimi-K2.5's
full tensor count (208k). Run: ``make bench`` or ``python benches/bench_first_load.py``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from _common import DS_1G6, checkpoint, interleaved, record, row, section, warm

_CHILD = r"""
import json, os, sys, time, logging, warnings
which, path = sys.argv[1], sys.argv[2]
import torch, kimi_loader, kimi_loader.models as km
from kimi_loader.models.hf import empty_model
import transformers.modeling_rope_utils
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # imported here, not timed
warnings.simplefilter("ignore")
logging.getLogger("transformers").setLevel(logging.ERROR)
files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
nbytes = sum(os.path.getsize(f) for f in files)

def fault_by_torch(model):
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point() or t.dtype in (torch.uint8, torch.int8, torch.int32):
                t.view(torch.uint8).zero_() if t.is_contiguous() else t.zero_()
    return model

if which.endswith("+torchfault"):  # every destination faulted in by torch before the load
    which = which[: -len("+torchfault")]
    materialize = km.materialize
    km.materialize = lambda m, device="cpu": fault_by_torch(materialize(m, device))

def read_into(buf):
    mv, at = memoryview(buf.numpy()), 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while (n := fh.readinto(mv[at:])):
                at += n

if which == "ceiling":
    buf = torch.empty(nbytes, dtype=torch.uint8).zero_()
t = time.perf_counter()
if which == "floor":
    read_into(torch.empty(nbytes, dtype=torch.uint8).zero_())
elif which == "ceiling":
    read_into(buf)
elif which in ("from_pretrained-bf16", "from_pretrained-f32"):
    kimi_loader.from_pretrained(path, dtype=torch.bfloat16 if which.endswith("bf16") else torch.float32)
elif which == "hf-model":  # transformers' model, built empty, loaded by us (dequantizing if int4)
    kimi_loader.load_weights(empty_model(path), path)
elif which == "read_tensors":
    kimi_loader.open(path).read_tensors()
elif which == "safetensors":
    from safetensors.torch import load_file
    out = [t.clone() for f in files for t in load_file(f).values()]
elif which == "fastsafetensors":
    from fastsafetensors import SafeTensorsFileLoader, SingleGroup
    loader = SafeTensorsFileLoader(SingleGroup(), device="cpu", nogds=True)
    loader.add_filenames({0: files})
    fb = loader.copy_files_to_device()
    out = [fb.get_tensor(k) for k in fb.key_to_rank_lidx]
elif which == "transformers":
    DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
else:
    sys.exit(f"unknown contender {which}")
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def child(which: str, path: str, env: dict | None = None) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, which, path],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if out.returncode:
        sys.exit(f"{which} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def rounds(contenders: dict[str, tuple[str, str, dict | None]], repeat: int) -> dict[str, tuple[float, float]]:
    """label -> (best, median) seconds; each contender once per round, fresh process each."""
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(repeat):
        for label, (which, path, env) in contenders.items():
            times[label].append(child(which, path, env))
    return {k: (min(v), statistics.median(v)) for k, v in times.items()}


def report(title: str, res: dict[str, tuple[float, float]], base: str, nbytes: int) -> None:
    """Prints (and records) every row against ``base``; > 1: faster than ``base``."""
    print(title)
    section(title)
    bb, bm = res[base]
    for label, (b, m) in res.items():
        print(row(label, b, bb, f"median {m * 1e3:7.0f} ms  {nbytes / m / 1e9:5.2f} GB/s (median)", m, bm))


def main() -> None:
    repeat = int(os.environ.get("KIMI_LOADER_BENCH_ROUNDS", "3"))
    import kimi_loader

    bf16 = checkpoint("vllm-ds-1.6g", quant="bf16", **DS_1G6)
    int4 = checkpoint("first-ds-1.6g-int4", quant="ct-int4", **DS_1G6)
    real = checkpoint("realsize-ct-int4", preset="kimi-k2.5-realsize", quant="ct-int4")
    nb = kimi_loader.open(bf16).data_bytes
    off = {"KIMI_LOADER_PREFAULT": "0"}
    print(f"first load into fresh memory, each run a fresh process, {repeat} interleaved rounds, warm page cache")

    warm(bf16, evict_others=True)
    res = rounds(
        {
            "torch.empty(n).zero_() + read the shards (bar)": ("floor", bf16, None),
            "read the shards into pre-faulted memory (ceiling)": ("ceiling", bf16, None),
            "kimi_loader.from_pretrained bf16": ("from_pretrained-bf16", bf16, None),
            "from_pretrained bf16, torch zero_() first": ("from_pretrained-bf16+torchfault", bf16, None),
            "from_pretrained bf16, KIMI_LOADER_PREFAULT=0": ("from_pretrained-bf16", bf16, off),
            "kimi_loader.from_pretrained float32": ("from_pretrained-f32", bf16, None),
            "from_pretrained float32, torch zero_() first": ("from_pretrained-f32+torchfault", bf16, None),
            "kimi_loader.open().read_tensors()": ("read_tensors", bf16, None),
            "safetensors load_file + clone": ("safetensors", bf16, None),
            "fastsafetensors (cpu, nogds)": ("fastsafetensors", bf16, None),
            "load_weights into transformers' model": ("hf-model", bf16, None),
            "transformers' model, torch zero_() first": ("hf-model+torchfault", bf16, None),
            "transformers from_pretrained": ("transformers", bf16, None),
        },
        repeat,
    )
    report(f"bf16 DeepSeek-V3 layout, {nb / 1e9:.2f} GB", res, "torch.empty(n).zero_() + read the shards (bar)", nb)

    def bar(ours: str, floor: str, r: dict = res) -> None:
        ratio = r[floor][1] / r[ours][1]
        print(f"  => {ours} vs {floor}: {ratio:.2f}x (medians; goal >= 1.0)")
        record(f"{ours} / {floor}", None, None, ratio_median=ratio)

    bar("kimi_loader.from_pretrained bf16", "torch.empty(n).zero_() + read the shards (bar)")
    bar("kimi_loader.from_pretrained bf16", "from_pretrained bf16, torch zero_() first")
    bar("kimi_loader.from_pretrained float32", "from_pretrained float32, torch zero_() first")
    bar("load_weights into transformers' model", "transformers' model, torch zero_() first")

    warm(int4, evict_others=True)
    res4 = rounds(
        {
            "dequantize on load into transformers' model": ("hf-model", int4, None),
            "the same, torch zero_() first": ("hf-model+torchfault", int4, None),
            "ct-int4 -> serving layout (from_pretrained bf16)": ("from_pretrained-bf16", int4, None),
            "serving layout, torch zero_() first": ("from_pretrained-bf16+torchfault", int4, None),
        },
        repeat,
    )
    report("ct-int4 twin, bf16 destinations", res4, "the same, torch zero_() first", nb)
    bar("dequantize on load into transformers' model", "the same, torch zero_() first", res4)
    bar("ct-int4 -> serving layout (from_pretrained bf16)", "serving layout, torch zero_() first", res4)

    nr = kimi_loader.open(real).data_bytes
    warm(real, evict_others=True)
    resr = rounds(
        {
            "torch.empty(n).zero_() + read the shards (bar)": ("floor", real, None),
            "kimi_loader.from_pretrained bf16": ("from_pretrained-bf16", real, None),
            "from_pretrained bf16, torch zero_() first": ("from_pretrained-bf16+torchfault", real, None),
            "safetensors load_file + clone": ("safetensors", real, None),
            "fastsafetensors (cpu, nogds)": ("fastsafetensors", real, None),
        },
        repeat,
    )
    report(f"kimi-k2.5-realsize ct-int4, {nr / 1e9:.2f} GB", resr, "torch.empty(n).zero_() + read the shards (bar)", nr)
    bar("kimi_loader.from_pretrained bf16", "torch.empty(n).zero_() + read the shards (bar)", resr)
    bar("kimi_loader.from_pretrained bf16", "from_pretrained bf16, torch zero_() first", resr)
    fullcount()


def fullcount() -> None:
    """Plan and a no-change update at Kimi-K2.5's full tensor count, in this process."""
    import torch

    import kimi_loader
    from kimi_loader.loader import plan_for
    from kimi_loader.models import for_config

    path = checkpoint("fullcount-ct-int4", preset="kimi-k2.5-fullcount", quant="ct-int4")
    ck = kimi_loader.open(path)
    meta = for_config(ck.config, device="meta")
    model = kimi_loader.from_pretrained(path, dtype=torch.bfloat16)
    up = kimi_loader.WeightUpdater(model, baseline=path)
    res = interleaved(
        {
            "open (parse + validate)": lambda: kimi_loader.open(path),
            "plan": lambda: plan_for(meta, ck),
            "no-change update_from_disk (hash every tensor)": lambda: up.update_from_disk(path),
        },
        repeat=5,
    )
    title = f"kimi-k2.5-fullcount ({len(ck)} tensors)"
    print(title)
    section(title)
    for label, (b, m) in res.items():
        print(row(label, b, None, f"median {m * 1e3:.0f} ms", m))
    record("tensors", None, None, count=len(ck))


if __name__ == "__main__":
    main()
