"""A tiny random-weight model with OpenVLA's structure and call behaviour (written for these tests).

Class name, attributes and control flow follow OpenVLA's remote code (``OpenVLAForActionPrediction``):
a timm ViT ``featurizer`` (and ``fused_featurizer`` on channels 3:6), a ``projector``, a Llama
``language_model``; the projected patches go right after BOS; a forward with a single input token is a
cached decode step; ``prepare_inputs_for_generation`` treats any cache object as "not the first step"
(the check that breaks on transformers >= 4.50); ``predict_action`` generates ``action_dim`` tokens
from the last 256 vocabulary ids.
"""
from functools import partial
import numpy as np
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

try:
    from transformers import GenerationMixin
except ImportError:  # pragma: no cover
    GenerationMixin = object
try:
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:
    from transformers import PretrainedConfig as _BaseConfig

N_BINS = 256
TEXT_VOCAB = 64


class TinyOpenVLAConfig(_BaseConfig):
    model_type = "tiny_openvla_test"
    sub_configs = {"text_config": LlamaConfig}

    def __init__(self, image_size=32, patch_size=8, vision_dim=32, use_fused_vision_backbone=False,
                 n_layers=4, action_dim=7, text_config=None, **kwargs):
        if text_config is None:
            text_config = LlamaConfig(vocab_size=TEXT_VOCAB + N_BINS, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, tie_word_embeddings=False,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
        elif isinstance(text_config, dict):
            text_config = LlamaConfig(**{k: v for k, v in text_config.items() if k != "model_type"})
        self.text_config = text_config
        self.image_size = image_size
        self.patch_size = patch_size
        self.vision_dim = vision_dim
        self.use_fused_vision_backbone = use_fused_vision_backbone
        self.n_layers = n_layers
        self.action_dim = action_dim
        super().__init__(**kwargs)


def _first(fn):
    def wrapper(*a, **k):
        out = fn(*a, **k)
        return out[0] if isinstance(out, (tuple, list)) else out
    return wrapper


def _vit(cfg):
    from timm.models.vision_transformer import VisionTransformer
    vit = VisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=3, num_classes=0,
                            global_pool="", embed_dim=cfg.vision_dim, depth=2, num_heads=2, mlp_ratio=2.0,
                            class_token=False)
    vit.forward = _first(partial(vit.get_intermediate_layers, n={len(vit.blocks) - 2}))
    return vit


class PrismaticVisionBackbone(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.use_fused_vision_backbone = cfg.use_fused_vision_backbone
        self.featurizer = _vit(cfg)
        self.embed_dim = cfg.vision_dim
        if self.use_fused_vision_backbone:
            self.fused_featurizer = _vit(cfg)
            self.embed_dim += cfg.vision_dim

    def _one(self, pixel_values):
        if not self.use_fused_vision_backbone:
            return self.featurizer(pixel_values)
        a, b = torch.split(pixel_values, [3, 3], dim=1)
        return torch.cat([self.featurizer(a), self.fused_featurizer(b)], dim=2)

    def forward(self, pixel_values):
        # several images (OpenVLA-OFT's wrist camera): channel-stacked, patches concatenated in order
        per = 6 if self.use_fused_vision_backbone else 3
        chunks = torch.split(pixel_values, per, dim=1)
        return torch.cat([self._one(c) for c in chunks], dim=1)


class PrismaticProjector(nn.Module):
    def __init__(self, vision_dim, llm_dim):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, llm_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class OpenVLAForActionPrediction(PreTrainedModel, GenerationMixin):
    config_class = TinyOpenVLAConfig
    base_model_prefix = "model"
    _supports_sdpa = True
    _supports_cache_class = True

    def __init__(self, config):
        super().__init__(config)
        text = config.text_config
        self.vision_backbone = PrismaticVisionBackbone(config)
        self.projector = PrismaticProjector(self.vision_backbone.embed_dim, 64)
        self.language_model = LlamaForCausalLM(text)
        self.vocab_size = TEXT_VOCAB + N_BINS
        self.bin_centers = (np.linspace(-1, 1, N_BINS)[:-1] + np.linspace(-1, 1, N_BINS)[1:]) / 2.0
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.2)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1.0)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, labels=None, inputs_embeds=None,
                past_key_values=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        if input_ids.shape[1] == 1:  # cached decode step (OpenVLA's test)
            return self.language_model(input_ids=input_ids, attention_mask=None, past_key_values=past_key_values,
                                       use_cache=use_cache)
        if pixel_values is None:  # text only
            return self.language_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)
        patches = self.projector(self.vision_backbone(pixel_values))
        emb = self.get_input_embeddings()(input_ids)
        mm = torch.cat([emb[:, :1], patches, emb[:, 1:]], dim=1)
        mask = None
        if attention_mask is not None:
            ones = attention_mask.new_ones(patches.shape[:2])
            mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
        return self.language_model(inputs_embeds=mm, attention_mask=mask, use_cache=use_cache)

    def prepare_inputs_for_generation(self, input_ids=None, past_key_values=None, inputs_embeds=None,
                                      pixel_values=None, attention_mask=None, **kwargs):
        if past_key_values is None:
            past_key_values = kwargs.get("cache")  # transformers >= 5.2x renamed the keyword
        if self.config.remote_code_prepare:
            cached = past_key_values is not None  # OpenVLA's test: an empty cache object counts as cached
        else:
            cached = _cache_len(past_key_values) > 0
        if cached:
            input_ids = input_ids[:, -1:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                "past_key_values": past_key_values, "use_cache": kwargs.get("use_cache")}

    def predict_action(self, input_ids=None, **kwargs):
        n = self.config.action_dim
        out = self.generate(input_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            pad_token_id=0, **kwargs)
        ids = out[0, -n:].cpu().numpy()
        disc = np.clip(self.vocab_size - ids - 1, 0, N_BINS - 2)
        return self.bin_centers[disc]


def _cache_len(cache):
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) and len(cache[0]) else 0


def build(seed=0, fused=False, n_layers=4, attn="sdpa", remote_code_prepare=False):
    """remote_code_prepare: keep OpenVLA's ``past_key_values is not None`` test (breaks generate on
    transformers >= 4.50); False tests the cache length instead (works everywhere)."""
    torch.manual_seed(seed)
    cfg = TinyOpenVLAConfig(use_fused_vision_backbone=fused, n_layers=n_layers)
    cfg.remote_code_prepare = remote_code_prepare
    cfg._attn_implementation = attn
    cfg.text_config._attn_implementation = attn
    model = OpenVLAForActionPrediction(cfg).eval()
    return model


def inputs(seed=0, batch=1, fused=False, prompt_len=6, images=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TEXT_VOCAB, (batch, prompt_len), generator=g)
    ids[:, 0] = 1
    ch = (6 if fused else 3) * images
    pix = torch.randn(batch, ch, 32, 32, generator=g)
    return ids, pix
