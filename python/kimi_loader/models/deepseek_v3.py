"""Serving-engine parameter layouts for DeepSeek-V3 / Kimi-K2.5 language models.

These are the destinations of :func:`kimi_loader.load_weights`: fused
``fused_qkv_a_proj_with_mqa`` and ``gate_up_proj``, MoE experts as ``experts.w13_*`` /
``experts.w2_*`` stacked over (local) experts, quantized tensors kept in their checkpoint
format, TP/EP-local shapes. The forward pass is :mod:`kimi_loader.models.runtime`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import ModelConfig, parse_config
from ..errors import ConfigError, InvalidArgumentError
from ..formats import ModuleFormats, quant_spec, quantization_config
from ..hooks import ForwardsWeightHooks, identity_hook
from ..parallel import ParallelLayout
from ..rules import WeightRules
from .layout import (
    KIMI_PREFIX_REWRITES,
    ROPE_IGNORE,
    SERVING_TP_RULES,
    TIED_IGNORE,
    empty_params,
    shard_shapes,
    stacked_shapes,
)

__all__ = ["DeepseekV3ForCausalLM", "KimiK25ForConditionalGeneration", "fusion_decision"]


def fusion_decision(
    text_config: dict[str, Any],
    quant: str,
    config: dict[str, Any] | None = None,
    shared_format: str | None = None,
    routed_format: str | None = None,
) -> tuple[int, str]:
    """Whether to fuse the shared expert into the routed experts (slot ``n_routed``):
    ``(1, reason)`` or ``(0, reason)``.

    The rule after the Kimi-K2.5 regression: only for ``n_routed_experts`` 256 or 384 with
    one shared expert, only when the shared expert is stored in the routed experts'
    format, and for 384 experts only for a Quark (MXFP4) checkpoint. Without explicit
    formats, the config's quantization lists decide them.
    """
    e, s = text_config.get("n_routed_experts"), text_config.get("n_shared_experts")
    if e not in (256, 384):
        return 0, f"n_routed_experts={e} is not 256 or 384"
    if s != 1:
        return 0, f"n_shared_experts={s} is not 1"
    if e == 384 and quant != "quark-mxfp4":
        return 0, (
            f"384-expert checkpoints are fused only in Quark MXFP4 format; this one is {quant} "
            "(moonshotai's compressed-tensors checkpoint keeps its shared expert in bf16)"
        )
    spec = quant_spec(config if config is not None else text_config)
    first = text_config.get("first_k_dense_replace") or 0
    shared_format = shared_format or spec.module_format(f"model.layers.{first}.mlp.shared_experts.gate_proj")
    routed_format = routed_format or spec.module_format(f"model.layers.{first}.mlp.experts.0.gate_proj")
    if shared_format != routed_format:
        return 0, f"the shared expert is stored as {shared_format}, the routed experts as {routed_format}"
    return 1, f"n_routed_experts={e}, one shared expert stored as {routed_format} like the routed experts"


def fusion_for(mc: ModelConfig, formats: ModuleFormats) -> tuple[int, str]:
    """:func:`fusion_decision` with the shared and routed experts' formats as ``formats``
    decides them (from the checkpoint's tensors when it has one)."""
    c = mc.text
    if not c.get("n_routed_experts") or c["first_k_dense_replace"] >= c["num_hidden_layers"]:
        return 0, "no MoE layer"
    moe0 = f"model.layers.{c['first_k_dense_replace']}.mlp"
    return fusion_decision(
        c,
        mc.quant.method,
        mc.raw,
        shared_format=formats.of(f"{moe0}.shared_experts.gate_proj"),
        routed_format=formats.of(f"{moe0}.experts.0.gate_proj"),
    )


class _Holder(nn.Module):
    """A module that only holds parameters (the runtime adds behaviour later). A linear's
    holder says its checkpoint ``format`` and, when stacked, the rows of each shard."""

    format: str
    stacked_rows: dict[str, list[int]]
    shard_rows: list[int]
    w13_shard_rows: list[int]


def _linear(fmt: str, shapes: dict[str, list[int]], dtype: torch.dtype, device: Any) -> _Holder:
    m = _Holder()
    empty_params(m, fmt, shapes, dtype, device=device)
    m.format = fmt
    return m


def _norm(n: int, dtype: torch.dtype, device: Any) -> nn.Module:
    m = _Holder()
    m.weight = nn.Parameter(torch.empty(n, dtype=dtype, device=device), requires_grad=False)
    return m


def _model_config(config: Any, quant_config_source: dict[str, Any] | None) -> ModelConfig:
    if isinstance(config, ModelConfig):
        return config
    if not isinstance(config, dict):
        raise ConfigError(f"a model config must be a dict or a ModelConfig, not {type(config).__name__}")
    if quant_config_source is not None and quant_config_source is not config:
        qc = quantization_config(quant_config_source)
        config = {**config, "quantization_config": qc} if qc is not None else config
    return parse_config(config)


class DeepseekV3ForCausalLM(nn.Module):
    """DeepSeek-V3 / Kimi-K2.5 language model in serving layout.

    ``config``: the language-model config dict (``text_config`` for Kimi-K2.5) or a
    :class:`~kimi_loader.config.ModelConfig`; ``quant_config_source`` the dict holding
    ``quantization_config`` when it is not ``config``. ``checkpoint``: an open checkpoint
    whose own tensors decide each linear's format (see
    :class:`~kimi_loader.formats.ModuleFormats`); without it the config decides.
    ``num_fused_shared_experts`` forces (1) or forbids (0) shared-expert fusion; by
    default :func:`fusion_decision` decides. Modules fused from linears stored in
    different formats (an FP8 ``q_a_proj`` with a BF16 ``kv_a_proj_with_mqa``) are held
    dequantized in ``dtype``, a decision listed in ``format_decisions``.
    """

    def __init__(
        self,
        config: Any,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: Any = None,
        tp_rank: int = 0,
        tp_size: int = 1,
        ep_rank: int | None = None,
        ep_size: int = 1,
        parallel: ParallelLayout | None = None,
        num_fused_shared_experts: int | None = None,
        quant_config_source: dict[str, Any] | None = None,
        checkpoint: Any = None,
    ) -> None:
        super().__init__()
        mc = _model_config(config, quant_config_source)
        self.model_config = mc
        self.config = c = mc.text
        spec = mc.quant
        self.quant_format = spec.method
        formats = ModuleFormats(spec, checkpoint)
        self.dtype = dtype
        if parallel is None:
            parallel = ParallelLayout.of(tp_rank, tp_size, ep_rank, ep_size)
        elif (tp_rank, tp_size, ep_rank, ep_size) != (0, 1, None, 1):
            raise InvalidArgumentError("give either parallel= or tp_*/ep_* arguments, not both")
        self.parallel = par = ParallelLayout.coerce(parallel)
        # every split is checked before a parameter is allocated
        e0 = "model.layers.{}.mlp".format(c["first_k_dense_replace"])
        par.check(
            c,
            formats={
                "attention": formats.of("model.layers.0.self_attn.o_proj"),
                "dense": formats.of("model.layers.0.mlp.down_proj"),
                "experts": formats.of(f"{e0}.experts.0.down_proj"),
                "shared": formats.of(f"{e0}.shared_experts.down_proj"),
            },
            group=spec.group_size or 32,
            fp8_block=spec.fp8_block,
        )
        self.tp_rank, self.tp_size, self.ep_rank, self.ep_size = par.tp_rank, par.tp_size, par.ep_rank, par.ep_size
        first_moe = c["first_k_dense_replace"]
        e_total = c.get("n_routed_experts") or 0
        fused, reason = fusion_for(mc, formats)
        if num_fused_shared_experts is not None:
            fused, reason = num_fused_shared_experts, f"forced to {num_fused_shared_experts} by the caller"
        self.num_fused_shared_experts, self.fusion_reason = fused, reason
        self.post_load_calls: list[list[int] | None] = []
        self.format_decisions: list[str] = []

        tp = par.tp_size
        fp8_block = spec.fp8_block
        group = spec.group_size
        h, heads = c["hidden_size"], c["num_attention_heads"]
        nope, rope, v = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
        q_lora, kv_lora = c.get("q_lora_rank"), c["kv_lora_rank"]
        self.fp8_block = fp8_block
        shape_kw = dict(tp=tp, fp8_block=fp8_block, group=group)

        def lin(module: str, out: int, inp: int, split: str = "replicated") -> nn.Module:
            f = formats.of(module)
            return _linear(f, shard_shapes(f, out, inp, split=split, **shape_kw), dtype, device)

        def stacked(modules: list[str], shards: list[tuple[int, int]], split: str = "replicated") -> nn.Module:
            fmts = [formats.of(m) for m in modules]
            f = fmts[0]
            if len(set(fmts)) > 1:  # no common quantized format: hold the fused module dense
                f = "bf16"
                self.format_decisions.append(
                    f"{' + '.join(modules)} stored as {' + '.join(fmts)}: fused dequantized to {dtype}"
                )
            shapes, rows = stacked_shapes(f, shards, split=split, **shape_kw)
            m = _linear(f, shapes, dtype, device)
            m.stacked_rows = rows
            # local rows of each shard: block-scaled formats dequantize shard by shard
            m.shard_rows = [o // tp if split == "column" else o for o, _ in shards]
            return m

        self.model = _Holder()
        self.model.embed_tokens = _Holder()
        self.model.embed_tokens.weight = nn.Parameter(
            torch.empty(c["vocab_size"] // tp, h, dtype=dtype, device=device), requires_grad=False
        )
        self.model.layers = nn.ModuleList()
        e_local = e_total // par.ep_size if e_total else 0
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}"
            layer = _Holder()
            layer.input_layernorm = _norm(h, dtype, device)
            layer.post_attention_layernorm = _norm(h, dtype, device)
            attn = layer.self_attn = _Holder()
            a = f"{p}.self_attn"
            if q_lora:
                attn.fused_qkv_a_proj_with_mqa = stacked(
                    [f"{a}.q_a_proj", f"{a}.kv_a_proj_with_mqa"], [(q_lora, h), (kv_lora + rope, h)]
                )
                attn.q_a_layernorm = _norm(q_lora, dtype, device)
                attn.q_b_proj = lin(f"{a}.q_b_proj", heads * (nope + rope), q_lora, "column")
            else:
                attn.kv_a_proj_with_mqa = lin(f"{a}.kv_a_proj_with_mqa", kv_lora + rope, h)
                attn.q_proj = lin(f"{a}.q_proj", heads * (nope + rope), h, "column")
            attn.kv_a_layernorm = _norm(kv_lora, dtype, device)
            attn.kv_b_proj = lin(f"{a}.kv_b_proj", heads * (nope + v), kv_lora, "column")
            attn.o_proj = lin(f"{a}.o_proj", h, heads * v, "row")
            mlp = layer.mlp = _Holder()
            if i < first_moe or not e_total:
                inter = c["intermediate_size"]
                mlp.gate_up_proj = stacked(
                    [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], [(inter, h), (inter, h)], "column"
                )
                mlp.down_proj = lin(f"{p}.mlp.down_proj", h, inter, "row")
            else:
                inter = c["moe_intermediate_size"]
                mlp.gate = _Holder()
                mlp.gate.weight = nn.Parameter(torch.empty(e_total, h, dtype=dtype, device=device), requires_grad=False)
                mlp.gate.register_buffer(
                    "e_score_correction_bias", torch.empty(e_total, dtype=torch.float32, device=device)
                )
                ef = formats.of(f"{p}.mlp.experts.0.gate_proj")
                experts = mlp.experts = _Holder()
                experts.format = ef
                slots = e_local + self.num_fused_shared_experts
                moe_kw = {**shape_kw, "tp": par.moe_tp_size}  # experts: sliced across the MoE TP group
                w13, w13_rows = stacked_shapes(ef, [(inter, h), (inter, h)], split="column", **moe_kw)
                w2 = shard_shapes(ef, h, inter, split="row", **moe_kw)
                empty_params(experts, ef, {k: [slots, *s] for k, s in w13.items()}, dtype, "w13_", device)
                empty_params(experts, ef, {k: [slots, *s] for k, s in w2.items()}, dtype, "w2_", device)
                experts.stacked_rows = {f"w13_{k}": r for k, r in w13_rows.items()}
                experts.w13_shard_rows = [inter // par.moe_tp_size] * 2
                if c.get("n_shared_experts") and not self.num_fused_shared_experts:
                    shared = mlp.shared_experts = _Holder()
                    si = inter * c["n_shared_experts"]
                    se = f"{p}.mlp.shared_experts"
                    shared.gate_up_proj = stacked([f"{se}.gate_proj", f"{se}.up_proj"], [(si, h), (si, h)], "column")
                    shared.down_proj = lin(f"{se}.down_proj", h, si, "row")
            self.model.layers.append(layer)
        self.model.norm = _norm(h, dtype, device)
        self.lm_head = _Holder()
        if c["tie_word_embeddings"]:
            self.lm_head.weight = self.model.embed_tokens.weight
        else:
            self.lm_head.weight = nn.Parameter(
                torch.empty(c["vocab_size"] // tp, h, dtype=dtype, device=device), requires_grad=False
            )

    def _apply(self, fn, recurse=True):
        """Keeps ``lm_head`` tied to ``embed_tokens`` through ``to`` / ``to_empty``."""
        out = super()._apply(fn, recurse)
        if self.config["tie_word_embeddings"]:
            self.lm_head.weight = self.model.embed_tokens.weight
        return out

    # -- the weight-hook protocol ------------------------------------------------------
    @property
    def stacked_params_mapping(self) -> list[tuple[str, str, int]]:
        qkv = (
            [("fused_qkv_a_proj_with_mqa", "q_a_proj", 0), ("fused_qkv_a_proj_with_mqa", "kv_a_proj_with_mqa", 1)]
            if self.config.get("q_lora_rank")
            else []
        )
        return [*qkv, ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1)]

    @property
    def expert_params_mapping(self) -> list[tuple[str, str, int, str]]:
        n = (self.config.get("n_routed_experts") or 0) + self.num_fused_shared_experts
        out = []
        for e in range(n):
            for proj, shard in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
                out.append(("experts.w13_" if shard != "w2" else "experts.w2_", f"experts.{e}.{proj}.", e, shard))
        return out

    @identity_hook
    def mutate_weight_preload(self, name: str) -> str | None:
        return name

    @identity_hook
    def custom_scale_remap(self, name: str) -> str:
        return name

    def post_load_weights(self, layers: list[int] | None = None) -> None:
        """Post-load processing: builds MLA ``w_kc`` / ``w_vc`` from ``kv_b_proj`` (any
        format) for ``layers`` (all by default). Records each call in ``post_load_calls``."""
        from .runtime import build_w_kc_w_vc

        self.post_load_calls.append(None if layers is None else list(layers))
        if self.lm_head.weight.device.type != "meta":
            build_w_kc_w_vc(self, layers)

    # -- running ----------------------------------------------------------------------
    #: False while a streamed update (``atomic=False``) is incomplete: the weights are a
    #: mix of two versions and the model refuses to run until a complete update lands
    weights_consistent: bool = True
    _process_group: Any = None

    @property
    def process_group(self) -> Any:
        """The ``torch.distributed`` group a sharded model runs its collectives over (one
        process per TP rank, in rank order); None: the world group. Checked when the model
        first runs."""
        return self._process_group

    @process_group.setter
    def process_group(self, group: Any) -> None:
        self._process_group = group
        self.__dict__.pop("_runtime", None)  # the next run checks and uses the new group

    def runtime(self):
        from .runtime import Runtime

        if not self.weights_consistent:
            from ..errors import InconsistentWeightsError

            raise InconsistentWeightsError(
                "the weights are a mix of two versions (a streamed update broke midway); "
                "run a complete update before using the model"
            )
        rt = getattr(self, "_runtime", None)
        if rt is None:
            rt = self._runtime = Runtime(self, self.process_group)
        return rt

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, cache: Any = None, inputs_embeds: Any = None) -> torch.Tensor:
        """Float32 logits ``[batch, seq, vocab]`` for ``input_ids`` ``[batch, seq]``; with a
        ``cache`` (from :meth:`new_cache`) the tokens continue the cached sequence;
        ``inputs_embeds`` replaces their embeddings (a multimodal prefill)."""
        return self.runtime().forward(input_ids, cache, inputs_embeds)

    def new_cache(self):
        return self.runtime().new_cache()

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        eos_token_id: int | None = None,
        inputs_embeds: Any = None,
    ) -> torch.Tensor:
        """Greedy decoding with the latent KV cache: one prefill, then one token per step.
        Returns ``input_ids`` followed by the new tokens (1-D in, 1-D out). With
        ``eos_token_id`` it stops once every sequence has produced it (finished sequences
        are padded with it). ``inputs_embeds`` (``[batch, seq, hidden]``) are the prefill's
        embeddings when given (image features spliced in)."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise InvalidArgumentError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        flat = input_ids.dim() == 1
        ids = input_ids[None] if flat else input_ids
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise InvalidArgumentError(f"input_ids must be [seq] or [batch, seq], got {tuple(input_ids.shape)}")
        cache = self.new_cache()
        if inputs_embeds is not None and flat:
            inputs_embeds = inputs_embeds[None] if inputs_embeds.dim() == 2 else inputs_embeds
        logits = self.forward(ids, cache, inputs_embeds)
        out = [ids]
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(dim=-1, keepdim=True)
            if eos_token_id is not None:
                nxt = torch.where(done[:, None], torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt[:, 0] == eos_token_id
            out.append(nxt)
            if eos_token_id is not None and bool(done.all()):
                break
            logits = self.forward(nxt, cache)
        result = torch.cat(out, dim=1)
        return result[0] if flat else result

    def __repr__(self) -> str:
        p = self.parallel
        return (
            f"{type(self).__name__}({self.config['num_hidden_layers']} layers, "
            f"{self.config.get('n_routed_experts') or 0} experts, {self.quant_format}, {self.dtype}, "
            f"tp {p.tp_rank}/{p.tp_size}, ep {p.ep_rank}/{p.ep_size}, "
            f"fused shared experts {self.num_fused_shared_experts})"
        )

    def weight_rules(self) -> WeightRules:
        """The rest of the naming rules, as data (see :mod:`kimi_loader.rules`)."""
        c = self.config
        tied = [TIED_IGNORE] if c["tie_word_embeddings"] else []
        return WeightRules(
            rewrites=KIMI_PREFIX_REWRITES,
            ignore=(
                ("vision_tower.", None, "vision tower: the language model is loaded text-only"),
                ("mm_projector.", None, "multimodal projector: the language model is loaded text-only"),
                ROPE_IGNORE,
                *tied,
            ),
            num_hidden_layers=c["num_hidden_layers"],
            num_nextn_predict_layers=c["num_nextn_predict_layers"],
            scale_remaps=(
                (".k_proj.k_scale", ".attn.k_scale"),
                (".v_proj.v_scale", ".attn.v_scale"),
                (".q_proj.output_scale", ".attn.q_scale"),
                (".k_proj.output_scale", ".attn.k_scale"),
                (".v_proj.output_scale", ".attn.v_scale"),
            ),
            tp_rules=SERVING_TP_RULES,
            num_experts=c.get("n_routed_experts"),
            fused_shared_slot=c.get("n_routed_experts") if self.num_fused_shared_experts else None,
            fp8_block=self.fp8_block,
        )


class KimiK25ForConditionalGeneration(ForwardsWeightHooks, nn.Module):
    """Kimi-K2.5's multimodal wrapper: the language model is ``self.language_model`` (the
    five weight hooks are forwarded to it); the MoonViT tower and the projector are
    ``self.vision_tower`` / ``self.mm_projector`` in checkpoint layout
    (:mod:`kimi_loader.models.vision`), loaded by the same plan, strictly: a missing
    vision tensor fails the load. ``text_only=True`` (implied by a config without
    ``vision_config``) builds no vision modules and skips the vision tensors by a
    declared rule (listed in the load report)."""

    weight_hooks_inner = "language_model"

    def __init__(self, config: dict[str, Any] | ModelConfig, *, text_only: bool = False, **kwargs: Any) -> None:
        super().__init__()
        mc = config if isinstance(config, ModelConfig) else parse_config(config)
        self.config = raw = mc.raw
        kwargs.pop("quant_config_source", None)  # the wrapper's config holds it, at either level
        self.language_model = DeepseekV3ForCausalLM(mc, **kwargs)
        self.text_only = bool(text_only)
        #: why the vision tower is not built (the ignore rules' reason)
        self.text_only_reason = "loaded text_only=True"
        if not self.text_only and not isinstance(raw.get("vision_config"), dict):
            self.text_only, self.text_only_reason = True, "the config has no vision_config"
        #: the language-model token whose positions take image features
        self.image_token_id = raw.get("media_placeholder_token_id", raw.get("image_token_id", 163605))
        if not self.text_only:
            from .vision import KimiProjector, MoonViT, VisionConfig

            self.vision_config = VisionConfig.parse(raw, mc.text["hidden_size"])
            dtype, device = kwargs.get("dtype", torch.bfloat16), kwargs.get("device")
            self.vision_tower = MoonViT(self.vision_config, dtype, device)
            self.mm_projector = KimiProjector(self.vision_config, dtype, device)

    @property
    def weight_extra_modules(self) -> tuple[str, ...]:
        """Modules beside the language model whose parameters the loader also writes
        (named as the checkpoint names them)."""
        return () if self.text_only else ("vision_tower", "mm_projector")

    def weight_rules(self) -> WeightRules:
        import dataclasses

        rules = self.language_model.weight_rules()
        vision = ("vision_tower.", "mm_projector.")
        kept: tuple[Any, ...] = tuple(r for r in rules.ignore_rules if r.prefix not in vision)
        if self.text_only:
            kept += (
                ("vision_tower.", None, f"vision tower: {self.text_only_reason}"),
                ("mm_projector.", None, f"multimodal projector: {self.text_only_reason}"),
            )
        if self.text_only:
            return dataclasses.replace(rules, ignore=kept)
        # identity rewrites first: the vision names are the parameters' own (and a missing
        # vision destination is named as the checkpoint would name it)
        rewrites = (*((v, v) for v in vision), *rules.rewrites)
        return dataclasses.replace(rules, ignore=kept, rewrites=rewrites)

    @property
    def process_group(self) -> Any:
        """The language model's (:attr:`DeepseekV3ForCausalLM.process_group`)."""
        return self.language_model.process_group

    @process_group.setter
    def process_group(self, group: Any) -> None:
        self.language_model.process_group = group

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Language-model embeddings of the images (one row per merged 2x2 patch)."""
        if self.text_only:
            raise InvalidArgumentError("this model was loaded text_only=True: it has no vision tower")
        from .vision import encode_images

        return encode_images(self.vision_tower, self.mm_projector, self.vision_config, pixel_values, image_grid_thw)

    def _inputs_embeds(self, input_ids: torch.Tensor, pixel_values: Any, image_grid_thw: Any) -> Any:
        if pixel_values is None:
            return None
        if image_grid_thw is None:
            raise InvalidArgumentError("pixel_values need image_grid_thw ([images, 3]: t, h, w in patches)")
        from .vision import splice

        features = self.image_features(pixel_values, image_grid_thw)
        ids = input_ids[None] if input_ids.dim() == 1 else input_ids
        placeholder = ids == self.image_token_id
        embeds = self.language_model.runtime()._embed(ids.masked_fill(placeholder, 0))
        return splice(embeds, ids, features, self.image_token_id)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: Any = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Float32 logits; with ``pixel_values`` (``[patches, 3, p, p]``) and
        ``image_grid_thw`` the image features replace the placeholder tokens, in order."""
        return self.language_model(input_ids, cache, self._inputs_embeds(input_ids, pixel_values, image_grid_thw))

    def new_cache(self):
        return self.language_model.new_cache()

    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        eos_token_id: int | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        embeds = self._inputs_embeds(input_ids, pixel_values, image_grid_thw)
        return self.language_model.generate(input_ids, max_new_tokens, eos_token_id=eos_token_id, inputs_embeds=embeds)

    def __repr__(self) -> str:
        vision = "not loaded (text_only)" if self.text_only else f"MoonViT {self.vision_config.num_layers} blocks"
        return f"KimiK25ForConditionalGeneration(language_model={self.language_model!r}, vision: {vision})"
