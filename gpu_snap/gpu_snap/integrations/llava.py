"""LLaVA (transformers ``LlavaForConditionalGeneration``): visual token pruning inside the LLM.

Tested on transformers 5.24 and 5.17 (CPU; tiny random-weight models in tests/test_llava.py).
The machinery is ``integrations._llm_pruning``; this file only finds the image tokens
(``config.image_token_id`` in ``input_ids``; one image = ``image_seq_length`` or
``tokens / pixel_values.shape[0]`` consecutive tokens), the text model and its decoder layers.
``VisualPruning(cuda_graph=True)`` runs the pruned layers of each prefill as a CUDA graph (see
``_llm_pruning``; decode steps stay eager).
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional, Tuple

from vprune.config import TechniqueConfig, VisualPruning
from vprune.errors import IncompatibleModelError, MissingInputsError, NoTargetsError

from . import _compat
from ._llm_pruning import ROW_MODES, VLM_STRATEGIES, LLMPruner, VPruneWarning, groups_from_mask, host_copies
from .registry import Integration


def _path_get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _binder(module: Any):
    """A function (args, kwargs) -> {name: value} for ``module.forward``'s parameters."""
    try:
        params = list(inspect.signature(type(module).forward).parameters)[1:]
    except (TypeError, ValueError):
        params = ["input_ids"]

    def bind(args: tuple, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        bound = dict(kwargs)
        for name, value in zip(params, args):
            bound.setdefault(name, value)
        return bound

    return bind


def _has_encoder_outputs(inputs: Dict[str, Any]) -> bool:
    """transformers 5.2x can pass precomputed vision outputs (``mm_encoder_outputs``, a dict that
    ``generate`` may hand over empty)."""
    enc = inputs.get("mm_encoder_outputs")
    if enc is None:
        return False
    if isinstance(enc, dict):
        return any(v is not None for v in enc.values())
    return True


class VLMIntegration(Integration):
    """Shared by the transformers VLM integrations: a text model under ``model.model.language_model``."""

    techniques = ("visual_pruning",)
    default_layer = 2
    default_strategy = "fastv"
    # attribute paths tried, in order, for the text model (its ``layers`` are the decoder layers)
    text_model_paths: Tuple[str, ...] = ("model.language_model", "language_model.model", "language_model")

    # ------------------------------------------------------------------------------ structure
    def text_model(self, model: Any) -> Any:
        for path in self.text_model_paths:
            tm = _path_get(model, path)
            if tm is not None and hasattr(tm, "layers") and hasattr(tm, "config"):
                return tm
        return None

    def check_structure(self, model: Any) -> None:
        tm = self.text_model(model)
        missing = []
        if tm is None:
            missing.append(" or ".join(f"{p}.layers" for p in self.text_model_paths))
        for attr in self.required_config_attrs:
            if getattr(model.config, attr, None) is None:
                missing.append(f"config.{attr}")
        if tm is not None:
            self._check_depth(model, len(tm.layers))
            if not hasattr(tm.layers[0], "self_attn"):
                missing.append("language model layers[i].self_attn")
        if missing:
            raise IncompatibleModelError(
                f"{type(model).__name__} matched the {self.name} integration by class name but lacks "
                f"{', '.join(missing)} (transformers {_compat.transformers_version_str()}; tested on {self.tested_on})")

    @staticmethod
    def _check_depth(model: Any, n: int) -> None:
        if n == 0:
            raise NoTargetsError(f"{type(model).__name__}: the language model has no decoder layers to prune in")
        if n < 2:
            raise NoTargetsError(
                f"{type(model).__name__}: the language model has {n} decoder layer; pruning needs at least 2 "
                f"(score at layer K-1, prune from layer K)")

    required_config_attrs: Tuple[str, ...] = ("image_token_id",)

    # ------------------------------------------------------------------------------- configs
    def default_config(self, model: Any, **overrides: Any) -> TechniqueConfig:
        fields = {"layer": self.default_layer, "strategy": self.default_strategy}
        fields.update(overrides)
        return VisualPruning(**fields)

    def resolve_config(self, model: Any, config: TechniqueConfig) -> TechniqueConfig:
        if not isinstance(config, VisualPruning):
            raise TypeError(f"the {self.name} integration takes a VisualPruning config, got {type(config).__name__}")
        changes: Dict[str, Any] = {}
        if config.layer is None:
            changes["layer"] = self.default_layer
        if config.strategy is None:
            changes["strategy"] = self.default_strategy
        if changes:
            config = config.replace(**changes)
        if config.strategy not in VLM_STRATEGIES:
            raise ValueError(
                f"VisualPruning.strategy={config.strategy!r} is invalid for {type(model).__name__}: allowed "
                f"{list(VLM_STRATEGIES)} ('dual' and 'action' need a VLA's action tokens)")
        tm = self.text_model(model)
        if tm is not None:
            n = len(tm.layers)
            self._check_depth(model, n)
            if not 1 <= config.layer <= n - 1:
                raise ValueError(
                    f"VisualPruning.layer={config.layer} is invalid for {type(model).__name__} with {n} decoder "
                    f"layers: allowed an int in [1, {n - 1}]")
        return config

    # --------------------------------------------------------------------------------- apply
    def apply(self, model: Any, config: TechniqueConfig, state: Any) -> None:
        tm = self.text_model(model)
        pruner = LLMPruner(tm.config, tm.layers, config, ROW_MODES[config.strategy],
                           host_name=type(model).__name__)
        state.runtime = pruner
        pruner.install(state.undo)
        self._install_call_hooks(model, pruner, state)
        n = len(tm.layers)
        state.targets = [
            f"{self._text_model_path(model)}.layers[{config.layer}:{n}] see only the kept visual tokens "
            f"(scored at layer {config.layer - 1}, attention {pruner.base_attention})",
        ] + self.target_tokens(model)

    def _text_model_path(self, model: Any) -> str:
        for path in self.text_model_paths:
            if self.text_model(model) is _path_get(model, path):
                return path
        return "language_model"

    def target_tokens(self, model: Any) -> List[str]:
        return [f"image tokens (id {model.config.image_token_id})"]

    def call_target(self, model: Any) -> Any:
        """The module whose forward sees input_ids, pixel values, mask and cache: the inner multimodal
        model (``model.model``) when there is one, so that calling it directly is pruned too."""
        inner = getattr(model, "model", None)
        if inner is not None and hasattr(inner, "language_model") and hasattr(inner, "forward"):
            return inner
        return model

    def _install_call_hooks(self, model: Any, pruner: LLMPruner, state: Any) -> None:
        target = self.call_target(model)
        bind = _binder(target)

        def pre(module, args, kwargs):
            inputs = bind(args, kwargs)
            state.calls += 1
            self.begin_call(model, pruner, inputs)
            return None

        if target is not model:  # the outer forward computes a loss the pruned logits cannot match
            bind_outer = _binder(model)

            def guard(module, args, kwargs):
                inputs = bind_outer(args, kwargs)
                ids = inputs.get("input_ids")
                if (inputs.get("labels") is not None and ids is not None
                        and _compat.cache_seq_length(_compat.layer_cache(inputs)) == 0
                        and bool(self.visual_mask(model, ids).any())):
                    raise ValueError(
                        f"{type(model).__name__} is patched by vprune: a prefill with visual tokens returns logits "
                        f"of the pruned length, so labels= cannot apply; vprune.unpatch(model) (or use "
                        f"vprune.patched(...) around inference only) to compute a loss")
                return None

            state.undo.add_hook(model.register_forward_pre_hook(guard, with_kwargs=True))

        def post(module, args, kwargs, output):
            pruner.end_call(failed=output is None)
            return None

        state.undo.add_hook(target.register_forward_pre_hook(pre, with_kwargs=True))
        state.undo.add_hook(target.register_forward_hook(post, with_kwargs=True, always_call=True))

    # ------------------------------------------------------------------------------ per call
    def visual_mask(self, model: Any, input_ids: Any) -> Any:
        return input_ids == model.config.image_token_id

    def has_visual_inputs(self, inputs: Dict[str, Any]) -> bool:
        return inputs.get("pixel_values") is not None or _has_encoder_outputs(inputs)

    def split_size(self, model: Any, inputs: Dict[str, Any], n_visual: int) -> Optional[int]:
        return None

    def begin_call(self, model: Any, pruner: LLMPruner, inputs: Dict[str, Any]) -> None:
        import warnings

        input_ids = inputs.get("input_ids")
        cache = _compat.layer_cache(inputs)
        cache_len = _compat.cache_seq_length(cache)
        embeds = inputs.get("inputs_embeds")
        if input_ids is None:
            if embeds is not None and cache_len == 0 and self.has_visual_inputs(inputs):
                warnings.warn(
                    f"{type(model).__name__}: called with inputs_embeds and no input_ids, so vprune cannot locate "
                    f"the visual tokens; this call runs unpruned", VPruneWarning, stacklevel=4)
            ref = embeds
            pruner.begin_call(None, batch=ref.shape[0] if ref is not None else 1,
                              seq_len=ref.shape[1] if ref is not None else 0,
                              device=ref.device if ref is not None else None, cache_len=cache_len)
            return
        groups = None
        attention_mask = inputs.get("attention_mask")
        visual_inputs = self.has_visual_inputs(inputs)
        if cache_len == 0 or visual_inputs:
            # the one device->host copy of a prefill (ids and mask together): everything after it is
            # planned on the host, and the plan's index tensors go back in one non-blocking copy
            ids, attention_mask = host_copies(input_ids, attention_mask)
            vis = self.visual_mask(model, ids)
            n_visual = int(vis.sum())
            if n_visual == 0:
                if visual_inputs and cache_len == 0:
                    raise MissingInputsError(
                        f"{type(model).__name__}: pixel_values were given but input_ids contain no image token "
                        f"({self.target_tokens(model)[0]}); the prompt must hold the processor's image placeholders")
            else:
                if cache_len == 0 and not visual_inputs and embeds is None:
                    warnings.warn(
                        f"{type(model).__name__}: input_ids hold {n_visual} image tokens but no pixel_values were "
                        f"given, so the vision tower did not run; pruning the placeholder embeddings",
                        VPruneWarning, stacklevel=4)
                groups = groups_from_mask(vis, split=self.split_size(model, inputs, n_visual), token_ids=ids)
        pruner.begin_call(groups, batch=input_ids.shape[0], seq_len=input_ids.shape[1], device=input_ids.device,
                          attention_mask=attention_mask, cache_len=cache_len)

    def reset(self, model: Any, state: Any) -> None:
        """A new request: forget the pruned-prefill record (the next call with an empty cache sets it)."""
        state.runtime.reset()

    # --------------------------------------------------------------------------------- stats
    def stats(self, model: Any, state: Any) -> Dict[str, Any]:
        pruner: LLMPruner = state.runtime
        return pruner.stats()


class LlavaIntegration(VLMIntegration):
    name = "llava"
    tested_on = "transformers 5.17, 5.24"

    def split_size(self, model: Any, inputs: Dict[str, Any], n_visual: int) -> Optional[int]:
        """Tokens per image: consecutive images are told apart by count (LLaVA has no separator)."""
        pv = inputs.get("pixel_values")
        if pv is not None and hasattr(pv, "shape") and pv.dim() == 4 and inputs.get("image_sizes") is None:
            n_images = int(pv.shape[0])
            if n_images > 0 and n_visual % n_images == 0:
                return n_visual // n_images
        return getattr(model.config, "image_seq_length", None)
