"""A tiny LLaDA-structured masked diffusion LM and its synthetic arithmetic task.

The model mirrors the module and attribute layout of LLaDA's remote code (``LLaDAModelLM`` ->
``.model`` (``LLaDAModel``) -> ``.transformer`` with ``wte``, ``emb_drop``, ``blocks``, ``ln_f``,
``ff_out``; blocks with ``attn_norm``, ``q_proj``, ``k_proj``, ``v_proj``, ``rotary_emb``,
``attn_out``, ``ff_norm``, ``ff_proj``, ``up_proj``, ``act``, ``ff_out``; RoPE tables from
``rotary_emb.get_rotary_embedding``), so the LLaDA integration serves it and the real model alike.
It is written from scratch for vprune; only the names follow LLaDA.

Task ("count from a to b"): the prompt gives a start ``a`` (3 digits), a step ``s`` and a bound
``b`` (3 digits), optionally preceded by 0-8 distractor letters (so prompts in a batch have
different lengths and get left padding). The answer lists ``a, a+s, a+2s, ...`` while ``<= b`` as
zero-padded 3-digit numbers each followed by ``,`` (4 tokens per number), then ``<eos>`` up to the
generation length. Answers are 64-224 tokens long, so a 64-mask window matters, and every answer
is checked exactly. The shipped model is trained with step 1 (``MAX_STEP``): a tiny model trained
for minutes on one CPU thread learns counting with carries but not general steps.

Tokens: ``<pad>`` 0, ``<mask>`` 1, ``<bos>`` 2, ``<eos>`` 3, ``<ans>`` 4, ``+`` 5, ``<`` 6, ``,`` 7,
digits ``0``-``9`` 8-17, letters ``a``-``h`` 18-25.
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "dlm_testbed.safetensors")
CONFIG = os.path.join(HERE, "dlm_testbed.json")

# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------
SPECIALS = ["<pad>", "<mask>", "<bos>", "<eos>", "<ans>", "+", "<", ","]
VOCAB: List[str] = SPECIALS + [str(d) for d in range(10)] + list("abcdefgh")
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}
PAD_ID, MASK_ID, BOS_ID, EOS_ID, ANS_ID = 0, 1, 2, 3, 4
GEN_LENGTH = 256  # generation length the testbed is trained and evaluated at


def encode(tokens: Sequence[str]) -> List[int]:
    return [TOKEN_ID[t] for t in tokens]


def decode(ids: Sequence[int]) -> str:
    return " ".join(VOCAB[i] for i in ids)


@dataclass(frozen=True)
class Problem:
    start: int
    step: int
    bound: int
    prefix: str = ""

    def prompt_ids(self) -> List[int]:
        toks = ["<bos>"] + list(self.prefix) + list(f"{self.start:03d}") + ["+", str(self.step), "<"]
        toks += list(f"{self.bound:03d}") + ["<ans>"]
        return encode(toks)

    def answer_ids(self) -> List[int]:
        out: List[str] = []
        v = self.start
        while v <= self.bound:
            out += list(f"{v:03d}") + [","]
            v += self.step
        return encode(out)

    def target(self, gen_length: int = GEN_LENGTH) -> List[int]:
        ans = self.answer_ids()
        if len(ans) >= gen_length:
            raise ValueError(f"answer of {len(ans)} tokens does not fit gen_length={gen_length}")
        return ans + [EOS_ID] * (gen_length - len(ans))


MAX_STEP = 1  # steps are drawn from 1..MAX_STEP


def sample_problem(rng: random.Random, min_numbers: int = 16, max_numbers: int = 56,
                   max_step: int = MAX_STEP) -> Problem:
    """A random problem whose answer has ``min_numbers``..``max_numbers`` numbers (4 tokens each)."""
    step = rng.randint(1, max_step)
    count = rng.randint(min_numbers, max_numbers)
    hi = 999 - (count - 1) * step
    start = rng.randint(0, max(0, hi))
    last = start + (count - 1) * step
    bound = min(999, last + rng.randint(0, step - 1))
    prefix = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(0, 8)))
    return Problem(start, step, bound, prefix)


def make_problems(n: int, seed: int) -> List[Problem]:
    rng = random.Random(seed)
    return [sample_problem(rng) for _ in range(n)]


def left_pad(prompts: Sequence[Sequence[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists: ``input_ids`` [B, P] and ``attention_mask`` [B, P] (1 = real token)."""
    p = max(len(x) for x in prompts)
    ids = torch.full((len(prompts), p), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), p), dtype=torch.long)
    for i, x in enumerate(prompts):
        ids[i, p - len(x):] = torch.tensor(list(x), dtype=torch.long)
        mask[i, p - len(x):] = 1
    return ids, mask


