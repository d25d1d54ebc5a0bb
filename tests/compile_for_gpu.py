"""Compiles every Triton kernel of ``kimi_loader.kernels``, in every specialization the
package launches, for an NVIDIA GPU, on a machine without one: ``python compile_for_gpu.py
ARCH OUT.json`` (ARCH: 90 for H100 / H200). Run by test_kernels_compile.py in a process of
its own, without ``TRITON_INTERPRET`` (the interpreter is lenient where the compiler is
not: types, pointer casts, constexpr branches, shapes of ``tl.dot``).

Each public entry point is called on small CPU tensors with ``JITFunction.run`` replaced:
a launch goes through Triton's own argument binder and specialization for the CUDA
backend, is compiled to PTX and a cubin (``ptxas``, shipped with Triton), and is not run.
What each compiled launch gives is written as JSON: the kernel, its constexprs, its shared
memory, its registers and spilled bytes per thread (``ptxas -v``), and its PTX's counts
of fused multiply-adds (``fma.rn``), of tensor-core matrix multiplies (``mma`` /
``wgmma``) and of float negations, and its approximate or flush-to-zero instructions."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

#: PTX instructions that are not IEEE-rounded, or that flush subnormals to zero (where the
#: CPU references keep them): approximate / full-range divisions, reciprocals, square
#: roots, ``ex2`` / ``lg2``, and any ``.ftz`` form
INEXACT = r"\b(?:div|rcp|sqrt|rsqrt|ex2|lg2|sin|cos)\.(?:approx|full)[.\w]*|\b[a-z0-9]+(?:\.\w+)*\.ftz[.\w]*"
#: unary minus on floats, in the TTIR: Triton 3.9 makes it ``arith.negf``, Triton 3.6 (the
#: GPU machine's) a subtraction from +0, which turns -0 into +0 (0 - 0 = +0); bit-exact
#: code sets sign bits or multiplies by -1.0 (which LLVM may turn into an exact ``neg``)
ZERO_CONSTANT = r"(%[\w.#]+) = arith\.constant (?:dense<)?0\.0+e\+00\b"


def _negations(ttir: str) -> int:
    zeros = set(re.findall(ZERO_CONSTANT, ttir))
    subs = re.findall(r"arith\.subf (%[\w.#]+),", ttir)
    return len(re.findall(r"\barith\.negf\b", ttir)) + sum(s in zeros for s in subs)


COMPILED: list[dict] = []
PTXAS: dict[str, tuple[int, int]] = {}  # binary hash -> (registers, spill bytes) per thread


def _capture(target: GPUTarget):
    backend = make_backend(target)

    def run(self, *args, grid, warmup, **kwargs):
        kwargs.setdefault("debug", False)
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # ptxas -v, printed by Triton (dump_ptxas_log)
            kernel = triton.compile(
                ASTSource(self, signature, constexprs, attrs), target=target, options=options.__dict__
            )
        regs = re.findall(r"Used (\d+) registers", log.getvalue())
        spills = re.findall(r"(\d+) bytes spill stores", log.getvalue())
        if regs:
            PTXAS[kernel.hash] = int(regs[-1]), int(spills[-1])
        # (no log: Triton's cache had this binary, from an earlier launch of this run)
        registers, spill_bytes = PTXAS[kernel.hash]
        names = [p.name for p in self.params]
        COMPILED.append(
            {
                "kernel": self.__name__,
                "constexprs": {names[k[0]]: repr(v) for k, v in constexprs.items()},
                "num_warps": options.num_warps,
                "fp_fusion": options.enable_fp_fusion,
                "shared": kernel.metadata.shared,
                "registers": registers,
                "spill_bytes": spill_bytes,
                "cubin_bytes": len(kernel.asm["cubin"]),
                "fma": len(re.findall(r"\bfma\.rn\.", kernel.asm["ptx"])),
                "mma": len(re.findall(r"\b(?:wgmma|mma)\.", kernel.asm["ptx"])),
                "inexact": sorted(set(re.findall(INEXACT, kernel.asm["ptx"]))),
                "negations": _negations(kernel.asm["ttir"]),
            }
        )
        return None

    return run


def _launch_everything() -> None:
    """One call of each entry point per specialization the package uses."""
    from kimi_loader.kernels import dequant, mla, moe, plan_exec, quantize
    from kimi_loader.kernels.hash import hash_tensors

    g = torch.Generator().manual_seed(0)
    # dequantization: ct-int4 (bf16 / fp16 / fp32 scales), MXFP4 (e8m0), FP8-block; every output dtype
    for out in (torch.float32, torch.float16, torch.bfloat16):
        for sdt in (torch.bfloat16, torch.float16, torch.float32):
            w = {"weight_packed": torch.zeros(64, 8, dtype=torch.int32), "weight_scale": torch.ones(64, 2, dtype=sdt)}
            dequant.dequantize("ct-int4", w, out)
        e8m0 = torch.full((64, 2), 127, dtype=torch.uint8)
        w = {"weight": torch.zeros(64, 32, dtype=torch.uint8), "weight_scale": e8m0}
        dequant.dequantize("quark-mxfp4", w, out)
        w = {"weight": torch.zeros(64, 64, dtype=torch.float8_e4m3fn), "weight_scale_inv": torch.ones(1, 1)}
        dequant.dequantize("fp8-block", w, out)
    # quantize-on-sync from every source dtype
    for src in (torch.bfloat16, torch.float16, torch.float32):
        w = torch.randn(64, 64, generator=g).to(src)
        for rule in ("compressed-tensors", "int4-qat"):
            for sdt in (torch.bfloat16, torch.float16, torch.float32):
                quantize.quantize_int4(w, group=32, rule=rule, scale_dtype=sdt)
        quantize.quantize_mxfp4(w)
        quantize.quantize_fp8_block(w, block=(128, 128))
    # MoE, per pair and grouped, both 4-bit formats, every activation dtype
    for act in (torch.float32, torch.float16, torch.bfloat16):
        for fmt, sdt in (("ct-int4", torch.bfloat16), ("ct-int4", torch.float16), ("quark-mxfp4", None)):
            per = 8 if fmt == "ct-int4" else 2
            pdt = torch.int32 if fmt == "ct-int4" else torch.uint8

            def scale(*shape, sdt=sdt):
                return torch.ones(*shape, dtype=sdt) if sdt else torch.full(shape, 127, dtype=torch.uint8)

            w13 = torch.zeros(4, 64, 64 // per, dtype=pdt)
            w2 = torch.zeros(4, 64, 32 // per, dtype=pdt)
            x = torch.randn(20, 64, generator=g).to(act)
            ids = torch.randint(0, 4, (20, 2), generator=g)
            # every weight tile for bf16 activations and Kimi's bf16 scales, the default else
            tiles = moe.TILES if (act, sdt) == (torch.bfloat16, torch.bfloat16) else moe.TILES[:1]
            for grouped in (False, True):
                for tile in tiles:
                    moe.moe_w4(
                        x, ids, torch.rand(20, 2), w13, scale(4, 64, 2), w2, scale(4, 64, 1), fmt, grouped, tile=tile
                    )
    moe.route_noaux_tc(
        torch.randn(3, 64, generator=g), torch.zeros(64), top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5
    )
    moe.route_noaux_tc(
        torch.randn(3, 384, generator=g), torch.zeros(384), top_k=8, n_group=1, topk_group=1, routed_scaling_factor=2.8
    )
    # MLA decode: Kimi-K2.5's latent 512 + rope 64 (the head count is a grid axis), every dtype
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        b, heads, s = 2, 64, 32
        mla.mla_decode(
            torch.randn(b, heads, 512).to(dt),
            torch.randn(b, heads, 64).to(dt),
            torch.randn(b, s, 512).to(dt),
            torch.randn(b, s, 64).to(dt),
            torch.tensor([s, 3]),
            0.1,
        )
    hash_tensors([torch.arange(1000, dtype=torch.float32), torch.zeros(3, dtype=torch.uint8)])
    # the device executor: every op kind of a descriptor table (codes as plan_exec reads them)
    _plan_exec_kinds(plan_exec)


def _plan_exec_kinds(plan_exec) -> None:
    from kimi_loader import _core

    rows = []
    for code in (0x0103, 0x0203, 0x0301, 0x0302, 0x0102, 0x0201):
        rows.append({0: 1, 11: code})
    for fmt, sdts in ((1, (1, 2, 3)), (2, (4,)), (3, (3,))):
        for sdt in sdts:
            for to in (1, 2, 3):
                rows.append({0: 2, 16: fmt, 17: sdt, 11: to})
    rows.append({0: 0})
    table = torch.zeros(len(rows), _core.OP_TABLE_COLS, dtype=torch.int64)
    for k, row in enumerate(rows):
        for col, v in row.items():
            table[k, col] = v
    table[:, 4] = 1  # one row each
    base = torch.zeros(64, dtype=torch.uint8)
    gpu_tile = plan_exec._tile_rows(torch.device("cuda"))  # (the tensors are on the CPU)
    plan_exec._tile_rows = lambda device: gpu_tile
    plan_exec._run(table, base.device, base)


def main() -> None:
    arch, out = int(sys.argv[1]), sys.argv[2]
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compiles for the GPU: run without TRITON_INTERPRET"
    knobs.nvidia.dump_ptxas_log = True
    JITFunction.run = _capture(GPUTarget("cuda", arch, 32))
    _launch_everything()
    with open(out, "w") as fh:
        json.dump(COMPILED, fh, indent=1)


if __name__ == "__main__":
    main()
