"""The device a kernel launch runs on.

Triton launches on the *current* CUDA device and that device's current stream, whatever
device the pointers it is given belong to. A model on ``cuda:1`` in a process whose
current device is ``cuda:0`` (two models in one RL process, a ``device_map`` spread over
GPUs, a worker that never called ``torch.cuda.set_device``) would otherwise be read and
written by a kernel on the wrong GPU, unordered with the work queued on ``cuda:1``: an
illegal address at best, silently stale data at worst. Every public kernel entry point
launches inside :func:`on_device`. No Triton import here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..errors import InvalidArgumentError


def _current(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """``device`` made current for the block (the test suite replaces this to check that
    every launch is inside one)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def on_device(what: str, **tensors: torch.Tensor) -> Iterator[torch.device]:
    """The one device of ``tensors`` (keyword: its argument name), current for the
    launches in the block. Tensors on different devices are an
    :class:`~kimi_loader.errors.InvalidArgumentError` naming each argument's device."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        on = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise InvalidArgumentError(f"{what}: the tensors must be on one device, got {on}")
    device = next(iter(devices.values()))
    with _current(device):
        yield device
