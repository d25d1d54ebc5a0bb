"""RL weight sync and loading on a GPU, each next to its peer and its memory ceiling:

- quantize-on-sync on the device (Triton: bf16 -> ct-int4, MXFP4, FP8-block, one
  ``[2048, 7168]`` weight) vs the torch reference quantizers on the same GPU and vs the
  copy floor (bytes read + written at the measured device-to-device bandwidth);
- the ``kl64`` device hash (what a GPU trainer's stream sends instead of copying weights
  to the host for xxh3) vs the read floor;
- a full in-place update of a bf16 model on the GPU from GPU tensors (the Triton device
  executor) vs ``torch`` per-tensor ``copy_`` of the same tensors and vs the copy floor;
- ``load_weights`` from a checkpoint on disk (page cache warm) into a model on the GPU
  (the pinned staging pipeline) vs the measured pinned host-to-device bandwidth (goal
  >= 0.8x), a full ``update_from_disk`` of that model (host-staged ops, one copy a
  destination) and an RL step from a trainer's CPU tensors (two versions in turn, the
  pinned arena kept) vs the same ceiling.

``make gpu-check`` runs it on a GPU and writes ``benches/results/gpu-sync-<date>.json``.
``--smoke``: the same code on tiny sizes on the CPU (the Triton interpreter; nothing
measured, nothing written): the test suite runs it so that the GPU run does not meet
untried code. Without CUDA and without ``--smoke`` it says so and exits 0.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def run(device: torch.device, smoke: bool, out: dict) -> None:
    import kimi_loader
    from _common import device_timer
    from kimi_loader import quant
    from kimi_loader.kernels import quantize as kq
    from kimi_loader.kernels.hash import hash_tensors
    from kimi_loader.models import for_config
    from kimi_loader.rl import WeightUpdater

    timed = device_timer(device)
    repeat = 1 if smoke else 10
    n = (1 << 16) if smoke else (1 << 30)
    a, b = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    copy_bw = 2 * n / timed(lambda: b.copy_(a), repeat)  # bytes read + written per second
    pin = torch.empty(n, dtype=torch.uint8, pin_memory=device.type == "cuda")
    h2d_bw = n / timed(lambda: b.copy_(pin, non_blocking=True), repeat)
    out["d2d_copy_GBps"], out["h2d_pinned_GBps"] = copy_bw / 1e9, h2d_bw / 1e9
    print(
        f"device {device}: copy {copy_bw / 1e9:.0f} GB/s (read + write), pinned host-to-device {h2d_bw / 1e9:.1f} GB/s"
    )

    # -- quantize-on-sync ----------------------------------------------------------------
    rows, cols = (64, 256) if smoke else (2048, 7168)
    g = torch.Generator(device=device).manual_seed(0)
    w = (torch.randn(rows, cols, device=device, generator=g) * 0.02).to(torch.bfloat16)
    cases = {
        "ct-int4": (lambda: kq.quantize_int4(w, group=32), lambda: quant.quantize_int4_torch(w, group=32)),
        "mxfp4": (lambda: kq.quantize_mxfp4(w), lambda: quant.quantize_mxfp4_torch(w)),
        "fp8-block": (lambda: kq.quantize_fp8_block(w), lambda: quant.quantize_fp8_block_torch(w)),
    }
    for name, (ours_fn, ref_fn) in cases.items():
        got, want = ours_fn(), ref_fn()
        for k in want:  # the figures are of a quantizer that is right
            assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), (name, k)
        moved = w.nbytes + sum(t.nbytes for t in got.values())
        ours, ref = timed(ours_fn, repeat), timed(ref_fn, max(1, repeat // 2))
        floor = moved / copy_bw
        out["rows"][f"quantize_{name}"] = {"ours_s": ours, "torch_s": ref, "copy_floor_s": floor}
        print(
            f"quantize bf16 -> {name}, {rows} x {cols}: {ours * 1e3:.3f} ms "
            f"({w.nbytes / ours / 1e9:.0f} GB/s of bf16), "
            f"{ref / ours:.1f}x the torch reference, {floor / ours:.2f}x of the copy floor"
        )

    # -- the device hash -----------------------------------------------------------------
    hashed = [a[: n // 2], a[n // 2 :]]
    hash_tensors(hashed)
    ours = timed(lambda: hash_tensors(hashed), repeat)
    floor = n / (copy_bw / 2)
    out["rows"]["hash_kl64"] = {"ours_s": ours, "read_floor_s": floor}
    print(
        f"kl64 hash of {n >> 20} MiB: {ours * 1e3:.3f} ms ({n / ours / 1e9:.0f} GB/s), "
        f"{floor / ours:.2f}x of the read floor"
    )

    # -- a full in-place update on the device, and load_weights onto it ----------------------
    from _common import checkpoint

    shape = dict(hidden_size=256, moe_intermediate_size=64, n_routed_experts=8, num_hidden_layers=2)
    if not smoke:
        shape = dict(hidden_size=2048, moe_intermediate_size=1024, n_routed_experts=32, num_hidden_layers=6)
    path = checkpoint(f"gpu-sync-{'smoke' if smoke else 'bf16'}", preset="kimi-k2.5-tiny", quant="bf16", **shape)
    ck = kimi_loader.open(path)
    model = for_config(ck.config, dtype=torch.bfloat16, device=device)
    nbytes = sum(ck.tensor_info(k).nbytes for k in ck.keys())
    kimi_loader.load_weights(model, ck)
    if device.type == "cuda":
        torch.cuda.synchronize()
    load = timed(lambda: kimi_loader.load_weights(model, ck), max(1, repeat // 2))
    out["rows"]["load_weights"] = {"ours_s": load, "h2d_ceiling_s": nbytes / h2d_bw, "bytes": nbytes}
    print(
        f"load_weights of {nbytes / 1e9:.2f} GB onto {device}: {load * 1e3:.1f} ms "
        f"({nbytes / load / 1e9:.1f} GB/s), {nbytes / h2d_bw / load:.2f}x of pinned host-to-device (goal >= 0.8x)"
    )
    # host sources into the model on the GPU (staged on the host, copied a destination at a
    # time): a fresh updater each time, so every tensor counts as changed (plan included)
    disk = timed(lambda: WeightUpdater(model).update_from_disk(ck), max(1, repeat // 2))
    out["rows"]["update_from_disk_to_device"] = {"ours_s": disk, "h2d_ceiling_s": nbytes / h2d_bw, "bytes": nbytes}
    print(
        f"full update from disk onto {device} ({nbytes / 1e9:.2f} GB, host-staged): {disk * 1e3:.1f} ms, "
        f"{nbytes / h2d_bw / disk:.2f}x of pinned host-to-device"
    )
    # an RL engine's step from a trainer's CPU state dict: one updater, two versions in
    # turn (every floating tensor changes), the pinned staging arena kept between steps
    host = [[(k, t) for k in ck.keys() for t in [ck.get_tensor(k)]]]
    host.append([(k, -t if t.is_floating_point() else t) for k, t in host[0]])
    up = WeightUpdater(model, executor="cpu")
    step = [0]

    def from_host() -> None:
        step[0] += 1
        up.update_from_tensors(host[step[0] % 2])

    steps = timed(from_host, max(1, repeat // 2))
    out["rows"]["update_from_host_tensors_to_device"] = {
        "ours_s": steps,
        "h2d_ceiling_s": nbytes / h2d_bw,
        "bytes": nbytes,
    }
    print(
        f"RL step from host tensors onto {device} ({nbytes / 1e9:.2f} GB, hashed, host-staged, kept arena): "
        f"{steps * 1e3:.1f} ms, {nbytes / h2d_bw / steps:.2f}x of pinned host-to-device"
    )
    host.clear()  # (the two host versions freed)
    items = [(k, ck.get_tensor(k).to(device)) for k in ck.keys()]
    copies = [torch.empty_like(t) for _, t in items]
    up = WeightUpdater(model, executor="triton")  # (what "auto" picks for GPU tensors)
    report = up.update_from_tensors(items)
    assert report.executor == "triton" and report.changed_tensors == len(items), report

    def per_tensor() -> None:
        for d, (_n, t) in zip(copies, items, strict=True):
            d.copy_(t)

    ours = timed(lambda: up.update_from_tensors(items), max(1, repeat // 2))
    peer = timed(per_tensor, repeat)
    floor = 2 * nbytes / copy_bw
    out["rows"]["update_from_device_tensors"] = {"ours_s": ours, "torch_copy_s": peer, "copy_floor_s": floor}
    print(
        f"update from {len(items)} device tensors ({nbytes / 1e9:.2f} GB): {ours * 1e3:.1f} ms, "
        f"{peer / ours:.2f}x torch per-tensor copy_ ({peer * 1e3:.1f} ms), {floor / ours:.2f}x of the copy floor"
    )


def main(argv: list[str] | None = None) -> int:
    from _common import gpu_main

    return gpu_main("sync", run, argv)


if __name__ == "__main__":
    sys.exit(main())
