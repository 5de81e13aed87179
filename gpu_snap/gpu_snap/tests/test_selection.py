"""Selection strategies: static sizes, ascending order, exact against brute-force references."""

import numpy as np
import pytest
import torch

from vprune.scoring import cosine_distance
from vprune.selection import check_scores, dual_select, greedy_max_min, select_tokens


def _brute_greedy(emb, k, candidates=None, first=None):
    """A plain-Python greedy max-min reference for one row."""
    d = cosine_distance(emb[None])[0].tolist()
    n = len(d)
    cand = list(range(n)) if candidates is None else [i for i in range(n) if candidates[i]]
    if first is None:
        def nearest(i):
            others = [d[i][j] for j in cand if j != i]
            return min(others) if others else 0.0
        best = max(nearest(i) for i in cand)
        first = min(i for i in cand if nearest(i) == best)
    chosen = [first]
    while len(chosen) < k:
        gains = {i: min(d[i][j] for j in chosen) for i in cand if i not in chosen}
        best = max(gains.values())
        chosen.append(min(i for i, g in gains.items() if g == best))
    return sorted(chosen)


@pytest.mark.parametrize("seed", range(4))
def test_greedy_max_min_matches_brute_force_reference(seed):
    torch.manual_seed(seed)
    emb = torch.randn(3, 13, 6)
    got = greedy_max_min(emb, 5)
    assert got.shape == (3, 5) and got.dtype == torch.int64
    for b in range(3):
        assert got[b].tolist() == _brute_greedy(emb[b], 5)


def test_greedy_max_min_restricted_to_candidates_and_deterministic():
    torch.manual_seed(5)
    emb = torch.randn(2, 10, 4)
    cand = torch.zeros(2, 10, dtype=torch.bool)
    cand[0, [1, 3, 4, 7, 9]] = True
    cand[1, [0, 2, 5, 6]] = True
    a = greedy_max_min(emb, 3, candidates=cand)
    b = greedy_max_min(emb, 3, candidates=cand)
    assert torch.equal(a, b)
    for row in range(2):
        assert set(a[row].tolist()) <= set(torch.nonzero(cand[row]).flatten().tolist())
        assert a[row].tolist() == _brute_greedy(emb[row], 3, cand[row].tolist())


def test_greedy_prefers_spread_out_points():
    # two tight clusters and one outlier: a 3-token budget must take one of each
    emb = torch.tensor([[[1.0, 0.01], [1.0, 0.0], [0.0, 1.0], [0.01, 1.0], [-1.0, -1.0]]])
    got = greedy_max_min(emb, 3)[0].tolist()
    assert 4 in got and len({0, 1} & set(got)) == 1 and len({2, 3} & set(got)) == 1


def test_dual_union_equal_sets_returns_that_set():
    torch.manual_seed(0)
    sem = torch.randn(2, 12)
    emb = torch.randn(2, 12, 5)
    got = dual_select(sem, sem.clone() * 3.0, emb, 4)
    ref = torch.sort(torch.topk(sem, 4).indices, dim=1).values
    assert torch.equal(got, ref)


def test_dual_returns_exactly_k_from_the_union():
    torch.manual_seed(1)
    for _ in range(5):
        sem, act, emb = torch.randn(3, 20), torch.randn(3, 20), torch.randn(3, 20, 6)
        got = dual_select(sem, act, emb, 6)
        assert got.shape == (3, 6)
        for b in range(3):
            union = set(torch.topk(sem[b], 6).indices.tolist()) | set(torch.topk(act[b], 6).indices.tolist())
            assert set(got[b].tolist()) <= union and len(set(got[b].tolist())) == 6
            assert got[b].tolist() == sorted(got[b].tolist())


def test_fastv_is_topk_with_ties_to_lower_index():
    scores = torch.tensor([[0.5, 0.9, 0.9, 0.1, 0.9]])
    assert select_tokens("fastv", 2, scores=scores).tolist() == [[1, 2]]


