"""RL hot-reload: replace the weights of a live model in place, all-or-nothing.

:class:`WeightUpdater` compiles the copy plan once (against the first checkpoint it sees)
and replays it for every later version with :meth:`Plan.rebind` (sources re-resolved by
name; a new plan only when names it has not seen appear). Every update:

1. validates names, shapes, dtypes and quantization groups (a weight and its scale) before
   anything is read into the model;
2. hashes the source tensors (xxh3, in parallel) and keeps only the ops whose sources
   changed since the last update (delta updates copy only changed bytes);
3. executes those ops into staging buffers, and only when every read succeeded copies
   them into the parameters (so a corrupt or truncated shard leaves the model bitwise
   unchanged);
4. writes in place (parameter storage addresses never change), bumps the version and runs
   ``post_load_weights(layers=...)`` for the layers whose tensors changed.

What is guaranteed about files changing underneath an update: shards are read with
``pread`` through file descriptors opened when the update starts. A shard replaced by
rename (the usual way trainers publish files) keeps serving the old file's bytes to this
update: no crash, a consistent old version. A shard truncated in place makes a read come up
short: the update fails with :class:`~kimi_loader.CheckpointIOError` and the model is
untouched. A shard rewritten in place while an update reads it can yield a mix of old and
new bytes for that update (the next update, whose hashes differ, repairs it).
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _core, _validate
from .errors import InvalidArgumentError, KimiLoaderError, PeerUpdateError, ShapeMismatchError
from .formats import TORCH_DTYPES, format_matching, layer_index, stored_suffixes
from .loader import (
    IncompleteLoadError,
    PlannedLoad,
    _flat_bytes,
    _Uploads,
    host_buffer,
    plan_for,
    resolve_parallel,
    wants_pinned,
)
from .reader import Checkpoint
from .reader import open as open_checkpoint
from .registry import FORMATS

__all__ = ["UpdateReport", "WeightUpdater", "broadcast_weights", "send_weights", "share_tensors"]

_ST_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}

#: what errors name as the "file" of tensors handed over in memory / streamed
_LABEL = "<update_from_tensors>"
_STREAM = "<weight stream>"
_IPC = "<shared tensors>"
#: the first object of a :func:`broadcast_weights` stream
STREAM_FORMAT = "kimi-loader-stream/3"  # 2: each tensor of a bucket starts at a multiple of BUCKET_ALIGN; 3: pull
#: what a :func:`share_tensors` payload says it is
IPC_FORMAT = "kimi-loader-ipc/1"


@dataclass
class UpdateReport:
    version: int
    tensors: int = 0
    changed_tensors: int = 0
    bytes_changed: int = 0
    bytes_hashed: int = 0
    layers_post_processed: list[int] = field(default_factory=list)
    replanned: bool = False
    #: bytes held back until the whole update arrived (a streamed ``atomic=True`` update)
    bytes_staged: int = 0
    #: bytes a streamed update received (every bucket of a broadcast; what this rank asked
    #: for from :func:`send_weights`)
    bytes_received: int = 0
    #: what applied it: ``"cpu"`` (the Rust executor, host memory) or ``"triton"`` (the
    #: device executor, on the model's device)
    executor: str = "cpu"
    seconds: dict[str, float] = field(default_factory=dict)


#: what the sync entry points take: ``(name, tensor)`` pairs, or a mapping (a ``state_dict``)
NamedTensors = Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor]

#: the tensors that make up one quantized weight, per format (kept in one bucket of a
#: stream; the Rust core checks that an update sends all of them)
_UNITS = tuple(f.suffixes for f in FORMATS.values() if f.quantized)


class WeightUpdater:
    """Updates ``model`` in place from new checkpoints, named tensors or a broadcast.

    ``baseline``: the checkpoint the model currently holds (path or open checkpoint);
    with it the first update is already a delta. Without it the first update writes every
    tensor it is given. ``keep_staging``: keep the staging buffer of all-or-nothing updates
    between updates (it grows to the largest update's changed bytes; steady-state updates
    then write into memory that is already faulted in; for a model on a GPU it is
    page-locked). :meth:`release_staging` frees it.
    """

    def __init__(
        self,
        model: Any,
        *,
        tp_rank: int | None = None,
        tp_size: int | None = None,
        ep_rank: int | None = None,
        ep_size: int | None = None,
        parallel: Any = None,
        threads: int | None = None,
        baseline: Any = None,
        keep_staging: bool = True,
        executor: str = "auto",
    ) -> None:
        if executor not in ("auto", "cpu", "triton"):
            raise InvalidArgumentError(f"executor must be 'auto', 'cpu' or 'triton', got {executor!r}")
        #: ``"cpu"``: the Rust executor (host memory); ``"triton"``: the plan's copy and
        #: convert ops as batched Triton kernels (on the destinations' device; on CPU
        #: tensors under ``TRITON_INTERPRET=1``); ``"auto"``: Triton when the update's
        #: tensors are on a GPU, else the CPU executor
        self.executor = executor
        self.model = model
        self.parallel = resolve_parallel(model, parallel, tp_rank, tp_size, ep_rank, ep_size)
        self.threads = _validate.threads(threads)
        self.version = 0
        self._plan = None  # the compiled plan (built for a complete checkpoint)
        self._known: set[str] = set()  # every name of the checkpoint the plan was built for
        self._reads: tuple[set[str], set[str]] | None = None  # (names the plan reads, their units)
        # the names broken atomic=False streams announced: to present again before the
        # model is consistent (each may hold either version)
        self._pending: set[str] = set()
        self._dests: list[torch.Tensor] = []  # by the plan's destination index
        # the hash of every source tensor as the model holds it (kept in Rust)
        self._state = _core.UpdateState()
        # quantize-on-sync: the checkpoint the plan was compiled for (its names, dtypes and
        # shapes say how each module is stored) and the hashes of the unquantized sources
        self._compiled: Checkpoint | None = None
        self._fp8_block: tuple[int, int] = (128, 128)
        self._source_hashes: dict[str, int] = {}
        self.keep_staging = keep_staging
        self._arena: torch.Tensor | None = None
        self._pin_refused = False  # (the driver refused to page-lock the arena once)
        # one update at a time: a second thread waits for the first; release_staging waits
        # for a running update instead of freeing the buffer under it
        self._lock = threading.RLock()
        if baseline is not None:
            ck = baseline if isinstance(baseline, Checkpoint) else open_checkpoint(baseline, threads=threads)
            plan = self._compile(ck).plan
            self._state.commit(self._state.select(plan, ck.core))

    def __repr__(self) -> str:
        p = self.parallel
        return (
            f"WeightUpdater({type(self.model).__name__}, version {self.version}, "
            f"tp {p.tp_rank}/{p.tp_size}, ep {p.ep_rank}/{p.ep_size}, "
            f"{'a compiled plan' if self._plan is not None else 'no plan yet'}, "
            f"staging {self._arena.numel() if self._arena is not None else 0} bytes)"
        )

    # -- planning --------------------------------------------------------------------
    def _compile(self, ck: Checkpoint) -> PlannedLoad:
        planned = plan_for(self.model, ck, threads=self.threads, need_memory=True, parallel=self.parallel)
        if planned.plan.unused():
            raise IncompleteLoadError(
                f"{ck.index_path or ck.files[0]}: tensors the model has no place for: "
                + "; ".join(f"{n} ({why})" for n, why in planned.plan.unused()[:5]),
                tensor=planned.plan.unused()[0][0],
                unused=planned.plan.unused(),
            )
        if not planned.plan.missing():  # a complete checkpoint: the plan to replay from now on
            self._plan, self._known, self._reads = planned.plan, set(ck.keys()), None
            self._dests = [planned.dests[n] for n in planned.plan.dest_names()]
            self._compiled, self._fp8_block = ck, planned.fp8_block
        return planned

    def _plan_for(self, ck: Checkpoint) -> tuple[Any, list[torch.Tensor], bool]:
        """``(plan, destinations by index, replanned)`` for checkpoint ``ck``."""
        if self._plan is not None:
            plan, unread = self._plan.rebind(ck.core)
            if all(n in self._known for n in unread):
                return plan, self._dests, False
        planned = self._compile(ck)
        return planned.plan, [planned.dests[n] for n in planned.plan.dest_names()], True

    def release_staging(self) -> None:
        """Frees the kept staging buffer (the next update allocates what it needs). Waits
        for an update running in another thread."""
        with self._lock:
            self._arena = None
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                # page-locked blocks stay cached by torch's host allocator after their
                # tensors die: handed back to the driver (only the unused ones)
                empty = getattr(torch._C, "_host_emptyCache", None)
                if empty is not None:
                    empty()

    def _staging(self, nbytes: int, pinned: bool = False) -> torch.Tensor | None:
        """The kept staging arena of at least ``nbytes`` (``None``: not kept), page-locked
        when ``pinned`` (its bytes go to a GPU) unless the driver refused that before."""
        if not self.keep_staging or nbytes == 0:
            return None
        a = self._arena
        repin = pinned and not self._pin_refused and a is not None and not a.is_pinned()
        if a is None or a.numel() < nbytes or repin:
            self._arena = None  # (freed before its successor is allocated)
            self._arena = host_buffer(nbytes, pinned and not self._pin_refused)
            self._pin_refused |= pinned and not self._arena.is_pinned()
        return self._arena

    # -- updates -----------------------------------------------------------------------
    def update_from_disk(self, path: Any, *, names: Iterable[str] | None = None) -> UpdateReport:
        """Updates from a checkpoint on disk (checkpoint naming, any subset of tensors).
        ``names`` restricts the update to those checkpoint tensors."""
        ck = path if isinstance(path, Checkpoint) else open_checkpoint(path, threads=self.threads)
        return self._update(ck, None if names is None else set(names))

    def update_from_tensors(self, named_tensors: NamedTensors, *, quantize: str | bool | None = None) -> UpdateReport:
        """Updates from ``(checkpoint_name, tensor)`` pairs, or a mapping of them (a
        ``state_dict``), through the same mappings (fused, expert, scale, TP/EP
        slicing). CPU tensors are read where they are (no file, no
        extra copy; do not modify them while the call runs). GPU tensors for a model on
        that GPU are applied there by the Triton executor (``executor="auto"``; no host
        round trip, no hash skipping); otherwise they are copied to the host first (CPU
        tensors of a mixed update go to the GPU). A dtype or shape that differs from what the model was
        planned for raises :class:`~kimi_loader.ShapeMismatchError` naming the tensor, the
        parameter and both. No tensors: an update that changes nothing.

        ``quantize``: unquantized (bf16 / fp16 / fp32) weights for modules the model
        stores quantized (ct-int4, MXFP4, FP8-block) are quantized on the way in, e.g.
        ``...experts.0.gate_proj.weight`` becomes ``weight_packed`` / ``weight_scale`` /
        ``weight_shape``. ``True`` or ``"compressed-tensors"``: compressed-tensors' own
        rules (int4: symmetric, ``scale = absmax / 7.5``, range -8..7); ``"int4-qat"``: the
        Kimi int4 QAT rule for int4 (``scale = max(absmax / 7, 1e-5)``, range -7..7). MXFP4
        and FP8-block have one rule each (OCP MX / transformers' FineGrainedFP8). Hashes
        are of the given (unquantized) bytes, so an unchanged weight is skipped before it
        is quantized.
        """
        names, tensors = [], []
        for n, t in _validate.named_tensors(named_tensors, _LABEL):
            names.append(n)
            tensors.append(t)
        target = self._target_device(tensors)
        tensors = [t.to(target).contiguous() for t in tensors]  # no copy where already so
        return self._update_from_memory(names, tensors, quantize)

    def _target_device(self, tensors: list[torch.Tensor]) -> torch.device:
        """Where an update's tensors are applied: the GPU they are on when the model lives
        there too (and the executor allows it), else the host. ``executor="triton"``: the
        model's device always (the device executor reads its sources from there: host
        tensors are copied over, never read through a host pointer by a GPU kernel)."""
        model_device = self._model_device()
        if self.executor == "triton" and model_device is not None:
            return model_device
        on = {t.device for t in tensors if t.device.type != "cpu"}
        if not on or self.executor == "cpu":
            return torch.device("cpu")
        if len(on) == 1 and model_device in on:
            return model_device
        return torch.device("cpu")

    def _update_from_memory(
        self, names: list[str], tensors: list[torch.Tensor], quantize: str | bool | None, label: str = _LABEL
    ) -> UpdateReport:
        with self._lock:
            t0 = time.perf_counter()
            self._check_not_own_names(names, label)
            source_hashes: dict[str, int] = {}
            presented = names  # (what the caller gave; _quantize returns new lists)
            if quantize:
                names, tensors, source_hashes = self._quantize(names, tensors, quantize, label)
            t_quant = time.perf_counter() - t0
            on_device = any(t.device.type != "cpu" for t in tensors)
            ck = Checkpoint(
                _core.from_tensors(label, names, tensors, self.threads, device=on_device), threads=self.threads
            )
            try:
                report = self._update_locked(ck, None, on_device=on_device, memory=True, presented=presented)
            finally:
                ck.core.release()  # the plan keeps the names, never the caller's memory
            self._source_hashes.update(source_hashes)
            if quantize:
                report.seconds["quantize"] = t_quant
                report.seconds["total"] += t_quant
            return report

    def _check_not_own_names(self, names: list[str], label: str) -> None:
        """Updates name tensors as the checkpoint does. A name the plan does not know that
        is one of the model's own parameters or buffers (another runtime's
        ``state_dict()``: fused ``w13_weight_packed``, ``gate_up_proj``) is refused by
        name before anything is read, instead of failing later on a fused shape."""
        unknown = [n for n in names if n not in self._known] if self._known else []
        if not unknown:
            return
        own = {n for n, _ in self.model.named_parameters()} | {n for n, _ in self.model.named_buffers()}
        mine = [n for n in unknown if n in own]
        if mine:
            raise InvalidArgumentError(
                f"{label}: '{mine[0]}' is a parameter of the model, not a tensor of the checkpoint it was planned "
                f"for ({len(mine)} such name(s)); updates name tensors as the checkpoint does (e.g. "
                f"'{sorted(self._known)[0]}'), so a model's own state_dict() is not an update",
                tensor=mine[0],
            )

    def _quantize(
        self,
        names: list[str],
        tensors: list[torch.Tensor],
        quantize: str | bool,
        label: str,
        known: dict[str, int] | None = None,
    ) -> tuple[list[str], list[torch.Tensor], dict[str, int]]:
        """Replaces each unquantized ``...weight`` whose module the model stores quantized
        by that format's tensors. Sources whose hash equals the last synced one are
        dropped before quantizing. ``known``: the sources' hashes where the caller has
        them (a stream's metadata); the others are hashed here (host memory only).
        Returns the names, tensors and the sources' hashes."""
        from .quant import INT4_RULES, quantize_fp8_block, quantize_int4, quantize_mxfp4

        rule = "compressed-tensors" if quantize is True else quantize
        if rule not in INT4_RULES:
            raise InvalidArgumentError(f"quantize must be True or one of {INT4_RULES}, got {quantize!r}")
        ck = self._compiled
        if ck is None:
            raise InvalidArgumentError(
                "quantize= needs to know how the model stores each module: create the WeightUpdater with "
                "baseline= (or run one complete update first)"
            )

        def info(name: str) -> Any:
            return ck.tensor_info(name) if name in ck else None

        plan: list[tuple[int, Any]] = []  # (index, Format) of the tensors to quantize
        for k, (n, t) in enumerate(zip(names, tensors, strict=True)):
            if n.endswith(".weight") and t.is_floating_point() and t.dim() == 2:
                fmt = _quantized_module(ck, n[: -len(".weight")])
                if fmt is not None:
                    plan.append((k, fmt))
        if not plan:
            return names, tensors, {}
        sources = [names[k] for k, _ in plan]
        hashes: dict[str, int] = {}
        if known is not None and all(n in known for n in sources):
            hashes = {n: known[n] for n in sources}
        elif all(tensors[k].device.type == "cpu" for k, _ in plan):  # (device memory is not hashed)
            hashed = _core.from_tensors(label, sources, [tensors[k] for k, _ in plan], self.threads)
            try:
                hashes = dict(zip(sources, hashed.hash_tensors(sources), strict=True))
            finally:
                hashed.release()
        out_names: list[str] = []
        out_tensors: list[torch.Tensor] = []
        formats = dict(plan)
        for k, (n, t) in enumerate(zip(names, tensors, strict=True)):
            fmt = formats.get(k)
            if fmt is None:
                out_names.append(n)
                out_tensors.append(t)
                continue
            if n in hashes and self._source_hashes.get(n) == hashes[n]:
                continue  # unchanged since the last sync: not quantized, not copied
            base = n[: -len(".weight")]
            _check_source(ck, base, fmt, t.shape, label)
            if fmt.name == "ct-int4":
                scale = ck.tensor_info(f"{base}.weight_scale")
                parts = quantize_int4(t, group=t.shape[1] // scale.shape[1], rule=rule, scale_dtype=scale.dtype, what=n)
                shape_info = info(f"{base}.weight_shape")
                if shape_info is not None:
                    parts["weight_shape"] = parts["weight_shape"].to(shape_info.dtype)
                else:
                    del parts["weight_shape"]
            elif fmt.name == "fp8-block":
                scale_dtype = ck.tensor_info(f"{base}.weight_scale_inv").dtype
                parts = quantize_fp8_block(t, block=self._fp8_block, scale_dtype=scale_dtype, what=n)
            else:
                parts = quantize_mxfp4(t, group=t.shape[1] // ck.tensor_info(f"{base}.weight_scale").shape[1], what=n)
            for suffix, v in parts.items():
                out_names.append(f"{base}.{suffix}")
                out_tensors.append(v)
        return out_names, out_tensors, hashes

    def update_from_ipc(self, payload: bytes, *, quantize: str | bool | None = None) -> UpdateReport:
        """Updates from a :func:`share_tensors` payload made by another process on this
        machine (a colocated trainer): its GPU tensors are opened through CUDA IPC handles
        and applied on the device, its host tensors are read in place from the shared
        memory they were put in; nothing is copied on the way. Then as
        :meth:`update_from_tensors` (``quantize`` too). A payload that is not one, or
        whose tensors are gone (the trainer exited, or a host payload already used), is
        refused before anything is read into the model. The payload is a pickle: take
        it from a trusted process only (as torch.multiprocessing's queues do)."""
        import pickle

        from .errors import CheckpointIOError

        try:
            obj = pickle.loads(payload)  # the rebuild functions of torch's tensor reductions
        except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, ImportError, IndexError, KeyError) as e:
            raise InvalidArgumentError(f"{_IPC}: not a {IPC_FORMAT} payload ({type(e).__name__}: {e})") from e
        except Exception as e:  # the handles could not be opened: OSError, EOFError, a CUDA error
            raise CheckpointIOError(
                f"{_IPC}: the shared tensors could not be opened ({type(e).__name__}: {e}); the trainer that shared "
                "them has exited or a payload of host tensors was used before (one payload per receiver)",
                file=_IPC,
            ) from e
        if not isinstance(obj, dict) or obj.get("format") != IPC_FORMAT:
            raise InvalidArgumentError(f"{_IPC}: not a {IPC_FORMAT} payload (is the sender a matching version?)")
        arena, layout = obj["host"]
        items: list[tuple[str, torch.Tensor]] = []
        for name, dtype, shape, offset in layout:
            nbytes = math.prod(shape) * dtype.itemsize
            items.append((name, arena[offset : offset + nbytes].view(dtype).view(shape)))
        items.extend(obj["device"])
        return self.update_from_tensors(items, quantize=quantize)

    def update_from_distributed(
        self, group: Any = None, *, src: int = 0, atomic: bool = True, quantize: str | bool | None = None
    ) -> UpdateReport:
        """Receives a :func:`broadcast_weights` or :func:`send_weights` stream from rank
        ``src`` and applies it, bucket by bucket as it arrives; this rank keeps only its
        TP/EP part (from ``send_weights`` it is sent only that part, and only what changed).

        The stream starts with every tensor's name, dtype, shape and xxh3; all of it is
        checked against the compiled plan before the first bucket lands (a problem raises
        after the stream is drained, the model untouched). Tensors whose hash equals what
        the model holds are skipped. ``atomic=True``: changed bytes are staged and copied
        into the model only when the whole stream arrived (extra memory: this rank's
        changed bytes); a broken stream leaves the model bitwise unchanged.
        ``atomic=False``: each bucket is applied as it arrives (extra memory: about two
        buckets); a broken stream leaves ``model.weights_consistent`` false, the version
        unchanged, and the model refuses to run until a complete update lands: one that
        presents again every tensor the broken stream announced, changed or not (the
        stream again, the whole checkpoint from disk or memory; an update of a subset
        leaves the mix as it is).
        What the broken stream wrote is rewritten by any later update (its hashes are
        forgotten), rolling back to the previous checkpoint included.
        ``quantize``: as :meth:`update_from_tensors`. Needs the compiled plan (``baseline``
        or an earlier complete update)."""
        with self._lock:
            return self._receive_stream(group, src, atomic, quantize)

    def _bump_version(self, presented: Iterable[str]) -> None:
        """A new version landed. An inconsistent model (a broken ``atomic=False`` stream)
        becomes consistent only through an update that ``presented`` again every tensor
        the broken streams announced (changed or not; the whole plan when no stream
        broke): after one of a subset, the others may still hold either version.
        ``presented`` is checked only for an inconsistent model."""
        from .hooks import hook_target

        self.version += 1
        models = {id(self.model): self.model, id(t := hook_target(self.model)[0]): t}.values()
        broken = [m for m in models if vars(m).get("weights_consistent") is False]
        complete = bool(broken) and _covers(self._pending or self._known, presented)
        if complete:
            self._pending = set()
        for m in models:
            m.weights_version = self.version  # (the runtime's KV caches check it)
            if complete and m in broken:
                m.weights_consistent = True

    def _post_load(self, layers: list[int], written: Callable[[], list[str]]) -> None:
        """The model's post-load step for ``layers`` (derived buffers: MLA ``w_kc`` /
        ``w_vc``). If it fails (a GPU out of memory, Ctrl-C), the new weights are in but
        their derived buffers are stale: the model is marked inconsistent (the runtime
        refuses to run), and the tensors just ``written`` are forgotten by the hash state
        and must be presented again, so that the next update rewrites them and redoes
        the step (``written``: their names, asked for only then)."""
        post = getattr(self.model, "post_load_weights", None)
        if post is None:
            return
        try:
            post(layers=layers)
        except BaseException as e:
            names = written()
            self._state.forget(sorted(set(names)))
            self._forget_sources(names)
            self._pending.update(names)
            self._mark_inconsistent()
            e.add_note(
                f"kimi_loader: post_load_weights(layers={layers}) failed after the weights were written; the model "
                "refuses to run until an update presents those tensors again (the same one will do)"
            )
            raise

    def _forget_sources(self, written: Iterable[str]) -> None:
        """Quantized parts were ``written`` as given (a checkpoint, a stream of int4): the
        unquantized source last synced for their module (quantize-on-sync) is no longer
        what the model holds, so its hash goes (else the same bf16 weights synced again
        would be skipped, leaving the parts written since)."""
        if self._source_hashes:
            for n in written:
                base, _, suffix = n.rpartition(".")
                if suffix != "weight":
                    self._source_hashes.pop(f"{base}.weight", None)

    def _mark_inconsistent(self) -> None:
        from .hooks import hook_target

        self.model.weights_consistent = False
        hook_target(self.model)[0].weights_consistent = False

    def _check_stream(self, meta: list[Any], quantize: str | bool | None) -> None:
        """Every streamed tensor has a place in the plan, with the dtype and shape it was
        planned for (or is an unquantized weight of a quantized module, with ``quantize``);
        the parts of a quantized weight come together."""
        ck = self._compiled
        if ck is None or self._plan is None:
            raise InvalidArgumentError(
                "a streamed update needs the compiled plan: create the WeightUpdater with baseline= "
                "(or run one complete update first)"
            )
        names: set[str] = set()
        plain: set[str] = set()  # the names that are not unquantized sources of quantized modules
        for name, st_dtype, shape, nbytes, _h in meta:
            _validate.name(name)
            if name in names:
                raise InvalidArgumentError(f"{_STREAM}: tensor '{name}' sent twice", tensor=name)
            names.add(name)
            dtype = TORCH_DTYPES.get(st_dtype)
            if dtype is None or nbytes != math.prod(shape) * dtype.itemsize:
                raise InvalidArgumentError(f"{_STREAM}: tensor '{name}': bad dtype or size", tensor=name)
            stored = ck.tensor_info(name) if name in ck else None
            base = name[: -len(".weight")]
            fmt = (
                _quantized_module(ck, base)
                if quantize and name.endswith(".weight") and dtype.is_floating_point and len(shape) == 2
                else None
            )
            if fmt is not None:
                _check_source(ck, base, fmt, shape, _STREAM)
                continue
            plain.add(name)
            if stored is None:
                raise IncompleteLoadError(
                    f"{_STREAM}: tensor '{name}': the model has no place for it"
                    + (
                        " (an unquantized weight of a quantized module: pass quantize=)"
                        if name.endswith(".weight")
                        else ""
                    ),
                    tensor=name,
                )
            if stored.st_dtype != st_dtype or list(stored.shape) != list(shape):
                what = "dtype" if stored.st_dtype != st_dtype else "shape"
                raise ShapeMismatchError(
                    f"{_STREAM}: tensor '{name}': {what} mismatch: the model was planned for {stored.st_dtype} "
                    f"{list(stored.shape)}, the stream has {st_dtype} {list(shape)}",
                    tensor=name,
                    expected=tuple(stored.shape),
                    found=tuple(shape),
                )
        self._plan.check_units(ck.core, sorted(plain))

    def _reads_of(self, name: str, quantize: str | bool | None) -> bool:
        """Whether this rank's compiled plan reads checkpoint tensor ``name`` (with
        ``quantize``: also the unquantized weight of a quantized module it reads). What it
        does not read (other ranks' parts, ignored tensors) a stream need not carry."""
        if self._reads is None:
            assert self._plan is not None  # (checked by _check_stream first)
            reads = {n for pair in self._plan.op_sources() for n in pair if n is not None}
            self._reads = (reads, {_unit_key(n) for n in reads})
        reads, units = self._reads
        return name in reads or (bool(quantize) and name.endswith(".weight") and name[: -len(".weight")] in units)

    def _stream_device(self) -> torch.device | None:
        """The device a stream's buckets are applied on by the Triton executor (``None``:
        through the host, by the Rust executor): the model's GPU (NCCL buckets arrive
        there; gloo buckets are copied there whole), or wherever the model is with
        ``executor="triton"``."""
        model = self._model_device()
        if model is None or self.executor == "cpu":
            return None
        if self.executor == "triton" or model.type != "cpu":
            return model
        return None

    def _model_device(self) -> torch.device | None:
        """Where the model's weights live: the one device of its planned destinations
        (else of its parameters); ``None`` for a model without either, or spread over
        several devices (the device executor writes one device: such a model is updated
        through the host, a copy per destination)."""
        devices = {t.device for t in (self._dests or self.model.parameters())}
        return next(iter(devices)) if len(devices) == 1 else None

    def _receive_stream(self, group: Any, src: int, atomic: bool, quantize: str | bool | None) -> UpdateReport:
        import torch.distributed as dist

        t0 = time.perf_counter()
        device = _comm_device(group)
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=src, group=group, device=device)
        header = box[0]
        if not isinstance(header, dict) or header.get("format") != STREAM_FORMAT:
            raise InvalidArgumentError(f"{_STREAM}: not a {STREAM_FORMAT} stream (is the sender a matching version?)")
        meta = header["meta"]
        pull = header.get("pull")  # bucket bytes: send_weights sends this rank what it asks for
        buckets: list[list[int]] = [] if pull else header["buckets"]
        try:
            self._check_stream(meta, quantize)
            problem: Exception | None = None
        except KimiLoaderError as e:
            problem = e

        # what this rank holds: the hash of each source as last applied (for a quantized
        # module synced unquantized, the hash of the unquantized source)
        def held(name: str) -> int | None:
            if quantize and name in self._source_hashes:
                return self._source_hashes[name]
            return self._state.get(name)

        # what this rank reads and does not hold (nothing when the stream is refused)
        differ = (
            set()
            if problem
            else {k for k, m in enumerate(meta) if self._reads_of(m[0], quantize) and held(m[0]) != m[4]}
        )
        # the parts of a quantized weight are read together (a dequantizing op reads the
        # data and its scale): one changed part sends its unit whole (they share a bucket)
        units = _units(meta)
        changed = {j for k in differ for j in units[_unit_key(meta[k][0])]}
        # where buckets are applied: on the model's device by the Triton executor (NCCL
        # buckets never leave the GPU; staging for atomic=True is device memory too), or
        # through the host by the Rust executor
        apply_on = self._stream_device()
        if apply_on is not None:
            from .kernels import plan_exec
        staged: list[tuple[_HostStaged, list[torch.Tensor]]] = []
        staged_dev: list[Any] = []
        unhashed: set[str] = set()  # quantized parts made in device memory (not hashed)
        layers: set[int] = set()
        report = UpdateReport(
            version=self.version, tensors=len(meta), changed_tensors=0, executor="cpu" if apply_on is None else "triton"
        )
        new_hashes: dict[str, int] = {}
        new_sources: dict[str, int] = {}
        received = 0

        def forget_applied() -> None:
            # what the applied buckets wrote is not what the hashes say the model holds:
            # forgotten, so that any later update rewrites it
            self._state.forget(sorted(set(new_hashes) | unhashed))
            self._forget_sources([*new_hashes, *unhashed])
            for n in new_sources:
                self._source_hashes.pop(n, None)

        try:
            if pull:  # the answer: what this rank reads and does not hold (nothing when refused)
                want = sorted(changed)
                _send_wanted(want, src, group, device)
                buckets = _wanted_buckets(meta, want, pull)
            layouts = [_bucket_offsets(meta, b) for b in buckets]
            # a host receiver takes every bucket into one buffer (nothing outlives its bucket:
            # what is staged is copied out): one allocation, where a fresh one per bucket among
            # the kept staging arenas fragmented the heap (the peak grew with the model)
            inbox = (
                torch.empty(max((s for _, s in layouts), default=0), dtype=torch.uint8)
                if device.type == "cpu"
                else None
            )
            for b, (offsets, size) in zip(buckets, layouts, strict=True):
                flat = inbox[:size] if inbox is not None else torch.empty(size, dtype=torch.uint8, device=device)
                if pull:
                    dist.recv(flat, src=src, group=group)
                else:
                    dist.broadcast(flat, src=src, group=group)
                received += 1
                report.bytes_received += size
                if problem is not None:
                    continue  # drained, never applied
                try:
                    flat = flat.to(apply_on or "cpu")
                    names, tensors = [], []
                    for k, off in zip(b, offsets, strict=True):
                        name, st_dtype, shape, nbytes, _h = meta[k]
                        if k in changed:
                            names.append(name)
                            tensors.append(flat[off : off + nbytes].view(TORCH_DTYPES[st_dtype]).view(shape))
                    if not names:
                        continue
                    hashes = {meta[k][0]: meta[k][4] for k in b if k in changed}
                    if quantize:
                        names, tensors, sources = self._quantize(names, tensors, quantize, _STREAM, known=hashes)
                        new_sources.update(sources)
                        hashes = {n: hashes[n] for n in names if n in hashes}
                    host = flat.device.type == "cpu"
                    ck = Checkpoint(
                        _core.from_tensors(_STREAM, names, tensors, self.threads, device=not host), threads=self.threads
                    )
                    try:
                        plan, dests, _ = self._plan_for(ck)
                        if quantize:  # the quantized parts' hashes are computed here (host memory)
                            qnames = [n for n in names if n not in hashes]
                            if host:
                                hashes.update(zip(qnames, ck.core.hash_tensors(qnames), strict=True))
                            else:
                                unhashed.update(qnames)
                        ops = plan.ops()
                        which = list(range(len(ops)))
                        layers.update(x for op in ops if (x := layer_index(op[1])) is not None)
                        report.bytes_changed += sum(op[3] for op in ops)
                        if atomic and apply_on is not None:
                            staged_dev.append(plan_exec.stage(plan, which, dests))  # device memory
                        elif atomic:
                            part = _HostStaged(plan, which, wants_pinned(t.device for t in dests))
                            staged.append((part, dests))  # the model is not touched yet
                        else:
                            if which:
                                self._mark_inconsistent()
                                self._pending.update(m[0] for m in meta)
                            if apply_on is not None:
                                plan_exec.execute(plan, which, dests)
                            else:
                                _apply_host(plan, which, dests)  # this bucket, straight into the model
                    finally:
                        ck.core.release()
                    new_hashes.update(hashes)
                    report.changed_tensors += sum(1 for k in b if k in differ)
                except KimiLoaderError as e:  # (the rest is drained: the sender is not left blocked)
                    problem = e
                    if not atomic:
                        if new_hashes or unhashed:
                            e.add_note(
                                f"kimi_loader: earlier buckets of the stream were applied ({len(new_hashes)} tensors); "
                                "the model holds a mix of versions and refuses to run until a complete update"
                            )
                        forget_applied()
            # every rank says whether it applied the stream, before any commits: no rank
            # serves a version the others do not hold (a rank refused, one failed applying
            # a bucket, or, with send_weights, the sender died serving a later rank)
            failed = _vote(group, device, problem is not None)
        except KimiLoaderError:
            raise
        except Exception as e:  # the transport broke (the sender died, a timeout, ...)
            from .errors import CheckpointIOError

            if not atomic:
                forget_applied()
            state = (
                "the model is unchanged"
                if atomic or not new_hashes
                else "the model holds a mix of versions and refuses to run until a complete update"
            )
            raise CheckpointIOError(
                f"{_STREAM}: the weight stream broke after {received} of {len(buckets)} buckets "
                f"({type(e).__name__}: {e}); {state}",
                file=_STREAM,
            ) from e
        if problem is not None:
            raise problem
        if failed:
            if atomic:
                state = "nothing was committed: the model is unchanged"
            else:
                forget_applied()
                state = (
                    "this rank applied it: the model is marked inconsistent and refuses to run until a complete update"
                    if new_hashes or unhashed
                    else "this rank had nothing to change"
                )
            raise PeerUpdateError(
                f"{_STREAM}: rank(s) {failed} of the group did not apply the stream; {state}", ranks=failed
            )
        for part, part_dests in staged:  # everything arrived: commit
            part.commit(part_dests)
        if staged_dev:
            plan_exec.commit(staged_dev)
        report.bytes_staged = sum(part.arena.numel() for part, _ in staged) + sum(x.nbytes for x in staged_dev)
        del staged, staged_dev
        t_copy = time.perf_counter()
        self._state.set(list(new_hashes.items()))
        self._state.forget(sorted(unhashed))
        self._forget_sources([*new_hashes, *unhashed])
        self._source_hashes.update(new_sources)
        self._bump_version(m[0] for m in meta)
        if new_hashes:
            self._post_load(sorted(layers), lambda: [*new_hashes, *unhashed])
        t_post = time.perf_counter()
        report.version = self.version
        report.layers_post_processed = sorted(layers) if new_hashes else []
        report.bytes_hashed = sum(m[3] for m in meta)
        report.seconds = {"receive_and_copy": t_copy - t0, "post_load": t_post - t_copy, "total": t_post - t0}
        return report

    def _update(self, ck: Checkpoint, only: set[str] | None) -> UpdateReport:
        with self._lock:
            return self._update_locked(ck, only)

    def _update_locked(
        self,
        ck: Checkpoint,
        only: set[str] | None,
        on_device: bool = False,
        memory: bool = False,
        presented: Iterable[str] | None = None,
    ) -> UpdateReport:
        """``on_device``: the sources are device memory; ``memory``: tensors handed over
        in memory (the device executor reads those only: a checkpoint on disk goes through
        the host whatever the executor); ``presented``: the names the caller gave (default
        ``only``, else the checkpoint's), for :meth:`_bump_version`."""
        t0 = time.perf_counter()
        if only is not None:
            absent = sorted(n for n in only if n not in ck)
            if absent:
                raise IncompleteLoadError(
                    f"names not in the update checkpoint: {', '.join(absent[:5])}", tensor=absent[0]
                )
        plan, dests, replanned = self._plan_for(ck)
        (self._plan or plan).check_units(ck.core, None if only is None else sorted(only))
        t_plan = time.perf_counter()
        if on_device:  # device memory is not hashed on the host: every op of the given tensors runs
            which = list(range(len(plan)))
            sel = None
        else:
            sel = self._state.select(plan, ck.core, None if only is None else sorted(only))
            which = sel.which
        t_hash = time.perf_counter()
        device_exec = on_device or (self.executor == "triton" and memory)
        if device_exec:
            from .kernels import plan_exec

            # every check (op kinds, sources, destinations) runs before the first launch,
            # and device reads do not fail midway: no staging is needed
            plan_exec.execute(plan, which, dests)
        else:
            assert sel is not None
            _apply_host(plan, which, dests, self._staging)  # all-or-nothing
        t_copy = time.perf_counter()
        written: Iterable[str] = only if only is not None else ck  # (iterated only when needed)
        self._forget_sources(written)
        if sel is not None:
            self._state.commit(sel)
        else:  # applied unhashed: what the model held for them is no longer known
            self._state.forget(ck.keys())
        self._bump_version(presented if presented is not None else written)
        ops = plan.ops() if sel is None else []  # (unhashed: every op of the given tensors ran)
        if sel is not None:
            layers = sel.layers if which else []
        else:
            layers = sorted({x for op in ops if (x := layer_index(op[1])) is not None})
        if which:
            self._post_load(layers, lambda: _source_names(plan, which))
        t_post = time.perf_counter()
        return UpdateReport(
            version=self.version,
            tensors=len(ck) if sel is None else sel.tensors,
            changed_tensors=len(ck) if sel is None else sel.changed,
            bytes_changed=sum(op[3] for op in ops) if sel is None else sel.bytes_changed,
            bytes_hashed=0 if sel is None else sel.bytes_hashed,
            layers_post_processed=layers,
            replanned=replanned,
            executor="triton" if device_exec else "cpu",
            seconds={
                "plan": t_plan - t0,
                "hash": t_hash - t_plan,
                "copy": t_copy - t_hash,
                "post_load": t_post - t_copy,
                "total": t_post - t0,
            },
        )


def _source_names(plan: Any, which: list[int]) -> list[str]:
    """The checkpoint tensors the ops ``which`` read."""
    sources = plan.op_sources()
    return [sources[k][0] for k in which]


def _covers(needed: set[str], presented: Iterable[str]) -> bool:
    """Whether ``presented`` names every tensor of ``needed``, a module's weight by any of
    its forms (``<module>.weight`` unquantized, or its quantized parts)."""

    def module(name: str) -> str:
        base, _, suffix = name.rpartition(".")
        return base if suffix.startswith("weight") else name

    given = set(presented)
    modules = {module(n) for n in given}
    return all(n in given or module(n) in modules for n in needed)


#: ``(nbytes, pinned) -> arena or None``: where an update stages (``WeightUpdater._staging``)
_Staging = Callable[[int, bool], "torch.Tensor | None"]


class _HostStaged:
    """The outputs of ops with host sources, executed by the Rust executor into a host
    arena (every source read and checked; no destination touched), committed later into
    destinations anywhere: host ones by ``Plan.commit``; a model on a GPU, which the Rust
    executor cannot write, by one ``copy_`` per run of bytes contiguous in both the arena
    and a destination (the ops are staged in destination order, so a destination whose
    every op is staged is one copy)."""

    def __init__(self, plan: Any, which: list[int], pinned: bool = False, staging: _Staging | None = None) -> None:
        layout = torch.frombuffer(bytearray(plan.op_layout(which)), dtype=torch.int64).view(-1, 3)
        by_offset = torch.argsort(layout[:, 1], stable=True)
        order = by_offset[torch.argsort(layout[by_offset, 0], stable=True)]  # by destination, then offset
        self.plan, self.which = plan, [which[i] for i in order.tolist()]
        self.layout = layout[order]
        need = plan.staged_bytes(self.which)
        arena = staging(need, pinned) if staging is not None else None
        if arena is None or arena.numel() < need:
            arena = host_buffer(need, pinned)
        self.arena = arena[:need]
        if need:
            plan.stage(self.which, self.arena)

    def commit(self, dests: list[torch.Tensor]) -> None:
        if not self.which:
            return
        targets = _op_targets(self.plan, self.which, dests)
        if _on_host(targets):
            self.plan.commit(self.which, targets, self.arena)  # (parallel, in Rust)
        else:
            self.copy_runs(dests)

    def runs(self) -> list[tuple[int, int, int, int]]:
        """``(destination index, first byte, end byte, arena offset)`` of each run of
        staged bytes contiguous in both the arena and one destination."""
        if not len(self.layout):
            return []
        dest, off, size = self.layout.unbind(1)
        at = torch.cumsum(size, 0) - size  # each op's bytes in the arena
        # a run ends where the next op goes to another destination or not right after
        starts = torch.ones(len(dest), dtype=torch.bool)
        starts[1:] = (dest[1:] != dest[:-1]) | (off[1:] != off[:-1] + size[:-1])
        first = starts.nonzero().flatten()
        last = torch.cat([first[1:], torch.tensor([len(dest)])]) - 1
        return list(
            zip(*(v.tolist() for v in (dest[first], off[first], off[last] + size[last], at[first])), strict=True)
        )

    def copy_runs(self, dests: list[torch.Tensor]) -> None:
        """One copy per run; to a GPU asynchronously on a side stream of its device (from
        pinned memory, the copies overlap one another's set-up), all done on return."""
        runs = self.runs()
        uploads = _Uploads(dests[d] for d in {r[0] for r in runs})
        try:
            uploads.copy((_flat_bytes(dests[d])[lo:hi], self.arena[at : at + hi - lo]) for d, lo, hi, at in runs)
        finally:
            uploads.finish()  # (the arena may be reused or freed once this returns)


def _apply_host(plan: Any, which: list[int], dests: list[torch.Tensor], staging: _Staging | None = None) -> None:
    """The ops ``which`` (host sources) all-or-nothing into ``dests``: the Rust executor
    where every destination is host memory, else staged on the host (pinned for a GPU),
    then copied to the device (:class:`_HostStaged`). ``staging``: the arena to stage in
    (default: one of the update's own)."""
    targets = _op_targets(plan, which, dests)
    if _on_host(targets):
        arena = staging(plan.staged_bytes(which), False) if staging is not None and which else None
        plan.execute_atomic(which, targets, arena)
    else:
        pinned = wants_pinned(t.device for t in targets.values())
        _HostStaged(plan, which, pinned, staging).copy_runs(dests)


def _op_targets(plan: Any, which: list[int], dests: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """``{destination index: tensor}`` of the ops ``which``."""
    op_dests = plan.op_dests()
    return {op_dests[k]: dests[op_dests[k]] for k in which}


def _on_host(targets: dict[int, torch.Tensor]) -> bool:
    """Whether every target is host memory (what the Rust executor writes)."""
    return all(t.device.type == "cpu" for t in targets.values())


def _quantized_module(ck: Checkpoint, base: str) -> Any:
    """The quantized :class:`~kimi_loader.registry.Format` checkpoint ``ck`` stores linear
    ``base`` in (``None``: not quantized, or not there): the registry decides, as for loads."""
    fmt = format_matching(stored_suffixes(ck, base))
    return fmt if fmt is not None and fmt.quantized else None


def _check_source(ck: Checkpoint, base: str, fmt: Any, shape: Any, what: str) -> None:
    """An unquantized weight sent for quantized linear ``base`` has the ``[out, in]`` its
    stored data implies (:class:`ShapeMismatchError` naming it otherwise)."""
    want = fmt.logical_shape(ck.tensor_info(f"{base}.{fmt.DATA}").shape)
    if tuple(shape) != tuple(want):
        raise ShapeMismatchError(
            f"{what}: tensor '{base}.weight': the model stores this linear as {fmt.name} of "
            f"{list(want)}, the update is {list(shape)}",
            tensor=f"{base}.weight",
            expected=tuple(want),
            found=tuple(shape),
        )


# -- colocated processes ----------------------------------------------------------------
def share_tensors(named_tensors: NamedTensors) -> bytes:
    """Trainer side of a colocated sync (trainer and engine processes on one machine, the
    pattern of SGLang's ``update_weights_from_tensor``): a payload for
    :meth:`WeightUpdater.update_from_ipc` in another process. GPU tensors travel as CUDA
    IPC handles (the receiver maps the same device memory; keep the tensors alive and
    unchanged until it is done); host tensors are copied once into one shared-memory
    arena that the receiver reads in place. Make one payload per receiving process (a
    host arena's file descriptor is handed over once)."""
    import io
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # (registers torch's tensor reductions with ForkingPickler)

    host: list[tuple[str, torch.Tensor]] = []
    device: list[tuple[str, torch.Tensor]] = []
    for n, t in _validate.named_tensors(named_tensors, _IPC):
        t = t.contiguous()
        (host if t.device.type == "cpu" else device).append((n, t))
    layout, offset = [], 0
    for n, t in host:
        layout.append((n, t.dtype, list(t.shape), offset))
        offset += -(-t.nbytes // 64) * 64  # 64-byte aligned views
    arena = torch.empty(offset, dtype=torch.uint8)
    if host:
        arena.share_memory_()
        for (_n, t), (_, _, _, at) in zip(host, layout, strict=True):
            arena[at : at + t.nbytes].copy_(t.reshape(-1).view(torch.uint8))
    buf = io.BytesIO()
    ForkingPickler(buf).dump({"format": IPC_FORMAT, "host": (arena, layout), "device": device})
    return buf.getvalue()


# -- torch.distributed -----------------------------------------------------------------
def broadcast_weights(
    named_tensors_or_path: Any,
    group: Any = None,
    *,
    src: int = 0,
    bucket_bytes: int = 64 << 20,
    hash: str = "auto",  # noqa: A002 (the option's name)
) -> int:
    """Trainer side: streams ``(name, tensor)`` pairs (or every tensor of a checkpoint
    path) from rank ``src`` to the group: first every tensor's name, dtype, shape, size and
    hash (receivers check them all before a byte lands and skip what they already hold),
    then buckets of about ``bucket_bytes`` (the parts of a quantized weight always share a
    bucket). Receivers call :meth:`WeightUpdater.update_from_distributed`. Returns the
    bytes sent.

    Every receiver gets every bucket (one collective each): with a sharded engine, where
    each rank keeps a part, :func:`send_weights` sends each one only the bytes it asks for.

    Tensors stay where they are: GPU tensors are hashed on their GPU and each bucket is
    assembled on the communication device (NCCL: the GPU), so a GPU trainer's weights are
    never copied to the host. ``hash``: ``"auto"`` (xxh3 of host memory, the ``kl64``
    device hash of :mod:`kimi_loader.kernels.hash` of device memory), ``"xxh3"`` (device
    tensors are copied to the host to be hashed), ``"device"`` (``kl64`` everywhere, host
    tensors through the Triton interpreter or a GPU). A receiver whose model was loaded
    from disk holds xxh3 hashes: the first ``kl64`` stream it gets rewrites every tensor
    it is sent, the next ones are deltas."""
    import torch.distributed as dist

    source = _StreamSource(named_tensors_or_path, hash, group, src)
    buckets = _buckets(source.meta, bucket_bytes)
    dist.broadcast_object_list(
        [{"format": STREAM_FORMAT, "meta": source.meta, "buckets": buckets}], src=src, group=group, device=source.device
    )
    sent = 0
    for b in buckets:
        flat = source.bucket(b)
        dist.broadcast(flat, src=src, group=group)
        sent += flat.numel()
    _sender_vote(group, source.device)
    return sent


def send_weights(
    named_tensors_or_path: Any,
    group: Any = None,
    *,
    src: int = 0,
    bucket_bytes: int = 64 << 20,
    hash: str = "auto",  # noqa: A002 (the option's name)
) -> int:
    """Trainer side, point to point: as :func:`broadcast_weights` (same arguments, same
    receiver call, :meth:`WeightUpdater.update_from_distributed`), but each receiver, once
    it has checked the table of every tensor, answers with the tensors it reads and does
    not hold, and is sent only those, in buckets of about ``bucket_bytes``. A TP/EP rank
    then receives its part of what changed, not the model; a receiver that holds
    everything receives nothing. The receivers are served one after the other (each
    bucket a ``send`` / ``recv``); a checkpoint path is read once per receiver that wants
    a tensor. Returns the bytes sent, all receivers together."""
    import torch.distributed as dist

    source = _StreamSource(named_tensors_or_path, hash, group, src)
    dist.broadcast_object_list(
        [{"format": STREAM_FORMAT, "meta": source.meta, "buckets": None, "pull": int(bucket_bytes)}],
        src=src,
        group=group,
        device=source.device,
    )
    ranks = _group_ranks(group)
    # every receiver's answer first (one that wants nothing is not kept waiting)
    wants = {r: _recv_wanted(r, group, source.device, len(source.meta)) for r in ranks if r != src}
    sent = 0
    for r, want in wants.items():
        for b in _wanted_buckets(source.meta, want, bucket_bytes):
            flat = source.bucket(b)
            dist.send(flat, dst=r, group=group)
            sent += flat.numel()
    _sender_vote(group, source.device)
    return sent


def _vote(group: Any, device: torch.device, failed: bool) -> list[int]:
    """The end of every stream: each rank of the group (the sender too) says whether it
    failed; returns the (global) ranks that did."""
    import torch.distributed as dist

    ranks = _group_ranks(group)
    flags = torch.zeros(len(ranks), dtype=torch.int64, device=device)
    flags[dist.get_rank(group)] = int(failed)
    dist.all_reduce(flags, group=group)
    return [r for r, f in zip(ranks, flags.tolist(), strict=True) if f]


def _group_ranks(group: Any) -> list[int]:
    """The global ranks of ``group`` (the world when ``None``), in group-rank order."""
    import torch.distributed as dist

    return dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))


def _sender_vote(group: Any, device: torch.device) -> None:
    failed = _vote(group, device, False)
    if failed:
        raise PeerUpdateError(
            f"{_STREAM}: rank(s) {failed} did not apply the stream (each raised why); the receivers "
            "committed nothing (atomic) or refuse to run until a complete update",
            ranks=failed,
        )


class _StreamSource:
    """What a trainer streams: the table (name, dtype, shape, bytes, hash of each tensor)
    and each bucket's bytes, assembled on the communication device."""

    def __init__(self, named_tensors_or_path: Any, how: str, group: Any, src: int) -> None:
        import torch.distributed as dist

        if how not in ("auto", "xxh3", "device"):
            raise InvalidArgumentError(f"hash must be 'auto', 'xxh3' or 'device', got {how!r}")
        self.items: list[tuple[str, torch.Tensor]] | None = None
        if not isinstance(named_tensors_or_path, (str, os.PathLike, Checkpoint)):
            self.items = [(n, t.contiguous()) for n, t in _validate.named_tensors(named_tensors_or_path, _STREAM)]
        if not dist.is_initialized():
            raise InvalidArgumentError(f"{_STREAM}: torch.distributed is not initialized (init_process_group)")
        if dist.get_rank() != src:
            raise InvalidArgumentError(
                f"{_STREAM}: the sender must be rank src={src} (this is rank {dist.get_rank()}); "
                "the other ranks call WeightUpdater.update_from_distributed"
            )
        self.device = _comm_device(group)
        if self.items is None:
            # a checkpoint is read bucket by bucket with pread (never through the map, where a
            # file truncated underneath would fault): a changed file is a CheckpointIOError
            self.ck = (
                named_tensors_or_path
                if isinstance(named_tensors_or_path, Checkpoint)
                else open_checkpoint(named_tensors_or_path)
            )
            names = self.ck.keys()
            infos = [self.ck.tensor_info(n) for n in names]
            hashes = self.ck.core.hash_tensors(names)
            self.meta = [(i.name, i.st_dtype, list(i.shape), i.nbytes, h) for i, h in zip(infos, hashes, strict=True)]
        else:
            items = self.items
            self.meta = [
                (n, _st_dtype(n, t), list(t.shape), t.nbytes, h)
                for (n, t), h in zip(items, _hashes(items, how), strict=True)
            ]

    def bucket(self, b: list[int]) -> torch.Tensor:
        """The bytes of the tensors ``b``, each from a ``BUCKET_ALIGN`` boundary, on the
        communication device (a GPU tensor never passes through the host for NCCL; a
        bucket of host tensors is copied to the GPU once, whole)."""
        meta, device = self.meta, self.device
        if self.items is None:
            got = self.ck.read_tensors([meta[k][0] for k in b])
            parts = [got[meta[k][0]] for k in b]
        else:
            parts = [self.items[k][1] for k in b]
        on = {t.device for t in parts}
        at = on.pop() if len(on) == 1 and device.type == "cpu" else device
        offsets, total = _bucket_offsets(meta, b)
        pad = torch.zeros(BUCKET_ALIGN, dtype=torch.uint8, device=at)
        pieces = []
        for t, off, end in zip(parts, offsets, [*offsets[1:], total], strict=True):
            pieces += [t.reshape(-1).view(torch.uint8).to(at), pad[: end - off - t.nbytes]]
        flat = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.uint8, device=device)
        return flat.to(device)


