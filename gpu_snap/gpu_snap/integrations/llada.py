"""LLaDA (masked diffusion LM, LLaMA-like blocks, bidirectional attention) -> Window-Diffusion.

Host: ``LLaDAModelLM`` as loaded with ``AutoModel.from_pretrained("GSAI-ML/LLaDA-8B-Instruct",
trust_remote_code=True)`` (remote ``modeling_llada.py``): ``model.model.transformer`` holds ``wte``,
``emb_drop``, ``ln_f``, ``ff_out`` and ``blocks`` (or ``block_groups``) of ``LLaDALlamaBlock`` with
``attn_norm``, ``q_proj``, ``k_proj``, ``v_proj``, ``rotary_emb``, ``attn_out``, ``ff_norm``,
``ff_proj``, ``up_proj``, ``act``, ``ff_out``; mask token 126336.

Tested on: the vprune testbed replica of that layout (``vprune.testbed.dlm``, torch 2.14,
transformers 5.x) and a random-weight LLaDA-8B-shaped instance of it (``vprune bench dlm``). The
real remote code was read, not run (no downloads here): the structural check below names what the
integration relies on.

How it patches: the class is swapped to a visible ``VPruneLLaDAModelLM`` (its forward is the
host's, unchanged); ``vprune.generate(model, input_ids, attention_mask=None, gen_length=...)`` runs
the windowed sampler (``window=False``: the vanilla sampler under the same interface). Refresh
steps call the host's own forward and read each layer's post-RoPE K (output of ``rotary_emb``) and V
(output of ``v_proj``) through forward hooks that exist only during that call; cheap steps run the
host's submodules on the query tokens only (``LLaDAEngine.window_forward``).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from vprune.config import TechniqueConfig, WindowDiffusion
from vprune.errors import IncompatibleModelError
from vprune.integrations.registry import Integration
from vprune.undo import vprune_subclass
from vprune import window as W

LLADA_MASK_ID = 126336
_BLOCK_ATTRS = ("attn_norm", "q_proj", "k_proj", "v_proj", "rotary_emb", "attn_out", "ff_norm", "ff_proj",
                "up_proj", "act", "ff_out")
_CONFIG_ATTRS = ("d_model", "n_heads", "effective_n_kv_heads", "rope")


def _blocks(model: Any) -> List[Any]:
    tr = model.model.transformer
    if "blocks" in tr:
        return list(tr.blocks)
    return [b for group in tr.block_groups for b in group]


def structure_problems(model: Any) -> List[str]:
    """What the integration needs but ``model`` lacks (empty when compatible)."""
    missing: List[str] = []
    llada = getattr(model, "model", None)
    tr = getattr(llada, "transformer", None)
    cfg = getattr(llada, "config", None)
    if tr is None:
        return ["model.model.transformer"]
    for name in ("wte", "ln_f"):
        if name not in tr:
            missing.append(f"model.model.transformer.{name}")
    if "blocks" not in tr and "block_groups" not in tr:
        missing.append("model.model.transformer.blocks (or block_groups)")
        return missing
    for a in _CONFIG_ATTRS:
        if not hasattr(cfg, a):
            missing.append(f"model.model.config.{a}")
    if cfg is not None and hasattr(cfg, "rope") and not cfg.rope:
        missing.append("model.model.config.rope=True (RoPE positions)")
    if cfg is not None and not getattr(cfg, "weight_tying", False) and "ff_out" not in tr:
        missing.append("model.model.transformer.ff_out")
    blocks = _blocks(model)
    if not blocks:
        missing.append("at least one transformer block")
    for i, blk in enumerate(blocks):
        for a in _BLOCK_ATTRS:
            if not hasattr(blk, a):
                missing.append(f"block {i}.{a}")
        rot = getattr(blk, "rotary_emb", None)
        if rot is not None and not (hasattr(rot, "get_rotary_embedding") and hasattr(rot, "apply_rotary_pos_emb")):
            missing.append(f"block {i}.rotary_emb.get_rotary_embedding / apply_rotary_pos_emb")
        if missing:
            break
    return missing


class LLaDAEngine:
    """The sampler's view of a LLaDA model (``vprune.window.DiffusionEngine``)."""

    logits_shift = 0
    padding_aware_positions = False  # LLaDA's RoPE uses the sequence index, pads included

    def __init__(self, model: Any):
        self.model = model
        self.cfg = model.model.config
        self.tr = model.model.transformer
        self.blocks = _blocks(model)
        self.n_layers = len(self.blocks)
        self.n_heads = self.cfg.n_heads
        self.n_kv_heads = self.cfg.effective_n_kv_heads
        self.head_dim = self.cfg.d_model // self.cfg.n_heads
        self.dtype = self.tr.wte.weight.dtype
        self._rope: Optional[tuple] = None

    # -- refresh / vanilla: the host's own forward -----------------------------------------------
    def full_forward(self, tokens: torch.Tensor, key_valid: Optional[torch.Tensor],
                     cache: Optional[W.WindowKVCache], positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        am = None if key_valid is None else key_valid.long()
        if cache is None:
            return self.model(input_ids=tokens, attention_mask=am).logits
        handles = []
        pending: Dict[int, torch.Tensor] = {}
        b, t = tokens.shape

        def v_hook(i):
            def hook(_m, _inp, out):
                pending[i] = out
            return hook

        def rope_hook(i):
            def hook(_m, _inp, out):
                k = out[1]
                v = pending.pop(i).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
                cache.store(i, k, v)
            return hook

        try:
            for i, blk in enumerate(self.blocks):
                handles.append(blk.v_proj.register_forward_hook(v_hook(i)))
                handles.append(blk.rotary_emb.register_forward_hook(rope_hook(i)))
            return self.model(input_ids=tokens, attention_mask=am).logits
        finally:
            for h in handles:
                h.remove()

    # -- cheap steps: host submodules on the query tokens only -----------------------------------
    def _rope_rows(self, rope_pos: torch.Tensor, length: int):
        if self._rope is None or self._rope[0].shape[0] < length or self._rope[0].device != rope_pos.device:
            sin, cos = self.blocks[0].rotary_emb.get_rotary_embedding(length, rope_pos.device)
            self._rope = (sin[0, 0].contiguous(), cos[0, 0].contiguous())
        sin, cos = self._rope
        return sin[rope_pos][:, None], cos[rope_pos][:, None]  # [B, 1, Q, D]

    def window_forward(self, tokens: torch.Tensor, rope_pos: torch.Tensor, write_idx: torch.Tensor,
                       key_mask: torch.Tensor, cache: W.WindowKVCache) -> torch.Tensor:
        cfg, tr = self.cfg, self.tr
        b, q_n = tokens.shape
        x = tr.wte(tokens)
        if getattr(cfg, "input_emb_norm", False):
            x = x * (cfg.d_model ** 0.5)
        x = tr.emb_drop(x)
        sin, cos = self._rope_rows(rope_pos, cache.length)
        full_prec = getattr(cfg, "rope_full_precision", True)
        for i, blk in enumerate(self.blocks):
            h = blk.attn_norm(x)
            q, k, v = blk.q_proj(h), blk.k_proj(h), blk.v_proj(h)
            if getattr(blk, "q_norm", None) is not None and getattr(blk, "k_norm", None) is not None:
                q, k = blk.q_norm(q).to(k.dtype), blk.k_norm(k).to(k.dtype)
            q = q.view(b, q_n, self.n_heads, self.head_dim).transpose(1, 2)
            k = k.view(b, q_n, self.n_kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(b, q_n, self.n_kv_heads, self.head_dim).transpose(1, 2)
            rot = blk.rotary_emb
            q_, k_ = (q.float(), k.float()) if full_prec else (q, k)
            s_, c_ = sin.type_as(q_), cos.type_as(q_)
            q = rot.apply_rotary_pos_emb(s_, c_, q_).type_as(q)
            k = rot.apply_rotary_pos_emb(s_, c_, k_).type_as(k)
            att = cache.attend(i, q, k, v, write_idx, key_mask)
            att = att.transpose(1, 2).reshape(b, q_n, self.n_heads * self.head_dim)
            x = x + blk.dropout(blk.attn_out(att))
            h = blk.ff_norm(x)
            a = blk.act(blk.ff_proj(h)) * blk.up_proj(h)
            x = x + blk.dropout(blk.ff_out(a))
        x = tr.ln_f(x)
        if getattr(cfg, "weight_tying", False):
            logits = F.linear(x, tr.wte.weight, None)
        else:
            logits = tr.ff_out(x)
        if getattr(cfg, "scale_logits", False):
            logits = logits * (1.0 / math.sqrt(cfg.d_model))
        return logits


def mask_id_of(model: Any) -> int:
    for cfg in (getattr(model, "config", None), getattr(getattr(model, "model", None), "config", None)):
        mid = getattr(cfg, "mask_token_id", None)
        if isinstance(mid, int):
            return mid
    return LLADA_MASK_ID


def diffusion_generate(model: Any, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                       config: Optional[WindowDiffusion] = None, mask_id: Optional[int] = None,
                       **kwargs: Any) -> torch.Tensor:
    """Sample from any LLaDA-structured model, patched or not: ``config=None`` runs the vanilla
    sampler, a ``WindowDiffusion`` the windowed one. kwargs: gen_length, steps, block_length,
    temperature, remasking, threshold, generator, stats (and cuda_graph, key_bucket, trace for the
    windowed sampler). Returns [B, P + gen_length]."""
    problems = structure_problems(model)
    if problems:
        raise IncompatibleModelError(f"{type(model).__name__} lacks what the LLaDA sampler needs: {problems}")
    engine = LLaDAEngine(model)
    mid = mask_id_of(model) if mask_id is None else mask_id
    if config is None:
        for key in ("cuda_graph", "key_bucket", "trace", "workspace"):
            kwargs.pop(key, None)
        return W.generate_vanilla(engine, input_ids, attention_mask, mask_id=mid, **kwargs)
    return W.generate_window(engine, input_ids, attention_mask, mask_id=mid, config=config, **kwargs)


class LLaDAIntegration(Integration):
    name = "llada"
    techniques = ("window_diffusion",)
    tested_on = "vprune testbed replica of LLaDA remote code layout (torch 2.14); LLaDA-8B remote code read, not run"

    def check_structure(self, model: Any) -> None:
        problems = structure_problems(model)
        if problems:
            raise IncompatibleModelError(
                f"{type(model).__name__} matched the LLaDA integration by name but lacks: {problems}")

    def default_config(self, model: Any, **overrides: Any) -> TechniqueConfig:
        return WindowDiffusion(**overrides)

    def apply(self, model: Any, config: TechniqueConfig, state: Any) -> None:
        cls = vprune_subclass(type(model), {}, tag="llada")
        state.undo.swap_class(model, cls)
        n = len(_blocks(model))
        state.targets = [f"{n} LLaDA blocks (cheap steps: q/k/v/attn_out/ff of query tokens only)"]
        state.runtime = {}

    def reset(self, model: Any, state: Any) -> None:
        state.last = None
        state.runtime.clear()  # drop the cached K/V buffers and CUDA graphs

    def stats(self, model: Any, state: Any) -> Dict[str, Any]:
        return dict(state.last or {})

    def generate(self, model: Any, state: Any, input_ids: torch.Tensor,
                 attention_mask: Optional[torch.Tensor] = None, *, window: bool = True, **kwargs: Any) -> torch.Tensor:
        """``vprune.generate(model, input_ids, attention_mask=None, gen_length=128, steps=None,
        block_length=None, temperature=0.0, remasking="low_confidence", threshold=None,
        mask_id=None, generator=None, window=True)`` -> [B, P + gen_length]."""
        st: Dict[str, Any] = kwargs.pop("stats", None)
        st = {} if st is None else st
        if window:
            kwargs.setdefault("workspace", state.runtime)  # K/V cache and CUDA graphs reused across calls
        out = diffusion_generate(model, input_ids, attention_mask, config=state.config if window else None,
                                 stats=st, **kwargs)
        state.calls += 1
        state.last = dict(st, sampler="window" if window else "vanilla")
        return out