def exact_match(generated: torch.Tensor, problems: Sequence[Problem]) -> List[bool]:
    """``generated`` [B, G] (the generated part only) against each problem's padded target."""
    g = generated.shape[1]
    return [generated[i].tolist() == p.target(g) for i, p in enumerate(problems)]


# ---------------------------------------------------------------------------------------------
# LLaDA-structured model
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """The fields of LLaDA's ``ModelConfig`` that this testbed (and the integration) uses."""

    d_model: int = 96
    n_heads: int = 4
    n_kv_heads: Optional[int] = None
    n_layers: int = 3
    mlp_hidden_size: int = 256
    vocab_size: int = len(VOCAB)
    embedding_size: Optional[int] = None
    max_sequence_length: int = 512
    rope: bool = True
    rope_theta: float = 10000.0
    rope_full_precision: bool = True
    input_emb_norm: bool = False
    weight_tying: bool = False
    scale_logits: bool = False
    include_bias: bool = False
    rms_norm_eps: float = 1e-5
    attention_layer_norm: bool = False
    mask_token_id: int = MASK_ID
    block_type: str = "llama"

    @property
    def effective_n_kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)


class RMSLayerNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class RotaryEmbedding(nn.Module):
    """RoPE with LLaDA's interface: ``get_rotary_embedding(seq_len, device)`` -> (sin, cos) of
    shape [1, 1, seq_len, head_dim]; ``forward(q, k)`` rotates q [B,H,Tq,D] at the last Tq of the Tk
    positions and k [B,KVH,Tk,D] at positions 0..Tk-1."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self._table: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def get_rotary_embedding(self, seq_len: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        t = self._table
        if t is not None and t[0].shape[-2] >= seq_len and t[0].device == torch.device(device):
            return t[0][:, :, :seq_len], t[1][:, :, :seq_len]
        dim = self.config.d_model // self.config.n_heads
        n = max(seq_len, self.config.max_sequence_length)
        inv = 1.0 / (self.config.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float) / dim))
        ang = torch.outer(torch.arange(n, device=device, dtype=torch.float), inv)
        ang = torch.cat((ang, ang), dim=-1)
        self._table = (ang.sin()[None, None], ang.cos()[None, None])
        return self._table[0][:, :, :seq_len], self._table[1][:, :, :seq_len]

    @staticmethod
    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def apply_rotary_pos_emb(self, pos_sin: torch.Tensor, pos_cos: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ((t * pos_cos) + (self.rotate_half(t) * pos_sin)).to(t.dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        q_, k_ = (q.float(), k.float()) if self.config.rope_full_precision else (q, k)
        tq, tk = q_.shape[-2], k_.shape[-2]
        sin, cos = self.get_rotary_embedding(tk, q_.device)
        sin, cos = sin.type_as(q_), cos.type_as(q_)
        q_ = self.apply_rotary_pos_emb(sin[:, :, tk - tq:tk], cos[:, :, tk - tq:tk], q_)
        k_ = self.apply_rotary_pos_emb(sin, cos, k_)
        return q_.type_as(q), k_.type_as(k)


class SiLU(nn.SiLU):
    pass


class LLaDALlamaBlock(nn.Module):
    def __init__(self, layer_id: int, config: ModelConfig):
        super().__init__()
        self.layer_id = layer_id
        self.config = config
        d, h = config.d_model, config.mlp_hidden_size
        kv = (d // config.n_heads) * config.effective_n_kv_heads
        bias = config.include_bias
        self.dropout = nn.Dropout(0.0)
        self.k_norm = None
        self.q_norm = None
        self.act = SiLU()
        self.attn_out = nn.Linear(d, d, bias=bias)
        self.ff_out = nn.Linear(h, d, bias=bias)
        self.rotary_emb = RotaryEmbedding(config)
        self.attn_norm = RMSLayerNorm(d, config.rms_norm_eps)
        self.ff_norm = RMSLayerNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, kv, bias=bias)
        self.v_proj = nn.Linear(d, kv, bias=bias)
        self.ff_proj = nn.Linear(d, h, bias=bias)
        self.up_proj = nn.Linear(d, h, bias=bias)

    def attention(self, q, k, v, attention_bias=None):
        b, t, c = q.shape
        nh, nkv = self.config.n_heads, self.config.effective_n_kv_heads
        hd = c // nh
        q = q.view(b, t, nh, hd).transpose(1, 2)
        k = k.view(b, t, nkv, hd).transpose(1, 2)
        v = v.view(b, t, nkv, hd).transpose(1, 2)
        q, k = self.rotary_emb(q, k)
        if nh != nkv:
            k = k.repeat_interleave(nh // nkv, dim=1, output_size=nh)
            v = v.repeat_interleave(nh // nkv, dim=1, output_size=nh)
        mask = None if attention_bias is None else attention_bias.to(q.dtype)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        return self.attn_out(att.transpose(1, 2).reshape(b, t, c))

    def forward(self, x, attention_bias=None):
        h = self.attn_norm(x)
        x = x + self.dropout(self.attention(self.q_proj(h), self.k_proj(h), self.v_proj(h), attention_bias))
        h = self.ff_norm(x)
        a = self.act(self.ff_proj(h)) * self.up_proj(h)
        return x + self.dropout(self.ff_out(a))


class LLaDAModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        n_emb = config.embedding_size or config.vocab_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(n_emb, config.d_model),
            emb_drop=nn.Dropout(0.0),
            ln_f=RMSLayerNorm(config.d_model, config.rms_norm_eps),
            blocks=nn.ModuleList([LLaDALlamaBlock(i, config) for i in range(config.n_layers)]),
        ))
        if not config.weight_tying:
            self.transformer.update({"ff_out": nn.Linear(config.d_model, n_emb, bias=config.include_bias)})

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        cfg = self.config
        x = self.transformer.wte(input_ids)
        if cfg.input_emb_norm:
            x = x * (cfg.d_model ** 0.5)
        x = self.transformer.emb_drop(x)
        bias = None
        if attention_mask is not None and bool((attention_mask == 0).any()):
            m = attention_mask.to(torch.float).view(x.shape[0], -1)[:, None, None, :]
            bias = (1.0 - m) * torch.finfo(m.dtype).min
        for block in self.transformer.blocks:
            x = block(x, attention_bias=bias)
        x = self.transformer.ln_f(x)
        if cfg.weight_tying:
            logits = F.linear(x, self.transformer.wte.weight, None)
        else:
            logits = self.transformer.ff_out(x)
        if cfg.scale_logits:
            logits = logits * (1.0 / math.sqrt(cfg.d_model))
        return logits


@dataclass
class LLaDAOutput:
    logits: torch.Tensor


class LLaDAModelLM(nn.Module):
    """``model(input_ids, attention_mask=None).logits`` -> [B, T, vocab], bidirectional attention."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LLaDAModel(config)

    @property
    def device(self) -> torch.device:
        return self.model.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.transformer.wte.weight.dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **_: object) -> LLaDAOutput:
        return LLaDAOutput(logits=self.model(input_ids, attention_mask=attention_mask))


def tiny_llada(seed: int = 0, **overrides: object) -> LLaDAModelLM:
    """A randomly initialised tiny LLaDA-structured model (for tests)."""
    fields = dict(d_model=32, n_heads=4, n_layers=2, mlp_hidden_size=64, vocab_size=40, max_sequence_length=256)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = LLaDAModelLM(ModelConfig(**fields))  # type: ignore[arg-type]
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model.eval()


def load_testbed_dlm(device: str = "cpu") -> LLaDAModelLM:
    """The shipped trained testbed (``dlm_testbed.safetensors``), in eval mode."""
    from safetensors.torch import load_file

    if not os.path.exists(WEIGHTS):
        raise FileNotFoundError(f"{WEIGHTS} is missing: run `python -m vprune.testbed.train_dlm` to train it")
    with open(CONFIG) as f:
        cfg = ModelConfig(**json.load(f))
    model = LLaDAModelLM(cfg)
    model.load_state_dict(load_file(WEIGHTS))
    return model.to(device).eval()
