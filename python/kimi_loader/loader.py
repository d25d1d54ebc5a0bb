"""``load_weights``: plan in Rust, prove completeness, copy in parallel, post-process."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _core, _validate
from .errors import IncompleteLoadError, InvalidArgumentError, UnsupportedFormatError
from .formats import TORCH_DTYPES, quant_spec
from .hooks import custom_renames, hook_target
from .parallel import ParallelLayout
from .reader import Checkpoint
from .reader import open as open_checkpoint
from .rules import ExpertShard, PlannerRules, WeightRules

__all__ = ["IncompleteLoadError", "LoadReport", "destinations", "load_weights", "plan_for"]

log = logging.getLogger("kimi_loader")

_ST_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}


@dataclass
class LoadReport:
    tensors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    unused: list[tuple[str, str]] = field(default_factory=list)
    missing: list[tuple[str, int, int, str | None]] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)
    other_rank: int = 0
    op_counts: dict[str, int] = field(default_factory=dict)
    #: destinations a declared rule leaves untouched, by reason (e.g. a vision tower)
    skipped_destinations: dict[str, int] = field(default_factory=dict)
    fused_shared_experts: int = 0
    fusion_reason: str = ""

    def __repr__(self) -> str:
        s = self.seconds
        gbps = self.bytes_written / s["copy"] / 1e9 if s.get("copy") else 0.0
        return (
            f"LoadReport({self.tensors} tensors, {self.bytes_written / 1e9:.3f} GB written in "
            f"{s.get('total', 0.0):.3f} s ({gbps:.2f} GB/s), {sum(self.ignored.values())} ignored, "
            f"{len(self.missing)} missing, {len(self.unused)} unused)"
        )

    def summary(self) -> str:
        s = self.seconds
        gbps = self.bytes_written / s["copy"] / 1e9 if s.get("copy") else 0.0
        lines = [
            f"tensors used     {self.tensors} (+{sum(self.ignored.values())} ignored by rule, "
            f"{self.other_rank} on other expert-parallel ranks)",
            f"bytes            {self.bytes_read:,} read, {self.bytes_written:,} written ({gbps:.2f} GB/s)",
            "ops              " + ", ".join(f"{k} {v}" for k, v in sorted(self.op_counts.items())),
            "seconds          " + ", ".join(f"{k} {v:.4f}" for k, v in s.items()),
            f"fused shared     {self.fused_shared_experts} ({self.fusion_reason})",
        ]
        for reason, n in sorted(self.ignored.items()):
            lines.append(f"ignored          {n} x {reason}")
        for reason, n in sorted(self.skipped_destinations.items()):
            lines.append(f"not loaded       {n} destination(s): {reason}")
        if self.unused:
            lines.append(f"UNUSED           {len(self.unused)}: " + ", ".join(n for n, _ in self.unused[:5]))
        if self.missing:
            lines.append(f"MISSING          {len(self.missing)}: " + ", ".join(m[3] or m[0] for m in self.missing[:5]))
        return "\n".join(lines)


def destinations(module: torch.nn.Module, aliases: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer of ``module`` by name; ``aliases`` maps a
    name suffix to an extra suffix the loader should also accept (e.g. transformers'
    3-D expert parameters, which have no ``.weight``)."""
    out: dict[str, torch.Tensor] = dict(module.named_parameters())
    for mod_name, mod in module.named_modules():
        for b_name, buf in mod._buffers.items():
            if buf is not None and b_name not in mod._non_persistent_buffers_set:
                out[f"{mod_name}.{b_name}" if mod_name else b_name] = buf
    for name in list(out):
        for suffix, extra in (aliases or {}).items():
            if name.endswith(suffix):
                out[name + extra] = out.pop(name)
    return out


#: vLLM's string shard ids of a fused qkv projection, in stacking order
_QKV_ORDER = {"q": 0, "k": 1, "v": 2}


def _order(shard_id: Any, seen: dict[str, list]) -> int:
    """The stacking position of a ``stacked_params_mapping`` shard id: an int is the
    position; ``q`` / ``k`` / ``v`` stack in that order; any other string id takes the
    next position the first time it appears (declaration order)."""
    if isinstance(shard_id, int) and not isinstance(shard_id, bool) and shard_id >= 0:
        return shard_id
    if not isinstance(shard_id, str):
        raise InvalidArgumentError(f"stacked_params_mapping: shard id {shard_id!r} is not an int >= 0 or a str")
    if shard_id in _QKV_ORDER:
        return _QKV_ORDER[shard_id]
    lst = seen.setdefault("ids", [])
    if shard_id not in lst:
        lst.append(shard_id)
    return lst.index(shard_id)


