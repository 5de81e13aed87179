"""Dream (Qwen2-based masked diffusion LM, logits shifted by one) -> Window-Diffusion.

Host: ``DreamModel`` as loaded with ``AutoModel.from_pretrained("Dream-org/Dream-v0-Instruct-7B",
trust_remote_code=True)`` (remote ``modeling_dream.py`` / ``generation_utils.py``): ``model.model``
holds ``embed_tokens``, ``layers`` (``self_attn`` with ``q_proj``/``k_proj``/``v_proj``/``o_proj``,
``mlp``, ``input_layernorm``, ``post_attention_layernorm``), ``norm`` and ``rotary_emb``
(``rotary_emb(x, position_ids) -> (cos, sin)``; older revisions keep one per ``self_attn``);
``model.lm_head``. The token at position p is predicted by logits row p-1; RoPE positions count
real tokens only (left pads do not shift them); mask token 151666.

Tested on: the vprune testbed replica of that layout (``vprune.testbed.dlm_dream``, torch 2.14).
The real remote code was read, not run (no downloads here).

How it patches: the class is swapped to ``VPruneDreamModel`` whose ``diffusion_generate`` (the
host's entry point, same arguments: ``inputs``, ``attention_mask``, ``max_new_tokens``, ``steps``,
``temperature``, ``alg``, ``return_dict_in_generate``) runs the windowed sampler with LLaDA's even
step schedule (``steps == max_new_tokens``: one token per step, as with Dream's). ``alg``:
``maskgit_plus`` (max probability), ``entropy``, ``topk_margin``, ``origin`` (random).
``top_p``/``top_k``/``alg_temp`` are not supported by the windowed sampler (clear error).
Refresh steps call the host's forward and read K/V through hooks on ``k_proj``/``v_proj`` (RoPE
applied to K in the hook with the host's cos/sin); cheap steps run the host's submodules on the
query tokens only (the active masks, their left neighbours, and the tokens decoded this phase).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from vprune.config import TechniqueConfig, WindowDiffusion
from vprune.errors import IncompatibleModelError
from vprune.integrations.registry import Integration
from vprune.undo import vprune_subclass
from vprune import window as W

DREAM_MASK_ID = 151666
_ALG = {"maskgit_plus": "low_confidence", "entropy": "entropy", "topk_margin": "margin", "origin": "random"}


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rotary(model: Any) -> Any:
    rot = getattr(model.model, "rotary_emb", None)
    return rot if rot is not None else model.model.layers[0].self_attn.rotary_emb


def structure_problems(model: Any) -> List[str]:
    missing: List[str] = []
    base = getattr(model, "model", None)
    for a in ("embed_tokens", "layers", "norm"):
        if not hasattr(base, a):
            missing.append(f"model.model.{a}")
    if not hasattr(model, "lm_head"):
        missing.append("model.lm_head")
    if missing:
        return missing
    if len(base.layers) == 0:
        return ["at least one decoder layer"]
    for i, layer in enumerate(base.layers):
        for a in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
            if not hasattr(layer, a):
                missing.append(f"layer {i}.{a}")
        att = getattr(layer, "self_attn", None)
        for a in ("q_proj", "k_proj", "v_proj", "o_proj", "num_heads", "head_dim", "num_key_value_heads"):
            if att is not None and not hasattr(att, a):
                missing.append(f"layer {i}.self_attn.{a}")
        if missing:
            return missing
    if getattr(base, "rotary_emb", None) is None and getattr(base.layers[0].self_attn, "rotary_emb", None) is None:
        missing.append("model.model.rotary_emb (or self_attn.rotary_emb)")
    return missing


class DreamEngine:
    """The sampler's view of a Dream model (``vprune.window.DiffusionEngine``)."""

    logits_shift = 1
    padding_aware_positions = True

    def __init__(self, model: Any):
        self.model = model
        self.layers = list(model.model.layers)
        att = self.layers[0].self_attn
        self.n_layers = len(self.layers)
        self.n_heads, self.n_kv_heads, self.head_dim = att.num_heads, att.num_key_value_heads, att.head_dim
        self.dtype = model.model.embed_tokens.weight.dtype
        self.rotary = _rotary(model)

    def _cos_sin(self, like: torch.Tensor, positions: torch.Tensor):
        cos, sin = self.rotary(like, positions)
        return cos[:, None].to(like.dtype), sin[:, None].to(like.dtype)  # [B, 1, T, D]

    def full_forward(self, tokens: torch.Tensor, key_valid: Optional[torch.Tensor],
                     cache: Optional[W.WindowKVCache], positions: torch.Tensor) -> torch.Tensor:
        am = None if key_valid is None else key_valid[:, None, None, :]
        pos = None if key_valid is None else positions
        if cache is None:
            return self.model(tokens, attention_mask=am, position_ids=pos).logits
        b, t = tokens.shape
        like = torch.zeros((), dtype=self.dtype, device=tokens.device)
        cos, sin = self._cos_sin(like, positions)
        pending: Dict[int, torch.Tensor] = {}
        handles = []

        def k_hook(i):
            def hook(_m, _inp, out):
                k = out.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
                pending[i] = (k * cos) + (_rotate_half(k) * sin)
            return hook

        def v_hook(i):
            def hook(_m, _inp, out):
                cache.store(i, pending.pop(i), out.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2))
            return hook

        try:
            for i, layer in enumerate(self.layers):
                handles.append(layer.self_attn.k_proj.register_forward_hook(k_hook(i)))
                handles.append(layer.self_attn.v_proj.register_forward_hook(v_hook(i)))
            return self.model(tokens, attention_mask=am, position_ids=pos).logits
        finally:
            for h in handles:
                h.remove()

    def window_forward(self, tokens: torch.Tensor, rope_pos: torch.Tensor, write_idx: torch.Tensor,
                       key_mask: torch.Tensor, cache: W.WindowKVCache) -> torch.Tensor:
        b, q_n = tokens.shape
        x = self.model.model.embed_tokens(tokens)
        cos, sin = self._cos_sin(x, rope_pos)
        for i, layer in enumerate(self.layers):
            att = layer.self_attn
            h = layer.input_layernorm(x)
            q = att.q_proj(h).view(b, q_n, self.n_heads, self.head_dim).transpose(1, 2)
            k = att.k_proj(h).view(b, q_n, self.n_kv_heads, self.head_dim).transpose(1, 2)
            v = att.v_proj(h).view(b, q_n, self.n_kv_heads, self.head_dim).transpose(1, 2)
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
            o = cache.attend(i, q, k, v, write_idx, key_mask)
            x = x + att.o_proj(o.transpose(1, 2).reshape(b, q_n, self.n_heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.lm_head(self.model.model.norm(x))


def mask_id_of(model: Any) -> int:
    mid = getattr(getattr(model, "config", None), "mask_token_id", None)
    return mid if isinstance(mid, int) else DREAM_MASK_ID


def diffusion_generate(model: Any, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                       config: Optional[WindowDiffusion] = None, mask_id: Optional[int] = None,
                       **kwargs: Any) -> torch.Tensor:
    """Sample from a Dream-structured model with vprune's samplers (``config=None``: vanilla).
    kwargs as ``vprune.window.generate_window``. Returns [B, P + gen_length]."""
    problems = structure_problems(model)
    if problems:
        raise IncompatibleModelError(f"{type(model).__name__} lacks what the Dream sampler needs: {problems}")
    engine = DreamEngine(model)
    mid = mask_id_of(model) if mask_id is None else mask_id
    if config is None:
        for key in ("cuda_graph", "key_bucket", "trace", "workspace"):
            kwargs.pop(key, None)
        return W.generate_vanilla(engine, input_ids, attention_mask, mask_id=mid, **kwargs)
    return W.generate_window(engine, input_ids, attention_mask, mask_id=mid, config=config, **kwargs)


class _DreamOutput:
    def __init__(self, sequences: torch.Tensor):
        self.sequences = sequences
        self.history = None


def _patched_diffusion_generate(self, inputs: Optional[torch.Tensor] = None, generation_config: Any = None,
                                **kwargs: Any):
    """Dream's ``diffusion_generate`` running vprune's windowed sampler (see the module docstring)."""
    state = self.__dict__["_vprune"]
    gc = generation_config

    def opt(name, default=None):
        if name in kwargs:
            return kwargs.pop(name)
        return getattr(gc, name, default) if gc is not None else default

    input_ids = inputs if inputs is not None else kwargs.pop("input_ids")
    attention_mask = kwargs.pop("attention_mask", None)
    max_new = opt("max_new_tokens")
    max_length = opt("max_length")
    if max_new is None:
        max_new = (max_length - input_ids.shape[1]) if max_length is not None else 512
    steps = opt("steps", max_new)
    temperature = opt("temperature", 0.0) or 0.0
    alg = opt("alg", "origin")
    top_p, top_k, alg_temp = opt("top_p"), opt("top_k"), opt("alg_temp")
    ret_dict = opt("return_dict_in_generate", False)
    if opt("output_history", False):
        raise NotImplementedError("vprune's windowed diffusion_generate does not record output_history")
    if top_p not in (None, 1.0) or top_k not in (None, 0) or alg_temp not in (None, 0.0):
        raise NotImplementedError(
            f"vprune's windowed diffusion_generate supports greedy or plain temperature sampling only: "
            f"top_p={top_p}, top_k={top_k}, alg_temp={alg_temp} (use None)")
    if alg not in _ALG:
        raise ValueError(f"alg={alg!r} is invalid: allowed one of {sorted(_ALG)}")
    extra = {k: kwargs.pop(k) for k in ("threshold", "block_length", "generator", "cuda_graph") if k in kwargs}
    st: Dict[str, Any] = {}
    out = diffusion_generate(self, input_ids, attention_mask, config=state.config, gen_length=int(max_new),
                             steps=int(steps), temperature=float(temperature), remasking=_ALG[alg], stats=st,
                             workspace=state.runtime, **extra)
    state.calls += 1
    state.last = dict(st, sampler="window")
    return _DreamOutput(out) if ret_dict else out


class DreamIntegration(Integration):
    name = "dream"
    techniques = ("window_diffusion",)
    tested_on = "vprune testbed replica of Dream remote code layout (torch 2.14); Dream-7B remote code read, not run"

    def check_structure(self, model: Any) -> None:
        problems = structure_problems(model)
        if problems:
            raise IncompatibleModelError(
                f"{type(model).__name__} matched the Dream integration by name but lacks: {problems}")

    def default_config(self, model: Any, **overrides: Any) -> TechniqueConfig:
        overrides.setdefault("window", 128)  # the Window-Diffusion paper's Dream setting
        return WindowDiffusion(**overrides)

    def apply(self, model: Any, config: TechniqueConfig, state: Any) -> None:
        cls = vprune_subclass(type(model), {"diffusion_generate": _patched_diffusion_generate}, tag="dream")
        state.undo.swap_class(model, cls)
        state.targets = [f"{len(model.model.layers)} Dream layers via diffusion_generate"]
        state.runtime = {}

    def reset(self, model: Any, state: Any) -> None:
        state.last = None
        state.runtime.clear()

    def stats(self, model: Any, state: Any) -> Dict[str, Any]:
        return dict(state.last or {})

    def generate(self, model: Any, state: Any, input_ids: torch.Tensor,
                 attention_mask: Optional[torch.Tensor] = None, *, window: bool = True, **kwargs: Any) -> torch.Tensor:
        """``vprune.generate(model, input_ids, attention_mask=None, gen_length=..., ...)`` as for LLaDA."""
        st: Dict[str, Any] = kwargs.pop("stats", None)
        st = {} if st is None else st
        if window:
            kwargs.setdefault("workspace", state.runtime)
        out = diffusion_generate(model, input_ids, attention_mask, config=state.config if window else None,
                                 stats=st, **kwargs)
        state.calls += 1
        state.last = dict(st, sampler="window" if window else "vanilla")
        return out
