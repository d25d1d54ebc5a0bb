"""The safetensors-like reader: :func:`open` and :class:`Checkpoint`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import _core, _validate
from .errors import ConfigError, KimiLoaderError, ShapeMismatchError
from .formats import TORCH_DTYPES, detect_quant_format

PathLike = str | os.PathLike[str]

__all__ = ["Checkpoint", "TensorInfo", "open"]


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, without reading it."""

    name: str
    dtype: torch.dtype
    #: the safetensors spelling of the dtype (``"BF16"``, ``"F8_E4M3"``, ...)
    st_dtype: str
    shape: tuple[int, ...]
    #: path of the shard file
    file: str
    #: absolute byte offset of the first byte in ``file``
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def open(path: PathLike | Sequence[PathLike], *, threads: int | None = None) -> Checkpoint:  # noqa: A001
    """Opens a checkpoint and validates every header and the index, in parallel.

    ``path`` is a directory holding ``model.safetensors.index.json`` (or a single
    ``model.safetensors``), an index file, one ``.safetensors`` file, or a list of shard
    files. ``threads`` defaults to ``$KIMI_LOADER_THREADS`` or the number of CPUs.
    The GIL is released while shards are parsed.
    """
    return Checkpoint(_core.open(_validate.paths(path), _validate.threads(threads)), threads=threads)


class Checkpoint:
    """An open, validated checkpoint. Use as a context manager or call :meth:`close`.

    Tensors from :meth:`get_tensor` are zero-copy views of the memory-mapped shards; the
    mapping is private (copy-on-write), so writing to a view never changes the file.
    Views stay valid after :meth:`close` (they keep their shard mapped).
    """

    def __init__(self, core: _core.Checkpoint, *, threads: int | None = None) -> None:
        self._core: _core.Checkpoint | None = core
        self._threads = threads
        self._buffers: dict[int, _core.ShardBuffer] = {}
        self._config: dict[str, Any] | None = None
        self._config_loaded = False

    # -- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Releases the checkpoint. Tensors already returned by :meth:`get_tensor`
        remain valid."""
        self._core = None
        self._buffers.clear()

    @property
    def closed(self) -> bool:
        return self._core is None

    @property
    def core(self) -> _core.Checkpoint:
        if self._core is None:
            raise KimiLoaderError("the checkpoint is closed")
        return self._core

    def __repr__(self) -> str:
        if self._core is None:
            return "<kimi_loader.Checkpoint (closed)>"
        where = self._core.index_path or self._core.root or self._core.files()[0]
        return f"<kimi_loader.Checkpoint {where!r}: {len(self)} tensors in {len(self.files)} shards>"

    # -- the tensor table ------------------------------------------------------------
    def keys(self) -> list[str]:
        """Every tensor name, sorted."""
        return self.core.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.core

    def __len__(self) -> int:
        return len(self.core)

    @property
    def files(self) -> list[str]:
        """Shard paths, in shard order."""
        return self.core.files()

    @property
    def index_path(self) -> str | None:
        return self.core.index_path

    @property
    def data_bytes(self) -> int:
        """Total bytes of tensor data over all shards."""
        return self.core.data_bytes

    @property
    def open_timings(self) -> dict[str, float]:
        """Seconds spent in each stage of :func:`open`: ``index``, ``shards``,
        ``names``, ``cross_check`` and ``total``."""
        return dict(self.core.open_timings)

    def tensor_info(self, name: str) -> TensorInfo:
        shard, st_dtype, shape, offset, nbytes = self.core.locate(_validate.name(name))
        return TensorInfo(
            name, TORCH_DTYPES[st_dtype], st_dtype, tuple(shape), self.core.files()[shard], offset, nbytes
        )

    def infos(self) -> list[TensorInfo]:
        """:class:`TensorInfo` of every tensor, in storage order."""
        files = self.core.files()
        return [
            TensorInfo(n, TORCH_DTYPES[d], d, tuple(s), files[sh], off, nb)
            for n, d, s, sh, off, nb in self.core.table()
        ]

    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` strings of the shards, merged."""
        return dict(self.core.metadata())

    @property
    def config_path(self) -> str:
        """Where ``config.json`` is (or would be)."""
        return os.path.join(self.core.root or "", "config.json")

    @property
    def config(self) -> dict[str, Any] | None:
        """``config.json`` beside the index (or in the directory), or ``None``."""
        if not self._config_loaded:
            text = self.core.config_json
            if text is not None:
                try:
                    config = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{self.config_path}: invalid JSON: {e}", file=self.config_path) from e
                if not isinstance(config, dict):
                    raise ConfigError(f"{self.config_path}: must be a JSON object", file=self.config_path)
                self._config = config
            self._config_loaded = True
        return self._config

    def model_config(self):
        """The validated :class:`~kimi_loader.config.ModelConfig` (``ConfigError`` naming
        the key when ``config.json`` is malformed or absent)."""
        from .config import parse_config

        if self.config is None:
            raise ConfigError(f"{self.config_path}: no config.json", file=self.config_path)
        return parse_config(self.config, file=self.config_path)

    @property
    def quant_format(self) -> str:
        """``"bf16"``, ``"fp8-block"``, ``"ct-int4"`` or ``"quark-mxfp4"``."""
        return detect_quant_format(self.config, file=self.config_path)

    # -- reading ---------------------------------------------------------------------
    def _buffer(self, shard: int) -> _core.ShardBuffer:
        buf = self._buffers.get(shard)
        if buf is None:
            buf = self._buffers[shard] = self.core.shard_buffer(shard)
        return buf

    def get_tensor(self, name: str) -> torch.Tensor:
        """A zero-copy CPU view of the tensor's bytes in the mapped shard.

        Writing to the view is allowed and never reaches the file (the mapping is
        copy-on-write). Use :meth:`read_tensors` for copies in fresh memory.
        """
        shard, st_dtype, shape, offset, nbytes = self.core.locate(_validate.name(name))
        dtype = TORCH_DTYPES[st_dtype]
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        count = nbytes // dtype.itemsize
        return torch.frombuffer(self._buffer(shard), dtype=dtype, count=count, offset=offset).view(shape)

    def read_tensors(
        self, names: Iterable[str] | None = None, *, out: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Copies tensors into fresh (or given) CPU memory, in parallel, GIL released.

        ``names`` defaults to every tensor. With ``out``, tensors are written into the
        given tensors instead of new ones: each must be a writable, contiguous CPU tensor
        of exactly the stored dtype and shape (bytes are never reinterpreted).
        """
        names = self.keys() if names is None else list(names)
        result: dict[str, torch.Tensor] = {}
        for n in names:
            _shard, st_dtype, shape, _offset, _nbytes = self.core.locate(_validate.name(n))
            dst = out.get(n) if out is not None else None
            if dst is None:
                dst = torch.empty(shape, dtype=TORCH_DTYPES[st_dtype])
            elif (
                dst.device.type != "cpu"
                or not dst.is_contiguous()
                or dst.dtype != TORCH_DTYPES[st_dtype]
                or tuple(dst.shape) != tuple(shape)
            ):
                raise ShapeMismatchError(
                    f"tensor '{n}': destination must be a contiguous CPU tensor {tuple(shape)} "
                    f"{TORCH_DTYPES[st_dtype]}, got {tuple(dst.shape)} {dst.dtype} on {dst.device}",
                    tensor=n,
                    expected=tuple(shape),
                    found=tuple(dst.shape),
                )
            result[n] = dst
        self.core.read_into(names, [result[n] for n in names])
        return result
