"""Version-dependent details of host libraries, in one place.

Integrations ask these functions instead of testing versions themselves. Tested on transformers 4.40.1
(OpenVLA's pinned version, with timm 0.9.16) and transformers 5.24 (timm 1.0). Importing this module
imports nothing from a host library until a function needs it.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Optional, Sequence, Tuple

import torch


def _version_tuple(text: str) -> Tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        m = re.match(r"\d+", piece)
        parts.append(int(m.group(0)) if m else 0)
    return tuple(parts)


def transformers_version() -> Tuple[int, ...]:
    """The installed transformers version as a tuple, (0,) when it is not installed."""
    try:
        import transformers
    except ImportError:
        return (0,)
    return _version_tuple(transformers.__version__)


def transformers_version_str() -> str:
    try:
        import transformers
    except ImportError:
        return "not installed"
    return transformers.__version__


# ----------------------------------------------------------------------------- decoder-layer calls
# Names of the cache keyword a Llama-style decoder layer / attention receives:
#   4.40.1: past_key_value;  4.4x..5.2x: past_key_values;  5.24+: cache.
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


def layer_cache(kwargs: Dict[str, Any]) -> Any:
    """The KV cache object passed to a decoder layer or attention module (None if there is none)."""
    for name in _CACHE_KWARGS:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None


def layer_hidden(args: tuple, kwargs: Dict[str, Any]) -> torch.Tensor:
    """The hidden states a decoder layer / attention module was called with (positional or keyword)."""
    if args:
        return args[0]
    return kwargs["hidden_states"]


def with_layer_hidden(args: tuple, kwargs: Dict[str, Any], hidden: torch.Tensor) -> Tuple[tuple, Dict[str, Any]]:
    """(args, kwargs) with the hidden states replaced (new containers; the caller's are not mutated)."""
    if args:
        return (hidden,) + tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = hidden
    return tuple(args), kwargs


def cache_seq_length(cache: Any) -> int:
    """Tokens already in ``cache`` (layer 0): 0 for None, an empty Cache object or an empty legacy tuple."""
    if cache is None:
        return 0
    if isinstance(cache, (tuple, list)):
        if len(cache) == 0 or cache[0] is None or len(cache[0]) == 0:
            return 0
        return int(cache[0][0].shape[-2])
    get = getattr(cache, "get_seq_length", None)
    if get is None:
        raise TypeError(f"unsupported KV cache type {type(cache).__name__}")
    return int(get())


def cache_layer_keys(cache: Any, layer_idx: int) -> Optional[torch.Tensor]:
    """Post-RoPE keys [B, Hkv, T, Dh] that ``cache`` holds for ``layer_idx`` (None if unavailable).

    transformers 4.40.1 ``DynamicCache`` keeps ``key_cache[i]``; 5.x keeps ``layers[i].keys``.
    """
    if cache is None:
        return None
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.56 / 5.x
        if layer_idx >= len(layers):
            return None
        keys = getattr(layers[layer_idx], "keys", None)
        return keys if isinstance(keys, torch.Tensor) and keys.numel() else None
    key_cache = getattr(cache, "key_cache", None)  # transformers 4.40 - 4.55
    if key_cache is not None:
        if layer_idx >= len(key_cache):
            return None
        keys = key_cache[layer_idx]
        return keys if isinstance(keys, torch.Tensor) and keys.numel() else None
    return None


# ------------------------------------------------------------------------------- attention pieces
def attention_geometry(attn: Any) -> Tuple[int, int, int, float]:
    """(query heads, key/value heads, head dim, softmax scale) of a Llama-style attention module."""
    cfg = getattr(attn, "config", None)
    n_heads = getattr(attn, "num_heads", None) or getattr(cfg, "num_attention_heads", None)
    n_kv = getattr(attn, "num_key_value_heads", None) or getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(attn, "head_dim", None)
    if n_heads is None or head_dim is None:
        raise AttributeError(f"{type(attn).__name__} has no num_heads/head_dim: not a Llama-style attention")
    scale = getattr(attn, "scaling", None)
    if scale is None:
        scale = head_dim ** -0.5
    return int(n_heads), int(n_kv), int(head_dim), float(scale)


def rope_cos_sin(attn: Any, hidden: torch.Tensor, kwargs: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, L, Dh] for the rows of ``hidden`` [B, L, D] as the attention module will use them.

    transformers >= 4.48 hands the attention ``position_embeddings=(cos, sin)``; 4.40.1 computes them
    inside the attention from ``position_ids`` with its own ``rotary_emb``.
    """
    pe = kwargs.get("position_embeddings")
    if pe is not None:
        return pe[0], pe[1]
    rotary = getattr(attn, "rotary_emb", None)
    position_ids = kwargs.get("position_ids")
    if rotary is None or position_ids is None:
        raise RuntimeError(
            f"cannot find RoPE inputs for {type(attn).__name__}: neither position_embeddings nor "
            f"rotary_emb + position_ids were passed (transformers {transformers_version_str()})")
    return rotary(hidden, position_ids)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotate-half RoPE: x [B, H, R, Dh], cos/sin [B, R, Dh] -> [B, H, R, Dh]."""
    cos = cos.unsqueeze(1).to(x.dtype)
    sin = sin.unsqueeze(1).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# ------------------------------------------------------------------------------- known host bugs
def generate_passes_empty_cache_first() -> bool:
    """True where ``generate()`` hands the model an empty cache *object* (not None) at the first step.

    From transformers 4.50 on, remote code written for 4.40 that tests ``past_key_values is not None``
    to detect a cached decode step (OpenVLA's ``prepare_inputs_for_generation``) takes its first
    generation step for a decode step and skips the vision tower.
    """
    return transformers_version() >= (4, 50)


# ------------------------------------------------------- attention implementations (transformers >= 4.48)
def attn_implementation(config: Any) -> Optional[str]:
    """The attention implementation a (text) config selects: 'sdpa', 'eager', 'flash_attention_2', ..."""
    return getattr(config, "_attn_implementation", None)


def set_attn_implementation(config: Any, name: str, undo: Any) -> None:
    """Point ``config`` at attention implementation ``name``, recorded in ``undo`` (an ``UndoLog``).

    transformers 4.4x..5.x keep the value in ``config._attn_implementation_internal`` behind a
    property; writing that attribute directly touches only this config (not the vision tower's) and
    restores exactly on undo. Models read it at every forward, so it works after loading.
    """
    if "_attn_implementation_internal" in getattr(config, "__dict__", {}) or hasattr(type(config), "_attn_implementation"):
        undo.set_attr(config, "_attn_implementation_internal", name)
    else:  # very old configs: a plain attribute
        undo.set_attr(config, "_attn_implementation", name)


def register_attention(name: str, attention_fn: Any, mask_fn: Any) -> None:
    """Register ``name`` in both ``AttentionInterface`` and ``AttentionMaskInterface``.

    Both are needed: with the attention name alone, ``create_causal_mask`` does not know the name and
    returns no mask, silently dropping padding (verified on 5.23).
    """
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(name, attention_fn)
    AttentionMaskInterface.register(name, mask_fn)


def unregister_attention(name: str) -> None:
    """Remove a name added by ``register_attention`` (a no-op where it is absent)."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)


_EAGER_BY_MODULE: Dict[str, Any] = {}


def stock_attention(base: str, attn_module: Any) -> Any:
    """The function transformers itself would call for ``base`` ('sdpa' or 'eager') in ``attn_module``.

    'eager' is the ``eager_attention_forward`` of the attention module's own modeling file (models
    differ in small ways), falling back to Llama's.
    """
    if base == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    if base == "eager":
        mod_name = type(attn_module).__module__
        fn = _EAGER_BY_MODULE.get(mod_name)
        if fn is None:
            import sys

            fn = getattr(sys.modules.get(mod_name), "eager_attention_forward", None)
            if fn is None:
                from transformers.models.llama.modeling_llama import eager_attention_forward as fn
            _EAGER_BY_MODULE[mod_name] = fn
        return fn
    raise ValueError(f"no stock attention function for {base!r}: allowed 'sdpa' or 'eager'")


def stock_mask_function(base: str) -> Any:
    """The ``AttentionMaskInterface`` entry transformers uses for ``base`` ('sdpa' or 'eager')."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS[base]


