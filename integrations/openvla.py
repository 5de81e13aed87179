"""OpenVLA-structured robot policies: dual-level, temporal-aware visual token pruning (VLA-Pruner).

Host versions tested on: transformers 4.40.1 + timm 0.9.16 (OpenVLA's pinned stack) and transformers
5.24 + timm 1.0.31, torch 2.14.1 (CPU, fp32), with a tiny random-weight OpenVLA-structured model and the
testbed policy (``vprune.testbed``). The real remote-code ``OpenVLAForActionPrediction`` is matched by
class name and attribute structure, without importing it.

Host structure this integration needs (checked by ``check_structure``)::

    model.vision_backbone.featurizer         timm ViT (the "alpha" backbone)
    model.vision_backbone.fused_featurizer   second ViT when use_fused_vision_backbone (pixel_values 3+3 ch)
    model.projector                          vision features [B, N, Dv] -> LLM embeddings [B, N, D]
    model.language_model                     a Llama-style causal LM (``.model.layers[i].self_attn``)

The host inserts the N projected patches right after the first token (BOS): LLM sequence
``[BOS, v_0 .. v_{N-1}, prompt..., action tokens...]``. Several images (e.g. a wrist camera: the channel
count of ``pixel_values`` is a multiple of 3, or of 6 with a fused backbone) give consecutive blocks of
N / n_images tokens, each pruned with its own budget ``config.budget(N / n_images)``.

One control step (one ``predict_action`` / ``generate`` call) runs like this:

1. Prefill (a forward whose KV cache is empty): the projector output (the layer-0 visual embeddings) is
   captured. At decoder layer K-1 a hook recomputes the last prompt row's attention over the visual keys
   (``semantic="last"``; ``"prefill_mean"`` averages every prefill row): the semantic score, [B, N].
   The action score is the smoothed history of the previous ``history`` control steps
   (``vprune.temporal``); a row with no recorded step yet (only with ``warmup`` < 1) uses its semantic
   score instead, so ``dual`` then keeps the semantic top-M. The strategy (default ``dual``: union of both top-M sets, cut to M by
   greedy max-min cosine diversity over the visual embeddings) picks M tokens per image.
   Layers K.. receive only [BOS, kept visual tokens, prompt]: every layer >= K gets a forward override
   (a per-instance class swap, cheaper than a pre-hook at every call) that hands it the gathered hidden
   states, position ids / RoPE cos-sin, 4-D mask rows and columns; kept tokens keep their original
   positions.
2. Action decode (forwards with a non-empty cache): the keep set is fixed; pruned layers get their mask
   columns gathered. At the action layer (default the middle one) a hook recomputes one query row per
   decode step (and the last prefill row, whose output is the first action token) over that layer's
   cached keys: the attention on the visual keys, averaged over heads and rows, and 0 for the tokens
   pruned at this step, also when the action layer is below K and still sees them as keys.
   A chunked / parallel-decoding action head (action-query tokens at the end of the prompt, decoded
   in one forward) declares ``action_query_rows = R`` on the model or its config: the last R prefill
   rows are then the action rows, and the semantic row is the prompt row before them.
3. The next prefill (a new control step) appends that mean to the history before it selects.

CPU fast paths (``_FAST_PATHS``; with ``_BATCHED_DECODE`` off the same numbers as the general code,
checked bit for bit by tests/test_openvla.py): without padding the scoring rows are plain slices and need no row mask; when
the action layer is K-1 the semantic row is also the first action row and is scored once; a decode
step on the CPU only keeps what its row's score needs (the layer's input row, its RoPE row, the keys
the cache holds then: a DynamicCache appends new tensors), and the rows are scored at the next step's
semantic scoring, right before the history update and the selection; rows of one attention module
are scored through a cached ``_RowPlan`` (no per-call lookups) with RoPE applied once to the stacked
rows (each row keeps its own matmuls and softmax: those results depend on the shapes), and the
deferred rows are summed, averaged and zeroed in NumPy; ``dual`` selection runs in NumPy / Python;
``semantic="prefill_mean"`` scores all L prefill rows through the plan (one q_proj matmul, RoPE once,
a cached additive causal mask per length, the general path's shapes for the matmul, softmax and
means), and its last row, the first action row when the action layer is K-1, joins the deferred rows.
With ``_BATCHED_DECODE`` (the default) the deferred decode rows of a step are scored in one computation
over the last row's keys (``_plan_batched_rows``) and prefill_mean's last row is taken from its
all-rows attention: the same keep sets and actions, action scores within fp32 rounding (tests).
On transformers >= 4.48 the attention modules of the scoring layers hand their post-RoPE queries
over (``_compat.capture_queries``: a per-module config copy whose registered attention function keeps
them and calls the stock one), so prefill_mean's rows and the deferred decode rows skip the q_proj
matmul and RoPE; prefill_mean's scores stay bit-identical to the general path's. Off the plan (CUDA,
other dtypes) the semantic row, the prefill action row and the decode rows use them too, and
prefill_mean's rows are scored from them in fp32 with the cached causal bias (``_QueryPlan``).
On the testbed CPU each small torch op (a view too) costs 5-60 us inside a policy step, so these cut
vprune's own time per step from ~5 ms to ~1.2 ms (``vprune eval vla``; scoring + selection ~0.9-1.0
ms of it). Off the CPU fast path (CUDA, other dtypes, ``_FAST_PATHS`` off) a decode step also only keeps
its row's inputs (and its layer's query); the next step's scoring scores them in one batched torch
computation (``_BATCHED_DECODE``, ``_batched_rows_total``: no host sync or copy, a cached additive causal
bias instead of a bool mask and its zero fill; the same keep sets as scoring each row alone, scores
within fp32 rounding: tests/test_openvla.py). ``vprune.stats(model)["overhead_ms"]`` gives the last control step's host time in vprune's
code by part (scoring, selection, other).

Warm-up: the first ``warmup`` (default ``history``) control steps of an episode run unpruned but still
record action scores. A budget that keeps every token (keep=1.0) scores and records nothing. With a batch, rows are separate environments: history and warm-up are per row;
if any row is in warm-up the whole batch runs unpruned that step (shapes must agree across rows).

A new episode: call ``vprune.reset(model)``; the policy's own ``reset()`` (if its class has one) is patched
to do the same; for one environment of a batched rollout call
``vprune.integrations.openvla.reset_rows(model, rows)``.

When a prefill runs without the vision tower (no ``pixel_values``, or transformers >= 4.50 with OpenVLA's
remote code, whose ``generate`` passes an empty cache object at the first step so the remote
``prepare_inputs_for_generation`` treats it as a cached decode step and skips the vision tower), the
patched model raises ``MissingInputsError`` naming the cause instead of running unpruned.

Defaults (``default_config``): strategy "dual"; K = ``min(3, max(1, depth // 2))`` (3 for 32 layers as
VLA-Pruner; a 4-layer LLM prunes from layer 2, a 2-layer one from 1) and never past the last layer;
action layer = (depth - 1) // 2 (15 of 32, the paper's layer).

Limitations: ``generate`` must decode with the KV cache (a second empty-cache forward inside one
``generate`` call raises: each token would otherwise count as a new control step); StaticCache is not supported (pruned layers would need padded columns); a plain forward of a
pruned model returns logits of the pruned length (``generate`` is unaffected); the mask must be a tensor
or None (flex-attention BlockMasks are not supported); batch rows share one visual layout.
"""
from __future__ import annotations

import functools
import inspect
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from vprune.config import TechniqueConfig, VisualPruning
from vprune.errors import IncompatibleModelError, MissingInputsError, VPruneError
from vprune.kernels import gather_rows
from vprune.integrations import _compat
from vprune.integrations._transfer import to_device
from vprune.integrations.registry import Integration
from vprune.scoring import attention_row_scores, attention_rows
from vprune.selection import dual_select, dual_select_host, dual_select_packed, select_tokens
from vprune.temporal import ActionHistory
from vprune.undo import vprune_subclass

VISUAL_START = 1  # the host inserts the patches right after BOS

# The CPU fast paths of one control step (all give the same numbers as the general code, which stays for
# padded batches, other devices and hosts without a KV cache): scoring rows as plain slices when no row
# is padded, the semantic row reused as the first action row, decode rows scored together at the next
# step's scoring, prefill_mean's rows through the cached plan, selection in NumPy / Python.
# tests/test_openvla.py switches them off to compare.
_FAST_PATHS = True

# Action rows scored together: decode steps off the CPU fast path (other devices, other dtypes,
# ``_FAST_PATHS`` off) keep their row's inputs and are scored at the next step's scoring in one batched
# computation (``_batched_rows_total``); on the CPU fast path the deferred decode rows share one
# computation too (``_plan_batched_rows``) and prefill_mean's last row comes from its all-rows attention.
# Scores equal scoring each row alone within fp32 rounding. Off: each row scored alone (the reference
# numbers; the general path then scores each decode row inside its decode forward).
_BATCHED_DECODE = True

# ``dual`` selection on an accelerator at batch sizes where it pays (B * N * N <= 2**22): the cosine
# similarities on the device, one copy of them and the scores to the host (the torch path syncs for
# its NaN check anyway), top-k, union and the greedy loop in NumPy, the keep indices back in one
# pinned non-blocking upload (``vprune.selection.dual_select_packed``): the same indices as the torch
# path, whose greedy loop launches ~6 kernels a step. Off: the torch path.
_HOST_SELECT = True

# The scoring layers' own post-RoPE queries (``_compat.capture_queries``), wherever a row's score can
# take them: no q_proj matmul and RoPE per scored row. Off: every row's query is recomputed from the
# layer input (the same values; a diagnostic switch for ``vprune.bench.vla_host`` and the tests).
_HANDED_QUERIES = True


# ------------------------------------------------------------------------------------------ helpers
def _decoder_layers(model: Any) -> Optional[Sequence[Any]]:
    lm = getattr(model, "language_model", None)
    if lm is None:
        return None
    for path in (("model", "layers"), ("layers",), ("model", "model", "layers")):
        obj = lm
        for name in path:
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return None


