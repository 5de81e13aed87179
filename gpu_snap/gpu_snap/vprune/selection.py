"""Which visual tokens to keep: strategies with a static output size, on device, no host syncs.

Every strategy returns int64 indices [B, k] into the image's own token axis, ascending (so gathered
tokens keep their order), chosen through ``vprune.kernels.select_topk`` (ties to the lower index).

CPU tensors outside ``torch.compile`` take a NumPy path for top-k, the union and the greedy diversity
loop: the same order rules and the same fp32 distances, so the same indices (tests compare both paths),
at about 1 us per NumPy op against 5-15 us per small torch op on the CPU. On the testbed policy (64
tokens, keep 16) ``dual_select`` went from about 2 ms to about 0.15 ms a control step. There is no
device to synchronise with on the CPU; other devices (and traced regions) keep the torch path.

    fastv     top-k of the last prompt row's attention (head mean)           needs scores
    semantic  top-k of the text rows' mean attention                         needs scores
    action    top-k of the (smoothed) action-decode attention                needs scores
    divprune  greedy max-min cosine diversity over the visual embeddings      needs embeddings
    random    k uniformly random tokens (a baseline), seeded                 needs nothing
    dual      union of top-k(semantic) and top-k(action), cut to exactly k    needs both scores
              by greedy max-min diversity over the embeddings                 and embeddings
"""
from __future__ import annotations

from typing import Any, List, Optional

import numpy as np
import torch

from vprune.kernels import select_topk
from vprune.scoring import cosine_distance, cosine_gram

STRATEGIES = ("fastv", "semantic", "action", "divprune", "random", "dual")


_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)