def _send_wanted(want: list[int], src: int, group: Any, device: torch.device) -> None:
    """A receiver's answer to a :func:`send_weights` table: the indices it wants."""
    import torch.distributed as dist

    dist.send(torch.tensor([len(want)], dtype=torch.int64, device=device), dst=src, group=group)
    if want:
        dist.send(torch.tensor(want, dtype=torch.int64, device=device), dst=src, group=group)


def _recv_wanted(rank: int, group: Any, device: torch.device, count: int) -> list[int]:
    """What receiver ``rank`` asked :func:`send_weights` for (checked: indices of the
    table, ascending, each once)."""
    import torch.distributed as dist

    n = torch.zeros(1, dtype=torch.int64, device=device)
    dist.recv(n, src=rank, group=group)
    size = int(n.item())
    if not 0 <= size <= count:
        raise InvalidArgumentError(f"{_STREAM}: rank {rank} asked for {size} of {count} tensors")
    if not size:
        return []
    got = torch.zeros(size, dtype=torch.int64, device=device)
    dist.recv(got, src=rank, group=group)
    want = got.tolist()
    if want[0] < 0 or want[-1] >= count or any(x >= y for x, y in itertools.pairwise(want)):
        raise InvalidArgumentError(f"{_STREAM}: rank {rank} asked for tensors that are not in the table")
    return want


