"""Every Triton kernel the package launches compiles for the GPUs it is meant for
(sm_90: H100 / H200), here, without a GPU: ``compile_for_gpu.py`` runs each entry point
with the launch replaced by Triton's own compiler for the CUDA backend (TTIR -> PTX ->
``ptxas``). The interpreter the other kernel tests run under does not type-check what
the compiler does, and never fuses a multiply with an add; this checks both: every
launch compiles, fits the shared memory of one sm_90 block without spilling registers,
the device executor's data movers stay at most 128 registers a thread, the kernels that
must be bit exact (dequantization, quantize-on-sync, the device executor, the hash) keep
no fused multiply-add in their PTX, no approximate or flush-to-zero instruction and no
float negation, and the 16-bit prefill MoE is on tensor cores."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia.compiler")

import kimi_loader.kernels

HERE = os.path.dirname(__file__)
KERNELS = os.path.dirname(kimi_loader.kernels.__file__)
BIT_EXACT = {"dequant", "quantize", "plan_exec", "hash"}  # modules whose kernels equal a reference bit for bit
SM90_SHARED = 227 * 1024  # the most shared memory one block gets on sm_90


def _launched() -> dict[str, str]:
    """The package's kernels, by module: every ``@triton.jit`` function that no other
    one calls (the rest are helpers, compiled into the kernels that call them)."""
    jitted, called = {}, set()
    for f in sorted(os.listdir(KERNELS)):
        if f.endswith(".py"):
            tree = ast.parse(open(os.path.join(KERNELS, f)).read())
            for node in tree.body:
                if isinstance(node, ast.FunctionDef) and "triton.jit" in map(ast.unparse, node.decorator_list):
                    jitted[node.name] = f[:-3]
                    calls = [c.func for c in ast.walk(node) if isinstance(c, ast.Call)]
                    called |= {c.id for c in calls if isinstance(c, ast.Name)}
    return {name: module for name, module in jitted.items() if name not in called}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm90") / "compiled.json"
    # Triton 3.10's default (no fusion unless a launch asks): a launch that relied on the
    # old default would lose its fused multiply-adds, and the fusion check sees it
    env = {
        **os.environ,
        "TRITON_INTERPRET": "0",
        "TRITON_CACHE_DIR": os.fspath(out.parent / "cache"),
        "TRITON_DEFAULT_FP_FUSION": "0",
    }
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "compile_for_gpu.py"), "90", os.fspath(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_every_kernel_launched_compiles_for_sm90(compiled):
    launched = _launched()
    assert len(launched) >= 10, launched  # (the pattern still finds the launches)
    assert {c["kernel"] for c in compiled} == set(launched)
    for c in compiled:
        assert c["cubin_bytes"] > 0, c
        assert c["shared"] <= SM90_SHARED, c
        assert c["spill_bytes"] == 0, c  # nothing spilled to local memory


def test_the_device_executor_stays_light_on_registers(compiled):
    """The device executor's kernels move bytes: their tile (4 rows on a GPU) keeps them
    at most 128 registers a thread, so a block of 4 warps leaves room for 4 more per SM
    to hide memory latency (16 x 256 tiles took 255 and spilled)."""
    ours = [c for c in compiled if c["kernel"] in ("copy_ops", "convert_ops", "dequant_ops")]
    assert ours
    assert max(c["registers"] for c in ours) <= 128, sorted({(c["kernel"], c["registers"]) for c in ours})


def test_bit_exact_kernels_keep_no_fused_multiply_add(compiled):
    launched = _launched()
    exact = [c for c in compiled if launched[c["kernel"]] in BIT_EXACT]
    assert {launched[c["kernel"]] for c in exact} == BIT_EXACT
    fused = [(c["kernel"], c["constexprs"], c["fma"]) for c in exact if c["fma"]]
    assert not fused, fused
    # (the tolerance-tested matmul kernels do fuse, as they should: the check sees fma)
    assert any(c["fma"] for c in compiled if launched[c["kernel"]] == "moe")
    # and each floating-point kernel says which it wants (EXACT / FAST): compiled with
    # fusion off by default (see `compiled`), a launch without FAST would show up here
    float_kernels = [c for c in compiled if launched[c["kernel"]] != "hash"]
    assert {c["kernel"] for c in float_kernels if c["fp_fusion"] != (launched[c["kernel"]] not in BIT_EXACT)} == set()


def test_bit_exact_kernels_keep_no_approximate_or_flush_to_zero_instruction(compiled):
    """The GPU's ``exp2`` / ``floor`` (libdevice, flush-to-zero) and ``/`` (``div.approx`` /
    ``div.full``) are not IEEE: an e4m3 / E2M1 value built with ``exp2``, a floor of a
    subnormal quotient, a division by a constant would differ from the CPU's in corner
    cases the interpreter never shows. The decoders build values from their bits and the
    quantizers divide with ``div_rn``; the tolerance-tested kernels (sigmoid, softmax,
    SiLU) keep their fast ``exp2``, and the check sees it there."""
    launched = _launched()
    inexact = [(c["kernel"], c["constexprs"], c["inexact"]) for c in compiled if launched[c["kernel"]] in BIT_EXACT]
    assert inexact and not [i for i in inexact if i[2]], [i for i in inexact if i[2]]
    assert any(c["inexact"] for c in compiled if launched[c["kernel"]] in ("moe", "mla"))


def test_bit_exact_kernels_negate_no_float(compiled):
    """A float's unary minus is ``0 - v`` under Triton 3.6 (the GPU machine's; 3.9 emits
    ``neg``): -0 comes out +0, so an E2M1 -0 code decoded that way differed from the
    reference's -0 on the GPU only (found by running the interpreter of Triton 3.6). The
    bit-exact kernels set sign bits or multiply by -1.0; the check sees the negation in
    the MoE's SiLU / sigmoid (``exp(-x)``), where it is harmless."""
    launched = _launched()
    exact = [c for c in compiled if launched[c["kernel"]] in BIT_EXACT]
    negating = [(c["kernel"], c["constexprs"]) for c in exact if c["negations"]]
    assert not negating, negating
    assert any(c["negations"] for c in compiled if launched[c["kernel"]] == "moe")


def test_16_bit_grouped_moe_multiplies_on_tensor_cores(compiled):
    """The prefill MoE's ``tl.dot`` in bf16 / fp16 (``DOT`` 1, 2) becomes tensor-core MMA
    instructions, and its IEEE float32 form (``DOT`` 3, never TF32) does not."""
    grouped = [c for c in compiled if c["kernel"] in ("_gate_up_grouped", "_down_grouped")]
    assert {c["constexprs"]["DOT"] for c in grouped} == {"1", "2", "3"}
    for c in grouped:
        assert (c["mma"] > 0) == (c["constexprs"]["DOT"] != "3"), c
