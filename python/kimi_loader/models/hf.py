"""Loading into transformers' own ``DeepseekV3ForCausalLM`` (the "embed in another
framework" path). Its experts are fused 3-D parameters, ``mlp.experts.gate_up_proj``
``[E, 2I, H]`` (gate rows first) and ``mlp.experts.down_proj`` ``[E, H, I]``; quantized
checkpoints are dequantized on load to the model's dtype, bit-exactly as
compressed-tensors / transformers do.

``kimi_loader.load_weights(hf_model, path)`` wraps a transformers model automatically.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..rules import WeightRules
from .layout import KIMI_PREFIX_REWRITES, ROPE_IGNORE, TIED_IGNORE

__all__ = ["HFDeepseekV3", "empty_model", "wrap_if_transformers"]

_MODEL_TYPES = ("deepseek_v3", "kimi_k2")


class HFDeepseekV3:
    """The weight hooks and rules for a transformers ``DeepseekV3ForCausalLM``."""

    weight_hooks_inner = "hf_model"

    def __init__(self, hf_model: nn.Module) -> None:
        self.hf_model = hf_model
        self.stacked_params_mapping: list = []  # transformers keeps q_a / kv_a and gate / up apart
        # the language model's config (a wrapper's text_config)
        self.config: Any = getattr(hf_model.config, "text_config", None) or hf_model.config
        self.outer_config: Any = hf_model.config

    @property
    def expert_params_mapping(self) -> list[tuple[str, str, int, str]]:
        out = []
        for e in range(self.config.n_routed_experts or 0):
            out += [
                ("experts.gate_up_proj.", f"experts.{e}.gate_proj.", e, "w1"),
                ("experts.gate_up_proj.", f"experts.{e}.up_proj.", e, "w3"),
                ("experts.down_proj.", f"experts.{e}.down_proj.", e, "w2"),
            ]
        return out

    def weight_rules(self) -> WeightRules:
        c = self.config
        qc = getattr(c, "quantization_config", None) or getattr(self.outer_config, "quantization_config", None)
        block = None
        if isinstance(qc, dict):
            block = qc.get("weight_block_size")
        elif qc is not None:
            block = getattr(qc, "weight_block_size", None)
        return WeightRules(
            rewrites=KIMI_PREFIX_REWRITES,
            ignore=(
                ("vision_tower.", None, "vision tower: not part of DeepseekV3ForCausalLM"),
                ("mm_projector.", None, "multimodal projector: not part of DeepseekV3ForCausalLM"),
                ROPE_IGNORE,
                *self._tied(),
            ),
            num_hidden_layers=c.num_hidden_layers,
            num_nextn_predict_layers=getattr(c, "num_nextn_predict_layers", 0) or 0,
            num_experts=c.n_routed_experts,
            dest_aliases={"mlp.experts.gate_up_proj": ".weight", "mlp.experts.down_proj": ".weight"},
            fp8_block=tuple(block or (128, 128)),
        )

    def _tied(self) -> list[tuple[str | None, str | None, str]]:
        tied = getattr(self.outer_config, "tie_word_embeddings", False) or getattr(
            self.config, "tie_word_embeddings", False
        )
        return [TIED_IGNORE] if tied else []

    def post_load_weights(self, layers: list[int] | None = None) -> None:
        return None


class HFKimiK25(HFDeepseekV3):
    """The weight hooks and rules for transformers' ``Kimi_K25ForConditionalGeneration``:
    its language model lives at ``model.language_model`` (head: ``lm_head``), its vision
    tower and projector at ``model.vision_tower`` / ``model.mm_projector`` under
    transformers' names (:data:`~kimi_loader.models.vision.TRANSFORMERS_RENAMES`, applied
    by the rename hook), with the fused ``wqkv`` cut into ``q/k/v_proj`` and the q / k
    rows reordered for rotate-half RoPE by an unfuse rule (ops of the plan, no Python per
    tensor)."""

    def mutate_weight_preload(self, name: str) -> str | None:
        from .vision import transformers_name

        return transformers_name(name)

    def weight_rules(self) -> WeightRules:
        heads = self.outer_config.vision_config.num_attention_heads
        from .vision import transformers_unfused

        return (
            super()
            .weight_rules()
            .replace(
                rewrites=(
                    ("language_model.model.", "model.language_model."),
                    ("language_model.layers.", "model.language_model.layers."),
                    ("language_model.lm_head.", "lm_head."),
                ),
                ignore=(ROPE_IGNORE, *self._tied()),
                unfused=transformers_unfused(heads),
            )
        )


def wrap_if_transformers(model: Any) -> Any:
    """``model`` itself, or an adapter around a transformers DeepSeek-V3 / Kimi-K2.5 model
    that has no weight rules of its own."""
    if hasattr(model, "weight_rules"):
        return model
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind == "kimi_k25" and hasattr(model, "lm_head"):
        return HFKimiK25(model)
    if kind in _MODEL_TYPES and hasattr(model, "model") and hasattr(model, "lm_head"):
        return HFDeepseekV3(model)
    return model


def empty_model(path_or_config: Any, *, dtype: Any = None, device: str = "cpu", wrapper: bool = False) -> nn.Module:
    """A transformers ``DeepseekV3ForCausalLM`` built on the meta device and materialized
    with ``to_empty`` semantics (uninitialized memory: nothing is computed or copied), with the
    dtypes ``from_pretrained`` would give it (``_keep_in_fp32_modules_strict`` stay
    float32) and its rotary buffers recomputed. ``path_or_config`` is a checkpoint
    directory (plain DeepSeek-V3 or a Kimi-K2.5 wrapper, whose ``text_config`` is used)
    or a ``DeepseekV3Config``. With ``wrapper=True`` a Kimi-K2.5 checkpoint gives
    transformers' ``Kimi_K25ForConditionalGeneration`` instead."""
    import torch

    from .._deps import optional_import

    transformers = optional_import("transformers", "hf", "models.hf.empty_model")
    DeepseekV3Config, DeepseekV3ForCausalLM = transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM

    model_class: Any = DeepseekV3ForCausalLM
    if isinstance(path_or_config, DeepseekV3Config):
        cfg = path_or_config
    elif wrapper:
        from transformers import AutoConfig, Kimi_K25ForConditionalGeneration

        cfg, model_class = AutoConfig.from_pretrained(path_or_config), Kimi_K25ForConditionalGeneration
    else:
        import json
        import os

        with open(os.path.join(path_or_config, "config.json")) as f:
            raw = json.load(f)
        raw = raw.get("text_config", raw) if isinstance(raw.get("text_config"), dict) else raw
        raw = {k: v for k, v in raw.items() if k not in ("architectures", "model_type")}
        cfg = DeepseekV3Config(**raw)
    dtype = dtype or torch.bfloat16
    with torch.device("meta"):
        model = model_class._from_config(cfg, dtype=dtype)
    from . import materialize

    model = materialize(model, device)
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()  # to_empty replaced the shared tensor by two
    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ()) | {"e_score_correction_bias"}
    for name, mod in model.named_modules():
        for b_name, buf in list(mod._buffers.items()):
            if buf is not None and any(k in f"{name}.{b_name}" for k in keep):
                mod._buffers[b_name] = buf.to(torch.float32)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for mod in model.modules():  # non-persistent rope / position buffers are in no checkpoint
        if hasattr(mod, "compute_pos_embed") and hasattr(mod, "time_position_embeddings"):
            with torch.device(device):  # Kimi-K2.5's vision time table
                mod.register_buffer("time_position_embeddings", mod.compute_pos_embed(), persistent=False)
        rope_type = getattr(mod, "rope_type", None)
        own = getattr(mod, f"compute_{rope_type}_rope_parameters", None)  # e.g. the vision tower's "axial"
        known = rope_type in ("default", *ROPE_INIT_FUNCTIONS) or own is not None
        if hasattr(mod, "inv_freq") and known and hasattr(mod, "config"):
            init = own or (
                mod.compute_default_rope_parameters
                if mod.rope_type == "default"
                else ROPE_INIT_FUNCTIONS[mod.rope_type]
            )
            inv_freq, scaling = init(mod.config, device=torch.device(device))
            mod.register_buffer("inv_freq", inv_freq, persistent=False)
            mod.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)
            mod.attention_scaling = scaling
    return model
