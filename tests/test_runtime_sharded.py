"""The runtime on TP/EP-sharded models: one gloo process per TP rank, each loading its own
shard with the loader, against the unsharded runtime (float32 logits < 1e-5 relative,
greedy tokens equal) in every format, with the experts split by expert group and sliced
within it, and the fused shared-expert slot (present on every expert group, run once)."""

from __future__ import annotations

import os
import socket

import pytest
import torch

import kimi_loader
from kimi_loader.synth import make_checkpoint

IDS = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
NEW_TOKENS = 5

#: name -> (preset, quant, text-config overrides); sizes chosen so every split is legal
CHECKPOINTS = {
    "kimi-bf16": ("kimi-k2.5-tiny", "bf16", {}),
    "ds-bf16": ("deepseek-v3-tiny", "bf16", {}),
    "kimi-int4": ("kimi-k2.5-tiny", "ct-int4", {"moe_intermediate_size": 64}),
    "ds-int4": ("deepseek-v3-tiny", "ct-int4", {"moe_intermediate_size": 64}),
    # 384 experts in Quark MXFP4: the shared expert is fused into slot 384 on every group
    "kimi-mxfp4-fused": ("kimi-k2.5-tiny", "quark-mxfp4", {"moe_intermediate_size": 64, "n_routed_experts": 384}),
    "ds-mxfp4": ("deepseek-v3-tiny", "quark-mxfp4", {"moe_intermediate_size": 64}),
    # FP8 blocks of 128: local q_b / kv_b / o_proj / MLP slices must be whole blocks
    "ds-fp8": (
        "deepseek-v3-tiny",
        "fp8-block",
        {
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 128,
            "v_head_dim": 128,
            "intermediate_size": 256,
            "moe_intermediate_size": 256,
        },
    ),
}

#: world size -> cases (checkpoint, ep_size, kernels); tp_size is the world size
CASES = {
    2: [
        ("kimi-bf16", 1, "torch"),  # experts sliced 2 ways (moe_tp_size 2)
        ("ds-bf16", 2, "torch"),  # experts split by group, group-limited routing
        ("kimi-int4", 1, "torch"),
        ("kimi-int4", 2, "triton"),  # the Triton MoE / MLA / dequant kernels, interpreted
        ("kimi-mxfp4-fused", 2, "torch"),
        ("ds-mxfp4", 1, "torch"),
        ("ds-fp8", 1, "torch"),  # stacked FP8 slices dequantized shard by shard
    ],
    4: [
        ("kimi-bf16", 2, "torch"),
        ("ds-int4", 4, "torch"),
    ],
}


def _worker(rank: int, world: int, port: int, paths: dict[str, str], out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for name, ep, kernels in CASES[world]:
            model = kimi_loader.from_pretrained(
                paths[name], dtype=torch.float32, tp_rank=rank, tp_size=world, ep_size=ep, kernels=kernels
            )
            results[(name, ep, kernels)] = (model(IDS), model.generate(IDS, NEW_TOKENS))
        if rank == 0:
            torch.save(results, os.path.join(out, "results.pt"))
        dist.barrier()  # every rank done before any tears the group down
    finally:
        dist.destroy_process_group()
    # Done and torn down: leave without interpreter teardown. A rank once aborted there
    # (SIGABRT, "terminate called without an active exception": a C++ thread destroyed
    # while joinable) after rank 0 had saved the results, failing a finished run.
    os._exit(0)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    return {
        name: make_checkpoint(root / name, preset=preset, quant=quant, **ov)
        for name, (preset, quant, ov) in CHECKPOINTS.items()
    }


@pytest.mark.parametrize("world", sorted(CASES))
def test_sharded_runtime_equals_the_unsharded_one(tmp_path, paths, world):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(world, port, paths, os.fspath(tmp_path)), nprocs=world, start_method="spawn")
    results = torch.load(tmp_path / "results.pt")
    assert len(results) == len(CASES[world])
    for (name, ep, kernels), (logits, tokens) in results.items():
        model = kimi_loader.from_pretrained(paths[name], dtype=torch.float32)
        want = model(IDS)
        assert logits.shape == want.shape, name
        err = ((logits - want).abs().max() / want.abs().max()).item()
        assert err < 1e-5, (name, ep, kernels, err)
        assert torch.equal(tokens, model.generate(IDS, NEW_TOKENS)), (name, ep, kernels)


def test_sharded_models_need_a_matching_process_group(synth_dir):
    path = synth_dir("deepseek-v3-tiny", "bf16")
    model = kimi_loader.from_pretrained(path, tp_rank=0, tp_size=2)
    with pytest.raises(kimi_loader.InvalidArgumentError, match=r"torch\.distributed"):
        model(IDS)
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:  # a one-process group for a TP rank of two
        with pytest.raises(kimi_loader.InvalidArgumentError, match=r"1 ranks.*TP rank 0 of 2"):
            model(IDS)
    finally:
        dist.destroy_process_group()
    indep = kimi_loader.models.for_config(
        kimi_loader.open(path).config, parallel=kimi_loader.parallel.ParallelLayout.of(0, 2, 0, 2, independent=True)
    )
    with pytest.raises(kimi_loader.InvalidArgumentError, match="inside the TP group"):
        indep.runtime()
