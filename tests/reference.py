"""An independent, deliberately plain Python reference for what each serving-layout
parameter must hold: checkpoint tensors gathered by name, sliced per TP rank, stacked,
in a few explicit lines per layout. The Rust planner is tested against it."""

from __future__ import annotations

import torch


def _slice(t: torch.Tensor, split: str, rank: int, tp: int) -> torch.Tensor:
    if tp == 1 or t.dim() <= 1 or split == "replicated":
        return t
    dim = 0 if split == "column" else 1
    n = t.shape[dim] // tp
    return t.narrow(dim, rank * n, n)


def _split_of(name: str) -> str:
    for frag, split in (
        ("q_b_proj.", "column"),
        ("q_proj.", "column"),
        ("kv_b_proj.", "column"),
        ("o_proj.", "row"),
        ("gate_up_proj.", "column"),
        ("down_proj.", "row"),
        ("embed_tokens.", "column"),
        ("lm_head.", "column"),
    ):
        if frag in name:
            return split
    return "replicated"


def expected_params(ck, model, **ranks) -> dict[str, torch.Tensor]:
    """What every parameter / buffer of the serving-layout ``model`` must equal on the rank
    it was built for (``model.parallel``; ``ranks``, when given, must agree with it).
    Attention, dense and shared MLPs, embedding and head are sliced ``tp_size`` ways by
    ``tp_rank``; routed experts are split by ``ep_rank`` and sliced ``moe_tp_size`` ways."""
    target = getattr(model, "language_model", model)
    par = target.parallel
    for key, value in ranks.items():
        assert getattr(par, key) == value, (key, value, par)
    pre = "language_model." if any(k.startswith("language_model.") for k in ck.keys()) else ""
    cfg = target.config
    e_total = cfg.get("n_routed_experts") or 0
    lo, hi = par.ep_rank * e_total // par.ep_size, (par.ep_rank + 1) * e_total // par.ep_size
    fused = target.num_fused_shared_experts

    def get(name: str, split: str, expert: bool = False) -> torch.Tensor:
        rank, ways = (par.moe_tp_rank, par.moe_tp_size) if expert else (par.tp_rank, par.tp_size)
        return _slice(ck.get_tensor(pre + name), split, rank, ways)

    out = {}
    from kimi_loader.loader import destinations

    dests = destinations(target)  # parameters and persistent buffers
    for name, param in dests.items():
        head, _, suffix = name.rpartition(".")
        if ".experts.w13_" in name or ".experts.w2_" in name:
            base, kind = name.split(".experts.")
            w13 = kind.startswith("w13_")
            suffix = kind[4:] if w13 else kind[3:]
            blocks = []
            for e in [*range(lo, hi), *(["shared"] if fused else [])]:
                src = f"{base}.shared_experts." if e == "shared" else f"{base}.experts.{e}."
                if w13:
                    blocks.append(
                        torch.cat(
                            [
                                get(src + f"gate_proj.{suffix}", "column", True),
                                get(src + f"up_proj.{suffix}", "column", True),
                            ]
                        )
                    )
                else:
                    blocks.append(get(src + f"down_proj.{suffix}", "row", True))
            want = torch.stack(blocks)
        elif ".fused_qkv_a_proj_with_mqa." in name:
            base = head.replace("fused_qkv_a_proj_with_mqa", "")
            want = torch.cat(
                [
                    get(base + f"q_a_proj.{suffix}", "replicated"),
                    get(base + f"kv_a_proj_with_mqa.{suffix}", "replicated"),
                ]
            )
        elif ".gate_up_proj." in name:
            base = head.replace("gate_up_proj", "")
            want = torch.cat([get(base + f"gate_proj.{suffix}", "column"), get(base + f"up_proj.{suffix}", "column")])
        else:
            want = get(name, _split_of(name))
        out[name] = want.to(param.dtype) if want.dtype != param.dtype else want
    return out


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def load_all(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (sharded or one ``model.safetensors``), read
    with safetensors (a weight and its scale may sit in different shards)."""
    import os

    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def rewrite(
    src: str,
    dst,
    *,
    change: dict[str, torch.Tensor] | None = None,
    drop: set[str] | None = None,
    add: dict[str, torch.Tensor] | None = None,
    rename=None,
) -> str:
    """A copy of checkpoint directory ``src`` at ``dst`` with tensors replaced (``change``),
    removed (``drop``), added to the first shard (``add``) or renamed (``rename(name)``);
    the index follows."""
    import json
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    index_path = os.path.join(dst, "model.safetensors.index.json")
    index = json.load(open(index_path))
    change, drop, add = change or {}, drop or set(), add or {}
    new_map: dict[str, str] = {}
    for k, f in enumerate(sorted(set(index["weight_map"].values()))):
        tensors = load_file(os.path.join(dst, f))
        tensors = {n: change.get(n, t) for n, t in tensors.items() if n not in drop}
        if rename is not None:
            tensors = {rename(n): t for n, t in tensors.items()}
        if k == 0:
            tensors.update(add)
        save_file(tensors, os.path.join(dst, f), metadata={"format": "pt"})
        new_map.update(dict.fromkeys(tensors, f))
    index["weight_map"] = new_map
    json.dump(index, open(index_path, "w"))
    return os.fspath(dst)


def module_tree(tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The checkpoint's names as a module tree: every 2-D projection and the head an
    ``nn.Linear`` (what compressed-tensors quantizes and lists), everything else a buffer.
    transformers 5 holds experts as 3-D parameters, which compressed-tensors cannot
    target, so the per-expert tree is built the way an exporter's model holds it."""
    root = torch.nn.Module()
    for name, t in tensors.items():
        *path, leaf = name.split(".")
        linear = t.dim() == 2 and leaf == "weight" and "embed" not in name and not name.endswith("mlp.gate.weight")
        parent = root
        for p in path[:-1] if linear else path:
            if not hasattr(parent, p):
                parent.add_module(p, torch.nn.Module())
            parent = getattr(parent, p)
        if linear:
            lin = torch.nn.Linear(t.shape[1], t.shape[0], bias=False, dtype=t.dtype)
            lin.weight.data = t.clone()
            parent.add_module(path[-1], lin)
        else:
            parent.register_buffer(leaf, t.clone())
    return root


def stack_experts(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert weights stacked as transformers' model holds them."""
    out = dict(weights)
    for name in [n for n in weights if ".experts.0.gate_proj.weight" in n]:
        base = name[: name.index("0.gate_proj")]
        n = sum(1 for k in weights if k.startswith(base) and k.endswith(".down_proj.weight"))
        out[base + "gate_up_proj"] = torch.stack(
            [
                torch.cat([weights[f"{base}{e}.gate_proj.weight"], weights[f"{base}{e}.up_proj.weight"]])
                for e in range(n)
            ]
        )
        out[base + "down_proj"] = torch.stack([weights[f"{base}{e}.down_proj.weight"] for e in range(n)])
    return out


def hf_kimi_dequantized(path: str):
    """transformers' own Kimi_K25ForConditionalGeneration of a ct-int4 checkpoint: loaded
    and dequantized by transformers / compressed-tensors in bf16 (what ``q * scale``
    gives), then run in float32."""
    from transformers import CompressedTensorsConfig, Kimi_K25ForConditionalGeneration

    model = Kimi_K25ForConditionalGeneration.from_pretrained(
        path, dtype=torch.bfloat16, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    return model.float().eval()
