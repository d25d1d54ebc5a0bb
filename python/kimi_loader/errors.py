"""The one exception hierarchy of kimi_loader.

Every error the library raises is a :class:`KimiLoaderError`. Instances carry
structured fields (``None`` when not applicable): the ``file`` and checkpoint ``tensor``
(the bare name) they are about, the ``destination`` parameter, the ``expected`` and
``found`` shapes of a mismatch, and a machine-readable ``kind`` (header and index
problems, e.g. ``"overlap"``, ``"missing_shard"``). The Rust core raises these classes by
name (see ``rust/python/src/errors.rs``); a Rust panic never crosses into Python (it is an
:class:`InternalError`).
"""

from __future__ import annotations

__all__ = [
    "CheckpointIOError",
    "CheckpointNotFoundError",
    "ConfigError",
    "HeaderError",
    "IncompleteLoadError",
    "InconsistentWeightsError",
    "IndexMismatchError",
    "InternalError",
    "InvalidArgumentError",
    "KimiLoaderError",
    "MissingTensorError",
    "PeerUpdateError",
    "PlanError",
    "ShapeMismatchError",
    "UnsupportedFormatError",
]


class KimiLoaderError(Exception):
    """Root of every kimi_loader error."""

    file: str | None = None
    tensor: str | None = None
    destination: str | None = None
    expected: tuple[int, ...] | None = None
    found: tuple[int, ...] | None = None
    kind: str | None = None

    def __init__(
        self,
        message: str = "",
        *,
        file: str | None = None,
        tensor: str | None = None,
        destination: str | None = None,
        expected: tuple[int, ...] | list[int] | None = None,
        found: tuple[int, ...] | list[int] | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.file = file
        self.tensor = tensor
        self.destination = destination
        self.expected = None if expected is None else tuple(expected)
        self.found = None if found is None else tuple(found)
        self.kind = kind

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CheckpointNotFoundError(KimiLoaderError, FileNotFoundError):
    """A checkpoint path (or a file it needs) does not exist."""


class CheckpointIOError(KimiLoaderError, OSError):
    """Reading a shard failed (permissions, a file truncated while in use, ...)."""


class HeaderError(KimiLoaderError, ValueError):
    """A safetensors header is malformed (see ``kind``)."""


class IndexMismatchError(KimiLoaderError, ValueError):
    """``model.safetensors.index.json`` and the shards disagree (see ``kind``)."""


class MissingTensorError(KimiLoaderError, KeyError):
    """A tensor that is needed is not in the checkpoint."""


class ShapeMismatchError(KimiLoaderError, ValueError):
    """A tensor's shape or size differs from what its destination expects."""


class PlanError(KimiLoaderError, ValueError):
    """The copy plan the rules give is inconsistent (``kind``: ``"overlap"`` when two
    checkpoint tensors write the same bytes of ``destination``, ``"past_end"``). Gaps are
    reported by :class:`IncompleteLoadError`."""


class UnsupportedFormatError(KimiLoaderError, ValueError):
    """The checkpoint's layout or quantization format is not supported."""


class InvalidArgumentError(KimiLoaderError, ValueError):
    """An argument cannot be honoured (e.g. ``threads=0``)."""


class ConfigError(KimiLoaderError, ValueError):
    """``config.json`` (or its ``quantization_config``) is malformed: ``key`` names the
    offending entry (dotted, e.g. ``text_config.hidden_size``)."""

    key: str | None = None

    def __init__(self, message: str = "", *, key: str | None = None, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.key = key


class IncompleteLoadError(KimiLoaderError):
    """The plan does not write every destination element or does not use every checkpoint
    tensor. ``missing``: ``[(destination, start_byte, end_byte, expected tensor)]``;
    ``unused``: ``[(tensor, why)]``."""

    def __init__(self, message: str = "", *, missing: list | None = None, unused: list | None = None, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.missing: list = list(missing or [])
        self.unused: list = list(unused or [])


class InconsistentWeightsError(KimiLoaderError, RuntimeError):
    """The model holds parts of two weight versions: a streamed update with
    ``atomic=False`` broke midway. It refuses to run until a complete update lands."""


class PeerUpdateError(KimiLoaderError, RuntimeError):
    """Another rank of a streamed update's group did not apply it (refused it, or failed
    applying it): ``ranks`` names them. The ranks agree at the end of every stream, so
    none serves a version the others do not hold: an ``atomic=True`` receiver commits
    nothing (its model is unchanged); an ``atomic=False`` one that applied buckets is
    marked inconsistent and refuses to run until a complete update lands. The sender
    raises it too."""

    def __init__(self, message: str = "", *, ranks: list[int] | None = None, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.ranks: list[int] = list(ranks or [])


class InternalError(KimiLoaderError, RuntimeError):
    """A bug in kimi_loader (a Rust panic caught at the boundary): the operation did not
    complete. Please report it with the message."""
