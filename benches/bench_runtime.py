"""The runtime on the demo checkpoint (tiny Kimi-K2.5, ct-int4), CPU, float32:

1. load-to-first-token: ``kimi_loader.from_pretrained`` + one forward vs transformers'
   ``Kimi_K25ForConditionalGeneration.from_pretrained`` (int4 dequantized) + one forward;
2. decode tokens/s with a KV cache (informational: the CUDA issue owns GPU speed).

Run: ``make bench`` or ``python benches/bench_runtime.py``.
"""

from __future__ import annotations

import logging
import warnings

import torch

import kimi_loader
from _common import checkpoint, interleaved, row, section


def main() -> None:
    from transformers import CompressedTensorsConfig, Kimi_K25ForConditionalGeneration
    from transformers.utils import logging as hf_logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    warnings.simplefilter("ignore")
    path = checkpoint("demo-kimi-ct-int4", preset="kimi-k2.5-tiny", quant="ct-int4")
    prompt = torch.tensor([[1, 17, 42, 99, 7, 3, 250, 8]])

    def ours() -> None:
        kimi_loader.from_pretrained(path)(prompt)

    def hf() -> None:
        m = Kimi_K25ForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
        )
        with torch.no_grad():
            m(input_ids=prompt)

    res = interleaved({"transformers": hf, "kimi_loader": ours}, repeat=7)
    base = res["transformers"][0]
    print("load-to-first-token, tiny Kimi-K2.5 ct-int4, CPU float32 (best of 7 interleaved rounds)")
    section("load-to-first-token")
    hf_med = res["transformers"][1]
    print(row("transformers from_pretrained + forward", base, base, f"median {hf_med * 1e3:.1f} ms", hf_med, hf_med))
    print(
        row(
            "kimi_loader.from_pretrained + forward",
            res["kimi_loader"][0],
            base,
            f"median {res['kimi_loader'][1] * 1e3:.1f} ms",
            res["kimi_loader"][1],
            hf_med,
        )
    )

    model = kimi_loader.from_pretrained(path)
    ref = Kimi_K25ForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    n = 32

    def decode_ours() -> None:
        model.generate(prompt, max_new_tokens=n)

    def decode_hf() -> None:
        ref.generate(input_ids=prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    res = interleaved({"transformers": decode_hf, "kimi_loader": decode_ours}, repeat=5)
    print(f"greedy decode, {n} new tokens with a KV cache (informational)")
    section("greedy decode")
    for label in ("transformers", "kimi_loader"):
        t = res[label][0]
        print(row(label, t, res["transformers"][0], f"{n / t:6.0f} tokens/s", res[label][1], res["transformers"][1]))


if __name__ == "__main__":
    main()