def resolve_parallel(
    model: Any,
    parallel: Any = None,
    tp_rank: int | None = None,
    tp_size: int | None = None,
    ep_rank: int | None = None,
    ep_size: int | None = None,
) -> ParallelLayout:
    """The parallel layout of a load: ``parallel`` or the ``tp_*`` / ``ep_*`` arguments, else
    the one the model was built with (ranks are passed once, when building the model). A
    layout that differs from the model's is refused before anything is read."""
    from .models.hf import wrap_if_transformers

    target, _prefix = hook_target(wrap_if_transformers(model))
    own = getattr(target, "parallel", None)
    given = any(v is not None for v in (tp_rank, tp_size, ep_rank, ep_size))
    if parallel is not None and given:
        raise InvalidArgumentError("give either parallel= or tp_*/ep_* arguments, not both")
    if parallel is not None:
        layout = ParallelLayout.coerce(parallel)
    elif given:
        layout = ParallelLayout.of(
            0 if tp_rank is None else tp_rank,
            1 if tp_size is None else tp_size,
            ep_rank,
            1 if ep_size is None else ep_size,
            independent=bool(own is not None and own.independent),
        )
    else:
        layout = own if isinstance(own, ParallelLayout) else ParallelLayout()
    if isinstance(own, ParallelLayout) and layout != own:
        raise InvalidArgumentError(f"the model was built for {own}, the load asks for {layout}")
    return layout


def build_rules(model: Any, ckpt: Checkpoint, layout: ParallelLayout) -> PlannerRules:
    """The planner's rules: the model's :class:`~kimi_loader.rules.WeightRules` plus its
    stacked / expert mappings, custom renames (computed once per name, in Python, only for
    models with non-identity rename hooks), the shard rows of stacked destinations and the
    parallel layout."""
    declared = WeightRules.coerce(
        getattr(model, "weight_rules", lambda: None)(), f"{type(model).__name__}.weight_rules()"
    )
    seen: dict[str, list] = {}
    stacked = tuple((p, c, _order(s, seen)) for p, c, s in (getattr(model, "stacked_params_mapping", None) or []))
    experts = tuple(
        (p, frag, int(e), ExpertShard.parse(s))
        for p, frag, e, s in (getattr(model, "expert_params_mapping", None) or [])
    )
    table: dict[str, str | None] = {}
    renames = custom_renames(model)
    if renames:
        for name in ckpt.keys():
            new: str | None = name
            for fn in renames:
                new = fn(new)
                if new is None:
                    break
            if new != name:
                table[name] = new
    target, _prefix = hook_target(model)
    shard_rows: dict[str, list[int]] = {}
    if isinstance(target, torch.nn.Module):
        for mod_name, mod in target.named_modules():
            for param, rows in (getattr(mod, "stacked_rows", None) or {}).items():
                shard_rows[f"{mod_name}.{param}" if mod_name else param] = list(rows)
    # adapters of other engines declare them directly (e.g. from vLLM's output_sizes)
    shard_rows.update({k: list(v) for k, v in (getattr(model, "stacked_shard_rows", None) or {}).items()})
    return PlannerRules(declared, stacked, experts, table, shard_rows, layout)


