"""The README's code blocks, run against the built-in synthetic checkpoints (issue #15):
the real paths they show are replaced by synthetic checkpoints of the same kind. The RL
block's torch.distributed and IPC lines need a trainer and receivers in separate processes;
they are run by tests/test_rl.py and left out here (named below)."""

from __future__ import annotations

import os
import re
import shlex

import pytest
import torch

from kimi_loader.cli import main
from kimi_loader.synth import make_checkpoint

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
#: statements of the README that need several processes (tested in test_rl.py)
MULTI_PROCESS = ("update_from_distributed", "broadcast_weights", "send_weights", "update_from_ipc", "share_tensors")


def _blocks(lang: str) -> list[str]:
    text = open(README).read()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """README path -> a synthetic checkpoint of that kind."""
    base = tmp_path_factory.mktemp("readme")
    # Kimi-K2.5's head and expert counts (the README's examples split them 8 ways)
    kimi = make_checkpoint(
        base / "kimi",
        quant="ct-int4",
        n_routed_experts=384,
        num_attention_heads=64,
        num_key_value_heads=64,
        num_hidden_layers=2,
        moe_intermediate_size=128,
    )
    return {
        "/models/Kimi-K2.5-tiny": make_checkpoint(base / "tiny", quant="ct-int4", num_hidden_layers=4),
        "/models/Kimi-K2.5": kimi,
        "/models/DeepSeek-V3-bf16": make_checkpoint(base / "ds", preset="deepseek-v3-tiny", quant="bf16"),
        "/ckpt/step-0": make_checkpoint(base / "s0", quant="ct-int4", num_hidden_layers=4, seed=0),
        "/ckpt/step-1": make_checkpoint(base / "s1", quant="ct-int4", num_hidden_layers=4, seed=1),
        "/tmp/tiny": os.fspath(base / "synth-out"),
    }


def _substitute(code: str, paths: dict[str, str]) -> str:
    for k in sorted(paths, key=len, reverse=True):
        code = (
            code.replace(f'"{k}"', repr(paths[k]))
            .replace(f" {k} ", f" {paths[k]} ")
            .replace(f" {k}\n", f" {paths[k]}\n")
        )
        if code.endswith(f" {k}"):
            code = code[: -len(k)] + paths[k]
    return code


def test_every_python_block_runs(paths):
    blocks = _blocks("python")
    assert len(blocks) >= 4
    env: dict = {"input_ids": torch.tensor([[1, 2, 3, 4]])}
    ran = 0
    for block in blocks:
        code = _substitute(block, paths)
        if "WeightUpdater" in code:  # the RL block continues the runtime block's `model`
            env["trainer_named_tensors"] = [("language_model.model.norm.weight", torch.ones(64, dtype=torch.bfloat16))]
            expert = "language_model.model.layers.1.mlp.experts.0"  # the tiny preset's shapes
            env["bf16_named_tensors"] = [
                (f"{expert}.{p}.weight", torch.randn(shape).to(torch.bfloat16))
                for p, shape in (("gate_proj", (32, 64)), ("up_proj", (32, 64)), ("down_proj", (64, 32)))
            ]
            code = "\n".join(line for line in code.splitlines() if not any(m in line for m in MULTI_PROCESS))
        if "init_process_group" in code:  # the sharded block, as a one-process world here
            import socket

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            env_vars = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}
            old = {k: os.environ.get(k) for k in env_vars}
            os.environ.update(env_vars)
            try:
                exec(compile(code, f"README block {ran}", "exec"), env)
                assert env["logits"].shape[-1] == env["model"].language_model.config["vocab_size"]
            finally:
                env["dist"].destroy_process_group()
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        else:
            exec(compile(code, f"README block {ran}", "exec"), env)
        ran += 1
    assert ran == len(blocks)
    assert env["report"].version >= 3  # the RL block's updates happened


def test_every_cli_line_runs(paths, capsys):
    lines = [line.split("#")[0].strip() for block in _blocks("bash") for line in block.splitlines()]
    commands = [line for line in lines if line.startswith("kimi-loader ")]
    assert len(commands) >= 5
    for command in commands:
        argv = shlex.split(_substitute(command + "\n", paths))[1:]
        assert main(argv) == 0, (command, capsys.readouterr())
