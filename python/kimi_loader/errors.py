"""The one exception hierarchy of kimi_loader.

Every error the library raises is a :class:`KimiLoaderError`. Instances carry the
``file`` and ``tensor`` they are about (``None`` when not applicable) and, for header and
index errors, a machine-readable ``kind`` (e.g. ``"overlap"``, ``"missing_shard"``).
The Rust core raises these classes by name (see ``rust/python/src/errors.rs``).
"""

from __future__ import annotations

__all__ = [
    "CheckpointIOError",
    "CheckpointNotFoundError",
    "ConfigError",
    "HeaderError",
    "IncompleteLoadError",
    "IndexMismatchError",
    "InternalError",
    "InvalidArgumentError",
    "KimiLoaderError",
    "MissingTensorError",
    "ShapeMismatchError",
    "UnsupportedFormatError",
]


class KimiLoaderError(Exception):
    """Root of every kimi_loader error."""

    file: str | None = None
    tensor: str | None = None
    kind: str | None = None

    def __init__(self, message: str = "", *, file: str | None = None, tensor: str | None = None,
                 kind: str | None = None) -> None:
        super().__init__(message)
        self.file = file
        self.tensor = tensor
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

    def __init__(self, message: str = "", *, missing: list | None = None, unused: list | None = None,
                 **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.missing: list = list(missing or [])
        self.unused: list = list(unused or [])


class InternalError(KimiLoaderError, RuntimeError):
    """A bug in kimi_loader (a Rust panic caught at the boundary): the operation did not
    complete. Please report it with the message."""