def test_random_is_seeded_and_distinct():
    a = select_tokens("random", 7, batch=2, n=30, seed=3)
    b = select_tokens("random", 7, batch=2, n=30, seed=3)
    c = select_tokens("random", 7, batch=2, n=30, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert all(len(set(r)) == 7 for r in a.tolist())


def test_nan_scores_raise_clear_error():
    s = torch.tensor([[0.1, float("nan"), 0.3], [0.1, 0.2, 0.3]])
    with pytest.raises(ValueError, match=r"NaN \(batch rows \[0\]\)"):
        check_scores(s)
    with pytest.raises(ValueError, match="NaN"):
        select_tokens("fastv", 1, scores=s)


@pytest.mark.parametrize("strategy,kw,msg", [
    ("fastv", {}, "needs attention scores"), ("divprune", {}, "needs visual embeddings"),
    ("dual", {"scores": torch.zeros(1, 3)}, "needs semantic scores, action scores"),
    ("bogus", {}, "unknown strategy"),
])
def test_missing_inputs_and_unknown_strategy(strategy, kw, msg):
    with pytest.raises(ValueError, match=msg):
        select_tokens(strategy, 1, **kw)


def _tie_heavy(gen, b, n, d):
    """Scores with many exact ties (rounded, zero blocks) and embeddings with duplicate rows."""
    sem = (torch.rand(b, n, generator=gen) * 4).round() / 4
    act = torch.rand(b, n, generator=gen)
    act[:, : n // 3] = 0.0
    emb = torch.randn(b, n, d, generator=gen)
    emb[:, 5] = emb[:, 9]
    return sem, act, emb


def _selection_cases(gen, seed):
    """(k, semantic, action, embeddings) for every k of one seeded shape: tie-heavy inputs (duplicate
    embeddings, repeated scores) for seed % 4 < 2, else Gaussian."""
    b, n = (1, 64) if seed % 2 else (3, 37)
    for k in (1, n // 8 or 1, n // 4, n // 2, n):
        if seed % 4 < 2:
            yield (k, *_tie_heavy(gen, b, n, 6))
        else:
            yield k, torch.randn(b, n, generator=gen), torch.randn(b, n, generator=gen), torch.randn(b, n, 6, generator=gen)


@pytest.mark.parametrize("seed", range(8))
def test_cpu_host_path_matches_the_torch_path(seed):
    """dual / greedy / top-k on CPU run in NumPy and Python; every index equals the torch path (the
    one other devices and traced code use), ties and duplicate embeddings included."""
    from vprune.kernels import select_topk
    from vprune.selection import _dual_select_torch, _greedy_torch, dual_select_host, topk_ascending

    gen = torch.Generator().manual_seed(seed)
    for k, sem, act, emb in _selection_cases(gen, seed):
        host = dual_select_host(sem, act, emb, k)
        assert host is not None and host.dtype == np.int64
        assert torch.equal(torch.from_numpy(host), _dual_select_torch(sem, act, emb, k))
        assert torch.equal(dual_select(sem, act, emb, k), _dual_select_torch(sem, act, emb, k))
        assert torch.equal(topk_ascending(act, k), select_topk(act, k))
        b, n = sem.shape
        cand = torch.rand(b, n, generator=gen) < 0.6
        cand[:, :k] = True
        first = torch.where(cand, sem, torch.tensor(float("-inf"))).argmax(dim=-1)
        assert torch.equal(greedy_max_min(emb, k), _greedy_torch(emb, k))
        assert torch.equal(greedy_max_min(emb, k, candidates=cand), _greedy_torch(emb, k, candidates=cand))
        assert torch.equal(greedy_max_min(emb, k, candidates=cand, first=first),
                           _greedy_torch(emb, k, candidates=cand, first=first))


def test_host_path_declines_what_it_does_not_cover():
    from vprune.selection import dual_select_host

    s, e = torch.rand(1, 8), torch.rand(1, 8, 3)
    assert dual_select_host(s.half(), s.half(), e, 2) is None   # fp16 scores: the torch path
    assert dual_select_host(s, s, e, 9) is None                 # a bad k: the torch path raises
    with pytest.raises(ValueError, match="NaN"):
        dual_select(torch.tensor([[0.1, float("nan"), 0.3]]), torch.rand(1, 3), torch.rand(1, 3, 2), 1)
    nan_emb = torch.rand(1, 6, 3)
    nan_emb[0, 2] = float("nan")  # NaN distances: the torch loop's literal steps
    sem, act = torch.arange(6.0)[None], torch.arange(6.0).flip(0)[None]
    from vprune.selection import _dual_select_torch
    assert torch.equal(dual_select(sem, act, nan_emb, 3), _dual_select_torch(sem, act, nan_emb, 3))


@pytest.mark.parametrize("nan_token", [0, 3, 7])
def test_host_cut_with_nan_embeddings_inside_or_outside_the_union(nan_token):
    """The host cut checks NaN on the union's distances only: a NaN embedding outside the union
    changes nothing (the torch loop masks it), inside the union the literal steps run; both equal
    the torch path."""
    from vprune.selection import _dual_select_torch, dual_select_host

    gen = torch.Generator().manual_seed(nan_token)
    sem = torch.tensor([[0.9, 0.8, 0.1, 0.7, 0.0, 0.2, 0.3, 0.05]])
    act = torch.tensor([[0.0, 0.1, 0.9, 0.2, 0.8, 0.7, 0.05, 0.3]])
    emb = torch.randn(1, 8, 4, generator=gen)
    emb[0, nan_token] = float("nan")  # token 7 is in neither top-3 set
    host = dual_select_host(sem, act, emb, 3)
    assert host is not None
    assert torch.equal(torch.from_numpy(host), _dual_select_torch(sem, act, emb, 3))


@pytest.mark.parametrize("seed", range(6))
def test_packed_host_selection_matches_the_torch_path(seed):
    """dual_select for accelerator tensors with its loop on the host (similarities computed by the
    device op, one copy of scores + similarities, the host loop): every index equals the torch path,
    ties and duplicate embeddings included; run here on the CPU through the unchecked body."""
    from vprune.selection import _dual_select_torch, _packed_select, dual_select_packed

    gen = torch.Generator().manual_seed(100 + seed)
    for k, sem, act, emb in _selection_cases(gen, seed):
        got = _packed_select(sem, act, emb.to(torch.bfloat16) if seed == 5 else emb, k)
        want = _dual_select_torch(sem, act, emb.to(torch.bfloat16) if seed == 5 else emb, k)
        assert got.dtype == np.int64 and torch.equal(torch.from_numpy(got), want)
    assert dual_select_packed(sem, act, emb, 2) is None  # CPU tensors: dual_select_host's job
    with pytest.raises(ValueError, match="NaN"):
        _packed_select(torch.tensor([[0.1, float("nan"), 0.3]]), torch.rand(1, 3), torch.rand(1, 3, 2), 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_packed_host_selection_on_cuda_matches_the_torch_path():
    from vprune.selection import _dual_select_torch, dual_select_packed

    gen = torch.Generator().manual_seed(7)
    for b, n, d, k in ((1, 256, 64, 64), (2, 256, 32, 32), (1, 64, 8, 16)):
        sem, act = torch.randn(b, n, generator=gen).cuda(), torch.randn(b, n, generator=gen).cuda()
        emb = torch.randn(b, n, d, generator=gen).cuda().to(torch.bfloat16)
        got = dual_select_packed(sem, act, emb, k)
        assert got is not None and torch.equal(torch.from_numpy(got).cuda(), _dual_select_torch(sem, act, emb, k))
