"""TestbedVLAPolicy: a tiny robot policy built like OpenVLA (Prismatic), trained on ``sim.PickEnv``.

Same attribute structure as OpenVLA's remote code (``OpenVLAForActionPrediction``), so the same
vprune integration patches both:

    policy.vision_backbone.featurizer        timm VisionTransformer (64 px, patch 8 -> 64 patches),
                                             forward = patches of its second-to-last block, as OpenVLA
    policy.vision_backbone.fused_featurizer  only with ``use_fused_vision_backbone``: a second ViT on
                                             channels 3:6 of the 6-channel pixel_values
    policy.projector                         MLP fc1 -> GELU -> fc2 into the LLM width
    policy.language_model                    transformers LlamaForCausalLM (4 layers, hidden 128, GQA 4/2)
    policy.config.n_action_bins, .norm_stats action bins = the last vocabulary ids; un-normalisation

The projected patches are inserted right after BOS: LLM sequence = [BOS, 64 patches, prompt, actions].
``predict_action`` generates ``action_dim`` (3: dx, dy, grip) tokens greedily with ``self.generate``
and decodes them through the bin centres and ``norm_stats`` like OpenVLA.

Transformers versions (tested on 5.24 and 4.40.1; timm 1.0 and 0.9.16):
- 5.x needs ``GenerationMixin`` mixed in explicitly; 4.40 already has it through PreTrainedModel.
- the cache keyword is ``cache`` on transformers >= 5.2x (``past_key_values`` deprecated) and
  ``past_key_values`` before; the LM output carries it under the same name. ``_CACHE_KW`` picks it.
- the first (prefill) step is detected by the cache's sequence length being 0, not by the cache
  being None: 5.x passes an empty ``DynamicCache`` on the first step (the reason OpenVLA's remote code
  skips its vision tower on transformers >= 4.50), 4.40 passes None and then legacy tuples.
"""
from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import timm
import torch
import torch.nn as nn
from transformers import GenerationMixin, LlamaConfig, LlamaForCausalLM, PreTrainedModel

try:  # transformers >= 5 renamed the class (the old name stays as an alias for a while)
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as _BaseConfig

IGNORE_INDEX = -100

