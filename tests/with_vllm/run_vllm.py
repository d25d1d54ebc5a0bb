"""Runs one vLLM engine (CPU, float32, greedy) on a checkpoint and writes what it
produced as JSON: ``python run_vllm.py PATH LOAD_FORMAT OUT.json`` (a process per
engine: vLLM keeps global state). Used by test_vllm.py."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import traceback

# apply_model hands a function to the engine's workers (pickled)
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

PROMPTS = [[1, 5, 9, 33, 7], [2, 200, 17, 4, 4, 90, 12]]


def digest(model) -> str:
    """sha256 over every parameter and buffer of vLLM's model (after its post-processing),
    by name: equal digests are equal weights, bit for bit."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    path, load_format, out = sys.argv[1:4]
    try:
        from vllm import LLM, SamplingParams

        llm = LLM(
            model=path,
            load_format=load_format,
            skip_tokenizer_init=True,
            enforce_eager=True,
            dtype="float32",
            max_model_len=128,
            max_num_seqs=2,
            gpu_memory_utilization=0.2,
        )
        params = SamplingParams(max_tokens=6, temperature=0, logprobs=0)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
        result = {
            "ok": True,
            # (by reference to this module, importable in the workers; not __main__)
            "digest": llm.apply_model(importlib.import_module("run_vllm").digest)[0],
            "tokens": [list(o.outputs[0].token_ids) for o in outs],
            "logprobs": [
                [step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)]
                for o in outs
            ],
        }
    except Exception as e:
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-4000:]}
    with open(out, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
