"""``make demo``: generate the built-in tiny Kimi-K2.5 checkpoint, inspect it, read every
tensor (throughput next to safetensors), load it into the runtime with a progress bar
(time next to transformers' ``from_pretrained``) and generate a few greedy tokens."""

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
    import torch

    same = len(ours) == len(theirs) and all(
        ours[k].view(-1).view(torch.uint8).equal(theirs[k].view(-1).view(torch.uint8)) for k in theirs
    )
    print(
        f"  kimi_loader  {len(ours)} tensors, {nbytes / 1e6:.2f} MB in {t_ours * 1e3:7.1f} ms "
        f"({nbytes / t_ours / 1e9:.2f} GB/s)"
    )
    print(
        f"  safetensors  {len(theirs)} tensors, {nbytes / 1e6:.2f} MB in {t_theirs * 1e3:7.1f} ms "
        f"({nbytes / t_theirs / 1e9:.2f} GB/s)"
    )
    print(f"  ratio {t_theirs / t_ours:.2f}x; bytes identical: {same}")
    print(
        "\n(tiny checkpoint: these timings are dominated by per-call overhead; `make bench` "
        "measures throughput on ~1.2 GB)"
    )
    if not same:
        return 1
    return _load_and_generate(path)


def _load_and_generate(path: str) -> int:
    import logging
    import warnings

    import torch

    from . import from_pretrained

    print("\n== load into the runtime (kimi_loader.from_pretrained, float32 on CPU)")
    t = time.perf_counter()
    model = from_pretrained(path, progress=True)
    t_ours = time.perf_counter() - t
    t_hf = None
    try:
        from transformers import CompressedTensorsConfig, Kimi_K25ForConditionalGeneration
        from transformers.utils import logging as hf_logging

        logging.getLogger("transformers").setLevel(logging.ERROR)
        hf_logging.disable_progress_bar()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = time.perf_counter()
            Kimi_K25ForConditionalGeneration.from_pretrained(
                path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
            )
            t_hf = time.perf_counter() - t
    except ImportError:
        pass
    print(f"  kimi_loader.from_pretrained   {t_ours * 1e3:8.1f} ms")
    if t_hf is not None:
        print(f"  transformers from_pretrained  {t_hf * 1e3:8.1f} ms   ({t_hf / t_ours:.1f}x slower)")

    print("\n== greedy generation (latent KV cache: one prefill, then one token per step)")
    prompt = torch.tensor([[1, 17, 42, 99, 7]])
    t = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=12)
    dt = time.perf_counter() - t
    print(f"  prompt {prompt[0].tolist()} -> {out[0, prompt.shape[1] :].tolist()}  ({12 / dt:.0f} tokens/s)")
    return _hot_reload(path, model, prompt, out)


def _hot_reload(path: str, model, prompt, before) -> int:
    """An RL step: perturb some experts, publish a new checkpoint, update in place."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from . import WeightUpdater

    print("\n== RL hot-reload: perturb experts 0-3 of every MoE layer, write a new checkpoint, update in place")
    new = path.rstrip("/") + "-step1"
    shutil.rmtree(new, ignore_errors=True)
    shutil.copytree(path, new)
    index = json.load(open(os.path.join(new, "model.safetensors.index.json")))
    g = torch.Generator().manual_seed(1)
    for f in sorted(set(index["weight_map"].values())):
        tensors = load_file(os.path.join(new, f))
        touched = False
        for name, t in tensors.items():
            expert = name.split(".experts.")[1].split(".")[0] if ".mlp.experts." in name else None
            if expert is not None and name.endswith("weight_packed") and int(expert) < 4:
                tensors[name] = t ^ torch.randint(0, 1 << 30, t.shape, generator=g, dtype=torch.int32)
                touched = True
        if touched:
            save_file(tensors, os.path.join(new, f), metadata={"format": "pt"})
    updater = WeightUpdater(model, baseline=path)
    addresses = [p.data_ptr() for p in model.parameters()]
    report = updater.update_from_disk(new)
    after = model.generate(prompt, max_new_tokens=12)
    same_place = addresses == [p.data_ptr() for p in model.parameters()]
    print(
        f"  update v{report.version}: {report.changed_tensors} of {report.tensors} tensors changed, "
        f"{report.bytes_changed:,} bytes written, {report.seconds['total'] * 1e3:.1f} ms; "
        f"parameters in place: {same_place}; post-load for layers {report.layers_post_processed}"
    )
    print(f"  generation before: {before[0, prompt.shape[1] :].tolist()}")
    print(f"  generation after:  {after[0, prompt.shape[1] :].tolist()}")
    return 0 if same_place else 1


if __name__ == "__main__":
    sys.exit(main())
