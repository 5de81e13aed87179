"""Window-Diffusion for masked diffusion LMs: schedule, K/V cache bookkeeping and the samplers.

Pure tensor logic; the host model is reached only through an *engine* (an integration object, see
``DiffusionEngine``) with two forwards:

* ``full_forward(tokens [B,T], key_valid [B,T] bool or None, cache or None, positions [B,T])
  -> logits [B,T,V]``: the host's own forward over sequence indices 0..T-1 (RoPE positions
  ``positions``). With ``cache`` it also stores every layer's post-RoPE K/V of those indices
  (``cache.store``).
* ``window_forward(tokens [B,Q], rope_pos [B,Q], write_idx [B,Q], key_mask [B,K], cache)
  -> logits [B,Q,V]``: computes only the Q query tokens (at absolute positions ``rope_pos``); at
  every layer it calls ``cache.attend`` which writes their fresh K/V into the cache at
  ``write_idx`` (the scratch column ``L`` for padding slots) and attends to cache columns 0..K-1
  where ``key_mask`` is True.

Sampling (LLaDA's): the answer region of ``gen_length`` masks is split into blocks of
``block_length``; each block gets ``steps * block_length / gen_length`` steps, and each step
unmasks the ``k`` most confident candidates (low-confidence remasking; greedy or Gumbel sampling
with ``temperature``), ``k`` spread evenly over the block's steps. With ``threshold`` (Fast-dLLM's
parallel decoding) a step unmasks every candidate whose confidence exceeds the threshold, and at
least the most confident one, until the block is done (``steps`` is then not used).

Window-Diffusion (``WindowDiffusion(active, window, refresh)``), per batch row:

* active: the first ``active`` still-masked positions; buffer: the next masks up to ``window``
  masks; far-field: every mask after those.
* a phase starts with a *refresh*: a full forward over positions ``0..e-1`` (prompt, decoded,
  active and buffer; far-field masks past ``e`` are not computed, those before it are masked out
  as keys), storing every layer's K/V. Candidates are all active and buffer masks.
* the other steps of the phase (*cheap steps*) compute only the active masks plus the tokens
  decoded since the phase began; they attend to the cached K/V of everything else up to ``e``
  (prompt, earlier decoded tokens, frozen buffer masks) and never to far-field masks.
  Candidates are the active masks.
* a phase ends after ``refresh`` steps, or earlier when the active set would leave the phase's
  window (parallel decoding), or the query set outgrows its static size (CUDA graphs).

With ``refresh=1`` and ``window >= gen_length`` every step is a refresh over the whole sequence
and the tokens equal the vanilla sampler's exactly. Batch rows keep their own sets; prompts of
different lengths are left-padded (``attention_mask``); pads are never attended.

Limitations: no classifier-free guidance; with ``temperature > 0`` the window and vanilla samplers
draw different random numbers (different shapes), so only greedy runs compare token for token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol, Tuple

import torch
import torch.nn.functional as F

from .config import WindowDiffusion

REMASKING = ("low_confidence", "random", "entropy", "margin")


class DiffusionEngine(Protocol):
    """What a sampler needs from a host model (implemented by integrations)."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    logits_shift: int  # 0: logits row p predicts position p (LLaDA); 1: row p-1 does (Dream)
    padding_aware_positions: bool  # True: RoPE position = index - left pads (Dream); False: index (LLaDA)

    def full_forward(self, tokens: torch.Tensor, key_valid: Optional[torch.Tensor],
                     cache: Optional["WindowKVCache"], positions: torch.Tensor) -> torch.Tensor: ...

    def window_forward(self, tokens: torch.Tensor, rope_pos: torch.Tensor, write_idx: torch.Tensor,
                       key_mask: torch.Tensor, cache: "WindowKVCache") -> torch.Tensor: ...


# ---------------------------------------------------------------------------------------------
# partition
# ---------------------------------------------------------------------------------------------
def mask_rank(masked: torch.Tensor) -> torch.Tensor:
    """[B, L] bool -> [B, L] long: the index of each masked position among its row's masks
    (0 for the leftmost mask); -1 where not masked."""
    r = masked.long().cumsum(dim=1) - 1
    return torch.where(masked, r, torch.full_like(r, -1))


