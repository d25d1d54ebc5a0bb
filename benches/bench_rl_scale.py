"""RL weight sync at two model sizes: time and peak extra memory of each way to sync.

For a ~0.2 GB and a ~0.8 GB bf16 DeepSeek-V3-layout model (serving layout, bf16):

- full update from disk (every tensor changed), a ~5% delta found by hashing, the same
  delta handed over by name as in-memory tensors (``update_from_tensors``);
- bf16 -> ct-int4 quantize-on-sync of every routed expert into an int4 model, and the
  quantizers' (int4, MXFP4, FP8-block) throughput next to a memcpy of the same bf16 bytes;
- gloo over loopback, trainer -> one receiver: the streamed update (``atomic=True`` and
  ``atomic=False``) next to the receive-all path it replaced (every bucket kept in memory,
  written to /dev/shm, then loaded), with the receiver's peak extra memory; and to a
  receiver holding half the experts (EP rank 0 of 2): ``broadcast_weights`` (it receives
  everything) next to ``send_weights`` (it is sent what it reads), with the bytes it
  received.

Peak extra memory is the receiver's / this process's resident set sampled every
millisecond during the call, minus the resident set before it. Run:
``python benches/bench_rl_scale.py`` (``make bench`` runs it). Writes
``benches/results/rl-scale-<date>.json``.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time

import psutil
import torch
import torch.multiprocessing as mp
from bench_update import SHAPE as UPDATE_SHAPE

import kimi_loader
from _common import CACHE, checkpoint, record, section
from kimi_loader.rl import WeightUpdater

# bench_update's DeepSeek-V3 layout, with the layer count and format set per measurement
BASE = {k: v for k, v in UPDATE_SHAPE.items() if k not in ("quant", "num_hidden_layers")} | {"num_shards": 4}
SIZES = {"S": 6, "L": 24}  # decoder layers
BUCKET = 16 << 20


class PeakRSS:
    """Samples this process's resident set every millisecond while in the block."""

    def __enter__(self) -> PeakRSS:
        self.proc = psutil.Process()
        self.before = self.peak = self.proc.memory_info().rss
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self.stop = True
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def extra(self) -> int:
        return self.peak - self.before


def timed(fn) -> tuple[float, int]:
    with PeakRSS() as m:
        t = time.perf_counter()
        fn()
        s = time.perf_counter() - t
    return s, m.extra


def best(fn, repeat: int = 3) -> tuple[float, int]:
    runs = [timed(fn) for _ in range(repeat)]
    return min(r[0] for r in runs), max(r[1] for r in runs)


def _stream_rank(rank: int, port: int, a: str, b: str, mode: str, out: str) -> None:
    import torch.distributed as dist

    from kimi_loader.rl import broadcast_weights, send_weights

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ep = mode.startswith("EP-half")
    if rank == 0:
        ck = kimi_loader.open(b)
        send = send_weights if mode.endswith("send_weights") else broadcast_weights
        send([(n, ck.get_tensor(n)) for n in ck.keys()], bucket_bytes=BUCKET)
    else:
        par = dict(ep_rank=0, ep_size=2) if ep else {}
        model = kimi_loader.from_pretrained(a, dtype=torch.bfloat16, **par)
        up = WeightUpdater(model, baseline=a, **par)
        got = {}
        if mode == "receive-all":
            fn = lambda: _receive_all(up)  # noqa: E731
        else:
            fn = lambda: got.update(r=up.update_from_distributed(atomic=mode != "streaming"))  # noqa: E731
        seconds, extra = timed(fn)
        received = got["r"].bytes_received if got else None
        with open(out, "w") as fh:
            json.dump({"seconds": seconds, "extra": extra, "received": received}, fh)
    dist.destroy_process_group()