class QueryCapture:
    """Where a captured attention module leaves its last call's post-RoPE (query, keys): ``rows``
    (None once read); ``original``: the stock attention function the module computes with."""

    __slots__ = ("rows", "original")

    def __init__(self, original: Any) -> None:
        self.rows: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.original = original


CAPTURE_NAME = "vprune_query_capture"


def _capturing_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: Any, *args: Any, **kwargs: Any) -> Any:
    """The attention function of a captured module: keep (query, key), then compute exactly what the
    module's own implementation computes, with the same arguments."""
    sink = module.__dict__.get("_vprune_capture")
    if sink is None:  # a module given the capture config by someone else: plain SDPA
        return stock_attention("sdpa", module)(module, query, key, value, attention_mask, *args, **kwargs)
    sink.rows = (query, key)
    return sink.original(module, query, key, value, attention_mask, *args, **kwargs)


def capture_queries(attn: Any, undo: Any) -> Optional[QueryCapture]:
    """Make one attention module hand over its post-RoPE queries and keys at every call, recorded in
    ``undo``; None where this transformers or this module does not allow it (the caller recomputes).

    The module gets its own shallow copy of its config whose attention implementation is the
    registered ``CAPTURE_NAME``, which stores (query, key) on the returned ``QueryCapture`` and calls
    the stock 'sdpa' / 'eager' function the module used before with the same arguments: the layer
    computes the same bits, no other module changes (the model builds its masks from its own config).
    Needs transformers >= 4.48 (``AttentionInterface``) and a module whose class looks its attention
    function up there (its modeling file imports ``ALL_ATTENTION_FUNCTIONS``)."""
    import sys

    config = getattr(attn, "config", None)
    base = attn_implementation(config) if config is not None else None
    if base not in ("sdpa", "eager") or "config" not in getattr(attn, "__dict__", {}):
        return None
    if not hasattr(sys.modules.get(type(attn).__module__), "ALL_ATTENTION_FUNCTIONS"):
        return None  # transformers < 4.48, or a class that does not use the interface
    try:
        from transformers.modeling_utils import AttentionInterface
    except ImportError:
        return None
    import copy

    own = copy.copy(config)
    if "_attn_implementation_internal" in own.__dict__:
        object.__setattr__(own, "_attn_implementation_internal", CAPTURE_NAME)
    else:
        object.__setattr__(own, "_attn_implementation", CAPTURE_NAME)
    if attn_implementation(own) != CAPTURE_NAME or attn_implementation(config) != base:
        return None
    sink = QueryCapture(stock_attention(base, attn))
    if _CAPTURE_USERS[0] == 0:  # registered while some module uses it, removed with the last one
        AttentionInterface.register(CAPTURE_NAME, _capturing_attention)
    _CAPTURE_USERS[0] += 1
    undo.on_undo(_release_capture_name, "the query-capture attention name")
    undo.set_attr(attn, "_vprune_capture", sink)
    undo.set_attr(attn, "config", own)
    return sink


