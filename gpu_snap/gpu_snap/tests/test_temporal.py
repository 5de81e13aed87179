"""Action-attention history (vprune.temporal) and the dual selection it feeds."""
import pytest
import torch

from vprune.selection import dual_select
from vprune.temporal import ActionHistory, temporal_weights


def test_weights_newest_first_weighted_one():
    w = temporal_weights(3, 0.8)
    assert torch.allclose(w, torch.tensor([1.0, 0.8, 0.64]))
    assert w[0] == 1.0 and (w[1:] < w[:-1]).all()  # newest weighted highest


@pytest.mark.parametrize("window,decay", [(0, 0.8), (3, 0.0), (3, 1.5), (True, 0.8)])
def test_bad_window_or_decay_raise(window, decay):
    with pytest.raises(ValueError):
        temporal_weights(window, decay)


def test_smoothed_is_decayed_sum_newest_weighted_one():
    h = ActionHistory(window=3, decay=0.5, warmup=0)
    assert h.smoothed() is None
    steps = [torch.tensor([[1.0, 0.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0, 0.0]]),
             torch.tensor([[0.0, 0.0, 1.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.0, 1.0]])]
    h.record(steps[0])
    assert torch.equal(h.smoothed(), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    h.record(steps[1])
    assert torch.equal(h.smoothed(), torch.tensor([[0.5, 1.0, 0.0, 0.0]]))
    h.record(steps[2])
    assert torch.equal(h.smoothed(), torch.tensor([[0.25, 0.5, 1.0, 0.0]]))
    h.record(steps[3])  # the oldest (step 0) falls out of the window of 3
    assert torch.equal(h.smoothed(), torch.tensor([[0.0, 0.25, 0.5, 1.0]]))


def test_pruned_tokens_contribute_zero():
    h = ActionHistory(window=2, decay=0.8, warmup=0)
    h.record(torch.tensor([[0.5, 0.0, 0.5]]))  # token 1 pruned at that step
    h.record(torch.tensor([[0.0, 0.0, 1.0]]))
    s = h.smoothed()
    assert s[0, 1] == 0.0
    assert torch.allclose(s, torch.tensor([[0.4, 0.0, 1.4]]))


def test_warmup_counts_control_steps_per_row_and_reset_restarts_it():
    h = ActionHistory(window=3, decay=0.8, warmup=2)
    assert h.begin_step(2) == [True, True]
    assert h.begin_step(2) == [True, True]
    assert h.begin_step(2) == [False, False]
    h.reset(rows=[1])  # row 1 starts a new episode
    assert h.begin_step(2) == [False, True]
    h.reset()
    assert h.begin_step(3) == [True, True, True]  # a new episode may change the batch size


def test_warmup_zero_never_warms_up():
    h = ActionHistory(window=3, decay=0.8, warmup=0)
    assert h.begin_step(1) == [False]


def test_rows_are_separate():
    h = ActionHistory(window=3, decay=0.8, warmup=0)
    h.record(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    h.record(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    s = h.smoothed()
    assert torch.allclose(s, torch.tensor([[1.8, 0.0], [0.0, 1.8]]))
    h.reset(rows=0)
    s = h.smoothed()
    assert torch.equal(s[0], torch.zeros(2))
    assert torch.allclose(s[1], torch.tensor([0.0, 1.8]))
    assert h.has_history().tolist() == [False, True]


def test_history_recorded_in_inference_mode_can_be_reset_and_extended_outside_it():
    h = ActionHistory(window=2, decay=0.5, warmup=0)
    with torch.inference_mode():
        h.record(torch.ones(2, 3))
    h.reset(rows=[0])
    h.record(torch.ones(2, 3))
    assert torch.equal(h.smoothed(), torch.tensor([[1.0] * 3, [1.5] * 3]))


def test_reset_clears_everything():
    h = ActionHistory(window=3, decay=0.8, warmup=1)
    h.begin_step(1)
    h.record(torch.ones(1, 4))
    h.reset()
    assert h.smoothed() is None and h.has_history() is None
    assert h.begin_step(1) == [True]


def test_shape_change_within_episode_raises_clear_error():
    h = ActionHistory(window=3, decay=0.8, warmup=0)
    h.record(torch.ones(2, 4))
    with pytest.raises(ValueError, match="vprune.reset"):
        h.record(torch.ones(3, 4))
    with pytest.raises(ValueError, match="vprune.reset"):
        h.record(torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        h.record(torch.ones(4))
    with pytest.raises(ValueError, match="reset row"):
        h.reset(rows=[7])


# ------------------------------------------------------------------ dual selection (union + diversity)
def _case(seed, b=2, n=24, d=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, n, generator=g), torch.rand(b, n, generator=g), torch.randn(b, n, d, generator=g))


@pytest.mark.parametrize("k", [1, 3, 7, 12, 24])
def test_dual_returns_exactly_k_ascending_from_the_union(k):
    sem, act, emb = _case(k)
    got = dual_select(sem, act, emb, k)
    assert got.shape == (2, k) and got.dtype == torch.int64
    for b in range(2):
        row = got[b].tolist()
        assert row == sorted(set(row))  # distinct, ascending
        union = set(torch.topk(sem[b], k).indices.tolist()) | set(torch.topk(act[b], k).indices.tolist())
        assert set(row) <= union
        # the most semantically important token of the union always survives the cut
        assert int(sem[b].argmax()) in row


def test_dual_is_deterministic():
    sem, act, emb = _case(5)
    a = dual_select(sem, act, emb, 6)
    b = dual_select(sem.clone(), act.clone(), emb.clone(), 6)
    assert torch.equal(a, b)


def test_dual_when_both_top_sets_coincide_returns_that_set():
    sem, _, emb = _case(9)
    act = sem * 3.0 + 1.0  # same ranking: the two top-k sets coincide, union has exactly k tokens
    k = 5
    got = dual_select(sem, act, emb, k)
    want = torch.sort(torch.topk(sem, k, dim=1).indices, dim=1).values
    assert torch.equal(got, want)


def test_dual_cut_prefers_diverse_tokens():
    # four near-duplicate tokens with high semantic score, two distinct ones with high action score
    emb = torch.tensor([[[1.0, 0.0], [1.0, 0.01], [1.0, 0.02], [1.0, 0.03], [0.0, 1.0], [-1.0, 0.0]]])
    sem = torch.tensor([[1.0, 0.9, 0.8, 0.7, 0.0, 0.0]])
    act = torch.tensor([[0.0, 0.0, 0.0, 0.5, 1.0, 0.9]])
    got = dual_select(sem, act, emb, 3)[0].tolist()
    assert got == [0, 4, 5]  # the best semantic token plus the two diverse action tokens


def test_smoothed_is_the_weighted_window_sum_and_counts_live_on_the_host():
    h = ActionHistory(window=3, decay=0.8, warmup=0)
    torch.manual_seed(0)
    steps = [torch.rand(2, 5) for _ in range(4)]
    for i, s in enumerate(steps):
        h.record(s)
        assert h.recorded == [min(i + 1, 3)] * 2 and h.filled.tolist() == [min(i + 1, 3)] * 2
    want = torch.einsum("bwn,w->bn", torch.stack(steps[::-1][:3], dim=1), h.weights)
    assert torch.equal(h.smoothed(), want)  # newest first, weighted 1, 0.8, 0.64
    assert h.all_rows_recorded()
    h.reset(rows=[1])
    assert h.recorded == [3, 0] and not h.all_rows_recorded() and h.has_history().tolist() == [True, False]


def test_smoothed_after_a_new_batch_size_rebuilds_its_cached_weights():
    """smoothed() caches the weights as [B, 1, w]; a new episode with another batch size gets new ones."""
    h = ActionHistory(window=3, decay=0.8, warmup=0)
    torch.manual_seed(1)
    for b in (2, 3, 1):
        h.reset()
        steps = [torch.rand(b, 4) for _ in range(2)]
        for s in steps:
            h.record(s)
        want = torch.einsum("bwn,w->bn", torch.stack([steps[1], steps[0], torch.zeros(b, 4)], dim=1), h.weights)
        assert torch.equal(h.smoothed(), want)
