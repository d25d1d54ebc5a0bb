"""The safetensors-like reader: :func:`open` and :class:`Checkpoint`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from . import _core, _validate
from .errors import ConfigError, InvalidArgumentError, KimiLoaderError, ShapeMismatchError
from .formats import TORCH_DTYPES, detect_quant_format

PathLike = str | os.PathLike[str]

__all__ = ["Checkpoint", "TensorInfo", "TensorSlice", "load_file", "open"]


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


def load_file(
    path: PathLike | Sequence[PathLike],
    device: str | torch.device = "cpu",
    *,
    dtype: torch.dtype | None = None,
    threads: int | None = None,
) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (file, folder, index or list of shards) as a new
    tensor on ``device``, like ``safetensors.torch.load_file``; read in parallel with the
    GIL released. ``dtype`` converts floating-point tensors (others keep their dtype)."""
    with open(path, threads=threads) as ck:
        return ck.read_tensors(device=device, dtype=dtype)


class TensorSlice:
    """A tensor not read yet (from :meth:`Checkpoint.get_slice`). Indexing it
    (``sl[a:b]``, ``sl[:, c:d]``, ``sl[i]``) copies just that part into a new tensor: only
    the pages of the mapped shard that hold those elements are touched."""

    def __init__(self, ckpt: Checkpoint, name: str) -> None:
        self._ckpt = ckpt
        self.info = ckpt.tensor_info(name)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.info.dtype

    def get_shape(self) -> list[int]:
        """The shape (as safetensors' ``get_shape``)."""
        return list(self.info.shape)

    def get_dtype(self) -> str:
        """The stored dtype's safetensors name (``"BF16"``, ...)."""
        return self.info.st_dtype

    def __len__(self) -> int:
        if not self.info.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.info.shape[0]

    def __getitem__(self, index: Any) -> torch.Tensor:
        view = self._ckpt.get_tensor(self.info.name)
        try:
            part = view[index]
        except (IndexError, TypeError) as e:
            raise InvalidArgumentError(
                f"tensor '{self.info.name}' {list(self.info.shape)}: bad index {index!r}: {e}",
                tensor=self.info.name,
            ) from None
        return part.clone(memory_format=torch.contiguous_format)

    def __repr__(self) -> str:
        return f"<kimi_loader.TensorSlice '{self.info.name}' {self.info.st_dtype} {list(self.info.shape)}>"


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
        self._files: list[str] = core.files()

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
        self.core  # noqa: B018  (raises once closed)
        return list(self._files)

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
        return TensorInfo(name, TORCH_DTYPES[st_dtype], st_dtype, tuple(shape), self._files[shard], offset, nbytes)

    def infos(self) -> list[TensorInfo]:
        """:class:`TensorInfo` of every tensor, in storage order."""
        files = self._files
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

    def get_tensor(
        self, name: str, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """A zero-copy CPU view of the tensor's bytes in the mapped shard.

        Writing to the view is allowed and never reaches the file (the mapping is
        copy-on-write). With ``device`` (other than the CPU) or ``dtype`` (other than the
        stored one), a new tensor, converted. Use :meth:`read_tensors` for many copies in
        fresh memory, :meth:`get_slice` for part of a tensor.
        """
        shard, st_dtype, shape, offset, nbytes = self.core.locate(_validate.name(name))
        stored = TORCH_DTYPES[st_dtype]
        if nbytes == 0:
            view = torch.empty(shape, dtype=stored)
        else:
            count = nbytes // stored.itemsize
            view = torch.frombuffer(self._buffer(shard), dtype=stored, count=count, offset=offset).view(shape)
        want = _dtype(dtype, stored, name)
        target = _device(device)
        if want == stored and target.type == "cpu":
            return view
        return view.to(device=target, dtype=want, copy=True)

    def __getitem__(self, name: str) -> torch.Tensor:
        """``ckpt[name]``: :meth:`get_tensor` (a ``KeyError``-compatible
        :class:`MissingTensorError` for a name the checkpoint lacks)."""
        return self.get_tensor(name)

    def get_slice(self, name: str) -> TensorSlice:
        """A lazily read tensor: ``ckpt.get_slice(name)[a:b, :]`` copies only those rows,
        as ``safetensors``' ``get_slice`` does."""
        return TensorSlice(self, _validate.name(name))

    def hash_tensors(self, names: Iterable[str] | None = None, *, algorithm: str = "xxh3-64") -> dict[str, str]:
        """Hex digests of each tensor's stored bytes, computed in parallel with the GIL
        released: ``"xxh3-64"`` (fast, for change detection) or ``"sha256"``."""
        names = self.keys() if names is None else [_validate.name(n) for n in names]
        if algorithm == "xxh3-64":
            return {n: f"{h:016x}" for n, h in zip(names, self.core.hash_tensors(names), strict=True)}
        if algorithm != "sha256":
            raise InvalidArgumentError(f"algorithm must be 'xxh3-64' or 'sha256', got {algorithm!r}")
        import hashlib
        from concurrent.futures import ThreadPoolExecutor

        located = [self.core.locate(n) for n in names]
        views = {shard: memoryview(cast(Any, self._buffer(shard))) for shard, *_ in located}  # mapped once

        def sha256(where: tuple) -> str:  # hashlib releases the GIL on large buffers
            shard, _dtype, _shape, offset, nbytes = where
            return hashlib.sha256(views[shard][offset : offset + nbytes]).hexdigest()

        with ThreadPoolExecutor(_core.resolve_threads(self._threads)) as pool:
            return dict(zip(names, pool.map(sha256, located), strict=True))

    def read_tensors(
        self,
        names: Iterable[str] | None = None,
        *,
        out: dict[str, torch.Tensor] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """Copies tensors into fresh (or given) memory, in parallel, GIL released.

        ``names`` defaults to every tensor. ``dtype`` converts floating-point tensors
        explicitly (bytes are never reinterpreted); ``device`` places the results. With
        ``out``, tensors are written into the given tensors instead: each must have
        exactly the stored shape and the stored dtype (or ``dtype``), on ``device`` (or
        the CPU), and be writable; contiguous CPU tensors of the stored dtype are written
        directly, others through a CPU copy.
        """
        names = self.keys() if names is None else list(names)
        target = _device(device)
        result: dict[str, torch.Tensor] = {}
        direct: dict[str, torch.Tensor] = {}  # read straight into these
        for n in names:
            _shard, st_dtype, shape, _offset, _nbytes = self.core.locate(_validate.name(n))
            stored = TORCH_DTYPES[st_dtype]
            want = _dtype(dtype, stored, n)
            dst = out.get(n) if out is not None else None
            if dst is None:
                direct[n] = torch.empty(shape, dtype=stored)
                continue
            if not isinstance(dst, torch.Tensor):
                raise InvalidArgumentError(f"out['{n}']: expected a torch.Tensor, got {type(dst).__name__}", tensor=n)
            if tuple(dst.shape) != tuple(shape) or dst.dtype != want or dst.device.type != target.type:
                raise ShapeMismatchError(
                    f"tensor '{n}': out must be {tuple(shape)} {want} on {target.type} "
                    f"(pass dtype= / device= to convert), got {tuple(dst.shape)} {dst.dtype} on {dst.device}",
                    tensor=n,
                    expected=tuple(shape),
                    found=tuple(dst.shape),
                )
            result[n] = dst
            if dst.device.type == "cpu" and dst.is_contiguous() and dst.dtype == stored:
                direct[n] = dst
            else:
                direct[n] = torch.empty(shape, dtype=stored)
        order = list(direct)
        self.core.read_into(order, [direct[n] for n in order])
        for n in names:
            read = direct[n]
            if n in result:
                if result[n] is not read:
                    result[n].copy_(read)
                continue
            want = _dtype(dtype, read.dtype, n)
            result[n] = read if want == read.dtype and target.type == "cpu" else read.to(target, want)
        return result


def _dtype(dtype: torch.dtype | None, stored: torch.dtype, name: str) -> torch.dtype:
    """The dtype a tensor is returned in: ``dtype`` for floating-point tensors, else the
    stored one (packed integers and scales are not values to convert)."""
    if dtype is None:
        return stored
    if not isinstance(dtype, torch.dtype):
        raise InvalidArgumentError(f"dtype: expected a torch.dtype, got {dtype!r}")
    return dtype if stored.is_floating_point and stored.itemsize > 1 else stored


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidArgumentError(f"device: not a torch device: {device!r}") from None