_CAPTURE_USERS = [0]  # modules handing over their queries, over every patched model


def _release_capture_name() -> None:
    from transformers.modeling_utils import AttentionInterface

    _CAPTURE_USERS[0] = max(0, _CAPTURE_USERS[0] - 1)
    if _CAPTURE_USERS[0] == 0:
        AttentionInterface._global_mapping.pop(CAPTURE_NAME, None)


def cache_graph_refusal(cache: Any, layer_ids: Sequence[int]) -> Optional[str]:
    """Why the user's cache cannot take a graph's K/V (None: it can). The graph body stands in for
    empty transformers ``DynamicLayer`` s (transformers >= 4.56 ``Cache.layers``), so those are the
    only layers accepted; a StaticCache, an offloading or quantised cache runs the layers eagerly."""
    if cache is None:
        return None
    if getattr(cache, "offloading", False):
        return "an offloading KV cache"
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        return f"a {type(cache).__name__} KV cache (not a transformers Cache with .layers)"
    for i in layer_ids:
        layer = layers[i] if i < len(layers) else None
        cls = type(layer) if layer is not None else getattr(cache, "layer_class_to_replicate", None)
        if cls is None or cls.__name__ != "DynamicLayer":
            return f"{getattr(cls, '__name__', cls)} cache layers (only DynamicLayer)"
        if layer is not None and layer.get_seq_length() != 0:
            return f"a KV cache whose layer {i} is not empty"
    return None


def outputs_being_recorded() -> bool:
    """True while transformers (>= 5) records per-layer outputs for ``output_hidden_states`` /
    ``output_attentions`` through hooks: the pass-through layers would record wrong values."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    try:
        return bool(_active_collector.get())
    except LookupError:
        return False
