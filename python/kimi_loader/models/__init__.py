"""Model layouts that :func:`kimi_loader.load_weights` loads into.

- :class:`DeepseekV3ForCausalLM` / :class:`KimiK25ForConditionalGeneration`: serving-engine
  layouts (fused qkv_a and gate_up, w13/w2 experts, checkpoint-format quantized tensors).
- :mod:`kimi_loader.models.hf`: rules for transformers' own ``DeepseekV3ForCausalLM``.
"""

from typing import Any

from .deepseek_v3 import DeepseekV3ForCausalLM, KimiK25ForConditionalGeneration, fusion_decision

__all__ = [
    "DeepseekV3ForCausalLM",
    "KimiK25ForConditionalGeneration",
    "for_config",
    "fusion_decision",
    "materialize",
]


def for_config(config: dict[str, Any], **kwargs: Any):
    """The serving-layout model for a ``config.json`` dict (Kimi-K2.5 wrapper or plain
    DeepSeek-V3). Pass ``checkpoint=`` (an open checkpoint) to let its own tensors decide
    each linear's format; ``text_only=True`` leaves a Kimi-K2.5 vision tower out (its
    tensors skipped by a declared rule)."""
    from ..config import parse_config

    mc = parse_config(config)
    text_only = kwargs.pop("text_only", False)  # (a plain DeepSeek-V3 is text-only anyway)
    if mc.is_wrapper:
        return KimiK25ForConditionalGeneration(mc, text_only=text_only, **kwargs)
    return DeepseekV3ForCausalLM(mc, **kwargs)


def materialize(model: Any, device: Any = "cpu") -> Any:
    """``model.to_empty(device=device)``: every parameter and buffer gets uninitialized
    storage of its own shape, strides and dtype. The same result without
    ``torch.empty_like`` on meta tensors, whose first call in a process imports sympy
    and ~480 more modules (0.3-0.5 s: a third of a first load of 1.5 GB)."""
    import torch

    return model._apply(lambda t: torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device), recurse=True)