def _wanted_buckets(meta: list[Any], want: list[int], bucket_bytes: int) -> list[list[int]]:
    """The buckets a receiver that asked for ``want`` is sent (both sides compute them)."""
    return [[want[i] for i in b] for b in _buckets([meta[k] for k in want], bucket_bytes)]


def _st_dtype(name: str, t: torch.Tensor) -> str:
    st = _ST_DTYPES.get(t.dtype)
    if st is None:
        raise InvalidArgumentError(
            f"{_STREAM}: tensor '{name}': dtype {t.dtype} has no safetensors equivalent", tensor=name
        )
    return st


def _hashes(items: list[tuple[str, torch.Tensor]], how: str) -> list[int]:
    """The hash of each tensor of a stream: xxh3 of host memory (Rust, in parallel), the
    ``kl64`` device hash of device memory (one Triton launch per device)."""
    out: list[int] = [0] * len(items)
    by_algo: dict[Any, list[int]] = {}
    for k, (_n, t) in enumerate(items):
        by_algo.setdefault(
            "kl64" if how == "device" or (how == "auto" and t.device.type != "cpu") else "xxh3", []
        ).append(k)
    host = by_algo.get("xxh3", [])
    if host:
        tensors = [items[k][1].cpu() for k in host]
        mem = _core.from_tensors(_STREAM, [items[k][0] for k in host], tensors)
        try:
            for k, h in zip(host, mem.hash_tensors([items[k][0] for k in host]), strict=True):
                out[k] = h
        finally:
            mem.release()
    device_side = by_algo.get("kl64", [])
    groups: dict[torch.device, list[int]] = {}
    for k in device_side:
        groups.setdefault(items[k][1].device, []).append(k)
    if groups:
        from .kernels.hash import hash_tensors

        for ks in groups.values():
            for k, h in zip(ks, hash_tensors([items[k][1] for k in ks]), strict=True):
                out[k] = h
    return out


