"""Runs one vLLM engine (CPU, float32, greedy) on a checkpoint and writes what it
produced as JSON: ``python run_vllm.py PATH LOAD_FORMAT OUT.json [RELOAD_PATH]`` (a
process per engine: vLLM keeps global state). With RELOAD_PATH the engine then reloads
its weights in place from there (vLLM's ``reload_weights``, which asks the load format's
``get_all_weights`` for the tensors and runs them through the model's own
``load_weights`` and post-processing) and generates again: ``"reloaded"`` in the JSON.
Used by test_vllm.py."""

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


def digests(model) -> dict[str, str]:
    """sha256 of every parameter and buffer of vLLM's model (after its post-processing),
    by name: equal digests are equal weights, bit for bit. (On CPU vLLM repacks dense
    linears into its kernels' own storage and leaves their parameters empty: those are
    covered by the generations, not by this.)"""
    import torch

    return {
        name: hashlib.sha256(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        for name, t in sorted(model.state_dict().items())
    }


def run(llm) -> dict:
    """Greedy generations and the weights' digest."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=6, temperature=0, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    out = {
        # (by reference to this module, importable in the workers; not __main__)
        "digests": llm.apply_model(importlib.import_module("run_vllm").digests)[0],
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "logprobs": [
            [step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)]
            for o in outs
        ],
    }
    out["digest"] = hashlib.sha256(json.dumps(out["digests"], sort_keys=True).encode()).hexdigest()
    return out


def main() -> None:
    path, load_format, out = sys.argv[1:4]
    try:
        from vllm import LLM

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
        result = {"ok": True, **run(llm)}
        if len(sys.argv) > 4:
            llm.collective_rpc("reload_weights", kwargs={"weights_path": sys.argv[4]})
            result["reloaded"] = run(llm)
    except Exception as e:
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-4000:]}
    with open(out, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