def partition(masked: torch.Tensor, active: int, window: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split each row's masked positions into (active, buffer, far) boolean masks [B, L].

    active: the first ``active`` masks; buffer: masks ``active..window-1``; far: the rest.
    """
    if active > window:
        raise ValueError(f"active={active} must be at most window={window}")
    r = mask_rank(masked)
    act = masked & (r < active)
    buf = masked & (r >= active) & (r < window)
    far = masked & (r >= window)
    return act, buf, far


def transfer_schedule(block_length: int, steps_per_block: int) -> List[int]:
    """Tokens unmasked at each step of a block: ``block_length`` spread evenly, the remainder on
    the first steps (LLaDA's schedule)."""
    base, rem = divmod(block_length, steps_per_block)
    return [base + (1 if i < rem else 0) for i in range(steps_per_block)]


# ---------------------------------------------------------------------------------------------
# K/V cache
# ---------------------------------------------------------------------------------------------
class WindowKVCache:
    """Per-layer post-RoPE K/V of every position, [B, KVH, L+1, D] each; column ``L`` is a scratch
    column that padding query slots write to and that is never attended."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.length = length
        shape = (batch, n_kv_heads, length + 1, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.kmax = length  # key columns the next attend() uses (set by the sampler per phase)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Refresh: k, v [B, KVH, T, D] are positions 0..T-1."""
        t = k.shape[2]
        self.k[layer][:, :, :t].copy_(k)
        self.v[layer][:, :, :t].copy_(v)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               write_idx: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """q [B,H,Q,D], k/v [B,KVH,Q,D] (post-RoPE) of the query tokens; write_idx [B,Q];
        key_mask [B,K] bool over cache columns 0..K-1. Returns attention output [B,H,Q,D]."""
        ck, cv = self.k[layer], self.v[layer]
        b, kvh, nq, d = k.shape
        idx = write_idx[:, None, :, None].expand(b, kvh, nq, d)
        ck.scatter_(2, idx, k.to(ck.dtype))
        cv.scatter_(2, idx, v.to(cv.dtype))
        kk = key_mask.shape[1]
        keys, vals = ck[:, :, :kk], cv[:, :, :kk]
        h = q.shape[1]
        if h != kvh:
            keys = keys.repeat_interleave(h // kvh, dim=1, output_size=h)
            vals = vals.repeat_interleave(h // kvh, dim=1, output_size=h)
        return F.scaled_dot_product_attention(q, keys.to(q.dtype), vals.to(q.dtype),
                                              attn_mask=key_mask[:, None, None, :])


# ---------------------------------------------------------------------------------------------
# decisions
# ---------------------------------------------------------------------------------------------
def _confidence(logits: torch.Tensor, temperature: float, remasking: str,
                generator: Optional[torch.Generator]) -> Tuple[torch.Tensor, torch.Tensor]:
    """logits [B,R,V] -> (x0 [B,R] predicted tokens, conf [B,R] float32)."""
    lf = logits.float()
    if temperature > 0:
        u = torch.rand(lf.shape, device=lf.device, generator=generator).clamp_(min=1e-20)
        x0 = torch.argmax(lf / temperature - torch.log(-torch.log(u)), dim=-1)  # Gumbel-max
    else:
        x0 = torch.argmax(lf, dim=-1)
    if remasking == "low_confidence":
        conf = torch.exp(lf.gather(-1, x0[..., None])[..., 0] - torch.logsumexp(lf, dim=-1))
    elif remasking == "entropy":  # Dream's "entropy": negative entropy of the distribution
        logp = torch.log_softmax(lf, dim=-1)
        conf = (logp.exp() * logp).sum(-1)
    elif remasking == "margin":  # Dream's "topk_margin": top-1 minus top-2 probability
        top2 = torch.softmax(lf, dim=-1).topk(2, dim=-1).values
        conf = top2[..., 0] - top2[..., 1]
    else:
        conf = torch.rand(x0.shape, device=lf.device, generator=generator)
    return x0, conf


def select_transfer(conf: torch.Tensor, k: Optional[int], threshold: Optional[float]) -> torch.Tensor:
    """conf [B, N] (-inf where not a candidate) -> bool [B, N] of positions to unmask.

    Fixed ``k``: the k most confident candidates, ties to the lower index. ``threshold``: every
    candidate above it plus the most confident one (rows without candidates select nothing).
    """
    finite = torch.isfinite(conf)
    if threshold is not None:
        top = torch.argmax(conf, dim=1, keepdim=True)
        sel = conf > threshold
        sel.scatter_(1, top, True)
        return sel & finite
    sel = torch.zeros_like(finite)
    if k and k > 0:
        order = torch.sort(conf, dim=1, descending=True, stable=True).indices[:, :k]
        sel.scatter_(1, order, True)
    return sel & finite


@dataclass
class _Run:
    """Mutable per-call sampler state."""

    x: torch.Tensor  # [B, L] tokens
    masked: torch.Tensor  # [B, L] bool, still masked
    key_valid: Optional[torch.Tensor]  # [B, L] bool, False at pads; None: no pads
    length: int
    pos_ids: torch.Tensor  # [B, L] RoPE positions
    stats: Dict[str, Any] = field(default_factory=dict)


def _decide(run: _Run, logits: torch.Tensor, target_pos: torch.Tensor, cand: torch.Tensor, k: Optional[int],
            threshold: Optional[float], temperature: float, remasking: str,
            generator: Optional[torch.Generator]) -> torch.Tensor:
    """Unmask in place. logits [B,R,V] predict the tokens at target_pos [B,R] (``run.length`` for
    padding rows); cand [B,R] bool. Decisions are taken over full-length [B, L] tensors so that
    ties break the same way whatever rows were computed. Returns the unmasked positions [B, L]."""
    b, n = run.x.shape
    x0, conf = _confidence(logits, temperature, remasking, generator)
    conf = torch.where(cand, conf, torch.full_like(conf, -math.inf))
    conf_full = torch.full((b, n + 1), -math.inf, device=conf.device, dtype=conf.dtype)
    conf_full.scatter_(1, target_pos, conf)
    x0_full = torch.zeros((b, n + 1), dtype=run.x.dtype, device=run.x.device)
    x0_full.scatter_(1, target_pos, x0.to(run.x.dtype))
    sel = select_transfer(conf_full[:, :n], k, threshold)
    run.x = torch.where(sel, x0_full[:, :n], run.x)
    run.masked = run.masked & ~sel
    return sel


# ---------------------------------------------------------------------------------------------
# CUDA graphs for the cheap step
# ---------------------------------------------------------------------------------------------
class _GraphedWindowStep:
    """``engine.window_forward`` captured in CUDA graphs, one per key length (static shapes:
    B x Q query slots, K key columns). Inputs are copied into static buffers before each replay;
    the K/V cache is already a static buffer."""

    def __init__(self, engine: Any, cache: WindowKVCache, batch: int, q_slots: int, device: torch.device):
        self.engine, self.cache = engine, cache
        self.tokens = torch.zeros((batch, q_slots), dtype=torch.long, device=device)
        self.rope_pos = torch.zeros((batch, q_slots), dtype=torch.long, device=device)
        self.write_idx = torch.full((batch, q_slots), cache.length, dtype=torch.long, device=device)
        self.graphs: Dict[int, Tuple[Any, torch.Tensor, torch.Tensor]] = {}
        self.captures = 0

    def __call__(self, tokens, rope_pos, write_idx, key_mask) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.rope_pos.copy_(rope_pos)
        self.write_idx.copy_(write_idx)
        kk = key_mask.shape[1]
        if kk not in self.graphs:
            mask = key_mask.clone()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):  # warm-up: rewrites the same K/V the replay writes
                    self.engine.window_forward(self.tokens, self.rope_pos, self.write_idx, mask, self.cache)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = self.engine.window_forward(self.tokens, self.rope_pos, self.write_idx, mask, self.cache)
            self.graphs[kk] = (g, mask, out)
            self.captures += 1
        g, mask, out = self.graphs[kk]
        mask.copy_(key_mask)
        g.replay()
        return out


# ---------------------------------------------------------------------------------------------
# samplers
# ---------------------------------------------------------------------------------------------
def _check_args(gen_length: int, steps: Optional[int], block_length: Optional[int], temperature: float,
                remasking: str, threshold: Optional[float]) -> Tuple[int, int]:
    if isinstance(gen_length, bool) or not isinstance(gen_length, int) or gen_length < 1:
        raise ValueError(f"gen_length={gen_length!r} is invalid: allowed an int >= 1")
    bl = gen_length if block_length is None else block_length
    if isinstance(bl, bool) or not isinstance(bl, int) or bl < 1 or gen_length % bl:
        raise ValueError(f"block_length={block_length!r} is invalid: allowed a divisor of gen_length={gen_length}")
    nb = gen_length // bl
    st = gen_length if steps is None else steps
    if isinstance(st, bool) or not isinstance(st, int) or st < nb or st % nb:
        raise ValueError(f"steps={steps!r} is invalid: allowed a positive multiple of the number of blocks "
                         f"({nb} = gen_length {gen_length} / block_length {bl})")
    if not (isinstance(temperature, (int, float)) and temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature={temperature!r} is invalid: allowed a number >= 0")
    if remasking not in REMASKING:
        raise ValueError(f"remasking={remasking!r} is invalid: allowed one of {list(REMASKING)}")
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0.0 < threshold <= 1.0):
        raise ValueError(f"threshold={threshold!r} is invalid: allowed a number in (0, 1] or None")
    return bl, st // nb


def _setup(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], gen_length: int,
           mask_id: int, padding_aware_positions: bool = False) -> _Run:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, prompt_length], got shape {tuple(input_ids.shape)}")
    b, p = input_ids.shape
    dev = input_ids.device
    x = torch.cat([input_ids, torch.full((b, gen_length), mask_id, dtype=input_ids.dtype, device=dev)], dim=1)
    masked = torch.zeros_like(x, dtype=torch.bool)
    masked[:, p:] = True
    key_valid = None
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                             f"{tuple(input_ids.shape)}")
        am = attention_mask.to(dev).bool()
        if not bool(am.any(dim=1).all()):
            raise ValueError("attention_mask has a row without any real token")
        if not bool(am.all()):
            key_valid = torch.cat([am, torch.ones((b, gen_length), dtype=torch.bool, device=dev)], dim=1)
    pos = torch.arange(p + gen_length, device=dev).expand(b, -1)
    if key_valid is not None and padding_aware_positions:
        pads = (~key_valid[:, :p]).sum(1, keepdim=True)
        pos = (pos - pads).clamp(min=0)
    return _Run(x=x, masked=masked, key_valid=key_valid, length=p + gen_length, pos_ids=pos)