#: where each tensor of a streamed bucket starts: a multiple of this many bytes (the
#: receiver views the bucket as each tensor's dtype, and the device executor reads it with
#: wide loads; a trainer's tensors come in any order and of any byte size)
BUCKET_ALIGN = 64


def _bucket_offsets(meta: list[Any], bucket: list[int]) -> tuple[list[int], int]:
    """The byte offset of each tensor of ``bucket`` in it, and the bucket's size."""
    offsets, at = [], 0
    for k in bucket:
        offsets.append(at)
        at += -(-meta[k][3] // BUCKET_ALIGN) * BUCKET_ALIGN
    return offsets, at


def _unit_key(name: str) -> str:
    """What the parts of one quantized weight share (its module; the name itself for
    any other tensor)."""
    base, _, suffix = name.rpartition(".")
    return base if any(suffix in u for u in _UNITS) else name


def _units(meta: list[Any]) -> dict[str, list[int]]:
    """The indices of ``meta`` by unit (:func:`_unit_key`), in order of first appearance."""
    units: dict[str, list[int]] = {}
    for k, (name, *_rest) in enumerate(meta):
        units.setdefault(_unit_key(name), []).append(k)
    return units


def _buckets(meta: list[Any], bucket_bytes: int) -> list[list[int]]:
    """Indices of ``meta`` in buckets of about ``bucket_bytes``; a quantized weight's parts
    (same module, suffixes of one unit) are never split across buckets."""
    units = _units(meta)
    buckets: list[list[int]] = []
    cur: list[int] = []
    size = 0
    for ks in units.values():
        n = sum(meta[k][3] for k in ks)
        if cur and size + n > bucket_bytes:
            buckets.append(cur)
            cur, size = [], 0
        cur.extend(ks)
        size += n
    if cur:
        buckets.append(cur)
    return buckets


def _comm_device(group: Any) -> torch.device:
    """CPU for gloo; the current CUDA device for NCCL (its collectives need CUDA tensors).
    Only the gloo path is tested here (no GPU on the development machines)."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
