"""Visual token pruning inside a transformers decoder-layer stack (FastV-style, at layer K).

Tested on transformers 5.24 and 5.17 (CPU, fp32/bf16/fp16; the whole test suite runs on both): the
difference that matters between them (the cache keyword ``cache`` vs ``past_key_values``) is read
through ``integrations._compat``.

What happens in a patched prefill (one call of the host model with visual tokens and an empty cache):

- layers 0..K-1 see every token. The text model runs under a registered attention implementation
  (``vprune_sdpa`` or ``vprune_eager``: one name in both ``AttentionInterface`` and
  ``AttentionMaskInterface``, set on the text config only) that delegates every call to the stock
  SDPA / eager function. At layer K-1 it first recomputes the softmax of only the query rows the
  strategy needs (FastV: each sequence's last real token; ``semantic``: every text row) against all
  keys, in fp32, heads averaged after repeating shared K/V heads (``vprune.scoring``). No attention
  weights are ever requested from the model.
- a forward pre-hook on layer K selects, per image, the ``config.budget(n_image)`` visual tokens to
  keep (``vprune.selection``: static k per image, ascending, ties to the lower index) and builds the
  kept index ``keep [B, L']`` (all text/padding tokens + kept visual tokens, original order).
- pre-hooks on every layer >= K replace (never mutate) the layer's inputs: hidden states (layer K
  only; later layers get layer K's pruned output), ``position_embeddings`` (cos/sin rows sliced, so
  kept tokens keep their original RoPE / mRoPE positions), ``position_ids`` and the 4-D attention
  mask rows. Mask columns are gathered in the attention function, where the key length is known:
  the layer's cache holds kept prompt tokens then everything after the prompt, so its columns are
  ``[keep, P, P+1, ...]`` of the unpruned mask (padded with masked columns up to a StaticCache's
  buffer length). The KV cache of layers >= K therefore holds L' prompt entries, not L.
- decode steps (non-empty cache) change nothing but those mask columns (eager, or SDPA with padding;
  SDPA without padding has no mask). ``generate`` tracks positions itself, so decoding continues
  after the unpruned length; the cache's ``get_seq_length()`` reads layer 0, which is unpruned.

Same count per row: rows of a batch must keep the same number of tokens. Each image gets its
budget; a row that would drop more tokens than another keeps extra tokens (its next best) so every
row drops the minimum over rows (a row without visual tokens means no row drops any: a warning says so).

Limits: attention implementations ``sdpa`` and ``eager`` only (FlashAttention's 2-D masks and
flex_attention's BlockMask are refused at patch time); sliding-window layers at or after K-1 are
refused; a plain forward of a patched model returns hidden states / logits of the pruned length
(``labels=`` cannot apply: the VLM integrations raise a clear error); visual tokens arriving with a non-empty cache (a second turn) are not
pruned (a warning says so). Beam search works: beams of one prompt share its keep set, so the
cache reordering between beams keeps the mask columns valid. A StaticCache costs one host sync per
step (reading its length); a DynamicCache none in decode. A prefill syncs once, before the vision
tower: one device->host copy of the input ids and padding mask (``host_copies``); the plan (visual
mask, per-row groups and budgets, padding, score rows, index layouts) is made on the host with
NumPy / CPU tensors and reaches the device as views of one buffer in one non-blocking copy from
pinned memory (``to_device``). (On an H100 the former per-tensor planning made 9 syncs and left the
GPU idle ~2 ms.) It never syncs between layer 0 and the end of the forward: on a device, the NaN
check of the scores is recorded at layer K and raised by ``end_call``, once every layer has been
queued, so the host is never stalled in the middle of the stack (a mid-stack
sync leaves the GPU idle while the host launches the remaining layers; at batch 8 on LLaVA-7B that
was 25 ms of a 73 ms prefill).

CUDA graphs (``VisualPruning(cuda_graph=True)``, ``LLMPruner.install_graphs``): a pruned prefill of
a few hundred kept tokens is launch-bound in eager mode (LLaVA-7B, B=8, 128 kept tokens: ~1 ms of GPU
work per layer, with the GPU idle between kernels while the host launches them). With the option,
layer K's forward (an instance attribute, undone on unpatch) runs layers K..N-1 as one captured graph:

- inputs: layer K's rewritten inputs (pruned hidden states, cos/sin sliced to the kept rows, the 4-D
  mask with rows *and* kept columns gathered, position ids, plain flags) are copied into static
  buffers. The graph is keyed by their shapes, strides, dtypes, devices and flag values (batch,
  kept length, dtype, mask or not, cache or not, ...), captured on the key's first use (a warm-up on a
  side stream, then the capture) and replayed afterwards. At most ``MAX_GRAPHS`` per model, least
  recently used dropped first; all share one memory pool. ``vprune.reset`` keeps them (they hold no
  request state); unpatching frees them.
- KV cache: inside the graph the layers write into a private stand-in for the (empty) cache layers
  K..N-1, whose K/V tensors are graph outputs; after each replay they are written into the user's
  cache with its own ``update`` (a DynamicLayer concatenates: a copy), so the cache holds exactly what
  the eager path leaves and the decode steps, which stay eager, are unchanged. The hidden state
  returned is a copy too. ``use_cache=False`` runs the graph without a cache.
- layers K+1..N-1 then return the hidden state they get (they already ran inside the graph).
- calls the graph cannot take run eagerly with a one-time warning per reason: autograd enabled,
  training mode, ``output_hidden_states`` / ``output_attentions`` (recorded per layer), a cache other
  than empty ``DynamicLayer`` s (StaticCache, offloading, quantised), being inside another capture.
  Inputs on the CPU raise (``IncompatibleModelError``) when a prefill is planned, before any layer runs:
  the check is at call time because a model is often patched on the CPU and moved to CUDA after.
- memory per graph: its private K/V for one prefill, 2 * (N - K) * B * H_kv * L' * head_dim elements
  (LLaVA-7B, K=2, B=8, L'=128, bf16: ~0.5 GB), its static inputs, and the shared pool's temporaries.
- hooks on the layers K+1..N-1 themselves see the pass-through call; hooks inside the layers run only
  while a graph is captured.

Reuse (OpenVLA, other Llama-style stacks): build an ``LLMPruner`` with the text model's config, its
decoder layers and the strategy's row mode, ``install`` it with an undo log, and call
``begin_call(groups, ...)`` / ``end_call()`` around each host forward, where ``groups`` lists the
visual-token positions of each image of each row (``groups_from_mask`` / ``groups_from_ranges`` help;
give them and ``begin_call`` host tensors, e.g. from ``host_copies``: device tensors cost a sync each).
Version-dependent layer-input rewriting lives in ``LLMPruner.rewrite_layer_inputs`` and
``_compat``; a port to another transformers version overrides or extends those.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from vprune import scoring, selection
from vprune.nested import copy_into, map_tensors
from vprune.errors import IncompatibleModelError, MissingInputsError, VPruneWarning
from vprune.kernels import gather_rows, select_topk

from . import _compat
from ._transfer import PACK_ALIGN, _packed_copy, to_device  # noqa: F401 (tests patch them here)

SUPPORTED_ATTENTION = ("sdpa", "eager")
# strategy -> which query rows are scored at layer K-1 (None: no attention scores needed)
ROW_MODES = {"fastv": "last", "semantic": "text", "divprune": None, "random": None}
VLM_STRATEGIES = tuple(ROW_MODES)

ATTR_LINK = "_vprune_llm"  # attribute set (and undone) on each linked attention module




# Groups: per batch row, a list of images, each a sequence of token positions (ascending).
Groups = List[List[Sequence[int]]]


# ------------------------------------------------------------------------------ locating tokens
def groups_from_mask(is_visual: torch.Tensor, split: Optional[int] = None,
                     token_ids: Optional[torch.Tensor] = None) -> Groups:
    """Contiguous runs of visual tokens per row, as image groups (ranges).

    is_visual: bool [B, L]. split: if given, a run that is a multiple of ``split`` long is cut into
    chunks of ``split`` (several images placed back to back). token_ids: if given, a change of token
    id also starts a new group (e.g. Qwen's image pad followed directly by a video pad). Device
    tensors are copied to the host (one sync each): pass host copies (``host_copies``) to avoid that.
    Runs are found with array ops, not a Python loop over tokens (B=8 x 576 visual tokens: ~50 us).
    """
    vis = is_visual.detach().to("cpu", torch.bool).numpy()
    ids = token_ids.detach().to("cpu").numpy() if token_ids is not None else None
    out: Groups = [[] for _ in range(vis.shape[0])]
    for b, start, end in zip(*_visual_runs(vis, ids)):
        n = end - start
        if split and n > split and n % split == 0:
            out[b].extend(range(i, i + split) for i in range(start, end, split))
        else:
            out[b].append(range(start, end))
    return out


def _visual_runs(vis: np.ndarray, ids: Optional[np.ndarray]) -> Tuple[List[int], List[int], List[int]]:
    """(row, start, end) of every run of True in ``vis`` [B, L], row-major; ``end`` exclusive. A run
    also breaks where ``ids`` (if given) changes value between two visual tokens."""
    prev = np.zeros_like(vis)
    prev[:, 1:] = vis[:, :-1]
    starts = vis & ~prev
    if ids is not None:
        changed = np.zeros_like(vis)
        changed[:, 1:] = ids[:, 1:] != ids[:, :-1]
        starts |= vis & prev & changed
    breaks = np.ones_like(vis)  # the next token does not continue the run
    breaks[:, :-1] = starts[:, 1:] | ~vis[:, 1:]
    rows, first = np.divmod(np.flatnonzero(starts), vis.shape[1])  # 1-D scans: ~5x faster than 2-D nonzero
    last = np.flatnonzero(vis & breaks) % vis.shape[1]
    return rows.tolist(), first.tolist(), (last + 1).tolist()


def groups_from_ranges(batch: int, ranges: Sequence[Tuple[int, int]]) -> Groups:
    """The same image ranges ``[(start, end), ...]`` in every row (e.g. OpenVLA: patches after BOS)."""
    return [[range(s, e) for s, e in ranges] for _ in range(batch)]


# -------------------------------------------------------------------------------- tensor helpers
def gather_tokens(x: torch.Tensor, idx: torch.Tensor, token_dim: int, batch_dim: int) -> torch.Tensor:
    """Rows ``idx`` [B, k] of ``x`` along ``token_dim``, per batch element along ``batch_dim``.

    A batch dim of size 1 is broadcast to B first (e.g. cos/sin built from position_ids [1, L]).
    cos/sin [B, L, D]: (token -2, batch -3); mRoPE cos [3, B, L, D]: the same; masks [B, 1, Q, K]:
    rows (2, 0), columns (3, 0); position ids [B, L] or [3, B, L]: (-1, -2).
    """
    nd = x.dim()
    td, bd = token_dim % nd, batch_dim % nd
    b = idx.shape[0]
    if x.shape[bd] != b:
        if x.shape[bd] != 1:
            raise ValueError(f"gather_tokens: batch {x.shape[bd]} of a {tuple(x.shape)} tensor does not match {b}")
        shape = list(x.shape)
        shape[bd] = b
        x = x.expand(*shape)
    if bd == 0:
        return gather_rows(x, idx, dim=td)
    moved = x.movedim(bd, 0)
    new_td = td + 1 if td < bd else td
    return gather_rows(moved, idx, dim=new_td).movedim(0, bd)


def masked_value(mask: torch.Tensor):
    """The 'may not attend' value of a mask: False for bool, the dtype's minimum for float masks."""
    return False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min


def padding_from_mask(attention_mask: Any, seq_len: int) -> Optional[torch.Tensor]:
    """bool [B, L] on the CPU, False at padding, from the mask a prefill got (None: no padding).

    Accepts the usual 2-D mask (1 = real token), a prepared 4-D mask [B, 1, L, K] (bool True = may
    attend, or additive float 0 = may attend; the last query row of a prefill sees every real prompt
    token, in columns 0..L-1) or a dict of such masks (Qwen's per-layer-type mapping).
    """
    if attention_mask is None:
        return None
    if isinstance(attention_mask, dict):
        attention_mask = attention_mask.get("full_attention", next(iter(attention_mask.values()), None))
        if attention_mask is None:
            return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"cannot read padding from a {type(attention_mask).__name__} attention mask")
    m = attention_mask.detach()
    if m.dim() == 2:
        return m[:, -seq_len:].to("cpu").bool()
    if m.dim() == 4:
        row = m[:, 0, -1, :seq_len]
        return (row if row.dtype == torch.bool else row == 0).to("cpu")
    raise ValueError(f"attention_mask of shape {tuple(m.shape)}: expected [B, L] or [B, 1, L, K]")


