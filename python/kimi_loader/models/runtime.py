"""The CPU reference runtime for the serving-layout DeepSeek-V3 / Kimi-K2.5 model.

- MLA in the absorbed form: ``q_nope`` is absorbed through ``w_kc``, attention runs over a
  latent cache of ``kv_lora_rank + qk_rope_head_dim`` values per token, and the latent
  output goes back through ``w_vc``; YaRN rope (interleaved pairs) with its mscale.
- MoE: noaux_tc routing (fp32 sigmoid scores, correction bias, group-limited top-k,
  ``norm_topk_prob``, ``routed_scaling_factor``), the shared expert or the fused shared
  slot; dense MLP for the first ``first_k_dense_replace`` layers.
- Quantized weights stay in checkpoint format and are dequantized per use (per expert for
  MoE) with :mod:`kimi_loader.quant`.

Sharded models run with ``torch.distributed`` collectives over the model's
``process_group`` (default: the world group), one process per TP rank, with the engines'
convention (expert parallelism inside the TP group, :mod:`kimi_loader.parallel`):

- the embedding is vocab-parallel (each rank embeds its rows, zeros elsewhere, all-reduce);
- attention runs this rank's heads (``q_b_proj`` / ``kv_b_proj`` column-parallel, so
  ``w_kc`` / ``w_vc`` are per local head); ``o_proj`` is row-parallel: all-reduce;
- the dense MLP and the shared expert are column- then row-parallel: all-reduce;
- routed experts: each rank runs the top-k slots that picked one of its experts (its slice
  of them when ``moe_tp_size > 1``); the fused shared slot, present on every expert group,
  is run by expert group 0 only; one all-reduce sums routed and shared parts;
- the head is vocab-parallel: all-gather of the logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..quant import dequantize
from ..registry import format_of


def dense(
    module: torch.nn.Module,
    dtype: torch.dtype,
    index: int | None = None,
    prefix: str = "",
    fp8_block: tuple[int, int] = (128, 128),
    kernels: str = "torch",
) -> torch.Tensor:
    """The dense weight of a linear held in checkpoint format (``prefix`` selects e.g. the
    ``w13_`` tensors of an experts module, ``index`` one expert); ``kernels="triton"``
    dequantizes with the device kernel (:mod:`kimi_loader.kernels.dequant`, equal bit for
    bit), on the weights' device."""
    if kernels == "triton":
        from ..kernels.dequant import dequantize as dequantize_fn
    else:
        dequantize_fn = dequantize
    fmt: str = getattr(module, "format")  # noqa: B009 - a plain attribute typed for mypy
    tensors = {}
    for suffix in format_of(fmt).suffix_dtypes:
        t = getattr(module, prefix + suffix, None)
        if t is not None:
            tensors[suffix] = t if index is None else t[index]
    rows = getattr(module, prefix + "shard_rows", None)
    if fmt == "fp8-block" and rows and len(rows) > 1:
        # a stacked FP8 parameter concatenates each shard's own block-scale grid
        w_parts = tensors["weight"].split(rows)
        s_parts = tensors["weight_scale_inv"].split([-(-r // fp8_block[0]) for r in rows])
        return torch.cat(
            [
                dequantize_fn(fmt, {"weight": w, "weight_scale_inv": sc}, dtype, fp8_block)
                for w, sc in zip(w_parts, s_parts, strict=True)
            ]
        )
    return dequantize_fn(fmt, tensors, dtype, fp8_block)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def yarn(config: dict[str, Any]) -> tuple[torch.Tensor, float, float]:
    """``(inv_freq, cos_sin_factor, softmax_mscale)`` for the rope head dim."""
    dim = config["qk_rope_head_dim"]
    base = config["rope_theta"]  # normalized by kimi_loader.config (also from rope_parameters)
    rs = config.get("rope_scaling") or {}
    pos = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if (rs.get("type") or rs.get("rope_type")) != "yarn":
        return 1.0 / pos, 1.0, 1.0
    factor = rs["factor"]
    orig = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
    attn = get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if mscale and mscale_all else get_mscale(factor)

    def corr(rot: float) -> float:
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrap = 1 - ramp
    inv_freq = (1.0 / (factor * pos)) * (1 - extrap) + (1.0 / pos) * extrap
    softmax_mscale = get_mscale(factor, mscale_all) ** 2 if mscale_all else 1.0
    return inv_freq, attn, softmax_mscale


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rope: pairs ``(x0, x1), (x2, x3), ...``, output de-interleaved."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@dataclass
class KVCache:
    """The latent cache: per layer, normalized ``c_kv`` ``[B, S, kv_lora]`` and the roped
    shared key ``[B, S, rope]``."""

    latent: list[torch.Tensor | None] = field(default_factory=list)
    k_rope: list[torch.Tensor | None] = field(default_factory=list)
    #: the model's ``weights_version`` when the cache was made: keys and values computed
    #: with older weights are stale after a hot-reload, and the model refuses them
    weights_version: int = 0

    @property
    def length(self) -> int:
        return 0 if not self.latent or self.latent[0] is None else self.latent[0].shape[1]


def route_noaux_tc(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 / Kimi-K2 routing as transformers computes it: sigmoid scores, plus the
    correction bias to choose; groups ranked by the sum of their two best choices, the
    best ``topk_group`` kept (the others masked to -inf), the ``top_k`` best experts among
    them; weights are the scores (without the bias), renormalized and scaled. Returns
    ``(ids [T, K], weights float32 [T, K])``. The reference of the Triton kernel."""
    t, e = router_logits.shape
    scores = router_logits.float().sigmoid()
    choice = scores + correction_bias.float()
    group_scores = choice.view(t, n_group, e // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    mask = mask.unsqueeze(-1).expand(-1, n_group, e // n_group).reshape(t, e)
    choice = choice.masked_fill(~mask.bool(), float("-inf"))
    ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    w = scores.gather(1, ids)
    if renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, w * routed_scaling_factor


def _check_group(model: Any, group: Any) -> Any:
    """The process group a sharded model runs its collectives over (None unsharded),
    checked against the model's layout: one process per TP rank, in rank order."""
    from ..errors import InvalidArgumentError

    par = model.parallel
    if par.tp_size == 1 and par.ep_size == 1:
        return None
    if par.independent or par.ep_size > par.tp_size:
        raise InvalidArgumentError(
            f"the runtime runs expert parallelism inside the TP group (ep_size <= tp_size, not independent); "
            f"this model is {par}"
        )
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise InvalidArgumentError(
            f"a sharded model (tp_size={par.tp_size}) runs with torch.distributed: initialize a process group "
            "(torch.distributed.init_process_group) with one process per TP rank"
        )
    group = group if group is not None else dist.group.WORLD
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if (size, rank) != (par.tp_size, par.tp_rank):
        raise InvalidArgumentError(
            f"the process group has {size} ranks and this process is rank {rank}; the model is TP rank "
            f"{par.tp_rank} of {par.tp_size}: pass a group of exactly the TP ranks (model.process_group)"
        )
    return group


class Runtime:
    """Forward pass over a :class:`~kimi_loader.models.DeepseekV3ForCausalLM`'s parameters."""

    def __init__(self, model: Any, group: Any = None) -> None:
        self.m = model
        c = model.config
        self.c = c
        self.dtype = model.dtype
        self.kernels = getattr(model, "kernels", "torch")
        self.group = _check_group(model, group)
        self.eps = c.get("rms_norm_eps", 1e-6)
        inv_freq, self.rope_factor, mscale = yarn(c)
        self.inv_freq = inv_freq
        self.scale = (c["qk_nope_head_dim"] + c["qk_rope_head_dim"]) ** -0.5 * mscale

    # -- pieces ----------------------------------------------------------------------
    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq
        return ((freqs.cos() * self.rope_factor).to(self.dtype), (freqs.sin() * self.rope_factor).to(self.dtype))

    def _dense(self, module: torch.nn.Module, index: int | None = None, prefix: str = "") -> torch.Tensor:
        return dense(module, self.dtype, index, prefix, self.m.fp8_block, self.kernels)

    def _linear(self, x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
        return F.linear(x, self._dense(module))

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the TP group of each rank's partial ``x`` (row-parallel outputs)."""
        if self.group is not None:
            import torch.distributed as dist

            dist.all_reduce(x, group=self.group)
        return x

    def attention(self, i: int, x: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        c, attn = self.c, self.m.model.layers[i].self_attn
        b, t, _ = x.shape
        heads = c["num_attention_heads"] // self.m.tp_size  # this rank's heads
        nope, rdim = c["qk_nope_head_dim"], c["qk_rope_head_dim"]
        kv_lora = c["kv_lora_rank"]
        if c.get("q_lora_rank"):
            fused = self._linear(x, attn.fused_qkv_a_proj_with_mqa)
            q_a, ckv = fused.split([c["q_lora_rank"], kv_lora + rdim], dim=-1)
            q = self._linear(rms_norm(q_a, attn.q_a_layernorm.weight, self.eps), attn.q_b_proj)
        else:
            q = self._linear(x, attn.q_proj)
            ckv = self._linear(x, attn.kv_a_proj_with_mqa)
        q = q.view(b, t, heads, nope + rdim)
        q_nope, q_rope = q.split([nope, rdim], dim=-1)
        latent, k_rope = ckv.split([kv_lora, rdim], dim=-1)
        latent = rms_norm(latent, attn.kv_a_layernorm.weight, self.eps)
        cos, sin = self._cos_sin(positions)
        q_rope = rope(q_rope, cos[:, :, None, :], sin[:, :, None, :])
        k_rope = rope(k_rope, cos, sin)
        old_latent, old_rope = cache.latent[i], cache.k_rope[i]
        if old_latent is not None and old_rope is not None:
            latent = torch.cat([old_latent, latent], dim=1)
            k_rope = torch.cat([old_rope, k_rope], dim=1)
        cache.latent[i], cache.k_rope[i] = latent, k_rope
        # absorbed attention over the latent cache
        q_latent = torch.einsum("bthd,hdc->bthc", q_nope, attn.w_kc)
        if t == 1 and getattr(self.m, "kernels", "torch") == "triton":  # decode: the Triton MLA kernel
            from ..kernels.mla import mla_decode

            lens = torch.full((b,), latent.shape[1], dtype=torch.int32, device=x.device)
            out_latent = mla_decode(q_latent[:, 0], q_rope[:, 0], latent, k_rope, lens, self.scale)[:, None]
            out = torch.einsum("bthc,hcv->bthv", out_latent, attn.w_vc).reshape(b, t, -1)
            return self._all_reduce(self._linear(out, attn.o_proj))
        scores = torch.einsum("bthc,bsc->bhts", q_latent, latent) + torch.einsum("bthr,bsr->bhts", q_rope, k_rope)
        scores = scores * self.scale
        s = latent.shape[1]
        key_pos = torch.arange(s, device=x.device)
        mask = key_pos[None, None, None, :] > positions[:, None, :, None]
        scores = scores.masked_fill(mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(self.dtype)
        out_latent = torch.einsum("bhts,bsc->bthc", probs, latent)
        out = torch.einsum("bthc,hcv->bthv", out_latent, attn.w_vc).reshape(b, t, -1)
        return self._all_reduce(self._linear(out, attn.o_proj))

    def _mlp(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, w13).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w2)

    def _route(self, h: torch.Tensor, mlp: Any, route: Any = route_noaux_tc) -> tuple[torch.Tensor, torch.Tensor]:
        """noaux_tc routing of ``h`` with ``route`` (this torch reference, or the Triton kernel)."""
        c = self.c
        return route(
            F.linear(h.float(), mlp.gate.weight.float()),
            mlp.gate.e_score_correction_bias,
            top_k=c["num_experts_per_tok"],
            n_group=c.get("n_group") or 1,
            topk_group=c.get("topk_group") or 1,
            routed_scaling_factor=c["routed_scaling_factor"],
            renormalize=c.get("norm_topk_prob", True),
        )

    def _expert_range(self) -> tuple[int, int]:
        """This rank's routed experts ``[lo, hi)`` (global ids)."""
        e_total, ep = self.c["n_routed_experts"], self.m.ep_size
        return self.m.ep_rank * e_total // ep, (self.m.ep_rank + 1) * e_total // ep

    def _moe_torch(self, h: torch.Tensor, mlp: Any) -> torch.Tensor:
        top_idx, top_w = self._route(h, mlp)
        experts = mlp.experts
        lo, hi = self._expert_range()
        out = torch.zeros_like(h)
        for e in top_idx.unique().tolist():
            if not lo <= e < hi:
                continue  # another expert group's
            tok, slot = torch.where(top_idx == e)
            w13 = self._dense(experts, e - lo, "w13_")
            w2 = self._dense(experts, e - lo, "w2_")
            y = self._mlp(h[tok], w13, w2) * top_w[tok, slot, None].to(self.dtype)
            out.index_add_(0, tok, y)
        return out

    def _moe_triton(self, h: torch.Tensor, mlp: Any) -> torch.Tensor:
        """The same with the Triton kernels (:mod:`kimi_loader.kernels.moe`): routing and
        the fused 4-bit experts read in checkpoint layout."""
        from ..kernels.moe import moe_w4
        from ..kernels.moe import route_noaux_tc as route_kernel

        experts = mlp.experts
        ids, w = self._route(h, mlp, route_kernel)
        lo, hi = self._expert_range()
        if (lo, hi) != (0, self.c["n_routed_experts"]):  # slots of other groups' experts weigh 0
            mine = (ids >= lo) & (ids < hi)
            ids, w = torch.where(mine, ids - lo, 0), torch.where(mine, w, 0.0)
        data = "weight_packed" if experts.format == "ct-int4" else "weight"
        return moe_w4(
            h,
            ids,
            w,
            getattr(experts, f"w13_{data}"),
            experts.w13_weight_scale,
            getattr(experts, f"w2_{data}"),
            experts.w2_weight_scale,
            experts.format,
        )

    def moe(self, i: int, x: torch.Tensor) -> torch.Tensor:
        mlp = self.m.model.layers[i].mlp
        if not hasattr(mlp, "experts"):
            return self._all_reduce(self._mlp(x, self._dense(mlp.gate_up_proj), self._dense(mlp.down_proj)))
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        experts = mlp.experts
        if self.kernels == "triton" and experts.format in ("ct-int4", "quark-mxfp4"):
            out = self._moe_triton(h, mlp)
        else:
            out = self._moe_torch(h, mlp)
        if self.m.num_fused_shared_experts:  # the fused slot (the last), always selected with weight 1
            if self.m.ep_rank == 0:  # every expert group holds it: one group runs it
                slot = next(t for n, t in experts.named_parameters() if n.startswith("w13_")).shape[0] - 1
                out = out + self._mlp(h, self._dense(experts, slot, "w13_"), self._dense(experts, slot, "w2_"))
        elif hasattr(mlp, "shared_experts"):
            se = mlp.shared_experts
            out = out + self._mlp(h, self._dense(se.gate_up_proj), self._dense(se.down_proj))
        return self._all_reduce(out).view(shape)

    # -- the model ---------------------------------------------------------------------
    def new_cache(self) -> KVCache:
        n = self.c["num_hidden_layers"]
        return KVCache([None] * n, [None] * n, getattr(self.m, "weights_version", 0))

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        w = self.m.model.embed_tokens.weight
        if self.group is None:
            return F.embedding(input_ids, w)
        rows = w.shape[0]  # vocab-parallel: this rank's rows
        local = input_ids - self.m.tp_rank * rows
        mine = (local >= 0) & (local < rows)
        x = F.embedding(local.clamp(0, rows - 1), w) * mine[..., None].to(w.dtype)
        return self._all_reduce(x)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.m.lm_head.weight).float()
        if self.group is None:
            return logits
        import torch.distributed as dist

        parts = [torch.empty_like(logits) for _ in range(self.m.tp_size)]
        dist.all_gather(parts, logits.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def forward(
        self, input_ids: torch.Tensor, cache: KVCache | None = None, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Float32 logits; ``inputs_embeds`` (``[B, T, hidden]``, e.g. with image features
        spliced in) replaces the embedding of ``input_ids``."""
        cache = cache if cache is not None else self.new_cache()
        version = getattr(self.m, "weights_version", 0)
        if not cache.length:
            cache.weights_version = version
        elif cache.weights_version != version:
            from ..errors import InvalidArgumentError

            raise InvalidArgumentError(
                f"this KV cache holds keys and values of weights version {cache.weights_version}, the model "
                f"was updated to version {version}: they are stale; start a new cache (model.new_cache())"
            )
        b, t = input_ids.shape
        positions = (torch.arange(t) + cache.length).expand(b, t)
        if inputs_embeds is not None:
            if inputs_embeds.shape[:2] != input_ids.shape or inputs_embeds.shape[-1] != self.c["hidden_size"]:
                from ..errors import InvalidArgumentError

                raise InvalidArgumentError(
                    f"inputs_embeds {tuple(inputs_embeds.shape)} do not fit input_ids {tuple(input_ids.shape)}"
                )
            x = inputs_embeds.to(self.dtype)
        else:
            x = self._embed(input_ids)
        for i, layer in enumerate(self.m.model.layers):
            x = x + self.attention(i, rms_norm(x, layer.input_layernorm.weight, self.eps), positions, cache)
            x = x + self.moe(i, rms_norm(x, layer.post_attention_layernorm.weight, self.eps))
        return self._head(rms_norm(x, self.m.model.norm.weight, self.eps))


def build_w_kc_w_vc(model: Any, layers: list[int] | None = None) -> list[int]:
    """MLA post-load processing: dequantize ``kv_b_proj`` (any format) to the compute dtype
    and split it per head into ``w_kc`` ``[heads, nope, kv_lora]`` and ``w_vc``
    ``[heads, kv_lora, v]`` (non-persistent buffers). Returns the layers processed."""
    c = model.config
    nope, v = c["qk_nope_head_dim"], c["v_head_dim"]
    n = len(model.model.layers)
    todo = range(n) if layers is None else list(layers)
    bad = [i for i in todo if not isinstance(i, int) or not 0 <= i < n]
    if bad:
        from ..errors import InvalidArgumentError

        raise InvalidArgumentError(f"post_load_weights(layers=...): {bad} not layers of this model (0..{n - 1})")
    for i in todo:
        attn = model.model.layers[i].self_attn
        w = dense(attn.kv_b_proj, model.dtype, fp8_block=model.fp8_block, kernels=getattr(model, "kernels", "torch"))
        w = w.view(-1, nope + v, c["kv_lora_rank"])
        kc, vc = w[:, :nope, :], w[:, nope:, :].transpose(1, 2)
        old = getattr(attn, "w_kc", None)
        if old is not None and old.shape == kc.shape and old.dtype == kc.dtype:
            attn.w_kc.copy_(kc)  # in place: addresses stay valid for captured graphs
            attn.w_vc.copy_(vc)
        else:
            attn.register_buffer("w_kc", kc.contiguous(), persistent=False)
            attn.register_buffer("w_vc", vc.contiguous(), persistent=False)
    return list(todo)
