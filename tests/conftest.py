from __future__ import annotations

import contextlib
import os
import threading

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


@pytest.fixture(autouse=True, scope="session")
def _every_launch_on_its_tensors_device():
    """Every Triton launch in this suite is checked: it happens inside
    :func:`kimi_loader.kernels._device.on_device`, and every tensor argument is on the
    device that made current (Triton launches on the current CUDA device and stream,
    not on the pointers' device). Otherwise the launch raises ``AssertionError``."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:  # (no Triton: no launch to check; the kernel tests skip themselves)
        yield
        return

    from kimi_loader.kernels import _device

    state = threading.local()
    real_current = _device._current

    @contextlib.contextmanager
    def current(device):
        stack = state.__dict__.setdefault("stack", [])
        stack.append(device)
        try:
            with real_current(device):
                yield
        finally:
            stack.pop()

    def checked(run):
        def launch(self, *args, grid, warmup, **kwargs):
            if not warmup:
                name = getattr(self, "__name__", repr(self))
                stack = getattr(state, "stack", [])
                assert stack, f"kernel {name} launched outside kimi_loader.kernels._device.on_device"
                off = [
                    str(a.device)
                    for a in (*args, *kwargs.values())
                    if isinstance(a, torch.Tensor) and a.device != stack[-1]
                ]
                assert not off, f"kernel {name} launched on {stack[-1]} with tensors on {off}"
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)

        return launch

    patched = [(cls, cls.run) for cls in (InterpretedFunction, JITFunction)]
    _device._current = current
    for cls, run in patched:
        cls.run = checked(run)
    yield
    _device._current = real_current
    for cls, run in patched:
        cls.run = run