# ------------------------------------------------------------------------ host <-> device copies
def host_copies(input_ids: torch.Tensor, attention_mask: Any = None) -> Tuple[torch.Tensor, Any]:
    """(input_ids, attention_mask) on the host, in one device->host copy (the one sync of a planned
    prefill: the GPU has nothing queued yet, so it costs the transfer alone).

    A 2-D integer / bool mask of the ids' shape and device travels stacked with the ids (as int64:
    exact for 0/1 and any integer); any other mask (float, 4-D, a dict) is returned as given, and
    ``padding_from_mask`` reads it later (a second copy, of its last row only). CPU tensors come back
    as they are.
    """
    ids = input_ids.detach()
    m = attention_mask
    if (isinstance(m, torch.Tensor) and m.shape == ids.shape and m.device == ids.device and ids.device.type != "cpu"
            and not m.dtype.is_floating_point and not m.dtype.is_complex):
        both = torch.stack([ids, m.detach().to(ids.dtype)]).cpu()
        return both[0], both[1].to(m.dtype)
    return ids.cpu(), m


# ------------------------------------------------------------------------------------ the plan
def _positions(images: List[Any], n: int) -> np.ndarray:
    """int64 [M, n] token positions of M images, each given as its first position (a run of n) or
    as a list of n positions."""
    if all(isinstance(p, int) for p in images):
        return np.add.outer(np.asarray(images, dtype=np.int64), np.arange(n, dtype=np.int64))
    return np.stack([np.arange(p, p + n, dtype=np.int64) if isinstance(p, int) else np.asarray(p, dtype=np.int64)
                     for p in images])


@dataclass
class _Bucket:
    """Images of one size n with one budget k, across the batch: selected in one kernel call."""

    n: int
    k: int
    rows: torch.Tensor  # int64 [M] batch row of each image
    positions: torch.Tensor  # int64 [M, n] token positions of each image


