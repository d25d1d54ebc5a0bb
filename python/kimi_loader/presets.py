"""The synthetic checkpoints' model shapes (pure data: the command line lists them
without importing torch). :mod:`kimi_loader.synth` writes them."""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS"]

_KIMI_ROPE = {
    "type": "yarn",
    "factor": 64.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096,
}
_DS_ROPE = {
    "type": "yarn",
    "factor": 40.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096,
}

_BASE_TEXT: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "moe_layer_freq": 1,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "tie_word_embeddings": False,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "use_cache": True,
}

#: preset name -> (family, default shard count, text config)
PRESETS: dict[str, tuple[str, int, dict[str, Any]]] = {
    "kimi-k2.5-tiny": (
        "kimi",
        4,
        {
            **_BASE_TEXT,
            "model_type": "kimi_k2",
            "vocab_size": 256,
            "hidden_size": 64,
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            "num_hidden_layers": 3,
            "num_nextn_predict_layers": 0,
            "first_k_dense_replace": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "q_lora_rank": 32,
            "kv_lora_rank": 32,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "num_experts_per_tok": 2,
            "n_group": 1,
            "topk_group": 1,
            "routed_scaling_factor": 2.827,
            "rms_norm_eps": 1e-5,
            "rope_theta": 50000.0,
            "max_position_embeddings": 262144,
            "rope_scaling": _KIMI_ROPE,
        },
    ),
    "deepseek-v3-tiny": (
        "deepseek",
        4,
        {
            **_BASE_TEXT,
            "model_type": "deepseek_v3",
            "vocab_size": 256,
            "hidden_size": 64,
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            "num_hidden_layers": 4,
            "num_nextn_predict_layers": 1,
            "first_k_dense_replace": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "q_lora_rank": 32,
            "kv_lora_rank": 32,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "num_experts_per_tok": 2,
            "n_group": 4,
            "topk_group": 2,
            "routed_scaling_factor": 2.5,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "max_position_embeddings": 163840,
            "rope_scaling": _DS_ROPE,
        },
    ),
    # Kimi-K2.5's real per-tensor shapes (vocabulary, hidden 7168, 64 heads, MLA ranks,
    # dense and expert MLP widths), one dense and one MoE layer. 16 of the 384 experts:
    # 384 real-size experts take 9.5 GB per layer even at int4 (pass
    # n_routed_experts=384 where memory allows). ct-int4: 6.4 GB on disk.
    "kimi-k2.5-realsize": (
        "kimi",
        8,
        {
            **_BASE_TEXT,
            "model_type": "kimi_k2",
            "vocab_size": 163840,
            "hidden_size": 7168,
            "intermediate_size": 18432,
            "moe_intermediate_size": 2048,
            "num_hidden_layers": 2,
            "num_nextn_predict_layers": 0,
            "first_k_dense_replace": 1,
            "num_attention_heads": 64,
            "num_key_value_heads": 64,
            "q_lora_rank": 1536,
            "kv_lora_rank": 512,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64,
            "v_head_dim": 128,
            "n_routed_experts": 16,
            "n_shared_experts": 1,
            "num_experts_per_tok": 8,
            "n_group": 1,
            "topk_group": 1,
            "routed_scaling_factor": 2.827,
            "rms_norm_eps": 1e-5,
            "rope_theta": 50000.0,
            "max_position_embeddings": 262144,
            "rope_scaling": _KIMI_ROPE,
        },
    ),
    # Kimi-K2.5's real tensor count (61 layers x 384 experts, 64 shards), tiny shapes.
    "kimi-k2.5-fullcount": (
        "kimi",
        64,
        {
            **_BASE_TEXT,
            "model_type": "kimi_k2",
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 32,
            "moe_intermediate_size": 32,
            "num_hidden_layers": 61,
            "num_nextn_predict_layers": 0,
            "first_k_dense_replace": 1,
            "num_attention_heads": 1,
            "num_key_value_heads": 1,
            "q_lora_rank": 32,
            "kv_lora_rank": 32,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 16,
            "v_head_dim": 16,
            "n_routed_experts": 384,
            "n_shared_experts": 1,
            "num_experts_per_tok": 8,
            "n_group": 1,
            "topk_group": 1,
            "routed_scaling_factor": 2.827,
            "rms_norm_eps": 1e-5,
            "rope_theta": 50000.0,
            "max_position_embeddings": 262144,
            "rope_scaling": _KIMI_ROPE,
        },
    ),
}

# vLLM's CPU MLA kernel needs kv_lora_rank + qk_rope_head_dim = 576 (Kimi-K2.5's and
# DeepSeek-V3's own 512 + 64): the tiny presets with that latent, for real engines
for _name in ("kimi-k2.5-tiny", "deepseek-v3-tiny"):
    _family, _shards, _cfg = PRESETS[_name]
    PRESETS[f"{_name}-576"] = (_family, _shards, {**_cfg, "kv_lora_rank": 512, "qk_rope_head_dim": 64})
