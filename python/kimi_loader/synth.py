"""Synthetic Kimi-K2.5 / DeepSeek-V3 checkpoints in the real naming and formats.

:func:`make_checkpoint` writes ``config.json``, ``model.safetensors.index.json`` and the
shards. Quantized tensors come from the reference packers: compressed-tensors'
``pack_to_int32`` for ct-int4, :func:`kimi_loader.formats.pack_mxfp4` (tested bit-exactly
against compressed-tensors' ``unpack_fp4_from_uint8``) for Quark MXFP4, and torch's
``float8_e4m3fn`` for FP8 block. Values are random but shaped like real weights
(Kaiming-scale linears, norms near 1), and the same ``seed`` gives the same bytes.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InvalidArgumentError
from .formats import QUANT_FORMATS, layer_index
from .presets import PRESETS
from .registry import FORMATS, format_of

__all__ = ["PRESETS", "SYNTH_VERSION", "expected_tensor_count", "make_checkpoint", "text_config"]

#: bumped whenever the generator writes different tensors for the same arguments (caches
#: of generated checkpoints, e.g. the benchmarks', compare it)
SYNTH_VERSION = 2

#: the synthetic MoonViT (tiny; the hub's vision_config keys)
_VISION: dict[str, Any] = {
    "vt_hidden_size": 32,
    "vt_num_attention_heads": 2,
    "vt_num_hidden_layers": 2,
    "vt_intermediate_size": 64,
    "patch_size": 4,
    "init_pos_emb_height": 8,
    "init_pos_emb_width": 8,
    "init_pos_emb_time": 4,
    "merge_kernel_size": [2, 2],
    "merge_type": "sd2_tpool",
    "mm_projector_type": "patchmerger",
    "mm_hidden_size": 32,
    "projector_hidden_act": "gelu",
    "projector_ln_eps": 1e-5,
    "pos_emb_type": "divided_fixed",
    "video_attn_type": "spatial_temporal",
}


def text_config(preset: str, **overrides: Any) -> dict[str, Any]:
    """The language-model config of a preset with ``overrides`` applied."""
    if preset not in PRESETS:
        raise InvalidArgumentError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[preset][2])
    cfg.update(overrides)
    return cfg


# --------------------------------------------------------------------------------------
# quantization configs as the real checkpoints spell them
def _quant_config(quant: str) -> dict[str, Any] | None:
    if quant == "bf16":
        return None
    if quant == "fp8-block":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    if quant == "ct-int4":
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "kv_cache_scheme": None,
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "input_activations": None,
                    "output_activations": None,
                    "weights": {
                        "num_bits": 4,
                        "type": "int",
                        "symmetric": True,
                        "group_size": 32,
                        "strategy": "group",
                        "dynamic": False,
                        "actorder": None,
                        "block_structure": None,
                        "observer": "minmax",
                        "observer_kwargs": {},
                    },
                }
            },
            "ignore": [
                "lm_head",
                "re:.*self_attn.*",
                "re:.*shared_experts.*",
                "re:.*mlp\\.(gate|up|gate_up|down)_proj.*",
                "re:.*mlp\\.gate$",
                "re:vision_tower.*",
                "re:mm_projector.*",
            ],
        }
    if quant == "quark-mxfp4":
        spec = {
            "dtype": "fp4",
            "qscheme": "per_group",
            "group_size": 32,
            "ch_axis": -1,
            "scale_format": "e8m0",
            "round_method": "half_even",
            "symmetric": None,
        }
        return {
            "quant_method": "quark",
            "quant_mode": "eager_mode",
            "export": {"weight_format": "real_quantized", "pack_method": "reorder", "kv_cache_group": []},
            "global_quant_config": {
                "weight": {**spec, "is_dynamic": False},
                "input_tensors": {**spec, "is_dynamic": True},
                "output_tensors": None,
                "bias": None,
            },
            "exclude": ["re:lm_head", "re:.*self_attn.*", "re:.*mlp.gate$", "re:vision_tower.*", "re:mm_projector.*"],
            "layer_quant_config": {},
            "layer_type_quant_config": {},
        }
    raise InvalidArgumentError(f"unknown quant {quant!r}; choose from {list(QUANT_FORMATS)}")


# --------------------------------------------------------------------------------------
# what tensors a model has
@dataclass
class _Linear:
    """A group of linears of one shape, generated together (e.g. one projection of all
    experts of a layer). ``role`` decides the format: ``expert``, ``shared``, ``dense``,
    ``attn``."""

    names: list[str]
    out: int
    inp: int
    role: str


@dataclass
class _Plain:
    name: str
    shape: tuple[int, ...]
    kind: str  # norm | embed | router | bias | vision | vision_linear | pos


def _layer_parts(cfg: dict[str, Any], p: str, moe: bool) -> Iterator[_Linear | _Plain]:
    h = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    kv_lora, q_lora = cfg["kv_lora_rank"], cfg["q_lora_rank"]
    yield _Plain(f"{p}.input_layernorm.weight", (h,), "norm")
    yield _Plain(f"{p}.post_attention_layernorm.weight", (h,), "norm")
    a = f"{p}.self_attn"
    if q_lora:
        yield _Linear([f"{a}.q_a_proj"], q_lora, h, "attn")
        yield _Plain(f"{a}.q_a_layernorm.weight", (q_lora,), "norm")
        yield _Linear([f"{a}.q_b_proj"], heads * (nope + rope), q_lora, "attn")
    else:
        yield _Linear([f"{a}.q_proj"], heads * (nope + rope), h, "attn")
    yield _Linear([f"{a}.kv_a_proj_with_mqa"], kv_lora + rope, h, "attn")
    yield _Plain(f"{a}.kv_a_layernorm.weight", (kv_lora,), "norm")
    yield _Linear([f"{a}.kv_b_proj"], heads * (nope + v), kv_lora, "attn")
    yield _Linear([f"{a}.o_proj"], h, heads * v, "attn")
    if not moe:
        inter = cfg["intermediate_size"]
        yield _Linear([f"{p}.mlp.gate_proj"], inter, h, "dense")
        yield _Linear([f"{p}.mlp.up_proj"], inter, h, "dense")
        yield _Linear([f"{p}.mlp.down_proj"], h, inter, "dense")
        return
    e, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    yield _Plain(f"{p}.mlp.gate.weight", (e, h), "router")
    yield _Plain(f"{p}.mlp.gate.e_score_correction_bias", (e,), "bias")
    experts = range(e)
    yield _Linear([f"{p}.mlp.experts.{i}.gate_proj" for i in experts], inter, h, "expert")
    yield _Linear([f"{p}.mlp.experts.{i}.up_proj" for i in experts], inter, h, "expert")
    yield _Linear([f"{p}.mlp.experts.{i}.down_proj" for i in experts], h, inter, "expert")
    shared = inter * cfg["n_shared_experts"]
    if cfg["n_shared_experts"]:
        yield _Linear([f"{p}.mlp.shared_experts.gate_proj"], shared, h, "shared")
        yield _Linear([f"{p}.mlp.shared_experts.up_proj"], shared, h, "shared")
        yield _Linear([f"{p}.mlp.shared_experts.down_proj"], h, shared, "shared")


def _model_parts(cfg: dict[str, Any], family: str) -> Iterator[_Linear | _Plain]:
    pre = "language_model." if family == "kimi" else ""
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    yield _Plain(f"{pre}model.embed_tokens.weight", (vocab, h), "embed")
    n = cfg["num_hidden_layers"]
    for i in range(n):
        yield from _layer_parts(cfg, f"{pre}model.layers.{i}", moe=i >= cfg["first_k_dense_replace"])
    for j in range(cfg.get("num_nextn_predict_layers") or 0):  # DeepSeek MTP layers
        p = f"{pre}model.layers.{n + j}"
        yield from _layer_parts(cfg, p, moe=True)
        yield _Plain(f"{p}.embed_tokens.weight", (vocab, h), "embed")
        yield _Plain(f"{p}.enorm.weight", (h,), "norm")
        yield _Plain(f"{p}.hnorm.weight", (h,), "norm")
        yield _Linear([f"{p}.eh_proj"], h, 2 * h, "attn")
        yield _Plain(f"{p}.shared_head.norm.weight", (h,), "norm")
        yield _Plain(f"{p}.shared_head.head.weight", (vocab, h), "embed")
    yield _Plain(f"{pre}model.norm.weight", (h,), "norm")
    yield _Plain(f"{pre}lm_head.weight", (vocab, h), "embed")
    if family == "kimi":
        yield from _vision_parts(h)


def _vision_parts(text_hidden: int) -> Iterator[_Plain]:
    """MoonViT and the projector as Kimi-K2.5 names and lays them out (tiny shapes; bf16
    in every format): fused ``wqkv`` with bias, ``norm0`` / ``norm1``, ``mlp.fc0`` /
    ``fc1``, ``wo``, a ``[H0, W0, D]`` position table, ``mm_projector.proj.0`` / ``.2``."""
    v = _VISION
    d, p, inter = v["vt_hidden_size"], v["patch_size"], v["vt_intermediate_size"]
    merged = d * v["merge_kernel_size"][0] * v["merge_kernel_size"][1]

    def linear(name: str, out: int, inp: int) -> Iterator[_Plain]:
        yield _Plain(f"{name}.weight", (out, inp), "vision_linear")
        yield _Plain(f"{name}.bias", (out,), "vision")

    def norm(name: str, n: int) -> Iterator[_Plain]:
        yield _Plain(f"{name}.weight", (n,), "norm")
        yield _Plain(f"{name}.bias", (n,), "vision")

    yield _Plain("vision_tower.patch_embed.proj.weight", (d, 3, p, p), "vision_linear")
    yield _Plain("vision_tower.patch_embed.proj.bias", (d,), "vision")
    yield _Plain(
        "vision_tower.patch_embed.pos_emb.weight", (v["init_pos_emb_height"], v["init_pos_emb_width"], d), "pos"
    )
    for i in range(v["vt_num_hidden_layers"]):
        b = f"vision_tower.encoder.blocks.{i}"
        yield from norm(f"{b}.norm0", d)
        yield from norm(f"{b}.norm1", d)
        yield from linear(f"{b}.wqkv", 3 * d, d)
        yield from linear(f"{b}.wo", d, d)
        yield from linear(f"{b}.mlp.fc0", inter, d)
        yield from linear(f"{b}.mlp.fc1", d, inter)
    yield from norm("vision_tower.encoder.final_layernorm", d)
    yield from norm("mm_projector.pre_norm", d)
    yield from linear("mm_projector.proj.0", merged, merged)
    yield from linear("mm_projector.proj.2", text_hidden, merged)


def _linear_format(role: str, quant: str, shared_expert_quant: str | None) -> str:
    if role == "shared" and shared_expert_quant is not None:
        return shared_expert_quant
    if quant == "ct-int4":
        return "ct-int4" if role == "expert" else "bf16"
    if quant == "quark-mxfp4":
        return "quark-mxfp4" if role in ("expert", "shared", "dense") else "bf16"
    return quant  # bf16, or fp8-block for every linear


def _shard_order(name: str) -> int:
    """Sort key placing tensors in shards as exporters do: embeddings, layers, the rest."""
    i = layer_index(name)
    if i is not None:
        return i
    return -1 if "embed_tokens" in name else 1 << 30


# --------------------------------------------------------------------------------------
# value generation and the reference packers
def _rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float32)


def _quantize_linear(w: torch.Tensor, fmt: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    """``w`` is ``[n, out, in]`` float32 (n stacked linears). Returns suffix -> stacked
    tensor with a leading ``n`` dim, in checkpoint format ``fmt`` (the registry's packers)."""
    return format_of(fmt).quantize(w, g)


def _plain_value(p: _Plain, g: torch.Generator) -> torch.Tensor:
    if p.kind == "norm":
        return (1.0 + 0.1 * _rand(g, *p.shape)).to(torch.bfloat16)
    if p.kind == "bias":
        return 0.01 * _rand(g, *p.shape)  # e_score_correction_bias stays float32
    if p.kind == "router":
        return (_rand(g, *p.shape) / math.sqrt(p.shape[1])).to(torch.bfloat16)
    if p.kind == "vision_linear":  # weights [out, in...]: unit-scale activations
        return (_rand(g, *p.shape) / math.sqrt(math.prod(p.shape[1:]))).to(torch.bfloat16)
    if p.kind == "pos":
        return (0.5 * _rand(g, *p.shape)).to(torch.bfloat16)
    return (0.02 * _rand(g, *p.shape)).to(torch.bfloat16)  # embed, lm_head, vision biases


def _tensors(
    cfg: dict[str, Any], family: str, quant: str, shared_expert_quant: str | None, g: torch.Generator, bar: Any
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for part in bar(_model_parts(cfg, family), desc="generating", unit=" modules"):
        if isinstance(part, _Plain):
            out[part.name] = _plain_value(part, g)
            continue
        fmt = _linear_format(part.role, quant, shared_expert_quant)
        w = _rand(g, len(part.names), part.out, part.inp) / math.sqrt(part.inp)
        for suffix, stacked in _quantize_linear(w, fmt, g).items():
            for i, name in enumerate(part.names):
                out[f"{name}.{suffix}"] = stacked[i]
    return out


def _unquantized_modules(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The linear-like modules (2-D+ ``weight`` without a uint8 packing) of a checkpoint,
    by full name: what Quark's ``exclude`` holds after an export."""
    return sorted(
        n[: -len(".weight")]
        for n, t in tensors.items()
        if n.endswith(".weight") and t.dim() >= 2 and t.dtype != torch.uint8 and "embed_tokens" not in n
    )


def expected_tensor_count(preset: str = "kimi-k2.5-tiny", quant: str = "ct-int4", **overrides: Any) -> int:
    """How many tensors :func:`make_checkpoint` writes, without generating them."""
    family = PRESETS[preset][0] if preset in PRESETS else None
    cfg = text_config(preset, **overrides)
    n = 0
    per = {name: len(f.suffixes) for name, f in FORMATS.items()}
    for part in _model_parts(cfg, family or "kimi"):
        n += 1 if isinstance(part, _Plain) else len(part.names) * per[_linear_format(part.role, quant, None)]
    return n


# --------------------------------------------------------------------------------------
def make_checkpoint(
    path: str | os.PathLike[str],
    *,
    preset: str = "kimi-k2.5-tiny",
    quant: str = "ct-int4",
    seed: int = 0,
    num_shards: int | None = None,
    shared_expert_quant: str | None = None,
    progress: bool = False,
    **overrides: Any,
) -> str:
    """Writes a complete synthetic checkpoint into directory ``path`` and returns it.

    ``preset``: ``kimi-k2.5-tiny`` (Kimi-K2.5 wrapper config with ``text_config``,
    ``language_model.`` names, vision tensors), ``deepseek-v3-tiny`` (plain DeepSeek-V3
    with an MTP layer), ``kimi-k2.5-fullcount`` (61 layers x 384 experts, ~210k
    tensors, 64 shards, tiny shapes), ``kimi-k2.5-realsize`` (Kimi-K2.5's real
    per-tensor shapes, one dense and one MoE layer with 16 experts: 6.4 GB as ct-int4),
    or the tiny ones with vLLM's 576-wide MLA latent, ``kimi-k2.5-tiny-576`` and
    ``deepseek-v3-tiny-576``. ``quant``: one of ``bf16``, ``fp8-block``, ``ct-int4``,
    ``quark-mxfp4``. ``num_shards`` defaults to the preset's (4; 8 for realsize, 64 for
    fullcount). ``shared_expert_quant`` forces the shared experts' format (e.g. ``"bf16"``
    in a Quark checkpoint, as an older Kimi-K2.5-MXFP4 revision had). Other keyword
    arguments override text-config fields (``num_hidden_layers=2``,
    ``n_routed_experts=384``, ...). ``progress``: tqdm bars on stderr while generating
    and writing (only when stderr is a terminal).
    """
    from safetensors.torch import save_file

    def bar(items: Any, **kw: Any) -> Any:
        if not progress:
            return items
        from tqdm.auto import tqdm

        return tqdm(items, disable=None, leave=False, file=sys.stderr, **kw)

    if preset not in PRESETS:
        raise InvalidArgumentError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    family, default_shards, _ = PRESETS[preset]
    num_shards = default_shards if num_shards is None else num_shards
    if num_shards < 1:
        raise InvalidArgumentError("num_shards must be at least 1")
    cfg = text_config(preset, **overrides)
    qc = _quant_config(quant)
    if shared_expert_quant is not None:
        _quant_config(shared_expert_quant)  # validates the name
        if shared_expert_quant == "bf16" and qc is not None:  # the config must say so too
            key = "exclude" if quant == "quark-mxfp4" else "ignore"
            if key in qc and "re:.*shared_experts.*" not in qc[key]:
                qc[key].append("re:.*shared_experts.*")
    if qc is not None and family != "kimi":
        cfg["quantization_config"] = qc
    g = torch.Generator().manual_seed(seed)
    tensors = _tensors(cfg, family, quant, shared_expert_quant, g, bar)
    if quant == "quark-mxfp4" and qc is not None:
        # Quark's exporter writes the modules it left unquantized one by one, with the
        # wrapper's prefix (amd/Kimi-K2.5-MXFP4 lists 530 names), not the patterns
        qc["exclude"] = _unquantized_modules(tensors)

    names = sorted(tensors, key=lambda n: (_shard_order(n), n))
    if num_shards > len(names):
        raise InvalidArgumentError(f"{num_shards} shards for {len(names)} tensors")
    sizes = [tensors[n].numel() * tensors[n].element_size() for n in names]
    total = sum(sizes)
    bounds, acc = [], 0
    for s in sizes:  # shard k gets the tensors that start in its 1/num_shards of the bytes
        bounds.append(min(num_shards - 1, acc * num_shards // max(total, 1)))
        acc += s
    if len(set(bounds)) < num_shards:  # a huge tensor left a shard empty: split by count
        bounds = [i * num_shards // len(names) for i in range(len(names))]
    width = 6 if family == "kimi" else 5  # Kimi-K2.5 names its shards model-00001-of-000064
    files = [f"model-{k + 1:05d}-of-{num_shards:0{width}d}.safetensors" for k in range(num_shards)]

    os.makedirs(path, exist_ok=True)
    weight_map: dict[str, str] = {}
    for k, f in enumerate(bar(files, desc="writing", unit=" shards")):
        shard = {n: tensors[n].contiguous() for n, b in zip(names, bounds, strict=True) if b == k}
        save_file(shard, os.path.join(path, f), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, f))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump(index, fh, indent=2)

    if family == "kimi":
        config = {
            "architectures": ["KimiK25ForConditionalGeneration"],
            "model_type": "kimi_k25",
            "text_config": cfg,
            # the hub's keys (vt_*, init_pos_emb_*) and transformers' names for the same values
            "vision_config": {
                "model_type": "kimi_k25_vision",
                **_VISION,
                "hidden_size": _VISION["vt_hidden_size"],
                "num_attention_heads": _VISION["vt_num_attention_heads"],
                "num_hidden_layers": _VISION["vt_num_hidden_layers"],
                "intermediate_size": _VISION["vt_intermediate_size"],
                "pos_emb_height": _VISION["init_pos_emb_height"],
                "pos_emb_width": _VISION["init_pos_emb_width"],
                "pos_emb_time": _VISION["init_pos_emb_time"],
                "text_hidden_size": cfg["hidden_size"],
            },
            "projection_hidden_size": _VISION["vt_hidden_size"],
            "projection_layer_norm_eps": _VISION["projector_ln_eps"],
            # the placeholder of image features (Kimi-K2.5: 163605, inside its vocabulary)
            "media_placeholder_token_id": cfg["vocab_size"] - 1,
            "image_token_id": cfg["vocab_size"] - 1,
            "video_token_id": cfg["vocab_size"] - 1,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }
        if qc is not None:  # where compressed-tensors' and Quark's exporters write it
            config["quantization_config"] = qc
    else:
        config = cfg
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    return os.fspath(path)