@dataclass
class PrefillPlan:
    """Everything decided on the host before a pruned prefill runs (one per call)."""

    batch: int
    seq_len: int
    keep_len: int  # L' = L - dropped, the same for every row
    dropped: int
    buckets: List[_Bucket]
    visual: torch.Tensor  # bool [B, L] visual-token mask
    groups: Groups
    budgets: List[List[int]]  # per row, per image: tokens kept
    requested: List[List[int]]  # per row, per image: config.budget(n) before equalising rows
    score_rows: Optional[torch.Tensor]  # int64 [B, R] query rows scored at layer K-1
    row_weights: Optional[torch.Tensor]  # [B, R] 1 for a real row, 0 for padding of the row list
    key_valid: Optional[torch.Tensor]  # bool [B, L] False at padding
    valid_len: List[int]  # real (non-padding) tokens per row
    host_buffer: Any = None  # the pinned buffer the device tensors were copied from (kept for the call)


@dataclass
class SequenceMap:
    """What the cache of layers >= K holds after a pruned prefill: prompt rows ``keep`` [B, L'] of an
    ``prompt_len``-token prompt, then every later token."""

    keep: torch.Tensor
    prompt_len: int


@dataclass
class CallScratch:
    """Per-call state, created by ``begin_call`` and dropped by ``end_call``."""

    plan: Optional[PrefillPlan] = None
    seq: Optional[SequenceMap] = None  # mapping used for mask columns at layers >= K in this call
    scores: Optional[torch.Tensor] = None  # fp32 [B, L] from layer K-1
    embeddings: Optional[torch.Tensor] = None  # layer-0 input [B, L, D] (divprune)
    keep: Optional[torch.Tensor] = None  # int64 [B, L'] set at layer K
    kept_visual: Optional[torch.Tensor] = None  # int64 [B, V'] kept visual positions
    memo: Dict[Any, Tuple[Any, Any]] = field(default_factory=dict)
    scored: bool = False
    pruned_layers: int = 0
    nan_rows: List[torch.Tensor] = field(default_factory=list)  # bool [B] per scored bucket (deferred check)
    graph: Optional[str] = None  # cuda_graph: 'captured', 'replayed' or 'eager: <why>'
    graph_out: Optional[torch.Tensor] = None  # the graph's final hidden state (layers > K pass it on)


# Devices whose NaN check of the scores waits for ``end_call`` (a host sync there costs nothing: the
# caller syncs on the output anyway). On the CPU there is no queue to stall, so it stays immediate.
DEFERRED_NAN_CHECK_DEVICES = ("cuda",)


def _link_of(module: Any) -> Optional[Tuple["LLMPruner", int]]:
    return module.__dict__.get(ATTR_LINK) if hasattr(module, "__dict__") else None


# ----------------------------------------------------------------- registered attention functions
_REGISTERED: Dict[str, int] = {}  # registered name -> number of installed pruners using it


def _make_attention(base: str) -> Callable:
    def vprune_attention(module, query, key, value, attention_mask, *args, **kwargs):
        link = _link_of(module)
        if link is not None:
            pruner, layer = link
            attention_mask = pruner.on_attention(layer, module, query, key, attention_mask, kwargs)
        return _compat.stock_attention(base, module)(module, query, key, value, attention_mask, *args, **kwargs)

    vprune_attention.__name__ = f"vprune_{base}_attention"
    return vprune_attention


def _acquire_attention_name(base: str) -> str:
    name = f"vprune_{base}"
    if _REGISTERED.get(name, 0) == 0:
        _compat.register_attention(name, _make_attention(base), _compat.stock_mask_function(base))
    _REGISTERED[name] = _REGISTERED.get(name, 0) + 1
    return name


def _release_attention_name(name: str) -> None:
    left = _REGISTERED.get(name, 0) - 1
    if left <= 0:
        _REGISTERED.pop(name, None)
        _compat.unregister_attention(name)
    else:
        _REGISTERED[name] = left


# ------------------------------------------------------------------ CUDA graphs of the pruned layers
#: Graphs one pruner keeps (least recently used dropped first). Each holds a private copy of the
#: pruned layers' K/V for one prefill: 2 * (N - K) * B * H_kv * L' * head_dim * dtype bytes (LLaVA-7B,
#: K=2, B=8, L'=128, bf16: 30 layers * 2 * 8.4 MB = 0.5 GB), plus its static inputs; the temporaries
#: of every graph of a pruner share one memory pool (about one layer's activations).
MAX_GRAPHS = 4

_CACHE_SLOT = object()  # where the user's cache sat in a layer's kwargs (the body passes its own)


class CudaGraphBackend:
    """Captures and replays the pruned layers' body (a seam: tests run the same bookkeeping on the
    CPU with ``NoCaptureBackend``). One memory pool per backend, i.e. per patched model."""

    def __init__(self) -> None:
        self.pool: Any = None

    def check_device(self, device: torch.device, host_name: str) -> None:
        """Raise a clear error unless the inputs are on CUDA (called when a prefill is planned)."""
        if torch.device(device).type != "cuda":
            raise IncompatibleModelError(
                f"{host_name}: VisualPruning(cuda_graph=True) runs the pruned decoder layers as a CUDA graph, "
                f"which needs CUDA tensors; this prefill's inputs are on {torch.device(device).type!r} (move the "
                f"model and inputs to a CUDA device, or patch with cuda_graph=False)")

    def usable(self) -> bool:
        """False inside someone else's capture (the layers then run eagerly into that capture)."""
        return not torch.cuda.is_current_stream_capturing()

    def capture(self, body: Callable[[], List[torch.Tensor]], device: torch.device) -> Tuple[Any, List[torch.Tensor]]:
        """Warm ``body`` up once on a side stream (lazy kernel / cuBLAS setup must not happen inside a
        capture), then record it on ``device``: -> (graph, its static output tensors). The capture
        itself runs nothing; the caller replays."""
        with torch.cuda.device(device):
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            main = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                body()
            main.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                outputs = body()
        return graph, outputs

    def replay(self, graph: Any, outputs: List[torch.Tensor]) -> None:
        """Run the recorded kernels on the current stream; they rewrite ``outputs`` in place."""
        graph.replay()


class NoCaptureBackend(CudaGraphBackend):
    """A CPU stand-in with the real backend's contract: ``capture`` runs the body once for its output
    tensors, ``replay`` runs the captured body again and copies the results into those tensors. The
    body is built once per graph, so it can only see a later call's inputs through the static buffers
    (what a real replay sees), and the caller must copy its results out as after a real replay."""

    def check_device(self, device: torch.device, host_name: str) -> None:
        return None

    def usable(self) -> bool:
        return True

    def capture(self, body: Callable[[], List[torch.Tensor]], device: torch.device) -> Tuple[Any, List[torch.Tensor]]:
        return body, body()

    def replay(self, graph: Any, outputs: List[torch.Tensor]) -> None:
        with torch.inference_mode():  # outputs captured under inference mode are inference tensors
            for static, new in zip(outputs, graph()):
                static.copy_(new)