def default_layer(depth: int) -> int:
    """K for an LLM of ``depth`` layers: 3 (VLA-Pruner's, for 32 layers), but at most half the layers
    for shallow LMs (``max(1, depth // 2)``: on the 4-layer testbed policy K=2 kept 85% of unpruned
    success with dual at 25% keep where K=1 kept 60%); at most depth - 1 so at least one layer is pruned."""
    k = min(3, max(1, depth // 2))
    return max(1, min(k, depth - 1))


def default_action_layer(depth: int) -> int:
    """The middle layer: (depth - 1) // 2 (layer 15 of 32, as VLA-Pruner)."""
    return (depth - 1) // 2


def _gather_seq(x: torch.Tensor, idx: torch.Tensor, dim: int, row: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gather along ``dim`` with per-row indices ``idx`` [B, L'] (x's batch dim may be 1: broadcast).
    row: ``idx[0]`` when the caller has it (batch 1: saves the select op)."""
    b = idx.shape[0]
    if b == 1 and x.shape[0] == 1:  # one row: one index_select (the same values, fewer ops)
        return x.index_select(dim, idx[0] if row is None else row)
    if x.shape[0] != b:
        x = x.expand(b, *x.shape[1:])
    shape = [1] * x.dim()
    shape[0] = b
    shape[dim] = idx.shape[1]
    view = idx.view(shape)
    expand = list(x.shape)
    expand[dim] = idx.shape[1]
    return torch.gather(x, dim, view.expand(expand))


def _gather_prefill_mask(mask: torch.Tensor, keep: torch.Tensor, length: int) -> torch.Tensor:
    """A prefill mask for the pruned layers: 4-D [B|1, 1|H, L, T] rows and the first L columns gathered
    by ``keep`` [B, L'] (columns past L kept as they are); 2-D [B, L] (FlashAttention) columns gathered."""
    if mask.dim() == 4:
        if mask.shape[2] == length:
            mask = _gather_seq(mask.expand(keep.shape[0], *mask.shape[1:]), keep, 2)
        if mask.shape[3] == length:
            mask = _gather_seq(mask, keep, 3)
        elif mask.shape[3] > length:
            mask = torch.cat([_gather_seq(mask[..., :length], keep, 3), mask[..., length:]], dim=3)
    elif mask.dim() == 2 and mask.shape[1] == length:
        mask = _gather_seq(mask, keep, 1)
    return mask


def _gather_decode_mask(mask: torch.Tensor, keep: torch.Tensor, length: int) -> torch.Tensor:
    """A decode-step mask for the pruned layers: columns = kept prompt positions, then every position
    after the prompt (the pruned layers' cache holds exactly those). mask: 4-D [B|1, 1|H, q, T] or 2-D [B, T]."""
    b = keep.shape[0]
    after = torch.arange(length, mask.shape[-1], device=keep.device).view(1, -1).expand(b, -1)
    idx = torch.cat([keep, after], dim=1)
    if mask.dim() == 4:
        return _gather_seq(mask.expand(b, *mask.shape[1:]), idx, 3)
    return _gather_seq(mask, idx, 1)


def _padding_free(text_mask: torch.Tensor, layer_kwargs: dict) -> bool:
    """Whether the prefill's 2-D ``text_mask`` [B, L] has no padding, known without a device sync: the
    host's attention got no mask at layer 0 (transformers drops it for SDPA's causal path only after
    finding every entry 1, in 4.40 as in 5.x: the model itself sees no padding), or the mask is on the
    CPU and all ones. Otherwise (an accelerator's mask the host kept, e.g. eager attention's 4-D one)
    padding may be there: False."""
    if "attention_mask" in layer_kwargs and layer_kwargs["attention_mask"] is None:
        return True
    return text_mask.device.type == "cpu" and bool(text_mask.all())


def _row_allowed(mask_rows: torch.Tensor) -> Optional[torch.Tensor]:
    """``_bool_allowed`` of a host mask's scoring rows, or None on the CPU when they allow every key
    (transformers 4.40 passes a 4-D mask even without padding): the masked softmax then gives the same
    numbers as the plain one, which skips four small ops (the check is one)."""
    allowed = _bool_allowed(mask_rows)
    if allowed.device.type == "cpu" and _FAST_PATHS and bool(allowed.all()):
        return None
    return allowed


def _bool_allowed(mask: torch.Tensor) -> torch.Tensor:
    """A mask (bool True = attend, or additive float 0 / large negative) as bool allowed."""
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


_CONSTANTS: Dict[Tuple[Any, ...], Any] = {}
_PER_KIND = 32  # entries kept of a kind whose keys vary with the prompt length (``bounded``)


def _constant(key: Tuple[Any, ...], build: Callable[[], Any], bounded: bool = False) -> Any:
    """The value ``build()`` for ``key``, built once (outside inference mode, so that calls with
    autograd on may use it) and cached in ``_CONSTANTS``. bounded: keys of this kind (``key[0]``)
    vary with the prompt length; keep at most ``_PER_KIND`` of them."""
    hit = _CONSTANTS.get(key)
    if hit is None:
        with torch.inference_mode(False):
            hit = build()
        if bounded:
            stale = [k for k in _CONSTANTS if k[0] == key[0]]
            if len(stale) >= _PER_KIND:
                for k in stale:
                    del _CONSTANTS[k]
        _CONSTANTS[key] = hit
    return hit


def _scalar(value: float) -> torch.Tensor:
    """A cached fp32 0-dim CPU tensor holding ``value``."""
    return _constant(("scalar", value), lambda: torch.tensor(value, dtype=torch.float32))


def _transposed(weight: torch.Tensor) -> torch.Tensor:
    """``weight.t()`` (a view), cached per weight tensor (in-place updates show through the view)."""
    hit = _TRANSPOSED.get(id(weight))
    if hit is None or hit[0]() is not weight:
        with torch.inference_mode(False):
            hit = (weakref.ref(weight), weight.detach().t())
        if len(_TRANSPOSED) > 256:  # dead entries of unloaded models
            for key in [key for key, (ref, _) in _TRANSPOSED.items() if ref() is None]:
                del _TRANSPOSED[key]
        _TRANSPOSED[id(weight)] = hit
    return hit[1]


_TRANSPOSED: Dict[int, Tuple[Any, torch.Tensor]] = {}


def _rotate_half(head_dim: int, dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(perm int64 [Dh], signs [Dh]) with x[..., perm] * signs == cat(-x[..., h:], x[..., :h]),
    h = Dh // 2 (Llama's rotate_half), cached."""
    def build() -> Tuple[torch.Tensor, torch.Tensor]:
        half = head_dim // 2
        perm = torch.cat([torch.arange(half, head_dim), torch.arange(half)]).to(device)
        signs = torch.ones(head_dim, dtype=dtype, device=device)
        signs[: head_dim - half] = -1
        return perm, signs
    return _constant(("rotate_half", head_dim, dtype, device), build)


def _head_map(n_heads: int, n_kv: int, device: torch.device) -> torch.Tensor:
    """int64 [H]: the K/V head of each query head (GQA), cached."""
    return _constant(("heads", n_heads, n_kv, device),
                     lambda: torch.arange(n_heads, device=device) // (n_heads // n_kv))


def _seq_parts(b: int, n: int, length: int) -> Tuple[np.ndarray, np.ndarray]:
    """int64 [B, VISUAL_START] and [B, L - VISUAL_START - N]: the prefill positions around the visual
    tokens (always kept), cached."""
    return _constant(("seq", b, n, length),
                     lambda: (np.tile(np.arange(VISUAL_START, dtype=np.int64), (b, 1)),
                              np.tile(np.arange(VISUAL_START + n, length, dtype=np.int64), (b, 1))))


def _project(linear: Any, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)``; a plain ``nn.Linear`` without hooks is called as ``F.linear`` (the same op,
    without the module-call overhead)."""
    if type(linear) is torch.nn.Linear and not linear._forward_hooks and not linear._forward_pre_hooks:
        return torch.nn.functional.linear(x, linear.weight, linear.bias)
    return linear(x)


class _RowPlan:
    """What ``_row_scores`` looks up per call, resolved once per attention module for the CPU fp32
    case without a mask: q_proj's cached W^T, the rotate-half permutation and signs, the GQA head map
    and the two fp32 0-dim scalars. Each lookup costs 1-5 us of Python on the testbed CPU (device
    objects, tuple keys, ``nn.Module.__getattr__``): about 40 us a row without the plan."""

    __slots__ = ("proj", "weight", "w_t", "n_heads", "head_dim", "half", "signs", "head_map", "scale", "heads",
                 "scale_f")

    def __init__(self, proj: torch.nn.Linear, geometry: Tuple[int, int, int, float]) -> None:
        n_heads, n_kv, head_dim, scale = geometry
        cpu = torch.device("cpu")
        self.proj = proj
        self.weight = proj.weight
        self.w_t = _transposed(proj.weight)
        self.n_heads, self.head_dim = n_heads, head_dim
        self.half = head_dim // 2  # rotate_half's x[..., perm] is x.roll(half, -1) (one copy, no index)
        _, self.signs = _rotate_half(head_dim, torch.float32, cpu)
        self.head_map = _head_map(n_heads, n_kv, cpu) if n_kv != n_heads else None
        self.scale = _scalar(scale)
        self.scale_f = float(scale)
        self.heads = _scalar(float(n_heads))

    def valid_for(self, attn: Any) -> bool:
        """Whether ``attn`` still has this plan's q_proj and weight, plain (no bias, no hooks)."""
        proj = attn._modules.get("q_proj")
        return proj is self.proj and proj._parameters.get("weight") is self.weight \
            and proj._parameters.get("bias") is None and not proj._forward_hooks and not proj._forward_pre_hooks


class _QueryPlan:
    """What ``_plan_mean_scores`` reads of a ``_RowPlan`` when the layer handed its queries over (no
    q_proj, no RoPE): the head count and size and the scale, for any device and dtype."""

    __slots__ = ("n_heads", "head_dim", "scale", "scale_f", "heads")

    def __init__(self, geometry: Tuple[int, int, int, float]) -> None:
        n_heads, _, head_dim, scale = geometry
        self.n_heads, self.head_dim = n_heads, head_dim
        self.scale, self.scale_f, self.heads = _scalar(scale), float(scale), _scalar(float(n_heads))


_PLANS: Dict[int, Tuple[Any, Optional[_RowPlan]]] = {}


def _row_plan(attn: Any, geometry: Optional[Tuple[int, int, int, float]] = None) -> Optional[_RowPlan]:
    """The cached ``_RowPlan`` of ``attn`` (None: not a plain fp32 CPU ``nn.Linear`` q_proj: use
    ``_row_scores``). geometry: ``attention_geometry(attn)`` if the caller has it (read on a miss)."""
    hit = _PLANS.get(id(attn))
    if hit is not None and hit[0]() is attn:
        plan = hit[1]
        if plan is None or plan.valid_for(attn):
            return plan
    proj = attn._modules.get("q_proj")
    plan = None
    if type(proj) is torch.nn.Linear and proj.weight.dtype == torch.float32 and proj.weight.device.type == "cpu":
        geometry = geometry if geometry is not None else _compat.attention_geometry(attn)
        plan = _RowPlan(proj, geometry) if geometry[2] % 2 == 0 else None  # rotate_half needs an even Dh
        if plan is not None and not plan.valid_for(attn):
            plan = None
    if len(_PLANS) > 256:  # dead entries of unloaded models
        for key in [key for key, (ref, _) in _PLANS.items() if ref() is None]:
            del _PLANS[key]
    _PLANS[id(attn)] = (weakref.ref(attn), plan)
    return plan


def _plan_row_scores(plan: _RowPlan, h_row: torch.Tensor, cos_r: torch.Tensor, sin_r: torch.Tensor,
                     k: torch.Tensor) -> torch.Tensor:
    """``_row_scores`` without a mask through a ``_RowPlan``: the same ops on the same values (fp32
    CPU tensors: h_row [B, 1, D] or [B, D], cos/sin rows [B|1, 1, Dh], k [B, Hkv, T, Dh]) -> [B, T]."""
    return _plan_rows_scores(plan, ((h_row, cos_r, sin_r, k),))[0]


def _plan_rows_scores(plan: _RowPlan, jobs: Sequence[Tuple[torch.Tensor, ...]]) -> List[torch.Tensor]:
    """``_row_scores`` without a mask for several rows (h_row, cos_r, sin_r, k) of one attention
    module, each [B, T_i], with as few torch calls as the numbers allow (each costs 5-60 us on the
    testbed CPU inside a policy step, a view call too). Each row keeps its own q_proj matmul (M = B)
    and attention (their results depend on the shapes); RoPE, elementwise and exact whatever the
    layout, runs once on the rows stacked (11 ops for 3 rows instead of 18; a control step scores 3
    rows on the testbed); the stacked queries are split per row in one call."""
    b = jobs[0][0].shape[0]
    n_heads, head_dim = plan.n_heads, plan.head_dim
    w_t = plan.w_t
    r = len(jobs)
    if r == 1:
        h_row, cos, sin, _ = jobs[0]
        q = torch.mm(h_row if h_row.dim() == 2 else h_row.view(b, -1), w_t)
    else:
        q = torch.cat([torch.mm(job[0] if job[0].dim() == 2 else job[0].view(b, -1), w_t) for job in jobs])
        cos = torch.cat([job[1] if job[1].shape[0] == b else job[1].expand(b, -1, -1) for job in jobs])
        sin = torch.cat([job[2] if job[2].shape[0] == b else job[2].expand(b, -1, -1) for job in jobs])
    q = q.view(r * b, n_heads, head_dim)  # cos / sin [R*B|1, 1, Dh] broadcast over the heads
    q = q * cos + q.roll(plan.half, -1) * (sin * plan.signs)
    rows = q.view(r, b * n_heads, 1, head_dim).unbind(0)  # [B*H, 1, Dh] per row
    return [_plan_attend(plan, q_row, job[3]) for q_row, job in zip(rows, jobs)]


def _plan_attend(plan: _RowPlan, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The rest of ``_row_scores`` for post-RoPE queries q [B*H, 1, Dh] over k [B, Hkv, T, Dh]: GQA
    heads repeated (a copy), fp32 q k^T * scale, softmax, head mean as sum then division -> [B, T]."""
    bk, _, t, d = k.shape
    n_heads = plan.n_heads
    if plan.head_map is not None:  # a contiguous copy: viewed, not reshaped
        k = k.index_select(1, plan.head_map).view(bk * n_heads, t, d)
    else:
        k = k.reshape(bk * n_heads, t, d)
    logits = torch.bmm(q, k.transpose(1, 2))
    logits.mul_(plan.scale)
    probs = torch.softmax(logits, dim=-1)  # [B*H, 1, T]
    # the head sum; with B = 1, [H, 1, T] summed over dim 0 is [1, T] directly (the same reduction)
    heads_sum = probs.sum(dim=0) if bk == 1 else probs.view(bk, n_heads, t).sum(dim=1)
    return heads_sum.div_(plan.heads)


def _plan_batched_rows(plan: _RowPlan, rows: List[Tuple[Any, ...]]) -> torch.Tensor:
    """The attention [B, R, T] of R ``_consecutive`` decode rows without mask rows (the CPU fast path's
    records) over the last row's keys [B, Hkv, T, Dh], through a ``_RowPlan``, in one computation:
    the rows' queries as the layer computed them (``_captured_queries``) or one q_proj matmul and
    RoPE, then ``_causal_rows_probs``. ``_plan_rows_scores`` runs about 8 torch calls a row (each costs 5-60 us
    inside a policy step); the numbers equal it within fp32 rounding (the matmuls over more rows and
    the softmax over the masked longer rows round in another order), not bit for bit."""
    b, r = rows[0][2].shape[0], len(rows)
    if all(rec[9] is not None for rec in rows):  # the layer's own queries [B, H, 1, Dh]
        q = torch.cat([rec[9] for rec in rows], dim=2)
    else:
        hidden = torch.cat([rec[2].view(b, 1, -1) for rec in rows], dim=1)  # [B, R, D]
        cos, sin = (_stack_rope([rec[i] for rec in rows], b).unsqueeze(2) for i in (3, 4))  # [B|1, R, 1, Dh]
        q = torch.mm(hidden.view(b * r, -1), plan.w_t).view(b, r, plan.n_heads, plan.head_dim)
        q = (q * cos + q.roll(plan.half, -1) * (sin * plan.signs)).transpose(1, 2)
    return _causal_rows_probs(q, rows[-1][5], plan.scale_f, plan.heads)


def _causal_rows_probs(q: torch.Tensor, k: torch.Tensor, scale: float, heads: torch.Tensor) -> torch.Tensor:
    """Head-mean attention [B, R, T] of the R consecutive last query rows ``q`` [B, H, R, Dh] (post-RoPE)
    over ``k`` [B, Hkv, T, Dh]: row i attends the first T - R + 1 + i keys (the last R rows of the
    cached ``_causal_bias``, added in the scale op: no row is empty, so no zero fill), in fp32. GQA
    without repeating the keys: the G query heads of key head kv (h = kv * G + g) are one [G*R, Dh]
    block of q. heads: the fp32 0-dim head count (on the CPU the head mean as torch's mean computes
    it, sum then div_, without its overhead)."""
    b, n_heads, r, d = q.shape
    bk, n_kv, t, _ = k.shape
    if q.dtype != torch.float32:
        q, k = q.float(), k.float()
    logits = torch.bmm(q.reshape(b * n_kv, -1, d), k.reshape(bk * n_kv, t, d).transpose(1, 2))
    logits = torch.add(_causal_bias(t, k.device)[t - r:], logits.view(b, n_heads, r, t), alpha=scale)
    probs = torch.softmax(logits, dim=-1)
    return probs.sum(dim=1).div_(heads) if probs.is_cpu else probs.mean(dim=1)


def _causal_bias(length: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """fp32 [L, L]: -inf above the diagonal (the keys each prefill row may not attend: ``_row_mask``'s
    causal rows without padding), 0 elsewhere, cached per length (and device: None is the CPU). Added
    to logits it gives the bits of ``masked_fill(~allowed, -inf)`` (x + 0 is x; a zero's sign does not
    change the softmax)."""
    if device is not None and device.type == "cpu":
        device = None
    return _constant(("causal", length, device), lambda: torch.zeros(length, length, device=device).masked_fill_(
        torch.ones(length, length, dtype=torch.bool, device=device).triu_(1), float("-inf")), bounded=True)


def _plan_mean_scores(plan: Any, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      k: torch.Tensor, blocked: torch.Tensor, last_row: bool = False,
                      q: Optional[torch.Tensor] = None) -> Any:
    """``semantic="prefill_mean"`` without padding through a ``_RowPlan``: the attention [B, T] of every
    row of ``hidden`` [B, L, D] (cos/sin [B|1, L, Dh]) over ``k`` [B, Hkv, T, Dh], averaged over heads,
    then over rows; with ``last_row``, also the last row's head mean [B, T] (a view). q: the layer's own
    post-RoPE queries [B, H, L, Dh] (``_captured_queries``: no q_proj matmul or RoPE here). blocked: the keys a row may not attend, bool [B|1, 1|H, L, T], or the fp32 [L, L]
    ``_causal_bias``. The ops and shapes of ``_query_keys`` + ``attention_row_scores`` with all-ones
    row weights (q_proj as one [B*L, D] matmul, RoPE, fp32 q k^T * scale, -inf fill, softmax, head
    mean, row mean): the same numbers. No row is fully masked (the caller checks): no zero fill.
    plan: a ``_RowPlan``, or a ``_QueryPlan`` when q is given (any device and dtype)."""
    b, length, _ = hidden.shape
    n_heads, head_dim = plan.n_heads, plan.head_dim
    bk, n_kv, t, d = k.shape
    if q is None:
        q = torch.mm(hidden.reshape(b * length, -1), plan.w_t).view(b, length, n_heads, head_dim)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [B|1, L, 1, Dh]: broadcast over the heads
        q = q * cos + q.roll(plan.half, -1) * (sin * plan.signs)
        q = q.transpose(1, 2)
    elif q.dtype != torch.float32:  # a _QueryPlan's handed-over bf16/fp16 queries: fp32 scores
        q, k = q.float(), k.float()
    # GQA without repeating the keys: the G query heads of key head kv (h = kv * G + g) are one
    # [G*L, Dh] block of q, multiplied by that head's keys once (the same products: the tests
    # compare them bit for bit with the general path's repeated keys)
    q = q.reshape(b * n_kv, -1, head_dim)  # [B, H, L, Dh] -> [B*Hkv, G*L, Dh] (a view of the layer's q)
    logits = torch.bmm(q, k.reshape(bk * n_kv, t, d).transpose(1, 2))
    logits = logits.view(b * n_heads, length, t)
    if blocked.dtype == torch.bool:
        logits.mul_(plan.scale)
        logits.view(b, n_heads, length, t).masked_fill_(blocked, float("-inf"))
    else:  # bias + logits * scale in one op: fma(x, scale, 0) rounds as x * scale does
        logits = torch.add(blocked, logits, alpha=plan.scale_f)
    probs = torch.softmax(logits, dim=-1).view(b, n_heads, length, t)
    rows = probs.sum(dim=1).div_(plan.heads)  # the head mean [B, L, T] (mean's sum, then div_)
    mean = rows.sum(dim=1).div_(_scalar(float(length)))  # the row mean (weights all 1: sum / L)
    return (mean, rows[:, -1]) if last_row else mean


def _captured_queries(rt: "_Runtime", layer_idx: int, keys: torch.Tensor, rows: int) -> Optional[torch.Tensor]:
    """The post-RoPE queries [B, H, rows, Dh] the attention of ``layer_idx`` computed in this call
    (``_compat.capture_queries``), when it attended exactly ``keys`` (the cache's tensor: a DynamicCache
    makes a new one at every update, so an earlier call's capture never matches) and has their dtype;
    None otherwise (the caller recomputes them). Read once: the capture is cleared."""
    sink = rt.captures.get(layer_idx)
    if sink is None or sink.rows is None:
        return None
    q, k = sink.rows
    sink.rows = None
    if not _HANDED_QUERIES or k is not keys or q.dim() != 4 or q.shape[2] != rows or q.dtype != k.dtype:
        return None
    return q


def _plannable(h_row: torch.Tensor, cos_r: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether ``_plan_row_scores`` takes these tensors: fp32 on the CPU, fast paths on."""
    f32 = torch.float32
    return _FAST_PATHS and h_row.dtype is f32 and cos_r.dtype is f32 and k.dtype is f32 and h_row.is_cpu \
        and k.is_cpu


def _row_scores(attn: Any, geometry: Tuple[int, int, int, float], h_row: torch.Tensor, cos_r: torch.Tensor,
                sin_r: torch.Tensor, k: torch.Tensor, allowed: Optional[torch.Tensor]) -> torch.Tensor:
    """Attention [B, T] of one query row, averaged over heads: ``attention_row_scores`` of the
    post-RoPE query of ``h_row`` [B, 1, D] (cos/sin rows [B|1, 1, Dh]) over ``k`` [B, Hkv, T, Dh].

    The same ops on the same values as ``_query_keys`` + ``attention_row_scores`` (q_proj on one row,
    rotate-half RoPE, K/V heads repeated, fp32 q k^T * scale, softmax, head mean), with fewer Python
    layers and views: a policy step runs it 3 times (the semantic row and two decode rows)."""
    return _attend_row(_row_query(attn, geometry, h_row, cos_r, sin_r), k, geometry, allowed)


def _row_query(attn: Any, geometry: Tuple[int, int, int, float], h_row: torch.Tensor, cos_r: torch.Tensor,
               sin_r: torch.Tensor) -> torch.Tensor:
    """The post-RoPE query [B, H, Dh] of ``h_row`` [B, 1, D] (cos/sin rows [B|1, 1, Dh]): q_proj on
    one row, then rotate-half RoPE, as the attention layer computes it."""
    n_heads, _, head_dim, _ = geometry
    b = h_row.shape[0]
    cpu = h_row.device.type == "cpu"
    proj = attn.q_proj
    if cpu and type(proj) is torch.nn.Linear and proj.bias is None and not proj._forward_hooks \
            and not proj._forward_pre_hooks:  # F.linear's own matmul: mm(x, W^T), W^T cached
        q = torch.mm(h_row.view(b, -1), _transposed(proj.weight)).view(b, n_heads, head_dim)
    else:
        q = _project(proj, h_row).view(b, n_heads, head_dim)  # one row: [B, H, Dh]
    if cos_r.dtype != q.dtype:
        cos_r, sin_r = cos_r.to(q.dtype), sin_r.to(q.dtype)
    # _compat.apply_rope: x * cos + cat(-x2, x1) * sin, with cat(-x2, x1) * sin written as
    # x[..., perm] * (signs * sin): a copy and sign flips, so the same values in fewer ops;
    # cos/sin [B|1, 1, Dh] broadcast over the heads
    perm, signs = _rotate_half(head_dim, q.dtype, q.device)
    return q * cos_r + q.index_select(-1, perm) * (sin_r * signs)


def _attend_row(q: torch.Tensor, k: torch.Tensor, geometry: Tuple[int, int, int, float],
                allowed: Optional[torch.Tensor]) -> torch.Tensor:
    """Attention [B, T] of one post-RoPE query row ``q`` [B, H, Dh] (``_row_query``'s, or the layer's
    own from ``_captured_queries``) over ``k`` [B, Hkv, T, Dh], averaged over heads: K/V heads
    repeated, fp32 q k^T * scale, softmax (``attention_row_scores`` with ``allowed``), head mean."""
    n_heads, n_kv, _, scale = geometry
    b = q.shape[0]
    cpu = q.device.type == "cpu"
    if allowed is not None:
        return attention_row_scores(q.unsqueeze(2), k, allowed, scale)
    if q.dtype != torch.float32:
        q, k = q.float(), k.float()
    bk, _, t, d = k.shape
    if n_kv != n_heads:  # repeat each K/V head for its query heads (a copy, as repeat_interleave)
        k = k.index_select(1, _head_map(n_heads, n_kv, k.device))
    logits = torch.bmm(q.reshape(b * n_heads, 1, d), k.reshape(bk * n_heads, t, d).transpose(1, 2))
    # * scale: a cached fp32 0-dim tensor on the CPU multiplies as the Python float does (skips a
    # scalar conversion per op; so does the head count below)
    logits.mul_(_scalar(scale) if cpu else scale)
    probs = torch.softmax(logits, dim=-1).view(b, n_heads, t)
    # the head mean; on the CPU as torch's mean computes it (sum, then div_), without its overhead
    return probs.sum(dim=1).div_(_scalar(float(n_heads))) if cpu else probs.mean(dim=1)


def _score_decode_row(rec: Tuple[Any, ...]) -> torch.Tensor:
    """The action score [B, N] of one decode step's row, from what the action hook kept: the attention
    module, its geometry, the layer input's last row [B, 1, D], its RoPE cos/sin [B|1, 1, Dh], the
    layer's cached keys at that step [B, Hkv, T, Dh], the 4-D mask row or None, the kept visual
    indices when the layer saw only those (else None), N, and the layer's own post-RoPE query
    [B, H, 1, Dh] when it was handed over (else None: recomputed from the row). The same ops as ``_query_keys`` +
    ``attention_row_scores`` on the same tensors (the KV cache appends new tensors, so the kept keys
    are the keys of that step)."""
    attn, geometry, h_row, cos_r, sin_r, k, mask_row, kept, n, q = rec
    allowed = None if mask_row is None else _row_allowed(mask_row)
    plan = _row_plan(attn, geometry) if allowed is None and _plannable(h_row, cos_r, k) else None
    if plan is not None:
        probs = _plan_row_scores(plan, h_row, cos_r, sin_r, k)
    elif q is not None:  # the layer's own query [B, H, 1, Dh]
        probs = _attend_row(q.select(2, 0), k, geometry, allowed)
    else:
        probs = _row_scores(attn, geometry, h_row, cos_r, sin_r, k, allowed)  # [B, T]
    return _visual_scores(probs, kept, n)


def _capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream of ``t``'s device."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _visual_scores(probs: torch.Tensor, kept: Optional[torch.Tensor], n: int) -> torch.Tensor:
    """[B, N] visual columns of one row's attention ``probs`` [B, T]; ``kept`` [B, M]: the layer saw
    only these visual tokens (layer >= K), whose M columns are scattered back, 0 elsewhere."""
    if kept is None:
        return probs[:, VISUAL_START:VISUAL_START + n]
    vis = probs[:, VISUAL_START:VISUAL_START + kept.shape[1]]
    full = torch.zeros(probs.shape[0], n, dtype=vis.dtype, device=vis.device)
    full.scatter_(1, kept, vis)
    return full


def _zero_unkept(total: torch.Tensor, kept: Any, fresh: bool = False) -> torch.Tensor:
    """``total`` [B, N] with 0 for every token outside ``kept`` [B, M]: ALGORITHMS.md section 1, "tokens
    pruned at a step contribute 0". Needed when the action layer is below K: the pruned tokens are
    still keys there and get attention. Applied once to the step's sum of rows (the same numbers as
    zeroing each row: kept columns add up in the same order, pruned ones are 0 either way). kept may
    be ``(kept, complement)`` of one row (the complement as NumPy int64); fresh: ``total`` is a
    tensor only the caller holds, which may be zeroed in place."""
    if isinstance(kept, tuple):  # (kept, complement NumPy int64) of one row, from the host selection
        if fresh and total.is_cpu and not total.requires_grad:  # ``total`` is ours: zero it in place
            total.numpy()[:, kept[1]] = 0.0                      # (one NumPy call instead of a torch op)
            return total
        return total.index_fill(1, torch.from_numpy(kept[1]), 0.0)
    full = torch.zeros_like(total)
    full.scatter_(1, kept, total.gather(1, kept))
    return full


def _score_decode_rows(total: Optional[torch.Tensor], rows: List[Tuple[Any, ...]],
                       extra: Optional[Tuple[Any, ...]] = None, host: bool = False) -> Tuple[Any, Optional[torch.Tensor]]:
    """``total`` plus the scores of ``rows``, in order, and the scores [B, T] of ``extra`` (a
    ``_RowPlan`` job: plan, h_row, cos_r, sin_r, k) when it was scored together with them (else
    None). host: when every row goes through one plan, sum the rows' visual columns in NumPy and
    return the total as a NumPy array (fp32 adds round as torch's; a NumPy call costs a few us where
    a small torch op costs 10-60 us inside a policy step, and the step's selection runs NumPy
    anyway). Under no_grad: scores are never differentiated, and the kept tensors may be inference
    tensors of an earlier ``torch.inference_mode()`` call."""
    if rows and torch.is_grad_enabled():
        with torch.no_grad():
            return _score_decode_rows(total, rows, extra, host)
    if not rows:
        return total, None
    plan, with_extra = _common_plan(rows, extra)
    if plan is None:
        if _batchable(rows):
            return _batched_rows_total(total, rows), None
        for rec in rows:
            vis = _score_decode_row(rec)
            total = vis if total is None else total + vis
        return total, None
    if _BATCHED_DECODE and len(rows) > 1 and _consecutive(rows):  # one attention over the last row's keys
        probs = list(_plan_batched_rows(plan, rows).unbind(1))
        if with_extra:  # this step's semantic row: scored alone (its own numbers)
            probs.append(_plan_row_scores(*extra))
    else:  # every row through one plan: RoPE once for all of them (and this step's semantic row)
        jobs = [rec[2:6] for rec in rows] + ([extra[1:]] if with_extra else [])
        probs = _plan_rows_scores(plan, jobs)
    if host and (total is None or (total.is_cpu and total.dtype is torch.float32 and not total.requires_grad)):
        total = None if total is None else total.numpy()
        for rec, p in zip(rows, probs):
            vis = _visual_host(p.numpy(), rec[7], rec[8])
            total = vis if total is None else total + vis
    else:
        for rec, p in zip(rows, probs):
            vis = _visual_scores(p, rec[7], rec[8])
            total = vis if total is None else total + vis
    return total, (probs[-1] if with_extra else None)


def _batchable(rows: List[Tuple[Any, ...]]) -> bool:
    """Whether ``_batched_rows_total`` takes these decode rows (rows without a common ``_RowPlan``:
    the caller tried that first): ``_BATCHED_DECODE`` and ``_consecutive`` rows."""
    return _BATCHED_DECODE and _consecutive(rows)


def _consecutive(rows: List[Tuple[Any, ...]]) -> bool:
    """Whether decode rows can be scored together over the last row's keys: one attention module,
    batch size, kept set and N, mask rows all present or all absent, and keys of one layout whose
    length grows by one per row. DynamicCache (transformers 4.40 ``key_cache[i]``, 5.x
    ``layers[i].keys``) replaces its keys by ``cat(old, new)`` at each update, so every earlier row's
    keys are then a prefix of the last row's."""
    first = rows[0]
    k0 = first[5]
    attn, b, kept, n, t0, masked = first[0], first[2].shape[0], first[7], first[8], k0.shape[-2], first[6] is not None
    for r, rec in enumerate(rows):
        k = rec[5]
        if rec[0] is not attn or rec[2].shape[0] != b or rec[2].shape[1] != 1 or rec[7] is not kept \
                or rec[8] != n or (rec[6] is not None) != masked or k.shape[-2] != t0 + r \
                or k.shape[:2] != k0.shape[:2] or k.shape[-1] != k0.shape[-1] or k.dtype != k0.dtype \
                or k.device != k0.device:
            return False
    return True


def _rows_allowed(rows: List[Tuple[Any, ...]], t: int) -> torch.Tensor:
    """bool [B|1, 1|H, R, T] keys each decode row may attend over the last row's T keys: the host's
    mask row of each step (disallowed past its own length)."""
    parts = []
    for rec in rows:
        m = rec[6]
        fill = False if m.dtype == torch.bool else torch.finfo(m.dtype).min
        parts.append(m if m.shape[-1] == t else torch.nn.functional.pad(m, (0, t - m.shape[-1]), value=fill))
    return _bool_allowed(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))


def _batched_rows_total(total: Optional[torch.Tensor], rows: List[Tuple[Any, ...]]) -> torch.Tensor:
    """``total`` plus the visual scores of R consecutive decode rows (``_batchable``), computed
    together with torch ops (no host sync, no host copy): the rows' queries as their layer computed
    them (``_captured_queries``; else the R rows through q_proj and RoPE with each row's own cos/sin),
    fp32 attention over the last row's keys with the host's mask rows or, without them, a cached
    additive causal bias (row i attends the first T - R + 1 + i keys; no row is empty, so no zero
    fill), softmax, head mean, visual columns (scattered back when the layer saw only the kept
    tokens), summed over rows. The same numbers as scoring each row alone up to fp32 rounding (a
    masked softmax over the longer row and the batched matmul sum in another order)."""
    attn, geometry = rows[0][0], rows[0][1]
    n_heads, _, head_dim, scale = geometry
    b, r = rows[0][2].shape[0], len(rows)
    k = rows[-1][5]
    if all(rec[9] is not None for rec in rows):  # the layer's own queries [B, H, 1, Dh]
        q = rows[0][9] if r == 1 else torch.cat([rec[9] for rec in rows], dim=2)
    else:
        hidden = rows[0][2] if r == 1 else torch.cat([rec[2] for rec in rows], dim=1)  # [B, R, D]
        cos, sin = (_stack_rope([rec[i] for rec in rows], b) for i in (3, 4))          # [B|1, R, Dh]
        q = attn.q_proj(hidden).view(b, r, n_heads, head_dim).transpose(1, 2)
        q = _compat.apply_rope(q, cos, sin)
    if rows[0][6] is not None:  # the host's mask rows
        probs = attention_rows(q, k, _rows_allowed(rows, k.shape[-2]), scale).mean(dim=1)  # [B, R, T]
    else:
        probs = _causal_rows_probs(q, k, scale, _scalar(float(n_heads)))
    kept, n = rows[0][7], rows[0][8]
    if kept is None:
        vis = probs[:, :, VISUAL_START:VISUAL_START + n]
    else:
        m = kept.shape[1]
        vis = torch.zeros(b, r, n, dtype=probs.dtype, device=probs.device)
        vis.scatter_(2, kept.unsqueeze(1).expand(b, r, m), probs[:, :, VISUAL_START:VISUAL_START + m])
    step = vis.sum(dim=1)
    return step if total is None else total + step


def _stack_rope(parts: List[torch.Tensor], b: int) -> torch.Tensor:
    """Decode rows' cos (or sin) rows [B|1, 1, Dh] as one [B|1, R, Dh] (expanded to B if mixed)."""
    if len(parts) == 1:
        return parts[0]
    if any(p.shape[0] != parts[0].shape[0] for p in parts):
        parts = [p.expand(b, -1, -1) for p in parts]
    return torch.cat(parts, dim=1)


def _visual_host(probs: np.ndarray, kept: Optional[torch.Tensor], n: int) -> np.ndarray:
    """``_visual_scores`` of a NumPy row ``probs`` [B, T]: [B, N] (kept: [B, M] or None)."""
    if kept is None:
        return probs[:, VISUAL_START:VISUAL_START + n]
    kept = kept.numpy()
    b, m = kept.shape
    full = np.zeros((b, n), dtype=probs.dtype)
    full[np.arange(b)[:, None], kept] = probs[:, VISUAL_START:VISUAL_START + m]
    return full


def _mean_zeroed_host(total: np.ndarray, rows: int, zero: Any) -> torch.Tensor:
    """The step's mean action row from a NumPy total [B, N]: ``total / rows`` (the same fp32 division
    as the tensor path), then 0 for the tokens pruned at the step (``_zero_unkept``'s numbers)."""
    mean = total / np.float32(rows)  # a fresh array: zeroed in place
    if isinstance(zero, tuple):
        mean[:, zero[1]] = 0.0
    elif zero is not None:
        kept = zero.numpy()
        at = np.arange(mean.shape[0])[:, None]
        full = np.zeros_like(mean)
        full[at, kept] = mean[at, kept]
        mean = full
    return torch.from_numpy(mean)


def _common_plan(rows: List[Tuple[Any, ...]], extra: Optional[Tuple[Any, ...]]) -> Tuple[Optional[_RowPlan], bool]:
    """The ``_RowPlan`` every decode row can be scored through together (no mask row, plannable
    tensors, one attention module, one batch size), else None; and whether ``extra`` (a job) joins
    them (the same plan and batch size: the semantic layer is the action layer)."""
    plan, b = None, None
    for attn, geometry, h_row, cos_r, _, k, mask_row, *_ in rows:
        if mask_row is not None or not _plannable(h_row, cos_r, k) or (b is not None and h_row.shape[0] != b):
            return None, False
        row_plan = _row_plan(attn, geometry)
        if row_plan is None or (plan is not None and row_plan is not plan):
            return None, False
        plan, b = row_plan, h_row.shape[0]
    return plan, extra is not None and extra[0] is plan and extra[1].shape[0] == b


@dataclass
class _Runtime:
    """Per-model runtime state (``state.runtime``): temporal history plus this control step's scratch."""

    history: ActionHistory
    layer: int
    action_layer: int
    depth: int
    fused: bool
    phase: str = "idle"                          # "idle" | "prefill" | "decode"
    active: bool = False                          # a control step is in progress (prefill seen)
    warm: List[bool] = field(default_factory=list)
    text_mask: Optional[torch.Tensor] = None      # 2-D attention_mask of the prefill call (text space)
    n_images: int = 1
    visual_emb: Optional[torch.Tensor] = None     # [B, N, D] projector output (layer-0 visual embeddings)
    seq_len: int = 0                              # L: unpruned prefill length
    mm_mask: Optional[torch.Tensor] = None        # [B, L] bool, real (non-pad) tokens
    semantic: Optional[torch.Tensor] = None       # [B, N]
    kept_visual: Optional[torch.Tensor] = None    # [B, M] ascending, None when unpruned
    unkept: Optional[np.ndarray] = None           # int64 [N - M] the pruned visual tokens (batch 1, host path)
    keep_seq: Optional[torch.Tensor] = None       # [B, L'] kept positions of the prefill sequence
    upload: Any = None                            # the pinned host buffer of the last keep upload
    scored_sum: Optional[torch.Tensor] = None     # [B, N] sum of the action rows scored so far
    action_rows: int = 0                          # action rows this control step (scored or pending)
    pending: List[Tuple[Any, ...]] = field(default_factory=list)  # decode rows not scored yet
    stashed: Optional[Tuple[Any, ...]] = None     # the previous step's rows, committed at the next
                                                  # semantic scoring (see _Runtime.stash_step)
    decode_steps: int = 0
    query_rows: int = 1                           # action-query rows at the end of the prefill
    generate_prefills: Optional[int] = None       # empty-cache forwards in the running generate()
    memo: Dict[str, Tuple[Any, Any]] = field(default_factory=dict)  # per-call gathered layer inputs
    dense: bool = False                           # no padding in this step's rows (known without a sync)
    needs_action: bool = True                     # the strategy reads action scores ("dual", "action")
    keeps_all: bool = False                       # this step's budget keeps every token: no scores
    captures: Dict[int, Any] = field(default_factory=dict)  # layer -> _compat.QueryCapture (scoring layers)
    semantic_row: Optional[torch.Tensor] = None   # [B, L] the semantic row's scores (reused as the
                                                  # prefill action row when both are the same row)
    # Host time (perf_counter seconds) spent in vprune's code during this control step, by part:
    # scoring (attention rows at the semantic and action layers), selection (top-k, union, diversity,
    # keep indices), other (input checks, history update, gathers for the pruned layers). On CUDA
    # this is launch time only (kernels run asynchronously).
    t_scoring: float = 0.0
    t_selection: float = 0.0
    t_other: float = 0.0

    def memo_get(self, name: str, original: Any, make: Any) -> Any:
        """``make()``, computed once per call for the same ``original`` object (layers >= K share them)."""
        hit = self.memo.get(name)
        if hit is not None and hit[0] is original:
            return hit[1]
        value = make()
        self.memo[name] = (original, value)
        return value
    control_steps: int = 0
    last: Optional[Dict[str, Any]] = None         # what the last prefill decided (tensors, for stats)

    @property
    def action_sum(self) -> Optional[torch.Tensor]:
        """[B, N] sum of this control step's action rows (pending decode rows are scored first), 0 for
        the tokens pruned at this step."""
        if self.pending:
            rows, self.pending = self.pending, []
            self.scored_sum = _score_decode_rows(self.scored_sum, rows)[0]
        zero = self._unkept()
        if self.scored_sum is None or zero is None:
            return self.scored_sum
        return _zero_unkept(self.scored_sum, zero)

    def _unkept(self) -> Optional[torch.Tensor]:
        """The kept indices whose complement must be zeroed in this step's action score (a pruned step
        whose action layer is below K), else None."""
        if self.kept_visual is None or self.action_layer >= self.layer:
            return None
        return self.kept_visual if self.unkept is None else (self.kept_visual, self.unkept)

    def clear_step(self) -> None:
        self.t_scoring = self.t_selection = self.t_other = 0.0
        self.dense = False
        self.semantic_row = None
        self.phase = "idle"
        self.active = False
        self.warm = []
        self.text_mask = None
        self.n_images = 1
        self.visual_emb = None
        self.seq_len = 0
        self.mm_mask = None
        self.semantic = None
        self.kept_visual = None
        self.unkept = None
        self.keep_seq = None
        self.keeps_all = False
        self.upload = None
        self.scored_sum = None
        self.pending = []
        self.action_rows = 0
        self.decode_steps = 0

    def commit_action(self) -> None:
        """Append this control step's mean action row to the history (if one was recorded)."""
        self.commit_stashed()
        if self.active and self.action_rows > 0:
            total = self.action_sum
            if total is not None:
                self.history.record(total / self.action_rows)
        self.scored_sum = None
        self.pending = []
        self.action_rows = 0

    def stash_step(self) -> None:
        """At a new control step: keep this step's action rows for ``commit_stashed``, which the
        semantic hook calls right before it scores and selects. Scoring the decode rows there, next to
        the other scoring work, instead of inside each decode forward, saves most of their cost on the
        CPU (the same ops on the same tensors: the same numbers; the first op of a burst that runs
        after other model code costs 30-60 us more than the same op run again)."""
        self.commit_stashed()
        if self.active and self.action_rows > 0:
            self.stashed = (self.scored_sum, self.action_rows, self.pending, self._unkept())
        self.scored_sum = None
        self.pending = []
        self.action_rows = 0

    def commit_stashed(self, extra: Optional[Tuple[Any, ...]] = None) -> Optional[torch.Tensor]:
        """Score the stashed step's pending decode rows and append its mean action row to the history.
        extra: this step's semantic row as a ``_RowPlan`` job, scored together with the pending rows
        when they share its plan; returns its scores [B, T] then, else None."""
        if self.stashed is None:
            return None
        total, rows, pending, zero = self.stashed
        self.stashed = None
        total, extra_scores = _score_decode_rows(total, pending, extra, host=True)
        if isinstance(total, np.ndarray):
            self.history.record(_mean_zeroed_host(total, rows, zero))
        elif total is not None:
            # the mean, then the pruned tokens' zeros: the same bits as zeroing first (0 / rows = 0)
            mean = total / (_scalar(float(rows)) if total.device.type == "cpu" else rows)
            if zero is not None:
                mean = _zero_unkept(mean, zero, fresh=True)
            self.history.record(mean)
        return extra_scores


_SIGNATURES: Dict[type, inspect.Signature] = {}


def _action_query_rows(model: Any) -> int:
    """How many trailing prefill rows are action queries: ``action_query_rows`` on the model or its
    config (a chunked / parallel-decoding action head, e.g. OpenVLA-OFT's empty action tokens);
    default 1, the last prompt row, whose output is the first autoregressive action token."""
    # read without nn.Module.__getattr__'s slow miss (once per control step): instance, class, config
    config = model.__dict__.get("config")
    if config is None:
        config = getattr(model, "config", None)
    for owner in (model, config):
        if owner is None:
            continue
        value = owner.__dict__.get("action_query_rows") if hasattr(owner, "__dict__") else None
        if value is None and getattr(type(owner), "action_query_rows", None) is not None:
            value = getattr(owner, "action_query_rows", None)  # a class attribute or property
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"action_query_rows={value!r} is invalid: allowed an int >= 1")
            return value
    return 1


def _state_of(model: Any) -> Any:
    return model.__dict__.get("_vprune")


# ------------------------------------------------------------------------------ the patched class
_FORWARDS: Dict[type, Any] = {}


def _forward_for(original: type) -> Any:
    """The patched ``forward`` for host class ``original``: marks the control-step phase, then runs the
    host's forward. ``functools.wraps`` keeps the host's signature visible to ``generate``."""
    fn = _FORWARDS.get(original)
    if fn is not None:
        return fn

    @functools.wraps(original.forward)
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        state = _state_of(self)
        if state is None:  # being patched/unpatched: behave as the host
            return original.forward(self, *args, **kwargs)
        rt = state.runtime
        rt.memo.clear()
        t0 = time.perf_counter()
        state.integration._begin_call(self, state, original, args, kwargs)
        rt.t_other += time.perf_counter() - t0  # _begin_call may have started a step (timers reset)
        try:
            return original.forward(self, *args, **kwargs)
        finally:
            state.runtime.phase = "idle"
            state.runtime.memo.clear()

    _FORWARDS[original] = forward
    return forward


_PRUNED_FORWARDS: Dict[type, Any] = {}


def _pruned_forward_for(original: type) -> Any:
    """The ``forward`` of a decoder layer >= K (class ``original``): the layer's inputs cut to the kept
    rows (``_pruned_layer_inputs``) when this control step prunes, then the layer's own forward. An
    override instead of a forward pre-hook: 29 layers x 8 forwards a control step, where each hooked
    call takes ``nn.Module``'s slower hook path (~3-5 us more a call on a robot's host)."""
    fn = _PRUNED_FORWARDS.get(original)
    if fn is not None:
        return fn

    @functools.wraps(original.forward)
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        owner = self.__dict__.get("_vprune_pruning")
        if owner is not None:
            integration, state = owner
            rt: _Runtime = state.runtime
            keep = rt.keep_seq
            # nothing to gather without a keep set, outside a call, or at a decode step without a mask
            if keep is not None and rt.phase != "idle" and \
                    (rt.phase != "decode" or kwargs.get("attention_mask") is not None):
                t0 = time.perf_counter()
                changed = integration._pruned_layer_inputs(rt, keep, args, kwargs)
                rt.t_other += time.perf_counter() - t0
                if changed is not None:
                    args, kwargs = changed
        return original.forward(self, *args, **kwargs)

    _PRUNED_FORWARDS[original] = forward
    return forward


_GENERATES: Dict[type, Any] = {}


def _generate_for(original: type) -> Any:
    """The patched ``generate``: marks one generate call, so that a second empty-cache forward inside
    it (decoding without a KV cache) is caught instead of being taken for a new control step."""
    fn = _GENERATES.get(original)
    if fn is not None:
        return fn

    @functools.wraps(original.generate)
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        state = _state_of(self)
        if state is None or state.runtime.generate_prefills is not None:  # unpatched, or nested
            return original.generate(self, *args, **kwargs)
        state.runtime.generate_prefills = 0
        try:
            return original.generate(self, *args, **kwargs)
        finally:
            state.runtime.generate_prefills = None

    _GENERATES[original] = generate
    return generate


def _patched_reset(self, *args: Any, **kwargs: Any) -> Any:
    state = _state_of(self)
    if state is not None:
        state.integration.reset(self, state)
    return type(self)._vprune_original_class.reset(self, *args, **kwargs)


def reset_rows(model: Any, rows: Sequence[int]) -> None:
    """Start a new episode for some rows of a batched rollout: clears their action history and restarts
    their warm-up (``vprune.reset(model)`` clears every row)."""
    state = _state_of(model)
    if state is None or not isinstance(state.runtime, _Runtime):
        raise MissingInputsError("reset_rows: the model is not patched by vprune's OpenVLA integration")
    rt: _Runtime = state.runtime
    rt.commit_action()
    rt.clear_step()
    rt.history.reset(rows=list(rows))


# ------------------------------------------------------------------------------------ integration
class OpenVLAIntegration(Integration):
    """VLA-Pruner for OpenVLA-structured policies (see the module docstring)."""

    name = "openvla"
    techniques = ("visual_pruning",)
    tested_on = "transformers 4.40.1 + timm 0.9.16; transformers 5.24 + timm 1.0.31; torch 2.14.1"

    # ---------------------------------------------------------------------------- config
    def check_structure(self, model: Any) -> None:
        missing: List[str] = []
        vb = getattr(model, "vision_backbone", None)
        if vb is None:
            missing.append("vision_backbone")
        else:
            if getattr(vb, "featurizer", None) is None:
                missing.append("vision_backbone.featurizer")
            if getattr(vb, "use_fused_vision_backbone", False) and getattr(vb, "fused_featurizer", None) is None:
                missing.append("vision_backbone.fused_featurizer (use_fused_vision_backbone is True)")
        if getattr(model, "projector", None) is None:
            missing.append("projector")
        if getattr(model, "language_model", None) is None:
            missing.append("language_model")
        else:
            layers = _decoder_layers(model)
            if layers is None or len(layers) == 0:
                missing.append("language_model.model.layers (decoder layers)")
            else:
                for i, layer in enumerate(layers):
                    attn = getattr(layer, "self_attn", None)
                    need = ("q_proj", "k_proj")
                    if attn is None or any(getattr(attn, n, None) is None for n in need):
                        missing.append(f"language_model.model.layers[{i}].self_attn.q_proj/k_proj")
                        break
        if missing:
            raise IncompatibleModelError(
                f"{type(model).__name__} matched the OpenVLA integration by class name but lacks "
                f"{', '.join(missing)}; it needs vision_backbone(.featurizer[, .fused_featurizer]), "
                f"projector and a Llama-style language_model")

    def _depth(self, model: Any) -> int:
        layers = _decoder_layers(model)
        if layers is None:
            self.check_structure(model)
        return len(layers)

    def default_config(self, model: Any, **overrides: Any) -> TechniqueConfig:
        overrides.setdefault("strategy", "dual")
        return VisualPruning(**overrides)

    def resolve_config(self, model: Any, config: TechniqueConfig) -> TechniqueConfig:
        if not isinstance(config, VisualPruning):
            raise ValueError(f"the OpenVLA integration applies VisualPruning, got {type(config).__name__}")
        if getattr(config, "cuda_graph", False):
            raise ValueError(
                f"VisualPruning.cuda_graph=True is not supported for {type(model).__name__}: the OpenVLA integration "
                "runs its pruned layers eagerly (allowed: cuda_graph=False; the option serves LLaVA and Qwen2-VL)")
        depth = self._depth(model)
        changes: Dict[str, Any] = {}
        if config.strategy is None:
            changes["strategy"] = "dual"
        layer = config.layer if config.layer is not None else default_layer(depth)
        if not 1 <= layer <= depth - 1:
            raise ValueError(
                f"VisualPruning.layer={layer} is invalid for {type(model).__name__}: allowed an int in "
                f"[1, {depth - 1}] (its language model has {depth} decoder layers)")
        changes["layer"] = layer
        action_layer = config.action_layer if config.action_layer is not None else default_action_layer(depth)
        if not 0 <= action_layer <= depth - 1:
            raise ValueError(
                f"VisualPruning.action_layer={action_layer} is invalid for {type(model).__name__}: allowed "
                f"an int in [0, {depth - 1}] (its language model has {depth} decoder layers)")
        changes["action_layer"] = action_layer
        return config.replace(**changes)

    # ----------------------------------------------------------------------------- apply
    def apply(self, model: Any, config: TechniqueConfig, state: Any) -> None:
        layers = _decoder_layers(model)
        depth = len(layers)
        k, a = config.layer, config.action_layer
        vb = model.vision_backbone
        rt = _Runtime(history=ActionHistory(config.history, config.decay, config.effective_warmup),
                      layer=k, action_layer=a, depth=depth,
                      fused=bool(getattr(vb, "use_fused_vision_backbone", False)),
                      needs_action=config.strategy in ("dual", "action"))
        state.runtime = rt
        original = type(model)
        namespace: Dict[str, Any] = {"forward": _forward_for(original)}
        if callable(getattr(original, "reset", None)):
            namespace["reset"] = _patched_reset
        if callable(getattr(original, "generate", None)):
            namespace["generate"] = _generate_for(original)
        cls = vprune_subclass(original, namespace, tag="openvla")
        state.undo.swap_class(model, cls)

        undo = state.undo
        undo.add_hook(model.projector.register_forward_hook(self._projector_hook(state)))
        undo.add_hook(layers[0].register_forward_pre_hook(self._first_layer_hook(model, state), with_kwargs=True))
        undo.add_hook(layers[k - 1].self_attn.register_forward_hook(
            self._semantic_hook(model, state), with_kwargs=True))
        for i in range(k, depth):  # a forward override, not a pre-hook: no hook dispatch at every call
            layer = layers[i]
            undo.set_attr(layer, "_vprune_pruning", (self, state))
            undo.swap_class(layer, vprune_subclass(type(layer), {"forward": _pruned_forward_for(type(layer))},
                                                   tag="openvla-pruned"))
        undo.add_hook(layers[a].self_attn.register_forward_hook(
            self._action_hook(state, a), with_kwargs=True))  # does nothing unless rt.needs_action
        for i in sorted({k - 1, a}):  # the scoring layers hand over their post-RoPE queries (see _fast_prefill_mean)
            sink = _compat.capture_queries(layers[i].self_attn, undo)
            if sink is not None:
                rt.captures[i] = sink
        state.targets.extend([
            f"language_model layers {k}..{depth - 1} (visual tokens pruned from layer {k})",
            f"semantic score at layer {k - 1}",
            f"action score at layer {a}",
            "projector output (layer-0 visual embeddings)",
        ])
        if "reset" in namespace:
            state.targets.append(f"{original.__name__}.reset() also clears the action history")

    # ------------------------------------------------------------------------- per call
    def _begin_call(self, model: Any, state: Any, original: type, args: tuple, kwargs: dict) -> None:
        rt: _Runtime = state.runtime
        state.calls += 1
        if args:  # positional arguments: name them from the host's signature (generate passes keywords)
            sig = _SIGNATURES.get(original)
            if sig is None:
                sig = _SIGNATURES[original] = inspect.signature(original.forward)
            try:
                bound = sig.bind_partial(model, *args, **kwargs).arguments
            except TypeError:
                bound = dict(kwargs)
        else:
            bound = kwargs
        extra = bound.get("kwargs") or {}
        cache = None
        for name in ("cache", "past_key_values", "past_key_value"):
            cache = bound.get(name, extra.get(name))
            if cache is not None:
                break
        input_ids = bound.get("input_ids")
        pixel_values = bound.get("pixel_values")
        past = _compat.cache_seq_length(cache)
        if past > 0:
            rt.phase = "decode" if rt.active else "idle"
            return
        # A new control step (empty cache): close the previous one, check the inputs.
        if rt.generate_prefills is not None:
            rt.generate_prefills += 1
            if rt.generate_prefills > 1:
                raise VPruneError(
                    f"generate() on patched {type(model).__mro__[1].__name__} ran the whole prompt again "
                    f"without a KV cache (use_cache=False, or a host that drops the cache between steps): "
                    f"every action token would count as a new control step of the pruning history. "
                    f"Generate with use_cache=True")
        rt.stash_step()
        rt.clear_step()
        cls_name = type(model).__mro__[1].__name__
        n_in = None
        if isinstance(input_ids, torch.Tensor):
            n_in = input_ids.shape[1]
        if pixel_values is None:
            if n_in == 1 and cache is not None:
                raise MissingInputsError(self._bug_message(cls_name))
            raise MissingInputsError(
                f"patched {cls_name} ran a prefill without pixel_values: its vision tower did not run, so "
                f"there were no visual tokens to prune (vprune refuses to run silently unpruned). Pass the "
                f"image (pixel_values) with the prompt"
                + (f"; {self._bug_hint()}" if n_in == 1 else ""))
        if n_in == 1:
            raise MissingInputsError(self._bug_message(cls_name))
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be a [B, C, H, W] tensor, got {type(pixel_values).__name__}"
                             f"{tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else ''}")
        per_image = 6 if rt.fused else 3
        channels = pixel_values.shape[1]
        if channels % per_image:
            raise ValueError(
                f"pixel_values has {channels} channels: allowed a multiple of {per_image} "
                f"({'3 + 3 per image for the fused backbone' if rt.fused else '3 per image'})")
        batch = pixel_values.shape[0]
        rt.query_rows = _action_query_rows(model)
        rt.warm = rt.history.begin_step(batch)
        rt.n_images = channels // per_image
        rt.text_mask = bound.get("attention_mask")
        rt.phase = "prefill"
        rt.active = True
        rt.control_steps += 1

    @staticmethod
    def _bug_hint() -> str:
        return (f"installed transformers is {_compat.transformers_version_str()}; from 4.50 on, generate() passes an "
                f"empty cache object at the first step and OpenVLA's remote prepare_inputs_for_generation "
                f"takes that for a cached decode step, cutting the prompt to its last token and skipping the "
                f"vision tower")

    def _bug_message(self, cls_name: str) -> str:
        return (f"patched {cls_name} ran its first step with an empty KV cache object and a single input "
                f"token, so the vision tower did not run and the action would come from a 1-token prompt "
                f"without the image. This is the transformers >= 4.50 incompatibility of OpenVLA's remote "
                f"code ({self._bug_hint()}). Use transformers 4.40.1 with timm 0.9.16 as OpenVLA requires, "
                f"or a prepare_inputs_for_generation that tests the cache length instead of "
                f"'past_key_values is not None'")

    # ------------------------------------------------------------------------- hooks
    def _projector_hook(self, state: Any):
        def hook(module: Any, args: tuple, output: Any) -> None:
            rt: _Runtime = state.runtime
            if rt.phase == "prefill" and isinstance(output, torch.Tensor):
                rt.visual_emb = output
        return hook

    def _first_layer_hook(self, model: Any, state: Any):
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            rt: _Runtime = state.runtime
            if rt.phase != "prefill":
                return None
            t0 = time.perf_counter()
            if rt.visual_emb is None:
                raise MissingInputsError(
                    f"patched {type(model).__mro__[1].__name__} ran a prefill in which its vision tower / "
                    f"projector did not run: there were no visual tokens to prune. "
                    f"If this came from generate(): {self._bug_hint()}")
            hidden = _compat.layer_hidden(args, kwargs)
            b, n = rt.visual_emb.shape[:2]
            if hidden.shape[0] != b or hidden.shape[1] < VISUAL_START + n:
                raise MissingInputsError(
                    f"the LLM input [{hidden.shape[0]}, {hidden.shape[1]}] cannot hold [BOS, {n} visual "
                    f"tokens, prompt] for a batch of {b}: the host did not insert the projected patches "
                    f"after BOS as OpenVLA does")
            if n % rt.n_images:
                raise ValueError(f"{n} visual tokens cannot be split evenly over {rt.n_images} images")
            rt.seq_len = hidden.shape[1]
            tm = rt.text_mask
            rt.mm_mask = None  # None: every token is real
            rt.dense = _FAST_PATHS  # no padding: scoring rows are plain slices, no row masks
            if isinstance(tm, torch.Tensor) and tm.dim() == 2 and tm.shape[1] + n == rt.seq_len:
                if not _padding_free(tm, kwargs):
                    ones = torch.ones(b, n, dtype=torch.bool, device=tm.device)
                    rt.mm_mask = torch.cat([tm[:, :1].bool(), ones, tm[:, 1:].bool()], dim=1).to(hidden.device)
                    rt.dense = False
            rt.t_other += time.perf_counter() - t0
            return None
        return hook

    _geometry: "weakref.WeakKeyDictionary[Any, Tuple[int, int, int, float]]" = weakref.WeakKeyDictionary()

    def _geometry_of(self, attn: Any) -> Tuple[int, int, int, float]:
        """``_compat.attention_geometry(attn)``, read once per module (reading a transformers config
        is slow)."""
        geometry = self._geometry.get(attn)
        if geometry is None:
            geometry = self._geometry[attn] = _compat.attention_geometry(attn)
        return geometry

    def _query_keys(self, attn: Any, layer_idx: int, args: tuple, kwargs: dict,
                    rows: Any) -> Tuple[torch.Tensor, torch.Tensor, float]:
        """Post-RoPE queries of ``rows`` of this call and every key of the layer. rows: int64 [B, R]
        (per batch row), a ``slice`` (the same rows for the whole batch: plain views), or None (the last row).

        Keys come from the layer's KV cache (already updated by this call) when there is one, else they
        are recomputed from the normalised input. Returns q [B, H, R, Dh], k [B, Hkv, T, Dh], scale."""
        hidden = _compat.layer_hidden(args, kwargs)
        geometry = self._geometry_of(attn)
        n_heads, n_kv, head_dim, scale = geometry
        b, length, _ = hidden.shape
        cos, sin = _compat.rope_cos_sin(attn, hidden, kwargs)
        if cos.shape[0] != b:
            cos, sin = cos.expand(b, *cos.shape[1:]), sin.expand(b, *sin.shape[1:])
        if rows is None:  # the last row (a decode step)
            rows = slice(length - 1, length)
        if isinstance(rows, slice):  # the same rows in every batch row: plain slices
            h_rows, cos_r, sin_r = hidden[:, rows], cos[:, rows], sin[:, rows]
            n_rows = h_rows.shape[1]
        else:
            h_rows, cos_r, sin_r = _gather_seq(hidden, rows, 1), _gather_seq(cos, rows, 1), _gather_seq(sin, rows, 1)
            n_rows = rows.shape[1]
        q = attn.q_proj(h_rows).view(b, n_rows, n_heads, head_dim).transpose(1, 2)
        q = _compat.apply_rope(q, cos_r, sin_r)
        k = _compat.cache_layer_keys(_compat.layer_cache(kwargs), layer_idx)
        if k is None:
            k = attn.k_proj(hidden).view(b, length, n_kv, head_dim).transpose(1, 2)
            k = _compat.apply_rope(k, cos, sin)
        return q, k, scale

    def _last_row_scores(self, attn: Any, rt: _Runtime, layer_idx: int, args: tuple, kwargs: dict, row: int,
                         length: int) -> torch.Tensor:
        """Scores [B, length] of query row ``row`` (the same in every batch row: no padding) over the
        first ``length`` keys of this prefill (``_query_keys`` + ``attention_row_scores``, leaner; the
        layer's own query when it was handed over and no ``_RowPlan`` scores the row)."""
        hidden = _compat.layer_hidden(args, kwargs)
        geometry = self._geometry_of(attn)
        keys = _compat.cache_layer_keys(_compat.layer_cache(kwargs), layer_idx)
        if keys is None:
            q, k, scale = self._query_keys(attn, layer_idx, args, kwargs, slice(row, row + 1))
            return attention_row_scores(q, k[..., :length, :], self._slice_mask(kwargs, slice(row, row + 1), length),
                                        scale)
        rows = slice(row, row + 1)
        k = keys if keys.shape[-2] == length else keys[..., :length, :]
        allowed = self._slice_mask(kwargs, rows, length)
        cos, sin = _compat.rope_cos_sin(attn, hidden, kwargs)
        h_row, cos_r, sin_r = hidden[:, rows], cos[:, rows], sin[:, rows]
        plan = _row_plan(attn, geometry) if allowed is None and _plannable(h_row, cos_r, k) else None
        if plan is not None:
            return _plan_row_scores(plan, h_row, cos_r, sin_r, k)
        q = _captured_queries(rt, layer_idx, keys, hidden.shape[1])  # [B, H, L, Dh]: no q_proj, no RoPE
        if q is not None:
            return _attend_row(q[:, :, row], k, geometry, allowed)
        return _row_scores(attn, geometry, h_row, cos_r, sin_r, k, allowed)

    def _last_row_job(self, attn: Any, layer_idx: int, args: tuple, kwargs: dict, row: int,
                      length: int) -> Optional[Tuple[Any, ...]]:
        """``_last_row_scores``'s inputs as a ``_RowPlan`` job (plan, h_row, cos_r, sin_r, k) when it
        would score through a plan (CPU fp32, no mask needed, keys in the cache), else None."""
        k = _compat.cache_layer_keys(_compat.layer_cache(kwargs), layer_idx)
        if k is None or not _FAST_PATHS:
            return None
        hidden = _compat.layer_hidden(args, kwargs)
        rows = slice(row, row + 1)
        if k.shape[-2] != length:
            k = k[..., :length, :]
        if self._slice_mask(kwargs, rows, length) is not None:
            return None
        cos, sin = _compat.rope_cos_sin(attn, hidden, kwargs)
        plan = _row_plan(attn) if _plannable(hidden, cos, k) else None
        # the row as [B, D] (one view op; the plan's matmul takes it as it is)
        return None if plan is None else (plan, hidden.select(1, row), cos[:, rows], sin[:, rows], k)

    @staticmethod
    def _slice_mask(kwargs: dict, rows: slice, key_len: int) -> Optional[torch.Tensor]:
        """``_row_mask`` for rows given as a slice of a sequence without padding: bool [B|1, 1, R, T],
        or None when every key is allowed (the last row of a causal sequence: no mask op at all)."""
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            m = mask[..., :key_len]
            if m.shape[2] != 1:
                m = m[:, :, rows]
            return _row_allowed(m)
        start, stop = rows.start, rows.stop
        if start == stop - 1 == key_len - 1:
            return None
        keys = torch.arange(key_len)
        pos = torch.arange(start, stop)
        return (keys.view(1, -1) <= pos.view(-1, 1)).view(1, 1, stop - start, key_len)

    def _row_mask(self, kwargs: dict, rows: torch.Tensor, key_len: int, query_pos: torch.Tensor,
                  key_real: Optional[torch.Tensor]) -> torch.Tensor:
        """bool [B, 1, R, T]: which keys each row may attend (from the 4-D mask when the host built one,
        else causal by position in this layer's sequence plus the padding columns)."""
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            m = mask[..., :key_len]
            if m.shape[2] != 1:
                m = _gather_seq(m, rows, 2)
            return _bool_allowed(m)
        keys = torch.arange(key_len, device=rows.device)
        allowed = keys.view(1, 1, -1) <= query_pos.unsqueeze(-1)  # [B, R, T]
        if key_real is not None:
            allowed = allowed & key_real[:, None, :key_len]
        return allowed.unsqueeze(1)

    def _semantic_hook(self, model: Any, state: Any):
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            rt: _Runtime = state.runtime
            if rt.phase != "prefill" or rt.visual_emb is None:
                return None
            t0 = time.perf_counter()
            config: VisualPruning = state.config
            length = rt.seq_len
            b, n = rt.visual_emb.shape[:2]
            per = n // rt.n_images
            if config.budget(per) >= per:  # every token kept (keep=1.0): nothing to score or record
                rt.keeps_all = True
                rt.commit_stashed()
                self._select(state, rt, config)
                rt.t_selection += time.perf_counter() - t0
                return None
            seed_row = None  # prefill_mean's fast path: the last row's scores, the first action row
            if config.semantic == "last" and rt.dense:  # no padding: the row is the same in every batch row
                last = length - 1
                if rt.query_rows > 1:  # a chunked head: the last prompt row precedes the action queries
                    last = max(last - rt.query_rows, VISUAL_START + n)
                job = self._last_row_job(module, rt.layer - 1, args, kwargs, last, length)
                # the previous step's action rows (scored here: see stash_step), with this row when
                # they share its plan
                scores = rt.commit_stashed(job)
                if scores is None:
                    scores = _plan_row_scores(*job) if job is not None else \
                        self._last_row_scores(module, rt, rt.layer - 1, args, kwargs, last, length)  # [B, L]
            elif config.semantic == "prefill_mean" and rt.dense and \
                    (fast := self._fast_prefill_mean(module, rt, args, kwargs, length)) is not None:
                scores, seed_row = fast
            else:
                rt.commit_stashed()  # the previous step's action rows (scored here: see stash_step)
                device = rt.visual_emb.device
                pos = torch.arange(length, device=device)
                real = rt.mm_mask if rt.mm_mask is not None else torch.ones(b, length, dtype=torch.bool, device=device)
                if config.semantic == "last":
                    last = torch.where(real, pos, torch.full_like(pos, -1)).amax(dim=1)  # last real row
                    if rt.query_rows > 1:  # a chunked head: the last prompt row precedes the action queries
                        last = (last - rt.query_rows).clamp_min(VISUAL_START + n)
                    rows = last.view(b, 1)
                    weights = None
                else:  # prefill_mean: every real row of the prefill
                    rows = pos.view(1, -1).expand(b, -1)
                    weights = real.float()
                q, k, scale = self._query_keys(module, rt.layer - 1, args, kwargs, rows)
                k = k[..., :length, :]
                allowed = self._row_mask(kwargs, rows, length, rows, real)
                scores = attention_row_scores(q, k, allowed, scale, row_weights=weights)  # [B, L]
            rt.semantic = scores[:, VISUAL_START:VISUAL_START + n]
            # the last prompt row is also the first action row when the action layer is K-1: the
            # same row, layer, keys and mask, so the same numbers (the action hook then skips it)
            rt.semantic_row = None
            seed = _FAST_PATHS and config.semantic == "last" and rt.query_rows == 1 and rt.needs_action \
                and rt.action_layer == rt.layer - 1
            if seed:
                rt.semantic_row = scores
            elif seed_row is not None:
                rt.semantic_row = seed_row
                seed = True
            t1 = time.perf_counter()
            rt.t_scoring += t1 - t0
            self._select(state, rt, config)
            t2 = time.perf_counter()
            rt.t_selection += t2 - t1
            if seed:  # the first action row (the tokens just pruned get 0 when the step is committed)
                rt.scored_sum = rt.semantic if seed_row is None else seed_row[:, VISUAL_START:VISUAL_START + n]
                rt.action_rows = 1
                rt.t_scoring += time.perf_counter() - t2
            return None
        return hook

    def _fast_prefill_mean(self, attn: Any, rt: _Runtime, args: tuple, kwargs: dict,
                           length: int) -> Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """``semantic="prefill_mean"`` without padding: (scores [B, L], the last row's scores [B, L]
        when it is also the first action row, else None), the previous step's action rows committed;
        None (nothing done) when the general path must run: no plan (not fp32 CPU or q_proj not a plain
        Linear, and no handed-over queries), no cached keys, or a host mask that blocks a whole row.
        With the layer's own queries and no ``_RowPlan`` (CUDA, other dtypes) a ``_QueryPlan`` scores
        them (not when the first action row must be scored alone: ``_BATCHED_DECODE`` off)."""
        layer_idx = rt.layer - 1
        k = _compat.cache_layer_keys(_compat.layer_cache(kwargs), layer_idx)
        if k is None:
            return None
        hidden = _compat.layer_hidden(args, kwargs)
        queries = _captured_queries(rt, layer_idx, k, hidden.shape[1])  # the layer's own, when handed over
        cos, sin = _compat.rope_cos_sin(attn, hidden, kwargs)
        if k.shape[-2] != length:
            k = k[..., :length, :]
        plan = _row_plan(attn) if _plannable(hidden, cos, k) and hidden.shape[1] == length else None
        seeds = rt.query_rows == 1 and rt.needs_action and rt.action_layer == layer_idx
        if plan is None and queries is not None and hidden.shape[1] == length and (_BATCHED_DECODE or not seeds):
            plan = _QueryPlan(self._geometry_of(attn))
        blocked = None if plan is None else self._prefill_blocked(kwargs, length, k.device)
        if blocked is None:
            return None
        if seeds and _BATCHED_DECODE:  # the last row as the first action row, from the rows computed
            rt.commit_stashed()         # here (the numbers of scoring it alone within fp32 rounding)
            return _plan_mean_scores(plan, hidden, cos, sin, k, blocked, last_row=True, q=queries)
        job = None  # the last row as the first action row (the action layer is K-1): scored alone (the
        if seeds:   # general path's numbers), with the decode rows
            if blocked.dtype == torch.bool:  # a host mask: its last row may need masking
                job = self._last_row_job(attn, layer_idx, args, kwargs, length - 1, length)
            else:  # causal: the last row attends every key (``_last_row_job``'s job, without lookups)
                job = (plan, hidden.select(1, length - 1), cos[:, length - 1:], sin[:, length - 1:], k)
        seed_row = rt.commit_stashed(job)
        if seed_row is None and job is not None:
            seed_row = _plan_row_scores(*job)
        return _plan_mean_scores(plan, hidden, cos, sin, k, blocked, q=queries), seed_row

    @staticmethod
    def _prefill_blocked(kwargs: dict, length: int, device: torch.device) -> Optional[torch.Tensor]:
        """The keys each prefill row may not attend (no padding): bool [B|1, 1|H, L, L] from the host's
        4-D mask when there is one (``_row_mask``'s rows), else the cached fp32 ``_causal_bias`` on
        ``device``; None when a row would have no key at all (the general path zeroes such rows) or
        when finding that out would sync an accelerator (a 4-D mask off the CPU)."""
        mask = kwargs.get("attention_mask")
        if not (isinstance(mask, torch.Tensor) and mask.dim() == 4):
            return _causal_bias(length, device)
        m = mask[..., :length]
        if m.shape[2] != length or m.device.type != "cpu":
            return None
        blocked = ~_bool_allowed(m)
        return None if bool(blocked.all(dim=-1).any()) else blocked

    def _select(self, state: Any, rt: _Runtime, config: VisualPruning) -> None:
        emb = rt.visual_emb
        b, n = emb.shape[:2]
        per = n // rt.n_images
        budgets = [config.budget(per)] * rt.n_images
        warm = any(rt.warm)
        m_total = sum(budgets)
        rt.kept_visual = None
        rt.unkept = None
        rt.keep_seq = None
        if not warm and m_total < n:
            semantic = rt.semantic
            action = rt.history.smoothed()
            if action is None:
                action = semantic
            elif rt.history.all_rows_recorded():  # known on the host: no where() needed
                if not (action.is_cpu and semantic.is_cpu) and action.device != semantic.device:
                    action = action.to(semantic.device)
            else:
                has = rt.history.has_history()
                action = torch.where(has.view(-1, 1).to(action.device), action.to(semantic.device), semantic)
            host = None
            if config.strategy == "dual" and len(budgets) == 1:  # CPU: NumPy (None elsewhere)
                host = dual_select_host(semantic, action, emb, budgets[0]) if _FAST_PATHS else None
                if host is None and _HOST_SELECT and not semantic.is_cpu:  # an accelerator: the loop on the host
                    host = dual_select_packed(semantic, action, emb, budgets[0])
            if host is not None:  # the keep indices in NumPy too: a few calls instead of six torch ops
                head, tail = _seq_parts(b, n, rt.seq_len)
                kept = torch.from_numpy(host)
                keep_seq = torch.from_numpy(np.concatenate((head, host + VISUAL_START, tail), axis=1))
                if emb.is_cpu:
                    rt.kept_visual, rt.keep_seq = kept, keep_seq
                    if b == 1 and rt.action_layer < rt.layer:  # the pruned ones, for the action score's zeros
                        pruned = np.ones(n, dtype=bool)
                        pruned[host[0]] = False
                        rt.unkept = np.flatnonzero(pruned)
                else:  # one pinned non-blocking upload of both (no sync)
                    (rt.kept_visual, rt.keep_seq), rt.upload = to_device([kept, keep_seq], emb.device)
            else:
                picks = []
                for i, m in enumerate(budgets):
                    sl = slice(i * per, (i + 1) * per)
                    if config.strategy == "dual":
                        idx = dual_select(semantic[:, sl], action[:, sl], emb[:, sl], m)
                    else:
                        idx = select_tokens(config.strategy, m, scores=semantic[:, sl], action_scores=action[:, sl],
                                            embeddings=emb[:, sl], seed=config.seed + rt.control_steps)
                    picks.append(idx + i * per if i else idx)
                kept = torch.cat(picks, dim=1) if len(picks) > 1 else picks[0]  # ascending: blocks in order
                length = rt.seq_len
                rt.kept_visual = kept
                head = torch.arange(VISUAL_START, device=kept.device).view(1, -1).expand(b, -1)
                tail = torch.arange(VISUAL_START + n, length, device=kept.device).view(1, -1).expand(b, -1)
                rt.keep_seq = torch.cat([head, kept + VISUAL_START, tail], dim=1)
        rt.last = {
            "batch": b, "visual_before": n, "images": rt.n_images, "budgets": budgets,
            "kept_visual": rt.kept_visual, "warm": list(rt.warm), "seq_len": rt.seq_len,
            "kept_seq_len": rt.seq_len if rt.keep_seq is None else rt.keep_seq.shape[1],
            "decode_steps": 0,
        }

    @staticmethod
    def _pruned_layer_inputs(rt: _Runtime, keep: torch.Tensor, args: tuple,
                             kwargs: dict) -> Optional[Tuple[tuple, dict]]:
        length = rt.seq_len
        hidden = _compat.layer_hidden(args, kwargs)
        if rt.phase == "prefill":
            kw = dict(kwargs)
            # batch 1: the one row of keep, taken once per call (every gather below reuses it)
            row = rt.memo_get("keep_row", keep, lambda: keep[0]) if keep.shape[0] == 1 else None
            if hidden.shape[1] == length:
                if hidden.is_cpu and row is not None:    # one op instead of the kernel
                    kept_hidden = hidden.index_select(1, row)  # dispatcher's five (same rows)
                else:
                    kept_hidden = gather_rows(hidden, keep, 1)
                args, kw = _compat.with_layer_hidden(args, kw, kept_hidden)
            elif hidden.shape[1] != keep.shape[1]:
                raise RuntimeError(f"pruned layer got {hidden.shape[1]} tokens, expected {length} or "
                                   f"{keep.shape[1]}")
            # every layer >= K gets the same position / mask objects: gather them once per call
            pid = kw.get("position_ids")
            if isinstance(pid, torch.Tensor) and pid.shape[-1] == length:
                kw["position_ids"] = rt.memo_get("position_ids", pid, lambda: _gather_seq(
                    pid if pid.dim() == 2 else pid.view(-1, length), keep, 1, row))
            pe = kw.get("position_embeddings")
            if isinstance(pe, (tuple, list)) and pe[0].shape[-2] == length:
                kw["position_embeddings"] = rt.memo_get(
                    "position_embeddings", pe, lambda: (_gather_seq(pe[0], keep, 1, row), _gather_seq(pe[1], keep, 1, row)))
            cp = kw.get("cache_position")
            if isinstance(cp, torch.Tensor) and cp.dim() == 1 and cp.shape[0] == length:
                kw["cache_position"] = rt.memo_get("cache_position", cp,
                                                   lambda: cp.index_select(0, keep[0] if row is None else row))
            mask = kw.get("attention_mask")
            if isinstance(mask, torch.Tensor):
                kw["attention_mask"] = rt.memo_get("attention_mask", mask,
                                                   lambda: _gather_prefill_mask(mask, keep, length))
            return args, kw
        # decode: gather the mask columns of the prompt part (generated columns follow as they are)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() in (2, 4) and mask.shape[-1] >= length:
            kw = dict(kwargs)
            kw["attention_mask"] = rt.memo_get("decode_mask", mask,
                                               lambda: _gather_decode_mask(mask, keep, length))
            return args, kw
        return None

    def _action_hook(self, state: Any, layer_idx: int):
        geometry_of: Dict[int, Tuple[int, int, int, float]] = {}  # this layer's attention geometry

        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            rt: _Runtime = state.runtime
            if rt.phase not in ("prefill", "decode") or not rt.active or rt.visual_emb is None \
                    or not rt.needs_action or rt.keeps_all:  # fastv, divprune, keep=1.0: no action scores
                return None
            if rt.semantic_row is not None and rt.phase == "prefill" and layer_idx == rt.layer - 1:
                return None  # the semantic hook recorded this row (the same numbers)
            t0 = time.perf_counter()
            if rt.phase == "decode" and _FAST_PATHS:  # the common case first: keep what the row's score needs
                hidden = kwargs["hidden_states"] if not args else args[0]
                k = _compat.cache_layer_keys(_compat.layer_cache(kwargs), layer_idx)
                mask = kwargs.get("attention_mask")
                # off the CPU only when the rows are scored later (batched) and no CUDA graph is
                # being captured (as the general branch below decides)
                if k is not None and hidden.shape[1] == 1 and mask is None and \
                        (k.is_cpu or (_BATCHED_DECODE and not _capturing(k))):
                    geometry = geometry_of.get(id(module))
                    if geometry is None:
                        geometry = geometry_of[id(module)] = _compat.attention_geometry(module)
                    cos, sin = _compat.rope_cos_sin(module, hidden, kwargs)
                    pruned_here = rt.keep_seq is not None and layer_idx >= rt.layer
                    rt.pending.append((module, geometry, hidden, cos, sin, k, None,
                                       rt.kept_visual if pruned_here else None, rt.visual_emb.shape[1],
                                       _captured_queries(rt, layer_idx, k, 1)))
                    rt.decode_steps += 1
                    rt.action_rows += 1
                    rt.t_scoring += time.perf_counter() - t0
                    return None
            hidden = _compat.layer_hidden(args, kwargs)
            b, q_len = hidden.shape[:2]
            n = rt.visual_emb.shape[1]
            pruned_here = rt.keep_seq is not None and layer_idx >= rt.layer
            n_rows = 1
            probs = None
            if rt.phase == "prefill":
                # the last real prompt row (or the last ``action_query_rows`` rows of a chunked
                # action head), in this layer's (possibly pruned) sequence
                n_rows = min(rt.query_rows, q_len)
                if rt.dense and n_rows == 1:
                    probs = self._last_row_scores(module, rt, layer_idx, args, kwargs, q_len - 1, q_len)
                elif rt.dense:
                    rows = slice(q_len - n_rows, q_len)
                    q, k, scale = self._query_keys(module, layer_idx, args, kwargs, rows)
                    k = k[..., :q_len, :]
                    allowed = self._slice_mask(kwargs, rows, k.shape[-2])
                else:
                    real = rt.mm_mask
                    if real is not None and pruned_here:
                        real = _gather_seq(real, rt.keep_seq, 1)
                    pos = torch.arange(q_len, device=hidden.device)
                    if real is None:
                        rows = pos[q_len - n_rows:].view(1, -1).expand(b, -1)
                    else:
                        rows = torch.topk(torch.where(real, pos, torch.full_like(pos, -1)), n_rows, dim=1).values.flip(1)
                    q, k, scale = self._query_keys(module, layer_idx, args, kwargs, rows)
                    k = k[..., :q_len, :]
                    allowed = self._row_mask(kwargs, rows, k.shape[-2], rows, real)
            else:
                # decode: keep what this row's score needs (the layer's input row, its RoPE row, the
                # keys the cache holds now, the mask row); _score_decode_row scores it later with
                # the ops it would run here
                geometry = geometry_of.get(id(module))
                if geometry is None:
                    geometry = geometry_of[id(module)] = _compat.attention_geometry(module)
                cos, sin = _compat.rope_cos_sin(module, hidden, kwargs)
                k = _compat.cache_layer_keys(_compat.layer_cache(kwargs), layer_idx)
                # score now without a cache object to read later, while a CUDA graph is captured
                # (a replay would overwrite the kept tensors) and with _BATCHED_DECODE off on the
                # general paths; else keep the row for _batched_rows_total (general rows) or the
                # CPU fast path
                general = k is None or not _FAST_PATHS or k.device.type != "cpu"
                if k is None or (general and (not _BATCHED_DECODE or _capturing(k))):
                    q, k, scale = self._query_keys(module, layer_idx, args, kwargs, None)
                    rec = None
                else:
                    if hidden.shape[1] != 1:
                        hidden, cos, sin = hidden[:, -1:], cos[:, -1:], sin[:, -1:]
                    rec = (module, geometry, hidden, cos, sin, k)
                mask = kwargs.get("attention_mask")
                mask_row = mask[:, :, -1:, :k.shape[-2]] if isinstance(mask, torch.Tensor) and mask.dim() == 4 else None
                rt.decode_steps += 1
                if rec is not None:  # with the layer's own query when handed over (not on the reference path)
                    q = _captured_queries(rt, layer_idx, k, 1) if _FAST_PATHS else None
                    rt.pending.append(rec + (mask_row, rt.kept_visual if pruned_here else None, n, q))
                    rt.action_rows += 1
                    rt.t_scoring += time.perf_counter() - t0
                    return None
                allowed = None if mask_row is None else _bool_allowed(mask_row)
            if probs is None:
                probs = attention_row_scores(q, k, allowed, scale)  # [B, T]
            vis = _visual_scores(probs, rt.kept_visual if pruned_here else None, n)
            if n_rows != 1:  # a sum over rows: every action row weighs the same in the step's mean
                vis = vis * n_rows
            rt.scored_sum = vis if rt.scored_sum is None else rt.scored_sum + vis
            rt.action_rows += n_rows
            rt.t_scoring += time.perf_counter() - t0
            return None
        return hook

    # ---------------------------------------------------------------------- reset / stats
    def reset(self, model: Any, state: Any) -> None:
        rt: _Runtime = state.runtime
        rt.clear_step()
        rt.stashed = None
        rt.history.reset()
        rt.last = None

    def stats(self, model: Any, state: Any) -> Dict[str, Any]:
        rt: _Runtime = state.runtime
        out: Dict[str, Any] = {
            "layer": rt.layer, "action_layer": rt.action_layer, "depth": rt.depth,
            "control_steps": rt.control_steps, "history": state.config.history,
            "warmup": state.config.effective_warmup,
            # host time vprune spent in the last control step (prefill and every decode step), ms
            "overhead_ms": {"scoring": rt.t_scoring * 1e3, "selection": rt.t_selection * 1e3,
                            "other": rt.t_other * 1e3,
                            "total": (rt.t_scoring + rt.t_selection + rt.t_other) * 1e3},
        }
        last = rt.last
        if last is None:
            out["per_sample"] = []
            out["flops_skipped"] = 0
            return out
        kept = last["kept_visual"]
        n = last["visual_before"]
        per_sample = []
        for b in range(last["batch"]):
            idx = list(range(n)) if kept is None else kept[b].tolist()
            per_sample.append({
                "visual_before": n, "visual_after": len(idx), "kept_indices": idx,
                "warmup": bool(last["warm"][b]) if b < len(last["warm"]) else False,
                "pruned": kept is not None, "layer": rt.layer,
            })
        flops = self._flops_skipped(model, rt, last)
        for s in per_sample:
            s["flops_skipped"] = flops // max(1, last["batch"])
        out["per_sample"] = per_sample
        out["images"] = last["images"]
        out["budgets"] = last["budgets"]
        out["decode_steps"] = rt.decode_steps
        out["action_query_rows"] = rt.query_rows
        out["flops_skipped"] = flops
        return out

    def _flops_skipped(self, model: Any, rt: _Runtime, last: Dict[str, Any]) -> int:
        """Estimate of the multiply-adds x2 the last control step skipped in layers K.. (all rows):
        linear layers 2 * params * removed tokens, attention 4 * H * Dh * (causal key-query pairs removed,
        prefill and each decode step)."""
        if last["kept_visual"] is None:
            return 0
        layers = _decoder_layers(model)
        removed = last["seq_len"] - last["kept_seq_len"]
        total = 0
        for i in range(rt.layer, rt.depth):
            layer = layers[i]
            params = sum(mod.weight.numel() for mod in layer.modules()
                         if isinstance(mod, torch.nn.Linear))
            n_heads, _, head_dim, _ = _compat.attention_geometry(layer.self_attn)
            length, kept = last["seq_len"], last["kept_seq_len"]
            pairs = length * (length + 1) // 2 - kept * (kept + 1) // 2 + removed * rt.decode_steps
            total += 2 * params * removed + 4 * n_heads * head_dim * pairs
        return int(total * last["batch"])