@torch.no_grad()
def generate_vanilla(engine: DiffusionEngine, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                     *, mask_id: int, gen_length: int = 128, steps: Optional[int] = None,
                     block_length: Optional[int] = None, temperature: float = 0.0,
                     remasking: str = "low_confidence", threshold: Optional[float] = None,
                     generator: Optional[torch.Generator] = None,
                     stats: Optional[Dict[str, Any]] = None) -> torch.Tensor:
    """LLaDA's sampler: a full forward every step. input_ids [B,P] (left-padded, ``attention_mask``
    [B,P] 1 = real token). Returns [B, P + gen_length] (prompt then answer)."""
    bl, spb = _check_args(gen_length, steps, block_length, temperature, remasking, threshold)
    run = _setup(input_ids, attention_mask, gen_length, mask_id, engine.padding_aware_positions)
    p, n, b = input_ids.shape[1], run.length, input_ids.shape[0]
    sh = engine.logits_shift
    dev = run.x.device
    n_steps, tokens = 0, 0
    for blk in range(gen_length // bl):
        bs, be = p + blk * bl, p + (blk + 1) * bl
        sched = transfer_schedule(bl, spb)
        i = 0
        while True:
            if threshold is None and i >= spb:
                break
            if threshold is not None and not bool(run.masked[:, bs:be].any()):
                break
            logits = engine.full_forward(run.x, run.key_valid, None, run.pos_ids)
            rows = logits[:, bs - sh:be - sh]
            tpos = torch.arange(bs, be, device=dev).expand(b, -1)
            _decide(run, rows, tpos, run.masked[:, bs:be], None if threshold is not None else sched[i],
                    threshold, temperature, remasking, generator)
            n_steps += 1
            tokens += b * n
            i += 1
    if stats is not None:
        stats.update(steps=n_steps, refreshes=n_steps, cheap_steps=0, computed_tokens=tokens,
                     tokens_per_step=gen_length / max(1, n_steps))
    return run.x


@torch.no_grad()
def generate_window(engine: DiffusionEngine, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                    *, mask_id: int, config: WindowDiffusion = WindowDiffusion(), gen_length: int = 128,
                    steps: Optional[int] = None, block_length: Optional[int] = None, temperature: float = 0.0,
                    remasking: str = "low_confidence", threshold: Optional[float] = None,
                    cuda_graph: Optional[bool] = None, key_bucket: int = 128,
                    generator: Optional[torch.Generator] = None, stats: Optional[Dict[str, Any]] = None,
                    trace: Optional[List[Dict[str, Any]]] = None,
                    workspace: Optional[Dict[Any, Any]] = None) -> torch.Tensor:
    """The Window-Diffusion sampler (see the module docstring); same arguments and output as
    ``generate_vanilla`` plus ``config`` (active / window / refresh; its ``threshold`` and
    ``cuda_graph`` are used where the arguments are None). ``key_bucket``: with CUDA graphs the key
    length is rounded up to a multiple of it (one graph per length). ``trace``: if a list, one dict
    per step is appended (kind, query positions, key length) for tests. ``workspace``: a dict in
    which the K/V cache and the captured CUDA graphs are kept and reused by later calls of the same
    shapes (without it, every call allocates and captures afresh)."""
    if not isinstance(config, WindowDiffusion):
        raise TypeError(f"config must be a WindowDiffusion, got {type(config).__name__}")
    if threshold is None:
        threshold = config.threshold
    use_graph = config.cuda_graph if cuda_graph is None else bool(cuda_graph)
    bl, spb = _check_args(gen_length, steps, block_length, temperature, remasking, threshold)
    run = _setup(input_ids, attention_mask, gen_length, mask_id, engine.padding_aware_positions)
    p, n, b = input_ids.shape[1], run.length, input_ids.shape[0]
    dev = run.x.device
    if use_graph and dev.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA model, the inputs are on {dev}")
    sh = engine.logits_shift
    A, W, R = config.active, config.window, config.refresh
    sched_all = transfer_schedule(bl, spb)
    kstep = 1 if threshold is not None else max(sched_all)
    # query slots of a cheap step: active (+ their left neighbours when logits are shifted) and
    # the tokens decoded since the refresh
    q_cap = min(W + A * sh, A * (1 + sh) + (R - 1) * kstep) if threshold is None else W + A * sh
    wkey = ("window", b, n, q_cap, use_graph, engine.n_layers, engine.n_kv_heads, engine.head_dim,
            engine.dtype, str(dev))  # type: ignore[attr-defined]
    if workspace is not None and wkey in workspace:
        cache, graphed = workspace[wkey]  # graphed keeps the engine its graphs were captured with
    else:
        cache = WindowKVCache(engine.n_layers, b, engine.n_kv_heads, n, engine.head_dim,
                              engine.dtype, dev)  # type: ignore[attr-defined]
        graphed = _GraphedWindowStep(engine, cache, b, q_cap, dev) if use_graph else None
        if workspace is not None:
            workspace.clear()  # one shape at a time: drop older caches and graphs
            workspace[wkey] = (cache, graphed)
    pos_row = torch.arange(n, device=dev).expand(b, -1)

    n_steps = refreshes = cheap = tokens = 0
    in_phase = R  # forces a refresh at the first step
    in_w = decoded = phase_key = None
    kmax = n
    for blk in range(gen_length // bl):
        bs, be = p + blk * bl, p + (blk + 1) * bl
        in_block = (pos_row >= bs) & (pos_row < be)
        i = 0
        while True:
            if threshold is None and i >= spb:
                break
            k = None if threshold is not None else sched_all[i]
            # host-side checks (one sync per step)
            need_refresh = in_phase >= R
            if not need_refresh:
                rem = run.masked.sum(1)
                rem_w = (run.masked & in_w).sum(1)
                act_n = torch.clamp(rem, max=A)
                d = decoded.sum(1)
                q_need = (act_n * (1 + sh) + d).max()
                bad = (rem_w < act_n).any()
                vals = torch.stack([q_need, bad.long(), run.masked[:, bs:be].any().long()]).tolist()
                q_need_i, bad_i, block_left = int(vals[0]), bool(vals[1]), bool(vals[2])
                need_refresh = bad_i or q_need_i > q_cap
            else:
                block_left = bool(run.masked[:, bs:be].any()) if threshold is not None else True
            if threshold is not None and not block_left:
                break
            if need_refresh:
                act, buf, far = partition(run.masked, A, W)
                not_far = ~far
                e_b = torch.where(not_far, pos_row + 1, torch.zeros_like(pos_row)).amax(1)  # [B]
                e = int(e_b.max())
                kv = not_far if run.key_valid is None else (not_far & run.key_valid)
                kv_e = kv[:, :e]
                logits = engine.full_forward(run.x[:, :e], None if bool(kv_e.all()) else kv_e, cache,
                                             run.pos_ids[:, :e])
                lo, hi = bs - sh, min(be, e + sh) - sh
                rows = logits[:, lo:hi]
                tpos = torch.arange(lo + sh, hi + sh, device=dev).expand(b, -1)
                cand = (run.masked & not_far & in_block)[:, lo + sh:hi + sh]
                in_w = act | buf
                phase_key = kv
                kmax = e if graphed is None else min(n, -(-e // key_bucket) * key_bucket)
                sel = _decide(run, rows, tpos, cand, k, threshold, temperature, remasking, generator)
                decoded = sel
                in_phase = 1
                refreshes += 1
                tokens += b * e
                if trace is not None:
                    trace.append(dict(kind="refresh", e=e, e_b=e_b.tolist(), rows=b * e,
                                      active=act.nonzero().tolist(), buffer=buf.nonzero().tolist()))
            else:
                r = mask_rank(run.masked)
                act = run.masked & (r >= 0) & (r < A)
                qflag = act | decoded
                if sh:
                    qflag = qflag | F.pad(act[:, sh:], (0, sh))  # left neighbours of the active
                q_n = q_cap if graphed is not None else max(1, q_need_i)
                key = torch.where(qflag, pos_row, pos_row + n)
                qsort = torch.sort(key, dim=1).values[:, :q_n]
                valid = qsort < n
                write_idx = torch.where(valid, qsort, torch.full_like(qsort, n))
                idx = torch.where(valid, qsort, torch.zeros_like(qsort))
                rope_pos = run.pos_ids.gather(1, idx)
                q_tok = torch.where(valid, run.x.gather(1, idx), torch.full_like(qsort, mask_id))
                key_mask = phase_key[:, :kmax]
                if graphed is not None:
                    logits = graphed(q_tok, rope_pos, write_idx, key_mask)
                else:
                    logits = engine.window_forward(q_tok, rope_pos, write_idx, key_mask, cache)
                tgt = torch.where(valid, idx + sh, torch.full_like(qsort, n)).clamp(max=n)
                tgt_c = tgt.clamp(max=n - 1)
                cand = valid & (tgt < n) & run.masked.gather(1, tgt_c) & act.gather(1, tgt_c) & in_block.gather(1, tgt_c)
                sel = _decide(run, logits, tgt, cand, k, threshold, temperature, remasking, generator)
                decoded = decoded | sel
                in_phase += 1
                cheap += 1
                tokens += b * q_n
                if trace is not None:
                    trace.append(dict(kind="cheap", rows=b * q_n, kmax=kmax, active=act.nonzero().tolist(),
                                      query=[qsort[j][valid[j]].tolist() for j in range(b)]))
            n_steps += 1
            i += 1
    if stats is not None:
        stats.update(steps=n_steps, refreshes=refreshes, cheap_steps=cheap, computed_tokens=tokens,
                     tokens_per_step=gen_length / max(1, n_steps),
                     graph_captures=graphed.captures if graphed is not None else 0)
    return run.x