class _PrivateCache:
    """Takes the place of the user's KV cache inside the graph body. The pruned layers of a prefill
    start from empty cache layers, so it returns what an empty transformers ``DynamicLayer`` returns
    (the concatenation of an empty tensor and the new K/V: the same op, so the attention sees the
    same tensors) and keeps those tensors as graph outputs, copied into the user's cache after each
    replay."""

    def __init__(self) -> None:
        self.kv: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        keys = torch.cat([key_states.new_empty(0), key_states], dim=-2)
        values = torch.cat([value_states.new_empty(0), value_states], dim=-2)
        self.kv[layer_idx] = (keys, values)
        return keys, values

    def outputs(self, layer_ids: Sequence[int]) -> List[torch.Tensor]:
        missing = [i for i in layer_ids if i not in self.kv]
        if missing:
            raise RuntimeError(f"decoder layers {missing} wrote no K/V while their prefill was captured")
        return [t for i in layer_ids for t in self.kv[i]]


@dataclass
class GraphEntry:
    """One captured graph: the static inputs its kernels read, the outputs they write."""

    graph: Any
    args: tuple  # static (hidden [B, L', D], ...)
    kwargs: Dict[str, Any]  # static tensors; the cache slot marked by _CACHE_SLOT
    outputs: List[torch.Tensor]  # [hidden out, K_K, V_K, K_K+1, ...]
    replays: int = 0


class _NotKeyable(Exception):
    """A layer argument a graph cannot be keyed on (the call then runs eagerly)."""


def graph_signature(x: Any) -> Any:
    """A hashable description of a layer argument: tensors by shape, strides, dtype and device, plain
    values by value, containers recursively. Raises _NotKeyable for anything else."""
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.stride(), x.dtype, str(x.device))
    if x is None or x is _CACHE_SLOT or isinstance(x, (bool, int, float, str)):
        return ("cache",) if x is _CACHE_SLOT else (type(x).__name__, x)
    if isinstance(x, (tuple, list)):
        return (type(x).__name__,) + tuple(graph_signature(v) for v in x)
    if isinstance(x, dict):
        return ("dict",) + tuple((k, graph_signature(v)) for k, v in sorted(x.items()))
    raise _NotKeyable(type(x).__name__)


def static_clone(x: Any) -> Any:
    """A copy of ``x`` whose tensors are fresh buffers (same shape, strides and values)."""
    return map_tensors(x, lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype,
                                                        device=t.device).copy_(t))