def _check_fusion(rules: PlannerRules, ckpt: Checkpoint) -> None:
    """Fusing a shared expert stored in another format than the routed experts is the
    regression this project exists to prevent: fail loudly, naming the tensors."""
    if rules.model.fused_shared_slot is None:
        return
    shared = [k for k in ckpt.keys() if ".mlp.shared_experts." in k]
    routed = [k for k in ckpt.keys() if ".mlp.experts.0." in k]
    if not shared or not routed:
        return
    s_suffixes = {k.rsplit(".", 1)[1] for k in shared}
    r_suffixes = {k.rsplit(".", 1)[1] for k in routed}
    s_dtypes = {ckpt.tensor_info(k).st_dtype for k in shared if k.endswith(".weight")}
    r_dtypes = {ckpt.tensor_info(k).st_dtype for k in routed if k.endswith(".weight")}
    if s_suffixes != r_suffixes or s_dtypes != r_dtypes:
        raise UnsupportedFormatError(
            f"shared-expert fusion needs the shared expert in the routed experts' format, but the shared "
            f"expert is stored as {sorted(s_suffixes)} {sorted(s_dtypes)} and the routed experts as "
            f"{sorted(r_suffixes)} {sorted(r_dtypes)}; shared-expert tensors: {', '.join(shared[:6])}"
            + (f" (+{len(shared) - 6} more)" if len(shared) > 6 else ""),
            file=ckpt.index_path,
            tensor=shared[0],
        )


def _dest_list(dests: dict[str, torch.Tensor], *, need_memory: bool) -> list[tuple[str, list[int], str]]:
    out = []
    for name, t in dests.items():
        if t.dtype not in _ST_DTYPES:
            raise UnsupportedFormatError(f"destination '{name}' has unsupported dtype {t.dtype}", tensor=name)
        if need_memory:
            if t.device.type == "meta":
                raise InvalidArgumentError(
                    f"destination '{name}' is on the meta device: materialize the model first "
                    "(e.g. model.to_empty(device='cpu'))",
                    tensor=name,
                )
            if not t.is_contiguous():
                raise InvalidArgumentError(f"destination '{name}' is not contiguous", tensor=name)
        out.append((name, list(t.shape), _ST_DTYPES[t.dtype]))
    return out


@dataclass
class PlannedLoad:
    """A plan with the destination tensors it writes (by name) and the destinations that
    declared rules leave untouched (count by reason)."""

    plan: Any
    dests: dict[str, torch.Tensor]
    skipped: dict[str, int]
    #: the FP8 block the plan was built with (quantize-on-sync quantizes to it)
    fp8_block: tuple[int, int] = (128, 128)


def plan_for(
    model: Any,
    ckpt: Checkpoint,
    *,
    tp_rank: int | None = None,
    tp_size: int | None = None,
    ep_rank: int | None = None,
    ep_size: int | None = None,
    parallel: Any = None,
    threads: int | None = None,
    need_memory: bool = False,
) -> PlannedLoad:
    """Builds the copy plan for ``model`` (no copying). The parallel layout defaults to
    the model's own (see :func:`resolve_parallel`)."""
    layout = resolve_parallel(model, parallel, tp_rank, tp_size, ep_rank, ep_size)
    threads = _validate.threads(threads)
    from .models.hf import wrap_if_transformers

    model = wrap_if_transformers(model)
    target, _prefix = hook_target(model)
    rules = build_rules(model, ckpt, layout)
    _check_fusion(rules, ckpt)
    dests = destinations(target, rules.model.dest_aliases)
    for name in getattr(model, "weight_extra_modules", ()) or ():  # e.g. a wrapper's vision tower
        dests.update({f"{name}.{k}": t for k, t in destinations(getattr(model, name)).items()})
    skipped: dict[str, int] = {}
    for prefix, reason in rules.model.skip_destinations:
        for name in [n for n in dests if n.startswith(prefix)]:
            del dests[name]
            skipped[reason] = skipped.get(reason, 0) + 1

    # the checkpoint's own config says how its quantized tensors are laid out
    fp8_block = rules.model.fp8_block
    groups: dict[str, int | None] = {}
    if ckpt.config is not None:
        spec = quant_spec(ckpt.config, file=ckpt.config_path)
        if spec.method == "fp8-block":
            fp8_block = spec.fp8_block
        groups = {"ct-int4": {"int4_group": spec.group_size}, "quark-mxfp4": {"mxfp4_group": spec.group_size}}.get(
            spec.method, {}
        )
    plan = _core.plan(
        ckpt.core, rules.to_core(), _dest_list(dests, need_memory=need_memory), fp8_block, threads, **groups
    )
    return PlannedLoad(plan, dests, skipped, (int(fp8_block[0]), int(fp8_block[1])))