# version-dependent: the name of the cache keyword of LlamaForCausalLM.forward (see module docstring)
_CACHE_KW = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def cache_length(cache: Any) -> int:
    """Tokens already in a KV cache: 0 for None, an empty ``DynamicCache`` or an empty legacy tuple."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and len(cache) > 0 and len(cache[0]) > 0:
        return int(cache[0][0].shape[-2])
    return 0


class TestbedVLAConfig(_BaseConfig):
    """Config of ``TestbedVLAPolicy`` (field names follow OpenVLA's config where they exist).

    image_size / patch_size / vision_dim / vision_depth / vision_heads: the timm ViT featurizer.
    use_fused_vision_backbone: two featurizers on a 6-channel input (OpenVLA's DINOv2 + SigLIP).
    text_config: a ``LlamaConfig`` (or its dict). n_action_bins: bins over [-1, 1] (256 as OpenVLA).
    norm_stats: {dataset: {"action": {"q01", "q99", "mask"}}} for un-normalising actions.
    """

    model_type = "testbed_vla"
    __test__ = False  # not a pytest class
    sub_configs = {"text_config": LlamaConfig}

    def __init__(self, image_size: int = 64, patch_size: int = 8, vision_dim: int = 64,
                 vision_depth: int = 3, vision_heads: int = 2, use_fused_vision_backbone: bool = False,
                 text_config: Optional[Any] = None, n_action_bins: int = 256,
                 norm_stats: Optional[Dict[str, Any]] = None, pad_to_multiple_of: int = 0,
                 **kwargs: Any):
        self.image_size = image_size
        self.patch_size = patch_size
        self.vision_dim = vision_dim
        self.vision_depth = vision_depth
        self.vision_heads = vision_heads
        self.use_fused_vision_backbone = use_fused_vision_backbone
        if text_config is None:
            text_config = default_text_config()
        elif isinstance(text_config, dict):
            text_config = LlamaConfig(**{k: v for k, v in text_config.items() if k != "model_type"})
        self.text_config = text_config
        self.n_action_bins = n_action_bins
        self.norm_stats = norm_stats or {
            "pick2d": {"action": {"q01": [-1.0, -1.0, -1.0], "q99": [1.0, 1.0, 1.0],
                                  "mask": [True, True, False]}}}
        self.pad_to_multiple_of = pad_to_multiple_of
        kwargs.setdefault("pad_token_id", 0)
        kwargs.setdefault("bos_token_id", 1)
        # The LM's input and output embeddings are separate weights. transformers 4.40 ties them
        # from the *outer* config's flag (default True) in post_init, so loading the shipped weights
        # there overwrote the input embeddings with the LM head: say no explicitly.
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> Dict[str, Any]:
        out = super().to_dict()
        if not isinstance(out.get("text_config"), dict):
            out["text_config"] = self.text_config.to_dict()
        return out


def default_text_config(vocab_size: int = 64 + 256) -> LlamaConfig:
    """The shipped LLM: 4 layers, hidden 128, 4 query heads sharing 2 K/V heads."""
    return LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                       tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _unpack_tuple(fn):
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out
    return wrapper


def _make_featurizer(config: TestbedVLAConfig) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=config.image_size, patch_size=config.patch_size, in_chans=3,
                            num_classes=0, global_pool="", embed_dim=config.vision_dim,
                            depth=config.vision_depth, num_heads=config.vision_heads, mlp_ratio=2.0,
                            class_token=False)
    # as OpenVLA: forward returns the patch features of the second-to-last block (no prefix tokens)
    vit.forward = _unpack_tuple(partial(vit.get_intermediate_layers, n={len(vit.blocks) - 2}))
    return vit


class TestbedVisionBackbone(nn.Module):
    """``featurizer`` (and ``fused_featurizer``): pixel_values [B, 3|6, H, W] -> patches [B, N, D]."""

    def __init__(self, config: TestbedVLAConfig):
        super().__init__()
        self.use_fused_vision_backbone = config.use_fused_vision_backbone
        self.featurizer = _make_featurizer(config)
        self.embed_dim = self.featurizer.embed_dim
        if self.use_fused_vision_backbone:
            self.fused_featurizer = _make_featurizer(config)
            self.embed_dim += self.fused_featurizer.embed_dim

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not self.use_fused_vision_backbone:
            return self.featurizer(pixel_values)
        img, img_fused = torch.split(pixel_values, [3, 3], dim=1)
        return torch.cat([self.featurizer(img), self.fused_featurizer(img_fused)], dim=2)


class TestbedProjector(nn.Module):
    """Vision features [B, N, D_v] -> LLM embeddings [B, N, D_llm] (OpenVLA's non-fused MLP)."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.vision_dim, self.llm_dim = vision_dim, llm_dim
        self.fc1 = nn.Linear(vision_dim, llm_dim, bias=True)
        self.fc2 = nn.Linear(llm_dim, llm_dim, bias=True)
        self.act_fn1 = nn.GELU()

    def forward(self, img_patches: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_fn1(self.fc1(img_patches)))


class TestbedVLAPolicy(PreTrainedModel, GenerationMixin):
    """A tiny OpenVLA-structured policy (see the module docstring). Batch > 1 is supported when the
    prompts have equal length (the sim's instructions all do); left padding also works."""

    config_class = TestbedVLAConfig
    __test__ = False  # not a pytest class
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["TestbedProjector"]
    _supports_sdpa = True
    _supports_cache_class = True

    def __init__(self, config: TestbedVLAConfig):
        super().__init__(config)
        self.vision_backbone = TestbedVisionBackbone(config)
        self.projector = TestbedProjector(self.vision_backbone.embed_dim, config.text_config.hidden_size)
        self.language_model = LlamaForCausalLM(config.text_config)
        self.vocab_size = config.text_config.vocab_size - config.pad_to_multiple_of
        self.pad_token_id = config.pad_token_id
        self.norm_stats = config.norm_stats
        self.bins = np.linspace(-1, 1, config.n_action_bins)
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = 0.02
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)

    # --- PreTrainedModel boilerplate -----------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    @property
    def num_patches(self) -> int:
        """Visual tokens per image (a fused backbone concatenates features, not tokens)."""
        return self.config.num_patches

    # --- multimodal embedding -------------------------------------------------------------------
    def embed_multimodal(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                         attention_mask: Optional[torch.Tensor] = None,
                         labels: Optional[torch.Tensor] = None):
        """[BOS, patches, rest of the prompt]: embeddings [B, 1+N+L-1, H], mask and labels to match."""
        projected = self.projector(self.vision_backbone(pixel_values))
        emb = self.get_input_embeddings()(input_ids)
        projected = projected.to(emb.dtype)
        b, n = projected.shape[:2]
        mm = torch.cat([emb[:, :1], projected, emb[:, 1:]], dim=1)
        mm_mask = None
        if attention_mask is not None:
            ones = attention_mask.new_ones((b, n))
            mm_mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
        mm_labels = None
        if labels is not None:
            ign = labels.new_full((b, n), IGNORE_INDEX)
            mm_labels = torch.cat([labels[:, :1], ign, labels[:, 1:]], dim=1)
        return mm, mm_mask, mm_labels, projected

    # --- forward ----------------------------------------------------------------------------------
    def forward(self, input_ids: Optional[torch.LongTensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.FloatTensor] = None,
                labels: Optional[torch.LongTensor] = None,
                inputs_embeds: Optional[torch.FloatTensor] = None,
                past_key_values: Optional[Any] = None,
                use_cache: Optional[bool] = None,
                output_attentions: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None,
                position_ids: Optional[torch.LongTensor] = None,
                **kwargs: Any) -> Any:
        """Prefill (empty cache + pixel_values): vision tower, projector, patches after BOS, LLM.
        Cached decode (non-empty cache): the new token(s) only; a text-space ``attention_mask`` is
        widened with ones for the visual columns (its width is matched to cache + new tokens).
        Text only (no pixel_values): the LLM alone. Returns the LLM's CausalLMOutputWithPast."""
        cache = kwargs.pop("cache", None)
        if cache is None:
            cache = past_key_values
        use_cache = bool(use_cache) and not self.training if use_cache is not None else not self.training
        past = cache_length(cache)
        lm_kwargs: Dict[str, Any] = {"use_cache": use_cache, _CACHE_KW: cache}
        if output_attentions:
            lm_kwargs["output_attentions"] = True
        if output_hidden_states:
            lm_kwargs["output_hidden_states"] = True

        if pixel_values is not None and past == 0:
            if input_ids is None:
                raise ValueError("TestbedVLAPolicy: a multimodal forward needs input_ids (BOS first)")
            if input_ids.shape[0] != pixel_values.shape[0]:
                raise ValueError(f"batch of input_ids ({input_ids.shape[0]}) != batch of pixel_values "
                                 f"({pixel_values.shape[0]})")
            mm, mm_mask, mm_labels, _ = self.embed_multimodal(input_ids, pixel_values, attention_mask, labels)
            return self.language_model(inputs_embeds=mm, attention_mask=mm_mask, labels=mm_labels,
                                       position_ids=position_ids, **lm_kwargs)
        if past > 0:
            if labels is not None:
                raise ValueError("labels are not supported in a cached decode step")
            if attention_mask is not None:
                missing = past + input_ids.shape[1] - attention_mask.shape[1]
                if missing > 0:  # the visual columns the text-space mask lacks: right after BOS
                    ones = attention_mask.new_ones((attention_mask.shape[0], missing))
                    attention_mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
            return self.language_model(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids, **lm_kwargs)
        return self.language_model(input_ids=input_ids, inputs_embeds=inputs_embeds,
                                   attention_mask=attention_mask, labels=labels,
                                   position_ids=position_ids, **lm_kwargs)

    # --- GenerationMixin ------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, past_key_values: Optional[Any] = None,
                                      attention_mask: Optional[torch.Tensor] = None,
                                      pixel_values: Optional[torch.Tensor] = None,
                                      **kwargs: Any) -> Dict[str, Any]:
        """pixel_values only on the first step (empty cache); afterwards the last token only."""
        key = "cache" if "cache" in kwargs else "past_key_values"
        cache = kwargs.pop("cache", None) if key == "cache" else past_key_values
        first = cache_length(cache) == 0
        inputs: Dict[str, Any] = {
            "input_ids": input_ids if first else input_ids[:, -1:],
            "attention_mask": attention_mask,
            "pixel_values": pixel_values if first else None,
            key: cache,
            "use_cache": kwargs.get("use_cache", True),
        }
        return inputs

    def _reorder_cache(self, *args: Any, **kwargs: Any) -> Any:
        return self.language_model._reorder_cache(*args, **kwargs)

    # --- actions --------------------------------------------------------------------------------
    def _check_unnorm_key(self, unnorm_key: Optional[str]) -> str:
        if unnorm_key is None:
            if len(self.norm_stats) != 1:
                raise ValueError(f"pass unnorm_key, one of {sorted(self.norm_stats)}")
            return next(iter(self.norm_stats))
        if unnorm_key not in self.norm_stats:
            raise ValueError(f"unnorm_key={unnorm_key!r} is not one of {sorted(self.norm_stats)}")
        return unnorm_key

    def get_action_dim(self, unnorm_key: Optional[str] = None) -> int:
        return len(self.norm_stats[self._check_unnorm_key(unnorm_key)]["action"]["q01"])

    def get_action_stats(self, unnorm_key: Optional[str] = None) -> Dict[str, Any]:
        return self.norm_stats[self._check_unnorm_key(unnorm_key)]["action"]

    def decode_actions(self, action_token_ids: np.ndarray, unnorm_key: Optional[str] = None) -> np.ndarray:
        """Action token ids [..., D] -> un-normalised actions [..., D] (OpenVLA's mapping)."""
        disc = self.vocab_size - np.asarray(action_token_ids, dtype=np.int64)
        disc = np.clip(disc - 1, 0, self.bin_centers.shape[0] - 1)
        normalized = self.bin_centers[disc]
        stats = self.get_action_stats(unnorm_key)
        high, low = np.asarray(stats["q99"]), np.asarray(stats["q01"])
        mask = np.asarray(stats.get("mask", np.ones_like(low, dtype=bool)), dtype=bool)
        return np.where(mask, 0.5 * (normalized + 1) * (high - low) + low, normalized)

    def predict_action(self, input_ids: Optional[torch.LongTensor] = None, unnorm_key: Optional[str] = None,
                       **kwargs: Any) -> np.ndarray:
        """Generate ``action_dim`` action tokens and decode them: float [D] for batch 1, else [B, D].

        kwargs go to ``generate`` (pixel_values, attention_mask, do_sample, ...)."""
        n = self.get_action_dim(unnorm_key)
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("pad_token_id", self.config.pad_token_id)
        generated = self.generate(input_ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        ids = generated[:, -n:].cpu().numpy()
        actions = self.decode_actions(ids, unnorm_key)
        return actions[0] if actions.shape[0] == 1 else actions