# ----------------------------------------------------------------------------------- the pruner
class LLMPruner:
    """Prunes visual tokens at decoder layer ``layer`` of a transformers text model.

    text_config: the config the text model and its attention modules read ``_attn_implementation``
        from (switched to a ``vprune_*`` name while installed).
    layers: the decoder layers, in order. attention_of: layer -> its attention module (``self_attn``).
    config: a resolved ``VisualPruning`` (layer, keep, strategy set).
    row_mode: which query rows score the tokens: "last" (FastV), "text" (every non-visual real row),
        "all" (every real row: the prefill-mean variant) or None (no attention scores).
    """

    def __init__(self, text_config: Any, layers: Sequence[torch.nn.Module], config: Any,
                 row_mode: Optional[str], attention_of: Callable[[torch.nn.Module], Any] = lambda l: l.self_attn,
                 host_name: str = "model") -> None:
        self.text_config = text_config
        self.layers = list(layers)
        self.config = config
        self.layer = int(config.layer)
        self.strategy = config.strategy
        self.row_mode = row_mode
        self.attention_of = attention_of
        self.host_name = host_name
        self.base_attention = _compat.attn_implementation(text_config)
        self.attention_name: Optional[str] = None
        self.seq: Optional[SequenceMap] = None
        self.call: Optional[CallScratch] = None
        self.last: Optional[Dict[str, Any]] = None
        self.calls = 0
        # cuda_graph (install_graphs): layers K..N-1 of a prefill as one captured graph per input signature
        self.graph_backend: Optional[CudaGraphBackend] = None
        self.graphs: "OrderedDict[Any, GraphEntry]" = OrderedDict()
        self.max_graphs = MAX_GRAPHS
        self.graphs_captured = 0
        self._forwards: Dict[int, Callable[..., Any]] = {}  # layer index -> its forward before the patch
        self._in_graph_body = False
        self._graph_warned: set = set()

    # ---------------------------------------------------------------------------------- install
    def check(self) -> None:
        """Raise IncompatibleModelError if this stack cannot be pruned as configured (nothing changes)."""
        n = len(self.layers)
        if not 1 <= self.layer <= n - 1:
            raise ValueError(f"VisualPruning.layer={self.layer} is invalid for {self.host_name} with {n} decoder "
                             f"layers: allowed an int in [1, {n - 1}]")
        impl = self.base_attention
        if impl not in SUPPORTED_ATTENTION:
            raise IncompatibleModelError(
                f"{self.host_name}: in-LLM visual pruning needs the language model's attention implementation to "
                f"be one of {list(SUPPORTED_ATTENTION)}, got {impl!r}; load the model with "
                f"attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa')) before patching")
        layer_types = getattr(self.text_config, "layer_types", None)
        if getattr(self.text_config, "use_sliding_window", False) and layer_types:
            bad = [i for i, t in enumerate(layer_types) if i >= self.layer - 1 and t != "full_attention"]
            if bad:
                raise IncompatibleModelError(
                    f"{self.host_name}: decoder layers {bad} use sliding-window attention, which in-LLM pruning "
                    f"does not support (allowed: full attention at layers >= {self.layer - 1})")
        for i, layer in enumerate(self.layers):
            attn = self.attention_of(layer)
            if attn is None:
                raise IncompatibleModelError(f"{self.host_name}: decoder layer {i} has no attention module")
            cfg = getattr(attn, "config", self.text_config)
            if cfg is not self.text_config and _compat.attn_implementation(cfg) != impl:
                raise IncompatibleModelError(
                    f"{self.host_name}: decoder layer {i} reads its attention implementation from another config")

    def install(self, undo: Any) -> None:
        """Switch the text config to the vprune attention name, link attention modules, add layer hooks.

        Every change goes through ``undo`` (an ``UndoLog``); undoing restores the model bit for bit.
        """
        self.check()
        self.install_attention(undo)
        self.install_layer_hooks(undo)
        if getattr(self.config, "cuda_graph", False):
            self.install_graphs(undo)

    def install_attention(self, undo: Any) -> None:
        """transformers >= 4.48: route the text model's attention through the registered ``vprune_*``
        function, which calls ``on_attention`` with post-RoPE q/k before the stock function. (An
        adapter for older versions calls ``on_attention`` from its own attention wrapper instead.)"""
        name = _acquire_attention_name(self.base_attention)
        self.attention_name = name
        undo.on_undo(lambda: _release_attention_name(name), f"attention name {name}")
        configs = {id(self.text_config): self.text_config}
        for layer in self.layers:
            cfg = getattr(self.attention_of(layer), "config", None)
            if cfg is not None:
                configs[id(cfg)] = cfg
        for cfg in configs.values():
            _compat.set_attn_implementation(cfg, name, undo)
        for i, layer in enumerate(self.layers):
            undo.set_attr(self.attention_of(layer), ATTR_LINK, (self, i))

    def install_layer_hooks(self, undo: Any) -> None:
        """Forward pre-hooks: layer 0 (divprune's embeddings) and every layer >= K (the pruned inputs)."""
        if self.strategy == "divprune":
            undo.add_hook(self.layers[0].register_forward_pre_hook(self._layer0_pre_hook, with_kwargs=True))
        for i in range(self.layer, len(self.layers)):
            undo.add_hook(self.layers[i].register_forward_pre_hook(self._make_layer_hook(i), with_kwargs=True))

    def install_graphs(self, undo: Any) -> None:
        """``cuda_graph``: give every layer >= K an instance-level ``forward`` (recorded in ``undo``).

        In a pruned prefill, layer K's forward (after its pre-hook rewrote the inputs) runs layers
        K..N-1 as one CUDA graph and returns the final hidden state; layers K+1.. return the hidden
        state they get (they already ran inside the graph). Any other call (decode steps, unpruned
        prefills, a call the graph cannot take) runs the original forwards. Unpatching frees the graphs.
        """
        self.graph_backend = CudaGraphBackend()
        undo.on_undo(self.drop_graphs, "CUDA graphs of the pruned layers")
        for i in range(self.layer, len(self.layers)):
            layer = self.layers[i]
            original = layer.forward  # the bound method, or an instance wrapper (accelerate's) that we keep
            self._forwards[i] = original
            undo.set_attr(layer, "forward", self._make_graph_forward(i, original))

    def drop_graphs(self) -> None:
        """Free every captured graph (its static buffers and private K/V) and the memory pool."""
        self.graphs.clear()
        if self.graph_backend is not None:
            self.graph_backend.pool = None

    def _make_graph_forward(self, index: int, original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            call = self.call
            if call is None or call.plan is None or call.keep is None:
                return original(*args, **kwargs)
            if index > self.layer:
                return _compat.layer_hidden(args, kwargs) if call.graph_out is not None else original(*args, **kwargs)
            try:
                key, static_kwargs, cache = self._graph_key(call, args, kwargs)
            except _NotKeyable as exc:
                key, reason = None, f"a decoder-layer argument of type {exc} that a graph cannot be keyed on"
            else:
                reason = (self._graph_refusal(cache) if key is not None else
                          "decoder-layer arguments other than (hidden_states, **keywords)")
            if reason is not None:
                call.graph = f"eager: {reason}"
                self._warn_graph_once(reason)
                return original(*args, **kwargs)
            call.graph_out = self._run_graph(call, key, tuple(args), static_kwargs, cache)
            return call.graph_out

        forward.__name__ = f"vprune_graph_forward_{index}"
        return forward

    def _graph_key(self, call: CallScratch, args: tuple, kwargs: Dict[str, Any]) -> Tuple[Any, Dict[str, Any], Any]:
        """(key, kwargs to make static, the user's cache) for layer K's rewritten inputs. The mask gets
        its columns gathered here (as ``on_attention`` would for a fresh cache: keys = the L' kept rows),
        so the graph reads a [B, 1, L', L'] mask; the cache is replaced by a slot marker."""
        if len(args) != 1:
            return None, {}, None
        plan = call.plan
        kwargs = dict(kwargs)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.shape[-1] == plan.seq_len:
            kwargs["attention_mask"] = self._mask_columns(call, mask, SequenceMap(call.keep, plan.seq_len),
                                                          plan.keep_len)
        cache = None
        for name in _compat._CACHE_KWARGS:
            if kwargs.get(name) is not None:
                cache, kwargs[name] = kwargs[name], _CACHE_SLOT
        return graph_signature((args, kwargs)), kwargs, cache

    def _graph_refusal(self, cache: Any) -> Optional[str]:
        """Why this prefill's pruned layers must run eagerly (None: they can run as a graph)."""
        if torch.is_grad_enabled():
            return "autograd is enabled (call the model under torch.no_grad() or torch.inference_mode())"
        if not self.graph_backend.usable():
            return "the call is itself being captured into a CUDA graph"
        if any(self.layers[i].training for i in range(self.layer, len(self.layers))):
            return "the model is in training mode"
        if _compat.outputs_being_recorded():
            return "output_hidden_states / output_attentions was requested"
        return _compat.cache_graph_refusal(cache, range(self.layer, len(self.layers)))

    def _warn_graph_once(self, reason: str) -> None:
        if reason not in self._graph_warned:
            self._graph_warned.add(reason)
            warnings.warn(f"{self.host_name}: VisualPruning(cuda_graph=True) ran decoder layers {self.layer}.."
                          f"{len(self.layers) - 1} of a pruned prefill eagerly: {reason}", VPruneWarning, stacklevel=4)

    def _run_graph(self, call: CallScratch, key: Any, args: tuple, kwargs: Dict[str, Any], cache: Any) -> torch.Tensor:
        """Replay (capturing first if ``key`` is new) layers K..N-1 on ``args``/``kwargs``, write their K/V
        into ``cache`` as the eager layers would, and return the final hidden state [B, L', D] (a copy:
        the next replay overwrites the graph's own output).

        The graphs of one model share a memory pool, so one graph's replay may reuse memory holding
        another graph's outputs: outputs are read only right after their own replay, never later."""
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(args, kwargs)
            self.graphs[key] = entry
            self.graphs_captured += 1
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
            call.graph = "captured"
        else:
            self.graphs.move_to_end(key)
            copy_into(entry.args, args)
            copy_into(entry.kwargs, kwargs)
            call.graph = "replayed"
        self.graph_backend.replay(entry.graph, entry.outputs)
        entry.replays += 1
        out = entry.outputs
        if cache is not None:  # DynamicLayer.update concatenates: the user's cache gets its own copies
            for j, i in enumerate(range(self.layer, len(self.layers))):
                cache.update(out[1 + 2 * j], out[2 + 2 * j], i)
        return out[0].clone()

    def _capture(self, args: tuple, kwargs: Dict[str, Any]) -> GraphEntry:
        """Static copies of the inputs, and the graph of layers K..N-1 reading them."""
        with torch.inference_mode(False), torch.no_grad():  # buffers any later call may write into
            static_args, static_kwargs = static_clone(args), static_clone(kwargs)
        layer_ids = list(range(self.layer, len(self.layers)))
        has_cache = any(v is _CACHE_SLOT for v in static_kwargs.values())

        def body() -> List[torch.Tensor]:
            private = _PrivateCache() if has_cache else None
            kw = {k: (private if v is _CACHE_SLOT else v) for k, v in static_kwargs.items()}
            hidden = static_args[0]
            self._in_graph_body = True
            try:
                for i in layer_ids:
                    hidden = self._forwards[i](hidden, **kw)
                    if not isinstance(hidden, torch.Tensor):
                        raise IncompatibleModelError(
                            f"{self.host_name}: decoder layer {i} returned a {type(hidden).__name__}; "
                            f"VisualPruning(cuda_graph=True) needs layers that return the hidden states "
                            f"tensor (transformers >= 5)")
            finally:
                self._in_graph_body = False
            return [hidden] + (private.outputs(layer_ids) if private is not None else [])

        try:
            graph, outputs = self.graph_backend.capture(body, static_args[0].device)
        except IncompatibleModelError:
            raise
        except Exception as exc:
            raise RuntimeError(
                f"{self.host_name}: capturing decoder layers {self.layer}..{len(self.layers) - 1} as a CUDA graph "
                f"failed ({type(exc).__name__}: {exc}); patch with VisualPruning(cuda_graph=False)") from exc
        return GraphEntry(graph=graph, args=static_args, kwargs=static_kwargs, outputs=outputs)

    # ------------------------------------------------------------------------------ per call
    def reset(self) -> None:
        """Forget the pruned-prefill record and the last call's stats (a new request / episode).
        Captured CUDA graphs stay: they are keyed by input shapes and hold no request state."""
        self.seq = None
        self.last = None

    def begin_call(self, groups: Optional[Groups], *, batch: int, seq_len: int, device: torch.device,
                   attention_mask: Optional[torch.Tensor] = None, cache_len: int = 0) -> None:
        """Start one host forward.

        groups: visual-token positions per row and image (None or all-empty: no visual tokens).
        attention_mask: the 2-D padding mask [B, L_total] the host got (1 = real token), or None; a
            host copy spares the prefill a sync (``host_copies``).
        device: where the plan's index tensors go (the inputs' device).
        cache_len: tokens already in the KV cache (0 = a fresh prefill).
        """
        self.calls += 1
        call = CallScratch()
        has_visual = bool(groups) and any(len(g) > 0 for row in groups for g in row)
        if cache_len == 0:
            self.seq = None  # a fresh sequence: whatever the cache held before is gone
            if has_visual:
                if self.graph_backend is not None:
                    self.graph_backend.check_device(device, self.host_name)
                call.plan = self._plan(groups, batch, seq_len, device, attention_mask)
        else:
            if has_visual:
                warnings.warn(
                    f"{self.host_name}: visual tokens arrived with {cache_len} tokens already cached (a second "
                    f"turn?); vprune prunes only in a prefill from an empty cache, so this call runs unpruned",
                    VPruneWarning, stacklevel=3)
            if self.seq is not None and self.seq.keep.shape[0] != batch:
                raise RuntimeError(
                    f"{self.host_name}: a decode step with batch {batch} follows a pruned prefill of batch "
                    f"{self.seq.keep.shape[0]}; vprune cannot map the pruned cache rows (the batch must stay "
                    f"the same between the prefill and its decode steps)")
            call.seq = self.seq
        self.call = call

    def end_call(self, failed: bool = False) -> None:
        """Finish the call: record what happened for ``stats`` and warn if a planned prune never ran.
        Raises ValueError when the scores of this call had NaN (the check deferred from layer K)."""
        call, self.call = self.call, None
        if call is None:
            return
        if call.nan_rows and not failed:
            bad = torch.stack(call.nan_rows).any(dim=0)
            if bool(bad.any()):  # the one sync of the check, after every layer was queued
                rows = torch.nonzero(bad).flatten().tolist()
                raise ValueError(
                    f"{self.host_name}: {self.strategy} scores contain NaN (batch rows {rows}): scores must be "
                    f"numbers; this usually means the model overflowed in fp16 or received NaN inputs")
        plan = call.plan
        if plan is None:
            if call.seq is None:
                self.last = {"pruned": False, "visual_tokens_before": None}
            return
        if call.keep is None:
            if not failed:
                warnings.warn(
                    f"{self.host_name}: the prompt had visual tokens but decoder layer {self.layer} never ran "
                    f"through vprune in this call; nothing was pruned", VPruneWarning, stacklevel=3)
            return
        self.seq = SequenceMap(keep=call.keep, prompt_len=plan.seq_len)
        self.last = {"pruned": True, "plan": plan, "kept_visual": call.kept_visual, "keep": call.keep,
                     "pruned_layers": call.pruned_layers, "graph": call.graph}

    # ------------------------------------------------------------------------------- planning
    def _plan(self, groups: Groups, batch: int, seq_len: int, device: torch.device,
              attention_mask: Optional[torch.Tensor]) -> PrefillPlan:
        if len(groups) != batch:
            raise ValueError(f"visual groups for {len(groups)} rows, batch has {batch}")
        requested = [[self.config.budget(len(g)) for g in row] for row in groups]
        drops = [sum(len(g) - k for g, k in zip(row, req)) for row, req in zip(groups, requested)]
        dropped = min(drops)
        budgets: List[List[int]] = []
        for row, req, d in zip(groups, requested, drops):
            extra = d - dropped  # this row must keep `extra` more tokens than its budgets say
            ks = list(req)
            while extra > 0:  # spread evenly over the images that still have tokens to give back
                open_ = [j for j, g in enumerate(row) if ks[j] < len(g)]
                share = max(1, extra // len(open_))
                for j in open_:
                    add = min(share, extra, len(row[j]) - ks[j])
                    ks[j] += add
                    extra -= add
            budgets.append(ks)
        if dropped == 0 and max(drops) > 0:
            warnings.warn(
                f"{self.host_name}: batch rows {[b for b, d in enumerate(drops) if d == 0]} have no visual tokens "
                f"to drop, and every row must keep the same number of tokens, so no row is pruned in this call "
                f"(batch such prompts separately)", VPruneWarning, stacklevel=4)

        visual, layout = self._visual_layout(groups, budgets, batch, seq_len)
        am = padding_from_mask(attention_mask, seq_len)
        if am is not None and am.shape[0] != batch:
            am = am.expand(batch, -1)  # a mask prepared once for the whole batch
        valid_len = am.sum(dim=1).tolist() if am is not None else [seq_len] * batch
        rows = self._score_rows(visual, am) if self.row_mode is not None else None

        flat = [visual, am, *(rows or (None, None))] + [t for pair in layout.values() for t in pair]
        on_device, host_buffer = to_device(flat, device)
        visual_d, am_d, score_rows, row_weights = on_device[:4]
        buckets = [_Bucket(n=n, k=k, rows=on_device[4 + 2 * i], positions=on_device[5 + 2 * i])
                   for i, (n, k) in enumerate(layout)]
        return PrefillPlan(
            batch=batch, seq_len=seq_len, keep_len=seq_len - dropped, dropped=dropped, buckets=buckets,
            visual=visual_d, groups=groups, budgets=budgets, requested=requested,
            score_rows=score_rows, row_weights=row_weights, key_valid=am_d, valid_len=valid_len,
            host_buffer=host_buffer)

    @staticmethod
    def _visual_layout(groups: Groups, budgets: List[List[int]], batch: int,
                       seq_len: int) -> Tuple[torch.Tensor, Dict[Tuple[int, int], Tuple[torch.Tensor, torch.Tensor]]]:
        """On the host: the visual mask bool [B, L] and, per (image size n, budget k) in sorted order,
        the batch rows int64 [M] and token positions int64 [M, n] of its images. Raises ValueError for
        an image outside the sequence. Ranges of step 1 (what ``groups_from_mask`` returns) are laid
        out with slices and aranges; any other sequence is indexed as a list."""
        visual = torch.zeros(batch, seq_len, dtype=torch.bool)
        vis_np = visual.numpy()  # shares memory
        by_size: Dict[Tuple[int, int], Tuple[List[int], List[Any]]] = {}
        for b, (row, ks) in enumerate(zip(groups, budgets)):
            for g, k in zip(row, ks):
                n = len(g)
                if n == 0:
                    continue
                first, last = g[0], g[-1]
                if first < 0 or last >= seq_len:
                    raise ValueError(f"visual positions {first}..{last} outside a sequence of {seq_len}")
                if isinstance(g, range) and g.step == 1:
                    vis_np[b, g.start:g.stop] = True
                    pos: Any = g.start  # positions start..start+n-1
                else:
                    pos = list(g)
                    visual[b, pos] = True
                rows, plist = by_size.setdefault((n, k), ([], []))
                rows.append(b)
                plist.append(pos)
        layout = {(n, k): (torch.tensor(rows, dtype=torch.long), torch.from_numpy(_positions(plist, n)))
                  for (n, k), (rows, plist) in sorted(by_size.items())}
        return visual, layout

    def _score_rows(self, visual: torch.Tensor, am: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """On the host: the query rows scored at layer K-1, int64 [B, R], and their weights fp32 [B, R]
        (1 = a real row, 0 = filler repeating row L-1). "last": each row's last real token; "text" /
        "all": its real non-visual / real tokens, ascending. A row with none scores row L-1 (weight 1)."""
        batch, seq_len = visual.shape
        ok = am.numpy() if am is not None else np.ones((batch, seq_len), dtype=bool)
        if self.row_mode == "last":
            last = seq_len - 1 - np.argmax(ok[:, ::-1], axis=1)
            rows = np.where(ok.any(axis=1), last, seq_len - 1)[:, None]
            return torch.from_numpy(rows.astype(np.int64)), torch.ones(batch, 1, dtype=torch.float32)
        if self.row_mode == "text":
            sel = ok & ~visual.numpy()
        elif self.row_mode == "all":
            sel = ok
        else:
            raise ValueError(f"unknown row mode {self.row_mode!r}: allowed 'last', 'text', 'all' or None")
        count = sel.sum(axis=1)
        length = np.maximum(count, 1)  # a row without such tokens scores row L-1
        r = int(length.max())
        first = np.argsort(~sel, axis=1, kind="stable")[:, :r]  # the selected positions first, ascending
        j = np.arange(r)
        rows = np.where(j < count[:, None], first, seq_len - 1).astype(np.int64)
        weights = (j < length[:, None]).astype(np.float32)
        return torch.from_numpy(rows), torch.from_numpy(weights)

    # ------------------------------------------------------------------------------- scoring
    def on_attention(self, layer: int, module: Any, query: torch.Tensor, key: torch.Tensor,
                     attention_mask: Any, kwargs: Dict[str, Any]) -> Any:
        """Called by the registered attention function before the stock one; returns the mask to use."""
        call = self.call
        if call is None or self._in_graph_body:  # the graph's mask already has the kept columns
            return attention_mask
        plan = call.plan
        if plan is not None and layer == self.layer - 1 and self.row_mode is not None and query.shape[2] == plan.seq_len:
            call.scores = self._score(plan, query, key, kwargs.get("scaling"))
            call.scored = True
        if layer >= self.layer and isinstance(attention_mask, torch.Tensor):
            seq = SequenceMap(call.keep, plan.seq_len) if (plan is not None and call.keep is not None) else call.seq
            if seq is not None:
                attention_mask = self._mask_columns(call, attention_mask, seq, key.shape[-2])
        return attention_mask

    def _score(self, plan: PrefillPlan, query: torch.Tensor, key: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
        n = plan.seq_len
        if key.shape[-2] < n:
            raise RuntimeError(f"{self.host_name}: layer {self.layer - 1} saw {key.shape[-2]} keys for a "
                               f"{n}-token prefill; cannot score the visual tokens")
        key = key[:, :, :n]  # a StaticCache hands back its whole buffer: the prefill wrote slots 0..n-1
        q_rows = gather_rows(query, plan.score_rows, dim=2)  # [B, H, R, Dh]
        cols = torch.arange(n, device=query.device)
        allowed = cols.view(1, 1, n) <= plan.score_rows.unsqueeze(-1)  # causal: [B, R, N]
        if plan.key_valid is not None:
            allowed = allowed & plan.key_valid.unsqueeze(1)
        return scoring.attention_row_scores(q_rows, key, allowed.unsqueeze(1), scale=scale,
                                            row_weights=plan.row_weights)

    # ----------------------------------------------------------------------------- selection
    def _select(self, call: CallScratch) -> torch.Tensor:
        plan = call.plan
        device = plan.visual.device
        keep_mask = ~plan.visual
        for bucket in plan.buckets:
            kwargs: Dict[str, Any] = {"seed": self.config.seed, "batch": bucket.rows.shape[0], "n": bucket.n,
                                      "device": device}
            if self.row_mode is not None:
                if call.scores is None:
                    raise MissingInputsError(
                        f"{self.host_name}: strategy {self.strategy!r} needs the attention of decoder layer "
                        f"{self.layer - 1}, but that layer never ran through vprune's attention function in this "
                        f"call (was the attention implementation changed after patching? it is "
                        f"{_compat.attn_implementation(self.text_config)!r})")
                kwargs["scores"] = call.scores[bucket.rows.unsqueeze(1), bucket.positions]
            if self.strategy == "divprune":
                if call.embeddings is None:
                    raise MissingInputsError(f"{self.host_name}: divprune needs the layer-0 inputs, which were not seen")
                kwargs["embeddings"] = call.embeddings[bucket.rows.unsqueeze(1), bucket.positions]
            local = self._select_bucket(call, bucket, kwargs)  # [M, k] ascending
            kept = bucket.positions.gather(1, local)
            keep_mask = keep_mask.index_put((bucket.rows.unsqueeze(1).expand_as(kept), kept),
                                            torch.ones((), dtype=torch.bool, device=device))
        keep = select_topk(keep_mask.to(torch.float32), plan.keep_len)  # the True entries, ascending
        call.kept_visual = keep_mask & plan.visual  # bool [B, L]; turned into indices by stats()
        return keep

    def _select_bucket(self, call: CallScratch, bucket: Any, kwargs: Dict[str, Any]) -> torch.Tensor:
        """``selection.select_tokens`` for one bucket, except that score-ranked strategies on a device
        record the NaN check for ``end_call`` instead of syncing here (NaN ranks lowest meanwhile)."""
        scores = kwargs.get("scores")
        if (self.strategy in ("fastv", "semantic") and scores is not None
                and scores.device.type in DEFERRED_NAN_CHECK_DEVICES):
            nan = torch.isnan(scores)
            if not selection._in_traced_region():
                rows = torch.zeros(call.plan.batch, device=scores.device)  # a row may hold several images
                call.nan_rows.append(rows.index_add(0, bucket.rows, nan.any(dim=-1).float()) > 0)
            clean = torch.where(nan, torch.full_like(scores, float("-inf")), scores)
            return select_topk(clean, bucket.k)
        return selection.select_tokens(self.strategy, bucket.k, **kwargs)

    # ------------------------------------------------------------------------------ layer hooks
    def _layer0_pre_hook(self, module, args, kwargs):
        call = self.call
        if call is not None and call.plan is not None:
            call.embeddings = _compat.layer_hidden(args, kwargs)
        return None

    def _make_layer_hook(self, index: int) -> Callable:
        def hook(module, args, kwargs):
            call = self.call
            if call is None or call.plan is None:
                return None
            if index == self.layer:
                current = _compat.attn_implementation(self.text_config)
                if self.attention_name is not None and current != self.attention_name:
                    raise MissingInputsError(
                        f"{self.host_name}: the language model's attention implementation is {current!r}, not "
                        f"vprune's {self.attention_name!r} (was it changed after patching?): vprune never ran "
                        f"through its attention function, so it cannot prune; unpatch and patch again")
                call.keep = self._select(call)
            if call.keep is None:
                return None
            call.pruned_layers += 1
            if call.graph_out is not None:  # ran inside layer K's graph: its forward passes the result on
                return None
            return self.rewrite_layer_inputs(index, call, args, kwargs)

        return hook

    def _memo(self, call: CallScratch, key: Any, original: Any, make: Callable[[], Any]) -> Any:
        hit = call.memo.get(key)
        if hit is not None and hit[0] is original:
            return hit[1]
        value = make()
        call.memo[key] = (original, value)  # the original is kept alive so its id is not reused
        return value

    def rewrite_layer_inputs(self, index: int, call: CallScratch, args: tuple,
                             kwargs: Dict[str, Any]) -> Tuple[tuple, Dict[str, Any]]:
        """New (args, kwargs) for decoder layer ``index`` >= K of a pruned prefill (transformers >= 4.48
        layer signature: hidden_states, attention_mask, position_ids, position_embeddings, cache...)."""
        keep = call.keep
        plan = call.plan
        hidden = _compat.layer_hidden(args, kwargs)
        if hidden.shape[1] == plan.seq_len and index == self.layer:
            hidden = gather_rows(hidden, keep, dim=1)
        elif hidden.shape[1] != plan.keep_len:
            raise RuntimeError(f"{self.host_name}: decoder layer {index} got {hidden.shape[1]} tokens, expected "
                               f"{plan.keep_len} after pruning at layer {self.layer}")
        args, kwargs = _compat.with_layer_hidden(args, kwargs, hidden)
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            kwargs["position_embeddings"] = self._memo(
                call, ("pe", id(pe)), pe,
                lambda: tuple(self._gather_seq(t, keep, -2, -3, plan.seq_len) for t in pe))
        pid = kwargs.get("position_ids")
        if isinstance(pid, torch.Tensor) and pid.shape[-1] == plan.seq_len:
            kwargs["position_ids"] = self._memo(call, ("pid", id(pid)), pid,
                                                lambda: gather_tokens(pid, keep, -1, -2))
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            if mask.dim() != 4:
                raise RuntimeError(f"{self.host_name}: decoder layer {index} got a {mask.dim()}-D attention mask; "
                                   f"in-LLM pruning handles 4-D masks (sdpa / eager) only")
            if mask.shape[2] == plan.seq_len:
                kwargs["attention_mask"] = self._memo(call, ("mask", id(mask)), mask,
                                                      lambda: gather_tokens(mask, keep, 2, 0))
        elif mask is not None:
            raise RuntimeError(f"{self.host_name}: decoder layer {index} got a {type(mask).__name__} attention "
                               f"mask, which in-LLM pruning cannot slice")
        return args, kwargs

    @staticmethod
    def _gather_seq(t: Any, keep: torch.Tensor, token_dim: int, batch_dim: int, seq_len: int) -> Any:
        if isinstance(t, torch.Tensor) and t.shape[token_dim] == seq_len:
            return gather_tokens(t, keep, token_dim, batch_dim)
        return t

    def _mask_columns(self, call: CallScratch, mask: torch.Tensor, seq: SequenceMap, key_len: int) -> torch.Tensor:
        def make() -> torch.Tensor:
            b = seq.keep.shape[0]
            full = mask.shape[-1]
            later = torch.arange(seq.prompt_len, full, device=mask.device).unsqueeze(0).expand(b, -1)
            cols = torch.cat([seq.keep.to(mask.device), later], dim=1)
            if cols.shape[1] > key_len:
                raise RuntimeError(
                    f"{self.host_name}: a pruned layer holds {key_len} cached keys but the mask maps "
                    f"{cols.shape[1]}; the KV cache does not match vprune's record of the pruned prefill")
            out = gather_tokens(mask, cols, 3, 0)
            if cols.shape[1] < key_len:  # StaticCache: unwritten slots stay masked
                pad = out.new_full((*out.shape[:3], key_len - cols.shape[1]), masked_value(mask))
                out = torch.cat([out, pad], dim=3)
            return out

        return self._memo(call, ("cols", id(mask), key_len), mask, make)

    # ---------------------------------------------------------------------------------- stats
    def stats(self) -> Dict[str, Any]:
        """Plain-Python summary of the last prefill (syncs the device)."""
        out: Dict[str, Any] = {"layer": self.layer, "strategy": self.strategy,
                               "attention": self.base_attention}
        if self.graph_backend is not None:
            out["cuda_graph"] = {"last_prefill": (self.last or {}).get("graph"), "graphs": len(self.graphs),
                                 "captured": self.graphs_captured,
                                 "replays": sum(e.replays for e in self.graphs.values())}
        last = self.last
        if not last or not last.get("pruned"):
            out.update(pruned=False, visual_tokens_before=[], visual_tokens_after=[], kept_indices=[],
                       per_image=[], flops_skipped=[])
            return out
        plan: PrefillPlan = last["plan"]
        kept_visual = last["kept_visual"].to("cpu")
        before = [int(plan.visual[b].sum()) for b in range(plan.batch)]
        kept_idx = [torch.nonzero(kept_visual[b]).flatten().tolist() for b in range(plan.batch)]
        after = [len(k) for k in kept_idx]
        flops = [self.flops_skipped(plan.valid_len[b], plan.valid_len[b] - plan.dropped) for b in range(plan.batch)]
        out.update(
            pruned=True, tokens_before=plan.seq_len, tokens_after=plan.keep_len,
            visual_tokens_before=before, visual_tokens_after=after, kept_indices=kept_idx,
            per_image=[[{"tokens": len(g), "requested": r, "kept": k} for g, r, k in zip(row, req, ks)]
                       for row, req, ks in zip(plan.groups, plan.requested, plan.budgets)],
            pruned_layers=last["pruned_layers"], flops_skipped=flops)
        return out

    def flops_skipped(self, n_before: int, n_after: int) -> float:
        """Estimated fraction of the language model's prefill FLOPs skipped.

        Per decoder layer and n tokens: f(n) = n * 2 * (d*H*dh + 2*d*Hkv*dh + H*dh*d + 3*d*F)
        (projections and a gated MLP) + 2 * H * dh * n * (n + 1) (causal QK^T and AV). Layers K..N-1
        run on n_after tokens instead of n_before: skipped = (N - K) * (f(n_before) - f(n_after)) /
        (N * f(n_before)). Embeddings, norms, the LM head and the vision tower are not counted.
        """
        c = self.text_config
        d = int(c.hidden_size)
        h = int(c.num_attention_heads)
        hkv = int(getattr(c, "num_key_value_heads", None) or h)
        dh = int(getattr(c, "head_dim", None) or d // h)
        ff = int(getattr(c, "intermediate_size", 4 * d))
        lin = 2 * (d * h * dh + 2 * d * hkv * dh + h * dh * d + 3 * d * ff)

        def f(n: int) -> float:
            return n * lin + 2.0 * h * dh * n * (n + 1)

        total_layers = len(self.layers)
        if n_before <= 0:
            return 0.0
        return (total_layers - self.layer) * (f(n_before) - f(n_after)) / (total_layers * f(n_before))