def _in_traced_region() -> bool:
    if _is_compiling():
        return True
    return bool(torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _host_path(*tensors: torch.Tensor) -> bool:
    """Whether to run selection in NumPy: every tensor is a plain fp32 CPU tensor and nothing traces."""
    f32 = torch.float32
    for t in tensors:  # is_cpu / dtype identity: no device objects (a few us each inside a policy step)
        if not t.is_cpu or t.dtype is not f32:
            return False
    return not _is_compiling()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _np_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """NumPy top-k with ``select_topk``'s rules: [B, N] fp32 -> int64 [B, k] ascending. A stable sort
    of the negated scores orders by score descending, ties by index, NaN last (NumPy sorts NaN to the
    end) and -0.0 == +0.0."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.sort(order, axis=1).astype(np.int64, copy=False)


def check_scores(scores: torch.Tensor, what: str = "scores") -> None:
    """Raise ValueError on NaN scores (a host sync: skipped under torch.compile / CUDA-graph capture,
    where NaN ranks lowest as the kernels define)."""
    if _in_traced_region():
        return
    bad = torch.isnan(scores)
    if bool(bad.any()):
        rows = torch.nonzero(bad.any(dim=-1)).flatten().tolist()
        raise ValueError(
            f"{what} contain NaN (batch rows {rows}): scores must be numbers; this usually means the "
            f"model overflowed in fp16 or received NaN inputs")


def topk_ascending(scores: torch.Tensor, k: int, what: str = "scores") -> torch.Tensor:
    """Top-k indices [B, k] ascending, after the NaN check."""
    if scores.dim() == 2 and _host_path(scores) and isinstance(k, int) and not isinstance(k, bool) \
            and 1 <= k <= scores.shape[1]:
        s = _np(scores)
        if np.isnan(s).any():
            check_scores(scores, what)  # raises with the rows named
        return torch.from_numpy(_np_topk(s, k))
    check_scores(scores, what)
    return select_topk(scores, k)


def random_select(batch: int, n: int, k: int, seed: int, device: torch.device) -> torch.Tensor:
    """k distinct random tokens per row, reproducible from ``seed`` (a baseline for evaluation)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.rand(batch, n, generator=gen).to(device)
    return select_topk(noise, k)


def greedy_max_min(embeddings: torch.Tensor, k: int,
                   candidates: Optional[torch.Tensor] = None,
                   first: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Greedy max-min diversity (DivPrune): k tokens that are as far apart (cosine) as possible.

    embeddings: [B, N, D]. candidates: optional bool [B, N]; only candidates are chosen (each row
    must have at least k). first: optional int64 [B], the first pick; default the candidate whose
    nearest other candidate is farthest. Each step adds the candidate with the largest distance to
    its nearest chosen token (ties to the lower index). Vectorised over the batch: k steps of a few
    tensor ops, no host syncs. Returns int64 [B, k] ascending.
    """
    b, n, _ = embeddings.shape
    if not 1 <= k <= n:
        raise ValueError(f"greedy_max_min: k={k} is invalid: allowed an int in [1, N={n}]")
    if embeddings.device.type == "cpu" and not _is_compiling():
        cand = None if candidates is None else _np(candidates.to(torch.bool))
        fst = None if first is None else _np(first.long().view(b))
        return torch.from_numpy(_greedy_numpy(_np(cosine_distance(embeddings)), k, cand, fst))
    return _greedy_torch(embeddings, k, candidates, first)


def _greedy_torch(embeddings: torch.Tensor, k: int, candidates: Optional[torch.Tensor] = None,
                  first: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``greedy_max_min`` in torch ops (any device, traceable, no host syncs)."""
    b, n, _ = embeddings.shape
    # normalise + one batched matmul: ~20x faster on the CPU than broadcasting cosine_similarity over
    # [B, N, N, D] (13 ms -> <1 ms for N=64, D=128), and the same formula as the brute-force reference
    dist = cosine_distance(embeddings)  # [B, N, N]
    neg_inf = torch.tensor(float("-inf"), device=embeddings.device)
    if candidates is None:
        candidates = torch.ones(b, n, dtype=torch.bool, device=embeddings.device)
    if first is None:
        eye = torch.eye(n, dtype=torch.bool, device=embeddings.device)
        pair_ok = candidates.unsqueeze(1) & ~eye  # distance to other candidates only
        nearest = torch.where(pair_ok, dist, torch.full_like(dist, float("inf"))).amin(dim=-1)
        nearest = torch.where(torch.isinf(nearest), torch.zeros_like(nearest), nearest)  # single candidate
        first = torch.where(candidates, nearest, neg_inf).argmax(dim=-1)
    first = first.long().view(b, 1)
    available = candidates.clone()
    available.scatter_(1, first, False)
    min_dist = dist.gather(1, first.view(b, 1, 1).expand(b, 1, n)).squeeze(1)  # [B, N] to nearest chosen
    picks = [first]
    for _ in range(k - 1):  # in-place scatter / gather: fewer, cheaper ops per step than fancy indexing
        nxt = min_dist.masked_fill(~available, float("-inf")).argmax(dim=-1, keepdim=True)  # first max
        available.scatter_(1, nxt, False)
        min_dist = torch.minimum(min_dist, dist.gather(1, nxt.view(b, 1, 1).expand(b, 1, n)).squeeze(1))
        picks.append(nxt)
    # k distinct picks per row -> ascending indices, static shape [B, k]
    return torch.cat(picks, dim=1).sort(dim=1).values


def _greedy_numpy(dist: np.ndarray, k: int, candidates: Optional[np.ndarray] = None,
                  first: Optional[np.ndarray] = None) -> np.ndarray:
    """``greedy_max_min``'s loop in NumPy over the fp32 distances [B, N, N]: int64 [B, k] ascending.

    The same picks as the torch loop: the same fp32 minimum, argmax taking the first maximum, and the
    candidates in ascending order (the loop runs on the candidates' sub-matrix, so ties still go to
    the lower token index). Chosen tokens hold -inf in the running minimum, which min() keeps. Inputs
    outside the fast path's assumptions (NaN distances, fewer than k candidates, a first pick that is
    not a candidate) follow the torch loop literally."""
    b, n, _ = dist.shape
    out = np.empty((b, k), dtype=np.int64)
    neg_inf = np.float32(-np.inf)
    for r in range(b):
        cand = np.ones(n, dtype=bool) if candidates is None else candidates[r]
        fr = None if first is None else int(first[r])
        idx = np.flatnonzero(cand)
        m = len(idx)
        if m < k or (fr is not None and not cand[fr]) or np.isnan(dist[r]).any():
            out[r] = _greedy_numpy_literal(dist[r], k, cand, fr)
            continue
        d = dist[r][np.ix_(idx, idx)] if m < n else dist[r]
        if fr is None:
            nearest = np.where(np.eye(m, dtype=bool), np.float32(np.inf), d).min(axis=-1)
            nearest = np.where(np.isinf(nearest), np.float32(0.0), nearest)  # a single candidate
            j = int(nearest.argmax())
        else:
            j = int(np.searchsorted(idx, fr))
        picks = [j]
        min_dist = d[j].copy()
        min_dist[j] = neg_inf
        for _ in range(k - 1):
            j = int(min_dist.argmax())
            np.minimum(min_dist, d[j], out=min_dist)
            min_dist[j] = neg_inf
            picks.append(j)
        out[r] = np.sort(idx[picks])
    return out


def _greedy_numpy_literal(d: np.ndarray, k: int, cand: np.ndarray, first: Optional[int]) -> np.ndarray:
    """One row of the torch loop, op for op (explicit masks over all N tokens): int64 [k] ascending."""
    n = d.shape[0]
    neg_inf = np.float32(-np.inf)
    if first is None:
        pair_ok = cand[None, :] & ~np.eye(n, dtype=bool)
        nearest = np.where(pair_ok, d, np.float32(np.inf)).min(axis=-1)
        nearest = np.where(np.isinf(nearest), np.float32(0.0), nearest)
        first = int(np.where(cand, nearest, neg_inf).argmax())
    available = cand.copy()
    available[first] = False
    min_dist = d[first].copy()
    picks = [first]
    for _ in range(k - 1):
        j = int(np.where(available, min_dist, neg_inf).argmax())
        available[j] = False
        np.minimum(min_dist, d[j], out=min_dist)
        picks.append(j)
    return np.sort(np.asarray(picks, dtype=np.int64))


def dual_select(semantic: torch.Tensor, action: torch.Tensor, embeddings: torch.Tensor, k: int) -> torch.Tensor:
    """VLA-Pruner's selection: union of the top-k by semantic and by action score, cut to exactly k
    by greedy max-min diversity over ``embeddings`` when the union is larger than k.

    semantic, action: [B, N]; embeddings: [B, N, D]. Returns int64 [B, k] ascending. When the two
    top-k sets coincide the union has exactly k tokens and is returned as is.
    """
    host = dual_select_host(semantic, action, embeddings, k)
    if host is not None:
        return torch.from_numpy(host)
    return _dual_select_torch(semantic, action, embeddings, k)


def _dual_select_torch(semantic: torch.Tensor, action: torch.Tensor, embeddings: torch.Tensor,
                       k: int) -> torch.Tensor:
    """``dual_select`` in torch ops (any device, traceable, no host syncs beyond the NaN check)."""
    b, n = semantic.shape
    top_sem = topk_ascending(semantic, k, "semantic scores")
    top_act = topk_ascending(action, k, "action scores")
    union = torch.zeros(b, n, dtype=torch.bool, device=semantic.device)
    union.scatter_(1, top_sem, True)
    union.scatter_(1, top_act, True)
    # Seed the diversity cut with the most semantically important token (deterministic).
    first = torch.where(union, semantic.float(), torch.tensor(float("-inf"), device=semantic.device)).argmax(dim=-1)
    return _greedy_torch(embeddings, k, candidates=union, first=first)


def dual_select_host(semantic: torch.Tensor, action: torch.Tensor, embeddings: torch.Tensor,
                     k: int) -> Optional[np.ndarray]:
    """``dual_select`` for CPU fp32 tensors, computed on the host: an int64 [B, k] array, ascending;
    None where this path does not apply (another device or dtype, a traced region, a bad k).

    The same indices as the torch path: top-k by a stable sort (ties to the lower index), the union,
    the first pick (the union's best semantic score, the lowest index among equals), then the greedy
    max-min loop over the union's cosine distances, which come from the same torch ops (normalise,
    one matmul) with ``1 - cos`` taken in fp32 on the union's sub-matrix only. A row whose union has
    exactly k tokens returns it (the loop would pick every candidate); the distances are computed only
    when some row needs the cut. Inside a policy step on the testbed CPU every small torch op costs
    15-60 us and every NumPy call 3-10 us (cold caches after the model's own work), while plain Python
    on 64-element lists stays cheap: the sorts and the union are Python, the loop NumPy."""
    if not (_host_path(semantic, action, embeddings) and isinstance(k, int) and not isinstance(k, bool)
            and semantic.dim() == 2 and 1 <= k <= semantic.shape[1]):
        return None
    return _dual_select_lists(semantic.tolist(), action.tolist(), k, lambda: cosine_gram(embeddings).numpy(),
                              semantic, action)


def dual_select_packed(semantic: torch.Tensor, action: torch.Tensor, embeddings: torch.Tensor,
                       k: int) -> Optional[np.ndarray]:
    """``dual_select`` for tensors on an accelerator, its loop on the host: an int64 [B, k] array
    (ascending), the same indices as ``_dual_select_torch``; None where this path does not apply (a CPU
    tensor, a traced region or CUDA graph capture, a bad k, B * N * N over 2**22).

    The cosine similarities are computed on the device by the torch path's op (``cosine_gram``); the
    scores and the similarities come to the host in one copy (a sync, where the torch path syncs for
    its NaN check anyway); top-k, union and the greedy loop run as in ``dual_select_host`` (1 - cos in
    fp32 rounds as on the device). The torch path launches about six kernels per greedy step (k - 1
    steps: ~380 launches for k = 64), which at batch 1 costs more host time than the whole copy."""
    if semantic.is_cpu or _in_traced_region() or not (isinstance(k, int) and not isinstance(k, bool)) \
            or semantic.dim() != 2 or not 1 <= k <= semantic.shape[1]:
        return None
    b, n = semantic.shape
    if b * n * n > 1 << 22 or action.shape != semantic.shape or embeddings.shape[:2] != (b, n):
        return None
    return _packed_select(semantic, action, embeddings, k)


def _packed_select(semantic: torch.Tensor, action: torch.Tensor, embeddings: torch.Tensor, k: int) -> np.ndarray:
    """``dual_select_packed`` without its checks (any device: tests run it on the CPU)."""
    b, n = semantic.shape
    packed = torch.cat([semantic.float(), action.to(semantic.device).float(),
                        cosine_gram(embeddings.to(semantic.device)).view(b, n * n)], dim=1).cpu().numpy()
    gram = packed[:, 2 * n:].reshape(b, n, n)
    return _dual_select_lists(packed[:, :n].tolist(), packed[:, n:2 * n].tolist(), k, lambda: gram,
                              semantic, action)


def _dual_select_lists(sem: List[List[float]], act: List[List[float]], k: int, gram_of: Any,
                       semantic: torch.Tensor, action: torch.Tensor) -> np.ndarray:
    """The host selection of ``dual_select_host`` / ``dual_select_packed`` over the scores as Python
    lists; gram_of() gives the fp32 cosine similarities [B, N, N] (called only when a row needs the
    cut); semantic / action: the tensors, for the NaN error."""
    b, n = len(sem), len(sem[0])
    for rows, t, what in ((sem, semantic, "semantic scores"), (act, action, "action scores")):
        for row in rows:
            total = sum(row)
            if total != total:  # NaN somewhere (or inf - inf: then check_scores finds nothing)
                check_scores(t, what)
    tokens = range(n)
    unions = []
    for s_row, a_row in zip(sem, act):
        # sorted(reverse=True) is stable: equal scores keep index order (ties to the lower index)
        union = set(sorted(tokens, key=s_row.__getitem__, reverse=True)[:k])
        union.update(sorted(tokens, key=a_row.__getitem__, reverse=True)[:k])
        unions.append(sorted(union))
    if all(len(u) == k for u in unions):
        return np.asarray(unions, dtype=np.int64)
    gram = gram_of()
    out = np.empty((b, k), dtype=np.int64)
    for r, idx in enumerate(unions):
        if len(idx) == k:
            out[r] = idx
            continue
        first = max(idx, key=sem[r].__getitem__)  # the first maximum: the lowest index among equals
        out[r] = _cut_union(gram[r], idx, first, k)
    return out


def _cut_union(gram: np.ndarray, idx: List[int], first: int, k: int) -> Any:
    """The greedy max-min cut of one row's union ``idx`` (ascending token indices, more than k) to k
    tokens, starting from token ``first``: k token indices ascending (a list, or an int64 array from
    the NaN path), the torch loop's picks.

    gram: the row's fp32 cosine similarities [N, N]. The loop runs on the union's distances ``1 - cos``
    (fp32, as ``cosine_distance``) with -inf on the diagonal, so the running minimum marks each pick
    itself: two NumPy calls a step (argmax takes the first maximum: ties to the lower index). NaN
    distances between union tokens take the torch loop's literal steps (NaN elsewhere never reaches
    a union token's running minimum)."""
    ia = np.asarray(idx)
    d = np.float32(1.0) - gram[ia[:, None], ia]  # the same fp32 1 - cos as cosine_distance
    total = float(d.sum())
    if total != total:  # NaN (inf - inf cannot occur: |1 - cos| <= 2 or NaN)
        cand = np.zeros(gram.shape[0], dtype=bool)
        cand[ia] = True
        return _greedy_numpy_literal(np.float32(1.0) - gram, k, cand, first)
    d.ravel()[:: len(idx) + 1] = -np.inf  # the diagonal (d is a fresh C-contiguous U x U array)
    j = idx.index(first)
    picks = [j]
    min_dist = d[j].copy()
    for _ in range(k - 1):
        j = int(min_dist.argmax())
        np.minimum(min_dist, d[j], out=min_dist)
        picks.append(j)
    return sorted([idx[p] for p in picks])  # plain Python on 16 ints: cheaper than two NumPy calls


def select_tokens(strategy: str, k: int, *, scores: Optional[torch.Tensor] = None,
                  action_scores: Optional[torch.Tensor] = None,
                  embeddings: Optional[torch.Tensor] = None, seed: int = 0,
                  batch: Optional[int] = None, n: Optional[int] = None,
                  device: Optional[torch.device] = None) -> torch.Tensor:
    """Dispatch to a strategy; raises ValueError naming what is missing or unknown."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: allowed {list(STRATEGIES)}")
    if strategy in ("fastv", "semantic"):
        if scores is None:
            raise ValueError(f"strategy {strategy!r} needs attention scores")
        return topk_ascending(scores, k, f"{strategy} scores")
    if strategy == "action":
        if action_scores is None:
            raise ValueError("strategy 'action' needs action scores")
        return topk_ascending(action_scores, k, "action scores")
    if strategy == "divprune":
        if embeddings is None:
            raise ValueError("strategy 'divprune' needs visual embeddings")
        return greedy_max_min(embeddings, k)
    if strategy == "random":
        ref = scores if scores is not None else embeddings
        if ref is not None:
            batch, n, device = ref.shape[0], ref.shape[1], ref.device
        if batch is None or n is None:
            raise ValueError("strategy 'random' needs batch and n (or a scores/embeddings tensor)")
        return random_select(batch, n, k, seed, device or torch.device("cpu"))
    if scores is None or action_scores is None or embeddings is None:
        raise ValueError("strategy 'dual' needs semantic scores, action scores and visual embeddings")
    return dual_select(scores, action_scores, embeddings, k)
