"""The Triton kernels on a GPU, each next to its torch reference and the memory floor:

- ``moe_w4`` (ct-int4; 1, 8, 64, 256 tokens, per-pair and grouped kernels; Kimi-K2.5's
  expert shapes, 384 experts, top-8) vs ``moe_w4_reference`` and vs the HBM floor (bytes
  of the active experts' int4 weights and scales / a measured device-to-device copy
  bandwidth), and each batch's kernel again with the other weight tiles of
  ``kernels.moe.TILES``;
- ``route_noaux_tc`` vs its reference;
- ``mla_decode`` at 8 and 64 heads (Kimi-K2.5's latent 512 + rope 64, 4k-token caches)
  vs its torch reference;
- ``dequantize`` (ct-int4, MXFP4, FP8-block -> bf16; 8 experts of Kimi-K2.5's
  ``w13`` shape) vs the torch reference and vs the copy floor (bytes read + written at the
  measured device-to-device bandwidth).

Needs CUDA (the Triton interpreter is not a benchmark): without one it says so and exits
0. ``make gpu-check`` runs it and writes ``benches/results/gpu-kernels-<date>.json``.
``--smoke``: the same code on tiny sizes on the CPU (the Triton interpreter; nothing
measured, nothing written): the test suite runs it so that the GPU run does not meet
untried code.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def run(dev: torch.device, smoke: bool, out: dict) -> None:
    """The figures on ``dev`` (``smoke``: tiny sizes, one timed call each)."""
    from _common import device_timer
    from kimi_loader.kernels.moe import (
        GROUPED_FROM,
        TILES,
        moe_w4,
        moe_w4_reference,
        route_noaux_tc,
        route_noaux_tc_reference,
    )

    timer = device_timer(dev)

    def _time(fn, repeat: int = 20) -> float:
        return timer(fn, 1 if smoke else repeat)

    n = (1 << 16) if smoke else (1 << 30)
    a, b = torch.empty(n, dtype=torch.uint8, device=dev), torch.empty(n, dtype=torch.uint8, device=dev)
    copy_bw = 2 * n / _time(lambda: b.copy_(a))  # read + write
    out["d2d_copy_GBps"] = copy_bw / 1e9
    experts, hidden, inter, top_k = (8, 64, 32, 4) if smoke else (384, 7168, 2048, 8)
    g = torch.Generator(device=dev).manual_seed(0)
    w13 = torch.randint(
        -(2**31), 2**31 - 1, (experts, 2 * inter, hidden // 8), dtype=torch.int32, device=dev, generator=g
    )
    s13 = (torch.rand(experts, 2 * inter, hidden // 32, device=dev, generator=g) * 0.01).to(torch.bfloat16)
    w2 = torch.randint(-(2**31), 2**31 - 1, (experts, hidden, inter // 8), dtype=torch.int32, device=dev, generator=g)
    s2 = (torch.rand(experts, hidden, inter // 32, device=dev, generator=g) * 0.01).to(torch.bfloat16)
    per_expert = w13[0].nbytes + s13[0].nbytes + w2[0].nbytes + s2[0].nbytes
    for tokens in (1, 8) if smoke else (1, 8, 64, 256):
        x = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16, generator=g)
        logits = torch.randn(tokens, experts, device=dev, generator=g)
        bias = torch.zeros(experts, device=dev)
        ids, w = route_noaux_tc(logits, bias, top_k=top_k, n_group=1, topk_group=1, routed_scaling_factor=2.827)
        active = len(torch.unique(ids))
        floor = active * per_expert / copy_bw * 2  # the bytes read once at copy speed (copy_bw counts 2x)
        ours = _time(lambda x=x, ids=ids, w=w: moe_w4(x, ids, w, w13, s13, w2, s2, grouped=False))
        grouped = _time(lambda x=x, ids=ids, w=w: moe_w4(x, ids, w, w13, s13, w2, s2, grouped=True))
        ref = _time(lambda x=x, ids=ids, w=w: moe_w4_reference(x, ids, w, w13, s13, w2, s2), repeat=5)
        route = _time(
            lambda logits=logits, bias=bias: route_noaux_tc(
                logits, bias, top_k=top_k, n_group=1, topk_group=1, routed_scaling_factor=2.827
            )
        )
        route_ref = _time(
            lambda logits=logits, bias=bias: route_noaux_tc_reference(
                logits, bias, top_k=top_k, n_group=1, topk_group=1, routed_scaling_factor=2.827
            )
        )
        # other weight tiles (BLOCK_N, BLOCK_K) of the kernel this batch takes by default,
        # to choose the default from on a GPU
        kind = tokens * top_k >= GROUPED_FROM
        tiles = {}
        for tile in TILES[:2] if smoke else TILES:
            tiles["x".join(map(str, tile))] = _time(
                lambda x=x, ids=ids, w=w, tile=tile, kind=kind: moe_w4(
                    x, ids, w, w13, s13, w2, s2, grouped=kind, tile=tile
                )
            )
        best_tile = min(tiles, key=tiles.__getitem__)
        row = {
            "moe_tiles_s": tiles,
            "moe_s": ours,
            "moe_grouped_s": grouped,
            "moe_reference_s": ref,
            "hbm_floor_s": floor,
            "floor_ratio": floor / ours,
            "route_s": route,
            "route_reference_s": route_ref,
            "active_experts": active,
        }
        out["rows"][f"moe_decode_{tokens}"] = row
        print(
            f"moe int4, {tokens} tokens ({active} experts): per pair {ours * 1e3:.3f} ms, grouped "
            f"{grouped * 1e3:.3f} ms; best {ref / min(ours, grouped):.1f}x the torch reference, "
            f"{floor / min(ours, grouped):.2f}x of the HBM floor; "
            f"routing {route * 1e6:.0f} us ({route_ref / route:.1f}x); best tile {best_tile} "
            f"{tiles[best_tile] * 1e3:.3f} ms ({tiles['32x32'] / tiles[best_tile]:.2f}x the default's)"
        )
    from kimi_loader.kernels.mla import mla_decode, mla_decode_reference

    for heads in (8, 64):
        b, s, lora, rope = (2, 16, 512, 64) if smoke else (8, 4096, 512, 64)
        q = torch.randn(b, heads, lora, device=dev, dtype=torch.bfloat16, generator=g)
        qr = torch.randn(b, heads, rope, device=dev, dtype=torch.bfloat16, generator=g)
        lat = torch.randn(b, s, lora, device=dev, dtype=torch.bfloat16, generator=g)
        kr = torch.randn(b, s, rope, device=dev, dtype=torch.bfloat16, generator=g)
        lens = torch.full((b,), s, device=dev)
        ours = _time(lambda q=q, qr=qr, lat=lat, kr=kr, lens=lens: mla_decode(q, qr, lat, kr, lens, 0.04))
        ref = _time(lambda q=q, qr=qr, lat=lat, kr=kr, lens=lens: mla_decode_reference(q, qr, lat, kr, lens, 0.04), 5)
        out["rows"][f"mla_decode_{heads}_heads"] = {"mla_s": ours, "mla_reference_s": ref}
        print(
            f"mla decode, {heads} heads, {b} x {s} tokens: {ours * 1e3:.3f} ms, {ref / ours:.1f}x the torch reference"
        )
    from kimi_loader.kernels.dequant import dequantize, dequantize_reference
    from kimi_loader.quant import quantize_fp8_block, quantize_int4, quantize_mxfp4

    rows, cols = (128, 128) if smoke else (8 * 2 * inter, hidden)  # 8 experts' stacked gate_up rows
    dense = torch.randn(rows, cols, device=dev, generator=g) * 0.02
    stored = {
        "ct-int4": quantize_int4(dense, group=32),
        "quark-mxfp4": quantize_mxfp4(dense),
        "fp8-block": quantize_fp8_block(dense),
    }
    for fmt, tensors in stored.items():
        tensors = {k: v for k, v in tensors.items() if k != "weight_shape"}
        nbytes = sum(t.nbytes for t in tensors.values()) + rows * cols * 2
        ours = _time(lambda fmt=fmt, t=tensors: dequantize(fmt, t, torch.bfloat16))
        ref = _time(lambda fmt=fmt, t=tensors: dequantize_reference(fmt, t, torch.bfloat16), 5)
        floor = nbytes / copy_bw
        out["rows"][f"dequant_{fmt}"] = {"dequant_s": ours, "reference_s": ref, "copy_floor_s": floor}
        print(
            f"dequantize {fmt} -> bf16, {rows} x {cols}: {ours * 1e3:.3f} ms ({nbytes / ours / 1e9:.0f} GB/s moved), "
            f"{ref / ours:.1f}x the torch reference, {floor / ours:.2f}x of the copy floor"
        )


def main(argv: list[str] | None = None) -> int:
    from _common import gpu_main

    return gpu_main("kernels", run, argv)


if __name__ == "__main__":
    sys.exit(main())
