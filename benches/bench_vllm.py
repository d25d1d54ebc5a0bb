"""Load time into vLLM (CPU, float32 destinations from a bf16 checkpoint): vLLM's
``load_weights`` step with ``load_format="kimi_loader"`` vs its default safetensors
loader, a fresh engine process per run, interleaved, best and median (the "Loading
weights took" line each writes to vLLM's log). Checkpoint: a DeepSeek-V3-layout bf16
checkpoint of ~1.6 GB with vLLM's 576-wide MLA latent.

Needs the vLLM venv of ``make test-vllm``; run: ``.venv-vllm/bin/python benches/bench_vllm.py``
(it says so and exits where vLLM is not installed).
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
RUN = os.path.join(HERE, "..", "tests", "with_vllm", "run_vllm.py")
ROUNDS = 3


def _checkpoint() -> str:
    from _common import DS_1G6, checkpoint

    return checkpoint("vllm-ds-1.6g", quant="bf16", **DS_1G6)


def _load_seconds(path: str, load_format: str, env: dict[str, str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [sys.executable, RUN, path, load_format, os.path.join(tmp, "out.json")],
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, **env},
        )
    found = re.findall(r"Loading weights took ([0-9.]+) seconds", proc.stdout + proc.stderr)
    if not found:
        raise SystemExit(f"bench_vllm: no load time in the {load_format} run:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return float(found[-1])


def main() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("bench_vllm: vLLM is not installed here (make test-vllm builds .venv-vllm); nothing measured")
        return
    path = _checkpoint()
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    contenders = {
        "vLLM default loader": ("auto", {}),
        "kimi_loader": ("kimi_loader", {}),
        "kimi_loader, KIMI_LOADER_PREFAULT=0": ("kimi_loader", {"KIMI_LOADER_PREFAULT": "0"}),
    }
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(ROUNDS):
        for label, (fmt, env) in contenders.items():
            times[label].append(_load_seconds(path, fmt, env))
    print(f"vLLM load_weights, {size / 1e9:.2f} GB bf16 -> float32, fresh engine per run, {ROUNDS} rounds")
    base = statistics.median(times["vLLM default loader"])
    for label, ts in times.items():
        med = statistics.median(ts)
        print(f"  {label:<38} best {min(ts):6.2f} s  median {med:6.2f} s  {base / med:5.2f}x the default loader")


if __name__ == "__main__":
    main()
