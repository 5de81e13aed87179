"""Visible / mask disentangling for masked (non-autoregressive) image generators.

MaskGIT-style samplers (MaskGIT, MUSE, aMUSEd) call the same transformer once per sampling step on a
token grid in which some tokens are still the mask token and the rest are *visible*; a visible token
never becomes masked again within one generation. Between two steps the tokens therefore fall into
three groups (all per batch row, shapes ``[B, N]``):

* *settled* visible tokens: visible in this step's input and in the previous one;
* *newly revealed* tokens: masked in the previous input, visible now;
* *mask* tokens: still masked.

This module holds the host-independent machinery (pure tensor logic plus per-stream bookkeeping);
an integration only tells it where the hooked blocks are, how to read the mask from the forward's
inputs, and routes each block's self-attention through :meth:`NATRuntime.attend`.

Modes (``NATCache.mode``):

``cache`` (A)
    Settled visible tokens are not recomputed: mask and newly revealed tokens run all hooked blocks
    as queries against a per-layer K/V cache that holds the settled tokens' keys/values from the
    step that last computed them. Every ``refresh`` steps a full step recomputes everything. With
    ``refresh=1`` every step is a full step and the output is bit-identical to the unpatched model.
``disentangle`` (C)
    ENAT's attention pattern: a visible token attends only to visible tokens revealed no later than
    itself (a token is encoded once, against the context that existed when it was revealed); mask
    tokens attend to everything. Under this pattern a settled token's keys/values never change, so
    the cache is exact: ``refresh=R`` gives the same result as ``refresh=1`` (the uncached
    reference, which recomputes every token under the same pattern), provided the hooked blocks'
    inputs are per-token functions of the token ids (true for the testbed MaskGIT; in aMUSEd the
    convolutional down-block mixes neighbours, so there the cache is exact only for
    ``num_res_blocks=0``). Changes outputs relative to the unpatched model: it is a different
    attention pattern, meant for models trained with it or tolerant of it.
``reuse`` (B)
    Full steps every ``refresh`` steps; in between, cheap steps compute only the newly revealed
    tokens plus as many mask tokens as were just revealed, chosen by the confidence of the last
    output (the tokens most likely to be revealed next); every other token's keys/values and block
    output (or, with a ``TokenIO``, its intermediate values and output) come from the cache.

Static shapes: the number of computed tokens ``k`` of a step is decided on the host from the mask
counts (one small device->host copy per step, of the per-row mask counts and a conditioning
fingerprint), rounded up to a multiple of ``SUBSET_MULTIPLE`` (8), and the selected indices are
padded to ``k`` per row (with settled tokens), so every step of a given ``k`` has the same shapes and
can be replayed from a captured CUDA graph (``NATCache(cuda_graphs=True)``). Steps whose ``k``
would reach ``N`` run as full steps.

Whole-forward rows: an integration may pass a :class:`TokenIO` to :func:`install`; then on subset
steps the host's whole forward runs on the ``k`` computed rows (its input cut to them, its output
merged back over a cached one with :meth:`NATRuntime.merge_rows`), and token-mixing ops read full
maps in which the non-computed tokens hold their values from when they were last computed
(:meth:`NATRuntime.full_map` for convolutions, :meth:`NATRuntime.token_norm` for global
per-channel statistics). Without it only the hooked blocks are shortened.

Row bookkeeping: each subset step computes its flat row numbers ``b * N + idx`` once
(:func:`flat_rows`, ``DevicePlan.flat``); every cache read is an ``index_select`` and every write an
``index_copy_`` of whole rows on a ``[B * N, ...]`` view (K/V caches are token-major for that), never
``gather`` / ``scatter_`` with an index expanded over the channels (an index per element: 2.3x
slower for reads on an H100, ALGORITHMS.md section 6).

Cost model (aMUSEd-256, 12 cosine steps; ``vprune.bench.nat.token_macs``): the 22 layers are ~87%
of the per-token MACs. With the whole forward on rows (aMUSEd modes cache/reuse) the work computed
equals the token fraction: cache with refresh >= 12 computes ~76% (FLOP ceiling ~1.3x), refresh 4
~80%; reuse with refresh 4 ~38% (ceiling ~2.6x), refresh 3 ~45%; the rest of the gap is launch
overhead, which CUDA graphs remove, and the sampler's own per-step work.

Streams: the state of one generation (previous mask, reveal order, caches) is a *stream*. A call is
matched to a stream by batch shape and a fingerprint of its conditioning inputs (class labels,
text embeddings), so classifier-free guidance run as two separate passes per step keeps separate
conditional and unconditional caches; CFG run as one concatenated batch is per-row state of one
stream. At most ``STREAMS_PER_SHAPE`` (2) streams per shape are kept: more than two generations of
one shape interleaved step by step would keep restarting each other (correct, but uncached). A stream restarts (full step, caches overwritten) when every token is masked, when a row
has more masks than in its previous call, or on ``vprune.reset(model)``.

Limitations: inference only (caches are written in place and detached); a generation that restarts
from a partially masked grid with fewer masks than the previous call of the same conditioning (e.g.
inpainting twice with one prompt) needs ``vprune.reset(model)`` in between.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from vprune.nested import copy_into, map_tensors

KIND_RESTART = "restart"
KIND_FULL = "full"
KIND_SUBSET = "subset"

#: A subset step computes a multiple of this many rows per batch row (padding with settled
#: tokens, whose recomputation is harmless). Measured (torch 2.14, x86 CPU): SDPA and sgemm switch
#: kernels for query blocks of fewer than 8 rows (k < 8, or k = 32*j + 1..7 in SDPA's 32-row
#: blocks), and those rows then differ in the last bit from the same rows computed inside a full
#: step; multiples of 8 keep mode "disentangle" bit-identical to its uncached reference (and
#: align tensor-core tiles on GPU).
SUBSET_MULTIPLE = 8

#: Streams kept per input shape: two cover CFG run as two passes (conditional, unconditional); a
#: new conditioning beyond that takes over the least recently used stream of the same shape, so
#: new prompts reuse the buffers and captured graphs instead of growing memory.
STREAMS_PER_SHAPE = 2
#: Streams kept in all (over different batch shapes); the least recently used one is dropped.
MAX_STREAMS = 4


# ----------------------------------------------------------------------------- pure tensor logic

def partition(is_mask: torch.Tensor, prev_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(settled, new, mask) boolean ``[B, N]`` tensors from this step's and the previous mask."""
    visible = ~is_mask
    return visible & ~prev_mask, visible & prev_mask, is_mask


