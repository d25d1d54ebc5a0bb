"""A vLLM model loader: ``LLM(model=path, load_format="kimi_loader")`` or ``vllm serve
path --load-format kimi_loader`` with nothing else to write.

Registered through the ``vllm.general_plugins`` entry point (:func:`register`, run in
every vLLM process, possibly more than once: idempotent). The loader builds our copy plan
against vLLM's own model from vLLM's own mapping data (``packed_modules_mapping``,
``get_expert_mapping()``), proves completeness (every parameter written, or left to a
declared rule whose reason is reported), copies in parallel with the GIL released, then
lets vLLM post-process (``process_weights_after_loading``). The load report goes to
vLLM's log. ``get_all_weights`` yields a checkpoint's tensors for vLLM's in-place reload.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

from ..models.layout import KIMI_PREFIX_REWRITES, ROPE_IGNORE, SERVING_TP_RULES, TIED_IGNORE
from ..rules import WeightRules

__all__ = ["LOAD_FORMAT", "VLLMModel", "register"]

LOAD_FORMAT = "kimi_loader"
log = logging.getLogger("kimi_loader")


class VLLMModel:
    """The weight hooks and rules of a vLLM DeepSeek-V3 / Kimi-K2 model, read from the
    model itself (its fused-module and expert mappings), for :func:`kimi_loader.load_weights`."""

    weight_hooks_inner = "vllm_model"

    def __init__(self, model: torch.nn.Module, tp_rank: int = 0, tp_size: int = 1) -> None:
        self.vllm_model = model
        self.config: Any = getattr(model, "config", None)
        self.tp_rank, self.tp_size = tp_rank, tp_size
        params = {n for n, _ in model.named_parameters()}
        # a multimodal wrapper (Kimi-K2.5) keeps the language model's mappings on it
        inner = getattr(model, "language_model", None)
        sources = [m for m in (model, inner) if m is not None]
        packed: dict[str, list[str]] = {}
        for m in sources:
            packed.update(getattr(m, "packed_modules_mapping", None) or {})
        self.stacked_params_mapping = [
            (fused, shard, i)
            for fused, shards in packed.items()
            if any(f".{fused}." in n for n in params)  # only the fusions this model built
            for i, shard in enumerate(shards)
        ]
        # vLLM's own checkpoint -> model renames (Kimi-K2.5: the projector's linears)
        self._mapper = getattr(model, "hf_to_vllm_mapper", None)
        getters = [g for g in (getattr(m, "get_expert_mapping", None) for m in sources) if g is not None]
        self.expert_params_mapping = list(getters[0]()) if getters else []
        # the local rows of each shard of a fused parameter, from vLLM's own modules
        fused = {f for f, _, _ in self.stacked_params_mapping}
        self.stacked_shard_rows: dict[str, list[int]] = {}
        for name, mod in model.named_modules():
            sizes = getattr(mod, "output_sizes", None)
            if sizes and name.rsplit(".", 1)[-1] in fused:
                for p_name, p in mod.named_parameters(recurse=False):
                    if p.dim() >= 1 and p.shape[0] == sum(sizes) // tp_size:
                        self.stacked_shard_rows[f"{name}.{p_name}"] = [int(s) // tp_size for s in sizes]

    @property
    def mutate_weight_preload(self) -> Any:
        """vLLM's ``hf_to_vllm_mapper`` as the rename hook (None: the identity)."""
        if self._mapper is None:
            from ..hooks import _same_name

            return _same_name
        return self._mapper.map_name

    def weight_rules(self) -> WeightRules:
        c = self.config
        text = getattr(c, "text_config", None) or c
        tied = [TIED_IGNORE] if getattr(text, "tie_word_embeddings", False) else []
        # vLLM's attention modules hold scale buffers (1.0) that checkpoints without
        # quantized KV caches do not have: left as vLLM set them, by a reported rule
        scales = tuple(
            (name, "attention q / k / v / prob scales: vLLM's defaults (no quantized KV cache in the checkpoint)")
            for name, _ in self.vllm_model.named_buffers()
            if name.rsplit(".", 1)[-1] in ("_k_scale", "_v_scale", "_q_scale", "_prob_scale")
        )
        return WeightRules(
            skip_destinations=scales,
            # a vLLM wrapper keeps the checkpoint's language_model. names (its mapper renames
            # the rest); a plain DeepSeek-V3 model may be handed a Kimi-named checkpoint
            rewrites=() if self._mapper is not None else KIMI_PREFIX_REWRITES,
            ignore=(ROPE_IGNORE, *tied),
            num_hidden_layers=text.num_hidden_layers,
            num_nextn_predict_layers=getattr(text, "num_nextn_predict_layers", 0) or 0,
            num_experts=getattr(text, "n_routed_experts", None),
            tp_rules=SERVING_TP_RULES,
        )


def _tp() -> tuple[int, int]:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except Exception:
        return 0, 1


def _loader_class() -> type:
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    class KimiLoader(BaseModelLoader):  # type: ignore[misc, valid-type]
        """kimi_loader's copy plan as a vLLM model loader."""

        def download_model(self, model_config: Any) -> None:
            if not os.path.isdir(model_config.model):
                from ..errors import CheckpointNotFoundError

                raise CheckpointNotFoundError(
                    f"{model_config.model}: load_format='kimi_loader' loads local checkpoints"
                )

        def load_weights(self, model: torch.nn.Module, model_config: Any) -> None:
            import time

            from vllm.logger import init_logger

            from ..loader import load_weights

            rank, size = _tp()
            start = time.perf_counter()
            report = load_weights(VLLMModel(model, rank, size), model_config.model, tp_rank=rank, tp_size=size)
            # (a "vllm." logger: vLLM's log handlers are on that namespace; the first line
            # is worded as vLLM's default loader words it, for side-by-side timings)
            out = init_logger("vllm.kimi_loader")
            out.info("Loading weights took %.2f seconds", time.perf_counter() - start)
            out.info("kimi_loader: %r\n%s", report, report.summary())

        def get_all_weights(self, model_config: Any, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
            """The checkpoint's tensors, for vLLM's in-place reload (they are fed through
            vLLM's own reload path, which re-runs its post-processing)."""
            from ..reader import open as open_checkpoint

            ck = open_checkpoint(model_config.model)
            for name in ck.keys():
                yield name, ck.get_tensor(name)

    return KimiLoader


_registered = False


def register() -> None:
    """The ``vllm.general_plugins`` entry point: registers ``load_format="kimi_loader"``
    (once per process)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.model_loader import register_model_loader

    register_model_loader(LOAD_FORMAT)(_loader_class())
    _registered = True
