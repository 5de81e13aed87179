"""A tiny Dream-structured (Qwen2-based) masked diffusion LM, random weights, for tests.

Mirrors the layout of Dream's remote code (``DreamModel`` -> ``.model`` (``DreamBaseModel``:
``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``) and ``.lm_head``; layers with
``self_attn`` (``q_proj``/``k_proj``/``v_proj`` with bias, ``o_proj``), ``mlp`` (``gate_proj``,
``up_proj``, ``down_proj``, ``act_fn``), ``input_layernorm``, ``post_attention_layernorm``), with
Dream's conventions: RoPE positions count real tokens only (left pads do not shift them), and the
logits are shifted by one (the token at position p is predicted from row p-1). Its own
``diffusion_generate`` is a minimal stand-in for Dream's (one token per step, ``maskgit_plus``
confidence, greedy), so that vprune's patched entry point can be compared with the host's.
Written from scratch for vprune; only the names follow Dream.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class DreamConfig:
    vocab_size: int = 48
    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    mask_token_id: int = 1
    pad_token_id: int = 0


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


class DreamRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class DreamRotaryEmbedding(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        dim = config.hidden_size // config.num_attention_heads
        inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class DreamMLP(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DreamSdpaAttention(nn.Module):
    def __init__(self, config: DreamConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None):
        b, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, t, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, t, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        rep = self.num_heads // self.num_key_value_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DreamDecoderLayer(nn.Module):
    def __init__(self, config: DreamConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DreamSdpaAttention(config, layer_idx)
        self.mlp = DreamMLP(config)
        self.input_layernorm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, attention_mask=None, position_embeddings=None):
        x = x + self.self_attn(self.input_layernorm(x), attention_mask, position_embeddings)
        return x + self.mlp(self.post_attention_layernorm(x))


class DreamBaseModel(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DreamDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = DreamRotaryEmbedding(config)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        x = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=x.device).expand(input_ids.shape[0], -1)
        pe = self.rotary_emb(x, position_ids)
        for layer in self.layers:
            x = layer(x, attention_mask, pe)
        return self.norm(x)


@dataclass
class MaskedLMOutput:
    logits: torch.Tensor


class DreamModel(nn.Module):
    """``model(input_ids, attention_mask=None, position_ids=None).logits`` (unshifted)."""

    def __init__(self, config: DreamConfig):
        super().__init__()
        self.config = config
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def device(self):
        return self.lm_head.weight.device

    def forward(self, input_ids, attention_mask=None, position_ids=None, **_):
        return MaskedLMOutput(self.lm_head(self.model(input_ids, attention_mask, position_ids)))

    @torch.no_grad()
    def diffusion_generate(self, inputs, attention_mask=None, max_new_tokens: int = 16, steps: Optional[int] = None,
                           temperature: float = 0.0, alg: str = "maskgit_plus", **_):
        """Minimal stand-in for Dream's sampler: one token per step, greedy, ``maskgit_plus``."""
        if steps not in (None, max_new_tokens) or temperature != 0.0 or alg != "maskgit_plus":
            raise NotImplementedError("the testbed's host sampler does steps == max_new_tokens, greedy, maskgit_plus")
        mid = self.config.mask_token_id
        b, p = inputs.shape
        x = torch.cat([inputs, torch.full((b, max_new_tokens), mid, dtype=inputs.dtype, device=inputs.device)], 1)
        masked = torch.zeros_like(x, dtype=torch.bool)
        masked[:, p:] = True
        am = None
        pos = None
        if attention_mask is not None and bool((attention_mask == 0).any()):
            full = F.pad(attention_mask, (0, max_new_tokens), value=1).bool()
            pos = (full.long().cumsum(-1) - 1).clamp(min=0)
            am = full[:, None, None, :]
        for _step in range(max_new_tokens):
            logits = self(x, am, pos).logits
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
            lf = logits.float()
            x0 = lf.argmax(-1)
            conf = torch.exp(lf.gather(-1, x0[..., None])[..., 0] - torch.logsumexp(lf, -1))
            conf = torch.where(masked, conf, torch.full_like(conf, -float("inf")))
            j = conf.argmax(1)
            rows = torch.arange(b)
            x[rows, j] = x0[rows, j]
            masked[rows, j] = False
        return x


def tiny_dream(seed: int = 0, **overrides) -> DreamModel:
    torch.manual_seed(seed)
    model = DreamModel(DreamConfig(**overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
            elif p.dim() == 1 and p.shape[0] != model.config.hidden_size:
                p.normal_(0.0, 0.1)  # biases
    return model.eval()