def _receive_all(up: WeightUpdater) -> None:
    """The path the streamed update replaced: every bucket in memory, then one
    safetensors file in /dev/shm, then a load from it."""
    import tempfile

    import torch.distributed as dist
    from safetensors.torch import save_file

    from kimi_loader.rl import _bucket_offsets, _vote

    box: list = [None]
    dist.broadcast_object_list(box, src=0)
    meta, buckets = box[0]["meta"], box[0]["buckets"]
    tensors = {}
    for b in buckets:
        offsets, size = _bucket_offsets(meta, b)
        flat = torch.empty(size, dtype=torch.uint8)
        dist.broadcast(flat, src=0)
        for k, off in zip(b, offsets, strict=True):
            name, st, shape, nbytes, _ = meta[k]
            tensors[name] = flat[off : off + nbytes].view(kimi_loader.formats.TORCH_DTYPES[st]).view(shape)
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        save_file(tensors, os.path.join(d, "u.safetensors"))
        up.update_from_disk(os.path.join(d, "u.safetensors"))
    _vote(None, torch.device("cpu"), False)  # (the stream's end: the group's vote)


def stream(a: str, b: str, mode: str) -> tuple[float, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(CACHE, "stream.json")
    mp.start_processes(_stream_rank, args=(port, a, b, mode, out), nprocs=2, join=True, start_method="spawn")
    r = json.load(open(out))
    RECEIVED[mode] = r["received"]
    return r["seconds"], r["extra"]


RECEIVED: dict[str, int | None] = {}  # bytes the receiver of each stream mode got


def delta_tensors(a: str, fraction: float, seed: int) -> list[tuple[str, torch.Tensor]]:
    """New values for the first experts' weights, about ``fraction`` of the bytes."""
    ck = kimi_loader.open(a)
    out, size = [], 0
    g = torch.Generator().manual_seed(seed)
    for i in sorted(ck.infos(), key=lambda i: i.name):
        if ".mlp.experts." in i.name and size < fraction * ck.data_bytes:
            out.append((i.name, (torch.randn(i.shape, generator=g) * 0.02).to(i.dtype)))
            size += i.nbytes
    return out


def write_delta(src: str, dst: str, change: dict[str, torch.Tensor]) -> None:
    """A copy of checkpoint ``src`` with the tensors of ``change`` replaced."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    index = json.load(open(os.path.join(dst, "model.safetensors.index.json")))["weight_map"]
    for f in sorted({index[n] for n in change}):
        t = load_file(os.path.join(dst, f))
        t.update({n: v for n, v in change.items() if n in t})
        save_file(t, os.path.join(dst, f), metadata={"format": "pt"})
    open(os.path.join(dst, ".complete"), "w").close()


def measure(label: str, layers: int) -> dict:
    """Every figure for one model size (printed, and returned for the results file)."""
    shape = dict(BASE, num_hidden_layers=layers)
    a = checkpoint(f"rl-{label}-a", quant="bf16", seed=0, **shape)
    b = checkpoint(f"rl-{label}-b", quant="bf16", seed=1, **shape)
    q = checkpoint(f"rl-{label}-int4", quant="ct-int4", seed=0, **shape)
    total = kimi_loader.open(a).data_bytes
    model = kimi_loader.from_pretrained(a, dtype=torch.bfloat16)
    up = WeightUpdater(model, baseline=a)
    state = {"at": a}

    def full() -> None:
        state["at"] = b if state["at"] == a else a
        up.update_from_disk(state["at"])

    delta = delta_tensors(a, 0.05, 1)
    dbytes = sum(t.nbytes for _, t in delta)
    ck_a = kimi_loader.open(a)
    restore = [(n, ck_a.get_tensor(n)) for n, _ in delta]
    rows: dict[str, tuple[float, int]] = {}
    rows["full update from disk"] = best(full)
    if state["at"] != a:
        full()

    def by_names() -> None:
        up.update_from_tensors(delta)
        up.update_from_tensors(restore)

    rows["5% delta by names (in-memory tensors), x2"] = best(by_names)
    d_dir = os.path.join(CACHE, f"rl-{label}-delta")
    if not os.path.exists(os.path.join(d_dir, ".complete")):
        write_delta(a, d_dir, dict(delta))

    def by_hash() -> None:
        up.update_from_disk(d_dir)
        up.update_from_disk(a)

    rows["5% delta found by hashing (disk), x2"] = best(by_hash)
    model = up = None  # freed before the next measurements

    # quantize-on-sync: every routed expert weight, bf16 from the trainer
    qmodel = kimi_loader.from_pretrained(q, dtype=torch.bfloat16)
    qup = WeightUpdater(qmodel, baseline=q)
    ck_b = kimi_loader.open(b)
    experts = [(n, ck_b.get_tensor(n)) for n in ck_b.keys() if ".mlp.experts." in n]
    ebytes = sum(t.nbytes for _, t in experts)
    rows["bf16 -> int4 quantize-on-sync (all experts)"] = timed(lambda: qup.update_from_tensors(experts, quantize=True))
    from kimi_loader.quant import quantize_fp8_block, quantize_int4, quantize_mxfp4

    qt = min(timed(lambda: [quantize_int4(t, group=32) for _, t in experts])[0] for _ in range(2))
    qm = min(timed(lambda: [quantize_mxfp4(t) for _, t in experts])[0] for _ in range(2))
    qf = min(timed(lambda: [quantize_fp8_block(t) for _, t in experts])[0] for _ in range(2))
    mc = min(timed(lambda: [t.clone() for _, t in experts])[0] for _ in range(3))
    qmodel = qup = None
    modes = ("atomic", "streaming", "receive-all", "EP-half, broadcast_weights", "EP-half, send_weights")
    for mode in modes:
        rows[f"gloo stream, {mode}"] = stream(a, b, mode)
    print(f"\nmodel {label}: {total / 1e9:.2f} GB bf16, 5% delta = {dbytes / 1e6:.0f} MB")
    print(f"  {'':<46} {'seconds':>8} {'GB/s':>6} {'peak extra':>11}")
    section(f"model {label} ({total / 1e9:.2f} GB bf16)")
    for k, (s, extra) in rows.items():
        got = RECEIVED.get(k.removeprefix("gloo stream, "))
        print(
            f"  {k:<46} {s:8.3f} {total / s / 1e9 if 'full' in k or 'gloo' in k else 0:6.2f} {extra / 1e6:9.0f} MB"
            + (f"  (received {got / 1e6:.0f} MB)" if got is not None else "")
        )
        record(k, s, None, peak_extra_bytes=extra, **({} if got is None else {"bytes_received": got}))
    record("quantize_int4 (all experts)", qt, None, gbps=ebytes / qt / 1e9)
    record("quantize_mxfp4 (all experts)", qm, None, gbps=ebytes / qm / 1e9)
    record("quantize_fp8_block (all experts)", qf, None, gbps=ebytes / qf / 1e9)
    record("memcpy of the same bf16 bytes", mc, None, gbps=ebytes / mc / 1e9)
    for name, t in (("quantize_int4", qt), ("quantize_mxfp4", qm), ("quantize_fp8_block", qf)):
        print(
            f"  {name} throughput {ebytes / t / 1e9:.2f} GB/s of bf16 vs memcpy of the same bytes "
            f"{ebytes / mc / 1e9:.2f} GB/s ({t / mc:.1f}x slower)"
        )
    return {
        "bytes": total,
        "delta_bytes": dbytes,
        "rows": {k: {"seconds": s, "peak_extra_bytes": e} for k, (s, e) in rows.items()},
        "bytes_received": {f"gloo stream, {m}": got for m, got in RECEIVED.items()},
        "quantize_int4_gbps": ebytes / qt / 1e9,
        "quantize_mxfp4_gbps": ebytes / qm / 1e9,
        "quantize_fp8_block_gbps": ebytes / qf / 1e9,
        "memcpy_gbps": ebytes / mc / 1e9,
    }


def main() -> None:
    results: dict = {"machine": f"{os.cpu_count()} CPUs", "date": datetime.date.today().isoformat(), "sizes": {}}
    print(f"RL weight sync (threads={kimi_loader._core.resolve_threads()}); time best of 3, peak extra RSS max of 3")
    for label, layers in SIZES.items():
        results["sizes"][label] = measure(label, layers)
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    path = os.path.join(os.path.dirname(__file__), "results", f"rl-scale-{results['date']}.json")
    with open(path, "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