def _format_problems(plan) -> str:
    parts = []
    missing, unused = plan.missing(), plan.unused()
    if missing:
        shown = "; ".join(
            f"'{exp}' (for {dest} bytes [{s}, {e}))" if exp else f"{dest} bytes [{s}, {e})"
            for dest, s, e, exp in missing[:5]
        )
        parts.append(
            f"{len(missing)} destination range(s) would not be written, missing checkpoint tensors: "
            f"{shown}" + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        )
    if unused:
        shown = "; ".join(f"'{n}' ({why})" for n, why in unused[:5])
        parts.append(
            f"{len(unused)} checkpoint tensor(s) would not be used: {shown}"
            + (f" (+{len(unused) - 5} more)" if len(unused) > 5 else "")
        )
    return ". ".join(parts)


DEFAULT_STAGING_BYTES = 256 << 20


def _execute_direct(plan, tensors: list[torch.Tensor], callback) -> None:
    """CPU destinations: the plan writes straight into them."""
    total, n_ops = plan.bytes_written, len(plan)
    batches = min(n_ops, 64) if callback else 1
    done = 0
    for b in range(batches):
        end = n_ops * (b + 1) // max(batches, 1)
        plan.execute(tensors, done, end)
        done = end
        if callback:
            callback(total * end // max(n_ops, 1), total)


def _execute_staged(plan, tensors: list[torch.Tensor], callback, budget: int) -> None:
    """Destinations that are not plain CPU memory (CUDA): the plan writes a batch of
    destinations into one of two staging arenas (pinned when CUDA is available) while the
    previous arena's host-to-device copies run on side streams, one per destination
    device (a model spread over GPUs: each copy on its own device's stream, an arena
    rewritten only when every device's copies from it are done). A destination larger
    than the arena gets a staging buffer of its own."""
    op_dests = plan.op_dests()
    nbytes = [t.numel() * t.element_size() for t in tensors]
    # runs of destinations in op order, each run within the budget
    batches: list[tuple[list[int], int, int]] = []
    k = 0
    while k < len(op_dests):
        start, size = k, 0
        dests: list[int] = []
        while k < len(op_dests):
            d = op_dests[k]
            if d not in dests:
                if dests and size + nbytes[d] > budget:
                    break
                dests.append(d)
                size += nbytes[d]
            k += 1
        batches.append((dests, start, k))
    uploads = _Uploads(tensors)
    arenas = [host_buffer(budget, uploads.pinned) for _ in range(2)]
    in_flight: list[Any] = [None, None]  # (events, buffer kept alive) per arena
    total, written = plan.bytes_written, 0
    try:
        for i, (dests, start, end) in enumerate(batches):
            slot = i % 2
            if in_flight[slot] is not None:
                uploads.wait(in_flight[slot][0])  # the arena's previous copies are done
                in_flight[slot] = None
            size = sum(nbytes[d] for d in dests)
            arena = arenas[slot] if size <= budget else host_buffer(size, uploads.pinned)
            views, off = {}, 0
            for d in dests:
                views[d] = arena[off : off + nbytes[d]]
                off += nbytes[d]
            plan.execute(views, start, end)
            in_flight[slot] = (uploads.copy([(_flat_bytes(tensors[d]), v) for d, v in views.items()]), arena)
            written += size
            if callback:
                callback(min(written, total), total)
    finally:
        uploads.finish()  # (also on a failure: no copy may still read an arena being freed)


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of contiguous tensor ``t`` as a flat uint8 view."""
    return t.view(-1).view(torch.uint8)


def wants_pinned(devices: Iterable[torch.device]) -> bool:
    """Whether host bytes bound for ``devices`` are worth staging in pinned memory: some
    are CUDA devices (pinned host-to-device copies run asynchronously, at about twice the
    pageable rate)."""
    return any(d.type == "cuda" for d in devices) and torch.cuda.is_available()


def host_buffer(nbytes: int, pinned: bool) -> torch.Tensor:
    """``nbytes`` of host memory, page-locked when ``pinned`` and the driver grants it
    (pinned memory is a limited resource: refused, the copies run from pageable memory,
    slower but the same bytes)."""
    if pinned:
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError as e:  # (cudaHostAlloc refused: out of page-locked memory)
            log.debug("%d bytes of pinned staging refused (%s); staging in pageable memory", nbytes, e)
    return torch.empty(nbytes, dtype=torch.uint8)


class _Uploads:
    """Host-to-device copies of staged bytes: asynchronous on a side stream of each CUDA
    destination's device (each made to wait for the work already queued on that device),
    plain copies otherwise (CUDA absent: the staged path exercised on CPU)."""

    def __init__(self, tensors: Iterable[torch.Tensor]) -> None:
        devices = {t.device for t in tensors if t.device.type == "cuda"}
        self.pinned = wants_pinned(devices)
        self.streams: dict[torch.device, Any] = {}
        if self.pinned:
            for dev in sorted(devices, key=str):
                stream = torch.cuda.Stream(device=dev)
                stream.wait_stream(torch.cuda.current_stream(dev))
                self.streams[dev] = stream

    def copy(self, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> list[Any]:
        """Copies each ``(destination bytes, staged bytes)`` (uint8 views of equal length);
        returns the events that mark the copies done (none: they are)."""
        used: dict[torch.device, Any] = {}
        for dest, staged in pairs:
            stream = self.streams.get(dest.device)
            if stream is None:
                dest.copy_(staged)
                continue
            with torch.cuda.stream(stream):  # (also makes the stream's device current)
                dest.copy_(staged, non_blocking=True)
            used[dest.device] = stream
        events = []
        for stream in used.values():
            event = torch.cuda.Event()
            event.record(stream)
            events.append(event)
        return events

    @staticmethod
    def wait(events: list[Any]) -> None:
        for event in events:
            event.synchronize()

    def finish(self) -> None:
        for stream in self.streams.values():
            stream.synchronize()


class _ProgressBar:
    """``progress=True``: a tqdm bar in bytes (with the rate) on stderr. It disables itself
    when stderr is not a terminal (no frames in log files) and, under torch.distributed,
    shows only on rank 0 (``progress="all"``: every rank)."""

    def __init__(self, every_rank: bool) -> None:
        from tqdm.auto import tqdm

        disable: bool | None = None  # tqdm: off when not a TTY
        if not every_rank and torch.distributed.is_available() and torch.distributed.is_initialized():
            disable = True if torch.distributed.get_rank() != 0 else None
        self.bar = tqdm(
            total=0,
            unit="B",
            unit_scale=True,
            unit_divisor=1000,
            desc="loading",
            disable=disable,
            file=sys.stderr,
            leave=False,
        )
        self.done = 0

    def __call__(self, done: int, total: int) -> None:
        self.bar.total = total
        self.bar.update(done - self.done)
        self.done = done
        if done >= total:
            self.bar.close()


def _log_decisions(model: Any, plan: _core.Plan) -> None:
    """What the plan decided on the user's behalf, on the ``kimi_loader`` logger: the
    format and shared-expert fusion decisions and the ignored tensors per reason at INFO
    (every ignored name at DEBUG)."""
    if not log.isEnabledFor(logging.INFO):
        return
    from .models.hf import wrap_if_transformers

    target, _ = hook_target(wrap_if_transformers(model))
    for decision in getattr(target, "format_decisions", ()):
        log.info("format decision: %s", decision)
    if hasattr(target, "fusion_reason"):
        log.info("shared-expert fusion: %s (%s)", getattr(target, "num_fused_shared_experts", 0), target.fusion_reason)
    by_reason: dict[str, list[str]] = {}
    for name, reason in plan.ignored():
        by_reason.setdefault(reason, []).append(name)
    for reason, names in sorted(by_reason.items()):
        log.info("ignored %d checkpoint tensors: %s (e.g. %s)", len(names), reason, names[0])
        if log.isEnabledFor(logging.DEBUG):
            for n in names:
                log.debug("ignored %s: %s", n, reason)


def load_weights(
    model: Any,
    path_or_checkpoint: str | os.PathLike[str] | Checkpoint,
    *,
    tp_rank: int | None = None,
    tp_size: int | None = None,
    ep_rank: int | None = None,
    ep_size: int | None = None,
    parallel: Any = None,
    strict: bool = True,
    progress: Callable[[int, int], None] | bool | str | None = None,
    threads: int | None = None,
    staging_bytes: int | None = None,
) -> LoadReport:
    """Loads a checkpoint into ``model`` (the outermost model; a wrapper forwards its weight
    hooks to its inner model).

    The plan is built and checked before anything is copied: with ``strict`` (the default)
    a destination element that no checkpoint tensor writes, or a checkpoint tensor that no
    rule uses or declares ignored, raises :class:`IncompleteLoadError` naming them and the
    model is left untouched. ``progress`` is a callback ``(bytes_done, bytes_total)``, or
    ``True`` for a tqdm bar on stderr (only when it is a terminal; only on rank 0 under
    torch.distributed, ``"all"`` for every rank). Afterwards ``model.post_load_weights()``
    runs. The report is logged at INFO on the ``kimi_loader`` logger; a ``strict=False``
    load with gaps, or one that loads nothing, logs a warning.

    CPU destinations are written directly. Others (CUDA) are staged through two pinned
    buffers of ``staging_bytes`` (default 256 MiB) with asynchronous host-to-device copies
    overlapping the next batch; passing ``staging_bytes`` for CPU destinations forces the
    staged path.

    The parallel layout is the model's own (``for_config(..., tp_rank=, tp_size=, ...)``);
    ``tp_*`` / ``ep_*`` / ``parallel`` here must agree with it (see
    :class:`~kimi_loader.parallel.ParallelLayout`).
    """
    t0 = time.perf_counter()
    layout = resolve_parallel(model, parallel, tp_rank, tp_size, ep_rank, ep_size)
    threads = _validate.threads(threads)
    ckpt = (
        path_or_checkpoint
        if isinstance(path_or_checkpoint, Checkpoint)
        else open_checkpoint(path_or_checkpoint, threads=threads)
    )
    t_open = time.perf_counter()
    planned = plan_for(model, ckpt, parallel=layout, threads=threads, need_memory=True)
    plan, dests = planned.plan, planned.dests
    t_plan = time.perf_counter()
    if strict and (plan.missing() or plan.unused()):
        first = (plan.missing() and plan.missing()[0][3]) or (plan.unused() and plan.unused()[0][0]) or None
        raise IncompleteLoadError(
            f"{ckpt.index_path or ckpt.files[0]}: refusing a partial load: {_format_problems(plan)}",
            file=ckpt.index_path,
            tensor=first,
            missing=plan.missing(),
            unused=plan.unused(),
        )
    if plan.missing() or plan.unused():
        log.warning("strict=False: loading with gaps: %s", _format_problems(plan))
    _log_decisions(model, plan)
    if plan.used == 0:
        log.warning(
            "%s: no checkpoint tensor has a place in %s: nothing will be loaded",
            ckpt.index_path or ckpt.files[0],
            type(model).__name__,
        )

    tensors = [dests[n] for n in plan.dest_names()]
    callback: Callable[[int, int], None] | None = None
    if progress is True or progress == "all":
        callback = _ProgressBar(every_rank=progress == "all")
    elif callable(progress):
        callback = progress
    elif progress not in (None, False):
        raise InvalidArgumentError(f"progress must be a callback, True, 'all' or None, got {progress!r}")
    if staging_bytes is None and all(t.device.type == "cpu" for t in tensors):
        _execute_direct(plan, tensors, callback)
    else:
        _execute_staged(plan, tensors, callback, staging_bytes or DEFAULT_STAGING_BYTES)
    t_copy = time.perf_counter()
    from .models.hf import wrap_if_transformers

    post = getattr(wrap_if_transformers(model), "post_load_weights", None)
    if post is not None:
        post()
    t_post = time.perf_counter()

    target, _ = hook_target(wrap_if_transformers(model))
    fused = getattr(target, "num_fused_shared_experts", 0)
    report = LoadReport(
        tensors=plan.used,
        bytes_read=plan.bytes_read,
        bytes_written=plan.bytes_written,
        seconds={
            "open": t_open - t0,
            "plan": t_plan - t_open,
            "copy": t_copy - t_plan,
            "post_load": t_post - t_copy,
            "total": t_post - t0,
        },
        unused=plan.unused(),
        missing=plan.missing(),
        ignored=dict(Counter(reason for _, reason in plan.ignored())),
        other_rank=plan.other_rank,
        op_counts=plan.op_counts(),
        skipped_destinations=planned.skipped,
        fused_shared_experts=fused,
        fusion_reason=getattr(target, "fusion_reason", ""),
    )
    log.info("loaded %s into %s\n%s", ckpt.index_path or ckpt.files[0], type(model).__name__, report.summary())
    return report