def select_tokens(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[B, k]`` (ascending) of the ``k`` highest scores per row, ties to the lower index.

    score: ``[B, N]`` float, larger first. Static ``k`` so the result has a fixed shape.
    """
    n = score.shape[1]
    if k >= n:
        return torch.arange(n, device=score.device).expand(score.shape[0], n)
    # a strictly decreasing index tie-break (below float32 resolution of any score in [0, 8])
    # keeps the choice deterministic: topk itself does not order ties
    tie = torch.arange(n, device=score.device, dtype=torch.float64) * (1e-9 / n)
    key = score.double() - tie
    idx = key.topk(k, dim=1, sorted=False).indices
    return idx.sort(dim=1).values


def disentangled_mask(q_idx: Optional[torch.Tensor], is_mask: torch.Tensor,
                      revkey: torch.Tensor) -> torch.Tensor:
    """ENAT pattern as a boolean SDPA mask ``[B, 1, q, N]`` (True = may attend).

    A visible query attends only to visible keys revealed no later than itself (``revkey`` is the
    number of tokens that were still masked when the token was revealed: larger = earlier); a mask
    query attends to every key. q_idx: ``[B, q]`` query positions, or None for all ``N``.
    """
    visible = ~is_mask
    if q_idx is None:
        q_vis, q_rev = visible, revkey
    else:
        q_vis, q_rev = visible.gather(1, q_idx), revkey.gather(1, q_idx)
    allowed = visible[:, None, :] & (revkey[:, None, :] >= q_rev[:, :, None])
    allowed = allowed | ~q_vis[:, :, None]
    return allowed[:, None]


def flat_rows(idx: torch.Tensor, n: int, offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Flat row numbers ``b * n + idx[b, j]`` ``[B * k]`` (int64) of a ``[B, N, ...]`` tensor seen
    as ``[B * N, ...]``: one index per row, so reads and writes are row copies (``index_select`` /
    ``index_copy_``) instead of ``gather`` / ``scatter_`` with an index per element.

    offsets: ``[B, 1]`` int64 ``arange(B) * n`` when the caller keeps it (saves a kernel per step).
    """
    if offsets is None:
        offsets = torch.arange(idx.shape[0], device=idx.device, dtype=torch.int64)[:, None] * n
    return (idx + offsets).reshape(-1)


def _flat_view_ok(x: torch.Tensor) -> bool:
    """Whether ``x`` ``[B, N, ...]`` can be viewed as ``[B * N, ...]`` without a copy."""
    return x.shape[0] == 1 or x.shape[1] == 1 or x.stride(0) == x.shape[1] * x.stride(1)


def take_rows(x: torch.Tensor, flat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``x[b, idx[b, j]]`` of ``x`` ``[B, N, *rest]`` -> ``[B, k, *rest]``.

    ``index_select`` of the flat rows ``flat`` (:func:`flat_rows` of ``idx``) on the ``[B * N, *rest]``
    view; an ``x`` without such a view (rare: batch stride not ``N`` rows) goes through
    ``vprune.kernels.gather_rows``, which reads the strides directly.
    """
    b, k = idx.shape
    if _flat_view_ok(x):
        return x.flatten(0, 1).index_select(0, flat).view(b, k, *x.shape[2:])
    from vprune.kernels import gather_rows as kernel_gather_rows
    return kernel_gather_rows(x, idx, 1)


def put_rows(cache: torch.Tensor, flat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Write ``rows`` ``[B, k, *rest]`` at the flat rows ``flat`` of ``cache`` ``[B, N, *rest]``
    (``cache[b, idx[b, j]] = rows[b, j]``) in place with ``index_copy_``; returns ``cache``.

    The cache must be viewable as ``[B * N, *rest]`` (the caches here are allocated so); a view
    that would need a copy raises instead of writing into the copy.
    """
    cache.view(-1, *cache.shape[2:]).index_copy_(0, flat, rows.flatten(0, 1))
    return cache


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, idx[b, j]]`` for ``x`` ``[B, N, C]`` and ``idx`` ``[B, k]`` -> ``[B, k, C]``."""
    return take_rows(x, flat_rows(idx, x.shape[1]), idx)


_FP_WEIGHTS: Dict[Tuple[int, str], torch.Tensor] = {}


def _fp_weights(m: int, device: torch.device) -> torch.Tensor:
    key = (m, str(device))
    w = _FP_WEIGHTS.get(key)
    if w is None:
        w = torch.sin(torch.arange(1, m + 1, dtype=torch.float64) * 12.9898).add_(1.5).to(device)
        _FP_WEIGHTS[key] = w
    return w


def _fingerprint(tensors: Sequence[torch.Tensor], batch: int) -> Optional[torch.Tensor]:
    """One float64 number per row and conditioning tensor: a fixed pseudo-random projection."""
    parts = []
    for t in tensors:
        if t is None:
            continue
        flat = t.detach().reshape(t.shape[0], -1) if t.dim() > 0 else t.detach().reshape(1, 1)
        if flat.shape[0] != batch:
            flat = flat.reshape(1, -1).expand(batch, -1)
        parts.append(flat.double() @ _fp_weights(flat.shape[1], t.device))
    if not parts:
        return None
    return torch.stack(parts, 1)


# ----------------------------------------------------------------------------- per-stream state

@dataclass
class NATStream:
    """The state of one generation: device buffers (updated in place) and host counters."""

    sid: int
    sig: Tuple
    prev_mask: torch.Tensor                 # [B, N] bool, the previous call's mask
    revkey: torch.Tensor                    # [B, N] int64, masked count when revealed (-1: masked)
    conf: torch.Tensor                      # [B, N] float32, confidence of the last output (reuse)
    offsets: torch.Tensor                   # [B, 1] int64, b * N: row b's first flat row
    kv: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    extra: Dict[Any, Any] = field(default_factory=dict)   # integration caches (e.g. text K/V)
    out: Optional[torch.Tensor] = None      # [B, N, C] output of the last hooked block
    fingerprint: Optional[tuple] = None
    prev_counts: Optional[List[int]] = None
    step: int = 0
    last_used: int = 0
    graphs: Dict[Any, Any] = field(default_factory=dict)


@dataclass
class HostPlan:
    """What the host decided for one call (no device values)."""

    stream: NATStream
    kind: str
    k: int
    n: int
    step: int


@dataclass
class DevicePlan:
    """Device tensors of the current call: query positions and the attention mask."""

    idx: Optional[torch.Tensor]             # [B, k] positions computed, None = all
    attn_mask: Optional[torch.Tensor]       # [B, 1, q, N] bool or None
    is_mask: torch.Tensor
    flat: Optional[torch.Tensor] = None     # [B * k] int64 b * N + idx: rows of [B * N, ...] views


@dataclass
class TokenIO:
    """How an integration runs a whole forward on the rows computed this step (modes cache/reuse).

    gather(model, runtime, args, kwargs) -> (args, kwargs): the forward's inputs cut to the rows
        computed this step (``runtime.take(x)``: ``[B, N, ...]`` -> ``[B, k, ...]``); the host
        forward then runs unchanged on them, its token-mixing modules reading full maps through
        :meth:`NATRuntime.full_map` / :meth:`NATRuntime.token_norm`.
    merge(model, runtime, out) -> out: the output of all ``N`` tokens again, usually
        :meth:`NATRuntime.merge_rows` (computed rows fresh, the rest as last computed).
    """

    gather: Callable[[Any, "NATRuntime", tuple, dict], Tuple[tuple, dict]]
    merge: Callable[[Any, "NATRuntime", Any], Any]


class NATRuntime:
    """Per-model NAT state: streams, the current call's plan, counters for ``vprune.stats``."""

    def __init__(self, mode: str, refresh: int, n_layers: int, cuda_graphs: bool = False) -> None:
        self.mode = mode
        self.refresh = refresh
        self.n_layers = n_layers
        self.cuda_graphs = cuda_graphs
        self.streams: List[NATStream] = []
        self.host: Optional[HostPlan] = None
        self.dev: Optional[DevicePlan] = None
        self._tick = 0
        self._prepared = False
        self.graph_backend: Any = CudaGraphBackend()
        self.history: List[Dict[str, Any]] = []   # host-side: kind/k/n per call (bounded)
        self.tokens_computed = 0
        self.tokens_total = 0
        self.io: Optional[TokenIO] = None

    # -- lifecycle ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every stream (and its caches and CUDA graphs)."""
        self.streams.clear()
        self.host = None
        self.dev = None
        self._prepared = False
        self.history.clear()
        self.tokens_computed = 0
        self.tokens_total = 0

    def begin(self, is_mask: torch.Tensor, cond: Sequence[torch.Tensor]) -> HostPlan:
        """Host decisions for one call: which stream, full or subset, how many tokens (one sync)."""
        if is_mask.dim() != 2:
            raise ValueError(f"is_mask must be [B, N], got shape {tuple(is_mask.shape)}")
        b, n = is_mask.shape
        counts = is_mask.sum(1).double()
        fp = _fingerprint(cond, b)
        payload = counts if fp is None else torch.cat([counts, fp.reshape(-1)])
        vals = payload.tolist()      # the one device->host copy of the step
        now = [int(v) for v in vals[:b]]
        fingerprint = tuple(vals[b:])
        sig = (b, n, str(is_mask.device))

        stream = next((s for s in self.streams if s.sig == sig and s.fingerprint == fingerprint), None)
        restart = stream is None or all(c == n for c in now) or (
            stream.prev_counts is not None and any(c > p for c, p in zip(now, stream.prev_counts)))
        if stream is None:
            same = [s for s in self.streams if s.sig == sig]
            if len(same) >= STREAMS_PER_SHAPE:
                # an unseen conditioning takes over the least recently used stream of its shape
                # (buffers and captured graphs are reused; the call restarts it)
                stream = min(same, key=lambda s: s.last_used)
            else:
                if len(self.streams) >= MAX_STREAMS:
                    self.streams.remove(min(self.streams, key=lambda s: s.last_used))
                stream = self._new_stream(sig, is_mask.device)
        if restart:
            stream.step = 0
            stream.prev_counts = None
        self._tick += 1
        stream.last_used = self._tick
        stream.fingerprint = fingerprint

        if restart:
            kind, k = KIND_RESTART, n
        elif stream.step % self.refresh == 0:
            kind, k = KIND_FULL, n
        else:
            prev = stream.prev_counts
            if self.mode == "reuse":
                new = [max(0, p - c) for p, c in zip(prev, now)]
                k = max(max(nw + max(1, min(c, max(1, nw))) for nw, c in zip(new, now)), 1)
                k = min(k, max(max(prev), 1))
            else:
                k = max(max(prev), 1)
            k = -(-k // SUBSET_MULTIPLE) * SUBSET_MULTIPLE
            kind = KIND_SUBSET if k < n else KIND_FULL
            if kind == KIND_FULL:
                k = n
        plan = HostPlan(stream=stream, kind=kind, k=k, n=n, step=stream.step)
        stream.prev_counts = now
        stream.step += 1
        self.host = plan
        self.tokens_computed += k * b
        self.tokens_total += n * b
        self.history.append({"stream": stream.sid, "step": plan.step, "kind": kind, "k": k, "n": n})
        if len(self.history) > 1024:
            del self.history[:512]
        return plan

    def _new_stream(self, sig: Tuple, device: torch.device) -> NATStream:
        b, n = sig[0], sig[1]
        s = NATStream(
            sid=self._next_sid(), sig=sig,
            prev_mask=torch.ones(b, n, dtype=torch.bool, device=device),
            revkey=torch.full((b, n), -1, dtype=torch.long, device=device),
            conf=torch.zeros(b, n, dtype=torch.float32, device=device),
            offsets=torch.arange(b, dtype=torch.int64, device=device)[:, None] * n)
        self.streams.append(s)
        return s

    def _next_sid(self) -> int:
        return max((s.sid for s in self.streams), default=-1) + 1

    def build(self, is_mask: torch.Tensor) -> DevicePlan:
        """Device part of the step (no host syncs, static shapes): indices, mask, state update."""
        hp = self.host
        if hp is None:
            raise RuntimeError("NATRuntime.build called before begin")
        s = hp.stream
        if hp.kind == KIND_RESTART:
            s.prev_mask.fill_(True)
            s.revkey.fill_(-1)
            s.conf.zero_()
        settled, new, mask = partition(is_mask, s.prev_mask)
        n_prev = s.prev_mask.sum(1, keepdim=True)
        s.revkey.copy_(torch.where(new, n_prev, s.revkey))
        if hp.kind == KIND_SUBSET:
            if self.mode == "reuse":
                score = new.float() * 4.0 + mask.float() * (1.0 + s.conf.clamp(0, 1))
            else:
                score = (new | mask).float()
            idx = select_tokens(score, hp.k)
            flat = flat_rows(idx, hp.n, s.offsets)
        else:
            idx = flat = None
        attn_mask = disentangled_mask(idx, is_mask, s.revkey) if self.mode == "disentangle" else None
        s.prev_mask.copy_(is_mask)
        self.dev = DevicePlan(idx=idx, attn_mask=attn_mask, is_mask=is_mask, flat=flat)
        return self.dev

    # -- hooks' work -------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.host is not None and self.dev is not None

    def scatter_output(self, y: torch.Tensor) -> torch.Tensor:
        """Stack output rows ``[B, k, C]`` -> ``[B, N, C]``, the rest from the output cache.

        Subset steps return a copy of the cache: the host continues on the result, and an in-place
        op of the host on it would otherwise corrupt the cache.
        """
        if not self.active:
            return y
        s = self.host.stream
        if self.dev.idx is None:
            if s.out is None or s.out.shape != y.shape or s.out.dtype != y.dtype:
                s.out = y.detach().clone(memory_format=torch.contiguous_format)
            else:
                s.out.copy_(y.detach())
            return y
        if s.out is None:
            raise RuntimeError("vprune NAT: a subset step ran before any full step filled the cache")
        return put_rows(s.out, self.dev.flat, y.detach()).clone()

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               math_scale: Optional[float] = None) -> torch.Tensor:
        """Self-attention of the computed rows against all ``N`` positions, via the K/V cache.

        q, k, v: ``[B, H, q, D]`` for the rows computed this step (``q = N`` on full steps).
        Writes k/v into the layer's cache and returns ``[B, H, q, D]``. On full steps of modes
        cache/reuse it computes attention exactly as the unpatched block does (bit-identical):
        SDPA, or with ``math_scale`` the explicit ``softmax(q*scale @ k^T) @ v`` of hosts whose
        fused attention is switched off.

        The cache is token-major (``[B, N, H, D]`` memory, handed to SDPA as a ``[B, H, N, D]``
        view, the layout of a host that splits heads from ``[B, N, H*D]`` projections): a step's
        write is one ``index_copy_`` of ``B*k`` contiguous ``H*D`` rows.
        """
        if not self.active:
            return _sdpa(q, k, v, None, math_scale)
        s = self.host.stream
        idx = self.dev.idx
        mask = self.dev.attn_mask
        if idx is None:
            cache = s.kv.get(layer)
            if cache is None or cache[0].shape != k.shape or cache[0].dtype != k.dtype:
                s.kv[layer] = (_token_major_copy(k), _token_major_copy(v))
            else:
                cache[0].copy_(k.detach())
                cache[1].copy_(v.detach())
            return _sdpa(q, k, v, mask, math_scale)
        cache = s.kv.get(layer)
        if cache is None:
            raise RuntimeError(f"vprune NAT: no K/V cache for layer {layer} (no full step ran first)")
        kc, vc = cache
        put_rows(kc.transpose(1, 2), self.dev.flat, k.detach().transpose(1, 2))
        put_rows(vc.transpose(1, 2), self.dev.flat, v.detach().transpose(1, 2))
        return _sdpa(q, kc, vc, mask, math_scale)

    def cached(self, key: Any, compute: Callable[[], Any]) -> Any:
        """A per-stream value that is constant within a generation (e.g. text-conditioning K/V).

        Computed on the stream's full/restart steps (written in place when already allocated, so
        captured CUDA graphs keep valid addresses) and read back on subset steps.
        """
        if not self.active:
            return compute()
        s = self.host.stream
        if self.dev.idx is None or key not in s.extra:
            value = compute()
            old = s.extra.get(key)
            if old is not None and _same_layout(old, value):
                copy_into(old, value)
                return old
            s.extra[key] = _detach(value)
            return value
        return s.extra[key]

    def set_confidence(self, conf: torch.Tensor) -> None:
        """Record the last output's per-token confidence (used by mode reuse): ``[B, N]``, or
        ``[B, k]`` for the rows computed this step (the others keep their last confidence)."""
        if not (self.active and self.mode == "reuse"):
            return
        s = self.host.stream
        conf = conf.detach().float()
        if conf.shape[1] == s.conf.shape[1]:
            s.conf.copy_(conf)
        else:
            put_rows(s.conf, self.dev.flat, conf)

    # -- row caches of a forward cut to the computed rows (TokenIO) ----------------------------
    def take(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, N, ...]`` -> the rows computed this step ``[B, k, ...]`` (``x`` on full steps):
        the stack's input, or a whole forward's inputs (``TokenIO.gather``)."""
        if not self.active or self.dev.idx is None:
            return x
        return take_rows(x, self.dev.flat, self.dev.idx)

    def full_map(self, key: Any, x: torch.Tensor) -> torch.Tensor:
        """Input of a token-mixing op (e.g. a depthwise convolution), channels first.

        Full steps: ``x`` is the whole map ``[B, C, *grid]``; it is recorded and returned. Subset
        steps: ``x`` holds the computed rows ``[B, C, k, ...]``; they are written into the recorded
        map, which is returned (``[B, C, *grid]``: fresh computed rows, the others as last computed).
        The record is token-major (``[B, *grid, C]`` memory: the returned map has channels-last
        strides), so writing a row and reading one back (:meth:`rows_of`) touch contiguous channels.
        """
        if not self.active:
            return x
        s = self.host.stream
        idx = self.dev.idx
        if idx is None:
            _store(s.extra, key, x.movedim(1, -1))
            return x
        return _scatter_rows(_need(s.extra, key), self.dev.flat, x)

    def rows_of(self, y: torch.Tensor) -> torch.Tensor:
        """``[B, C, *grid]`` -> the computed rows ``[B, C, k]`` (all ``N`` on full steps); a view with
        token-major strides when ``y`` has them."""
        b, c = y.shape[:2]
        flat = y.reshape(b, c, -1)
        if not self.active or self.dev.idx is None:
            return flat
        return take_rows(flat.transpose(1, 2), self.dev.flat, self.dev.idx).transpose(1, 2)

    def token_norm(self, key: Any, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-channel L2 norm over all ``N`` tokens, ``[B, C]`` in ``x``'s dtype (subset steps).

        x: ``[B, N, C]`` on full steps (recorded; returns None: the host's own op computes the
        statistic over the whole ``x``) or the computed rows ``[B, k, C]`` on subset steps: they are
        written into the record, and the norm is taken over the record (non-computed tokens count
        with their values from when they were last computed). This is the reduction the host's
        ``torch.norm`` runs (float32 accumulation), one read of the record: cheaper than updating a
        running sum of squares by the rows' change, whose float32 temporaries of the fresh and the
        replaced rows move ~50 bytes per row element at fp16 against 2 per record element here
        (break-even near ``k = N / 25``); and it does not drift across steps.
        """
        s = self.host.stream
        if self.dev.idx is None:
            _store(s.extra, (key, "rows"), x)
            return None
        rows = put_rows(_need(s.extra, (key, "rows")), self.dev.flat, x.detach())
        return torch.linalg.vector_norm(rows, ord=2, dim=1)

    def merge_rows(self, key: Any, y: torch.Tensor) -> torch.Tensor:
        """Output ``[B, C, *grid]`` of all tokens from this step's rows (subset steps: ``[B, C, k, ...]``).

        Full steps record ``y`` and return it; subset steps write the rows into the record and return
        a copy of it (the record itself while a CUDA graph is being captured: the replay wrapper
        copies). The copy is the one full-size copy of a subset step, and needed: the caller keeps
        the result while the next call writes the record. The record is token-major like
        :meth:`full_map`'s; so is the returned map's layout.
        """
        if not self.active:
            return y
        s = self.host.stream
        idx = self.dev.idx
        if idx is None:
            _store(s.extra, key, y.movedim(1, -1))
            return y
        out = _scatter_rows(_need(s.extra, key), self.dev.flat, y)
        if out.is_cuda and torch.cuda.is_current_stream_capturing():
            return out
        return out.clone()

    def end(self) -> None:
        self.dev = None
        self._prepared = False

    # -- the call wrapper (eager or CUDA graph) ----------------------------------------------
    def call(self, forward: Callable[..., Any], args: tuple, kwargs: dict,
             mask_fn: Callable[[tuple, dict], torch.Tensor],
             cond_fn: Callable[[tuple, dict], Sequence[torch.Tensor]]) -> Any:
        """Run one patched forward: host plan, then eager or a captured CUDA graph per (kind, k)."""
        backend = self.graph_backend
        if not (self.cuda_graphs and not torch.is_grad_enabled() and backend.usable()):
            return forward(*args, **kwargs)
        is_mask = mask_fn(args, kwargs)
        if not backend.on_device(is_mask):
            return forward(*args, **kwargs)
        plan = self.begin(is_mask, cond_fn(args, kwargs))
        key = (plan.kind, plan.k, _signature(args, kwargs))
        entry = plan.stream.graphs.get(key)
        if entry is None:
            self._prepared = True
            out = forward(*args, **kwargs)        # the real step, eagerly (also warms up kernels)
            static_args, static_kwargs = _clone(args), _clone(kwargs)

            def body() -> Any:
                self.host = plan
                self._prepared = True
                try:
                    return forward(*static_args, **static_kwargs)
                finally:
                    self.host = None
                    self._prepared = False

            graph, static_out = backend.capture(body, self)
            plan.stream.graphs[key] = (graph, static_args, static_kwargs, static_out)
            return out
        graph, static_args, static_kwargs, static_out = entry
        copy_into(static_args, args)
        copy_into(static_kwargs, kwargs)
        backend.replay(graph)
        self.host = None
        self._prepared = False
        return _clone(static_out)

    def prepare_in_forward(self, is_mask: torch.Tensor, cond: Sequence[torch.Tensor]) -> DevicePlan:
        """Called by the integration's model pre-hook: plan (unless the graph wrapper did), then build."""
        if not self._prepared:
            self.begin(is_mask, cond)
        return self.build(is_mask)

    # -- reporting ---------------------------------------------------------------------------
    def summary(self) -> Dict[str, Any]:
        last = self.history[-1] if self.history else None
        return {
            "mode": self.mode, "refresh": self.refresh, "cuda_graphs": self.cuda_graphs,
            "streams": len(self.streams),
            "last_step": dict(last) if last else None,
            "tokens_computed_fraction": (self.tokens_computed / self.tokens_total) if self.tokens_total else None,
            # what that fraction applies to: with a TokenIO every per-token module of the forward
            # (token-mixing ops still read full maps), else only the hooked blocks
            "tokens_computed_scope": "forward" if self.io is not None else "blocks",
            "graphs_captured": sum(len(s.graphs) for s in self.streams),
        }


class CudaGraphBackend:
    """How ``NATRuntime.call`` captures and replays steps (a seam so tests can check the
    bookkeeping on CPU with a stand-in that re-runs the captured Python body)."""

    def __init__(self) -> None:
        self.pool = None

    def usable(self) -> bool:
        return torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing()

    def on_device(self, t: torch.Tensor) -> bool:
        return t.is_cuda

    def capture(self, body: Callable[[], Any], runtime: "NATRuntime") -> Tuple[Any, Any]:
        """Record ``body()`` (not executed: a capture has no device side effects) -> (graph, static output)."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, pool=self.pool):
            out = body()
        return graph, out

    def replay(self, graph: Any) -> None:
        graph.replay()


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
          math_scale: Optional[float]) -> torch.Tensor:
    if math_scale is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    attn = (q * math_scale) @ k.transpose(-2, -1)
    if mask is not None:
        attn = attn.masked_fill(~mask, float("-inf"))
    return attn.softmax(dim=-1) @ v


# ----------------------------------------------------------------------------- installing

def install(model: Any, state: Any, config: Any, *, blocks: Sequence[Any], tag: str,
            mask_fn: Callable[[Any, tuple, dict], torch.Tensor],
            cond_fn: Callable[[Any, tuple, dict], Sequence[torch.Tensor]],
            conf_fn: Callable[[Any, Any], torch.Tensor], io: Optional[TokenIO] = None) -> NATRuntime:
    """Host-independent part of a NAT patch, every change recorded in ``state.undo``.

    blocks: the hooked transformer blocks, in order; they must map ``[B, N, C] -> [B, N, C]`` with
        tokens in the order of ``mask_fn``'s ``[B, N]`` mask, and route their self-attention
        through ``runtime.attend`` (the integration does that part).
    mask_fn(model, args, kwargs) -> ``[B, N]`` bool, True where the forward's input is a mask token.
    cond_fn(model, args, kwargs) -> conditioning tensors (their fingerprint picks the stream).
    conf_fn(model, output) -> ``[B, n]`` confidence of the output (mode reuse only; ``n = k`` when
        ``io`` cut the forward to the computed rows).
    io: None (only ``blocks`` are shortened) or a :class:`TokenIO`: on subset steps the whole
        forward runs on the computed rows (``io.gather``) and ``io.merge`` restores all tokens.

    The model's class is swapped to a ``VPrune<Host>`` subclass whose ``forward`` plans the step,
    runs the original forward (eagerly or from a captured CUDA graph) and records the confidence.
    Without ``io`` the first block gets a pre-hook that gathers the computed rows and the last a
    hook that scatters them back over the output cache.
    """
    from .undo import vprune_subclass

    rt = NATRuntime(config.mode, config.refresh, len(blocks), cuda_graphs=config.cuda_graphs)
    rt.io = io
    state.runtime = rt
    original = type(model)
    original_forward = original.forward

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        st = self.__dict__["_vprune"]
        runtime: NATRuntime = st.runtime
        st.calls += 1

        def inner(*a: Any, **k: Any) -> Any:
            dev = runtime.prepare_in_forward(mask_fn(self, a, k), cond_fn(self, a, k))
            tio = runtime.io      # read from the runtime: the subclass (and this closure) is shared
            try:
                if tio is not None and dev.idx is not None:
                    a, k = tio.gather(self, runtime, a, k)
                out = original_forward(self, *a, **k)
                if runtime.mode == "reuse":
                    runtime.set_confidence(conf_fn(self, out))
                if tio is not None:
                    out = tio.merge(self, runtime, out)
            finally:
                runtime.end()
            return out

        return runtime.call(inner, args, kwargs, lambda a, k: mask_fn(self, a, k),
                            lambda a, k: cond_fn(self, a, k))

    forward.__doc__ = original_forward.__doc__
    state.undo.swap_class(model, vprune_subclass(original, {"forward": forward}, tag=f"nat-{tag}"))

    def pre(module: Any, args: tuple) -> tuple:
        return (rt.take(args[0]),) + tuple(args[1:])

    def post(module: Any, args: tuple, output: Any) -> Any:
        return rt.scatter_output(output)

    if io is None:
        state.undo.add_hook(blocks[0].register_forward_pre_hook(pre))
        state.undo.add_hook(blocks[-1].register_forward_hook(post))
    state.undo.on_undo(rt.reset, "NAT runtime")
    return rt


# ----------------------------------------------------------------------------- nested helpers

def _clone(obj: Any) -> Any:
    return map_tensors(obj, lambda t: t.detach().clone())


def _detach(obj: Any) -> Any:
    return map_tensors(obj, lambda t: t.detach())


def _store(extra: Dict[Any, Any], key: Any, value: torch.Tensor) -> torch.Tensor:
    """Record ``value`` under ``key`` (in place when the layout matches: captured graphs keep
    their addresses) and return the record."""
    old = extra.get(key)
    if old is not None and _same_layout(old, value):
        old.copy_(value.detach())
        return old
    extra[key] = value.detach().clone(memory_format=torch.contiguous_format)
    return extra[key]


def _scatter_rows(cache: torch.Tensor, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Write rows ``x`` ``[B, C, k, ...]`` at the flat rows ``flat`` ``[B * k]`` into the token-major
    record ``cache`` ``[B, *grid, C]``; returns the record as ``[B, C, *grid]`` (channels-last view)."""
    b, c = x.shape[:2]
    rows = x.detach().reshape(b, c, -1).transpose(1, 2)               # [B, k, C]
    put_rows(cache.view(b, -1, c), flat, rows)
    return cache.movedim(-1, 1)


def _token_major_copy(t: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``t`` ``[B, H, N, D]`` whose memory is ``[B, N, H, D]`` (rows contiguous)."""
    b, h, n, d = t.shape
    out = torch.empty(b, n, h, d, dtype=t.dtype, device=t.device).transpose(1, 2)
    return out.copy_(t.detach())


def _need(extra: Dict[Any, Any], key: Any) -> torch.Tensor:
    if key not in extra:
        raise RuntimeError(f"vprune NAT: no cache {key!r} (a subset step ran before any full step filled it)")
    return extra[key]


def _same_layout(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same_layout(x, y) for x, y in zip(a, b))
    return False


def _signature(args: tuple, kwargs: dict) -> Any:
    def sig(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            return ("T", tuple(o.shape), str(o.dtype), str(o.device))
        if isinstance(o, (tuple, list)):
            return tuple(sig(x) for x in o)
        if isinstance(o, dict):
            return tuple(sorted((k, sig(v)) for k, v in o.items()))
        return repr(o)
    return sig(args), sig(kwargs)


def cosine_mask_counts(n_tokens: int, steps: int) -> List[int]:
    """Masked tokens in the input of each step under MaskGIT's cosine schedule (aMUSEd's rule:
    ``floor(N * cos(pi/2 * (s+1)/steps))``, at least one revealed and one kept masked per step)."""
    counts = [n_tokens]
    for s in range(steps - 1):
        target = math.floor(n_tokens * math.cos(math.pi / 2 * (s + 1) / steps))
        counts.append(max(1, min(counts[-1] - 1, target)))
    return counts
