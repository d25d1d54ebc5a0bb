from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run on CPU tensors in the interpreter (the kernel tests), chosen before
# triton is first imported; `make gpu-check` (KIMI_LOADER_GPU_TESTS=1) compiles them
# for the `gpu`-marked tests instead
if os.environ.get("KIMI_LOADER_GPU_TESTS") != "1" or not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kimi_loader.synth import make_checkpoint

PRESETS = ("kimi-k2.5-tiny", "deepseek-v3-tiny")

#: bf16 tolerances (max |error| / max |value|) of the kernels on a GPU against float32
#: references: two bf16 epsilons (fp16 in the interpreter tests: 2e-3, two fp16 epsilons)
BF16_TOL = 2 * torch.finfo(torch.bfloat16).eps


def on_gpu(fn):
    """A ``gpu`` test: run by ``make gpu-check`` (``-m gpu``), skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(fn))


QUANTS = ("bf16", "ct-int4", "fp8-block", "quark-mxfp4")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """Returns a function making (and caching for the session) a synthetic checkpoint."""
    made: dict[tuple, str] = {}

    def make(preset: str = "kimi-k2.5-tiny", quant: str = "ct-int4", **kw) -> str:
        key = (preset, quant, tuple(sorted(kw.items())))
        if key not in made:
            path = tmp_path_factory.mktemp(f"{preset}-{quant}")
            made[key] = make_checkpoint(os.fspath(path), preset=preset, quant=quant, **kw)
        return made[key]

    return make
