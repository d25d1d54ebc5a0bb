"""Argument checks at the public entry points: a bad argument is an
:class:`~kimi_loader.errors.InvalidArgumentError` naming it, never a builtin
``TypeError`` / ``OverflowError`` from the extension's conversion."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ._core import MAX_THREADS  # the Rust core's cap (rust/core/src/threads.rs)
from .errors import InvalidArgumentError


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def threads(value: Any) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or not 1 <= value <= MAX_THREADS:
        raise InvalidArgumentError(f"threads must be an int between 1 and {MAX_THREADS} or None, got {value!r}")
    return value


def paths(path: Any) -> list[str]:
    """One path or a non-empty sequence of paths, as strings."""
    if isinstance(path, (str, os.PathLike)):
        return [os.fspath(path)]
    if isinstance(path, (bytes, bytearray)) or not isinstance(path, Sequence):
        raise InvalidArgumentError(f"a checkpoint path (str or os.PathLike) or a list of them, got {path!r}")
    if not path:
        raise InvalidArgumentError("no checkpoint path given")
    bad = [p for p in path if not isinstance(p, (str, os.PathLike))]
    if bad:
        raise InvalidArgumentError(f"checkpoint paths must be str or os.PathLike, got {bad[0]!r}")
    return [os.fspath(p) for p in path]


def name(value: Any, what: str = "tensor name") -> str:
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{what} must be a str, got {value!r}")
    return value


def named_tensors(value: Any, what: str) -> Iterator[tuple[str, Any]]:
    """``(name, tensor)`` pairs from a mapping (a ``state_dict``) or an iterable of pairs
    (``named_parameters()``, a list, a generator), one at a time, each tensor a
    ``torch.Tensor`` with data (not on the meta device), detached."""
    import torch

    if isinstance(value, Mapping):
        value = value.items()
    elif isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise InvalidArgumentError(f"{what}: (name, tensor) pairs or a mapping of them, got {type(value).__name__}")
    for k, pair in enumerate(value):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise InvalidArgumentError(f"{what}: item {k} is not a (name, tensor) pair, got {type(pair).__name__}")
        n, t = name(pair[0]), pair[1]
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            got = f"a {t.device.type} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
            raise InvalidArgumentError(f"{what}: tensor '{n}' must be a torch.Tensor with data, got {got}", tensor=n)
        yield n, t.detach()
