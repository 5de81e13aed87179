"""Core NAT logic (vprune.nat): partition, static-size selection, ENAT mask, streams, config."""
import math

import pytest
import torch

import vprune
from vprune import nat


def test_partition_groups_are_disjoint_and_cover():
    prev = torch.tensor([[True, True, False, True, False]])
    now = torch.tensor([[True, False, False, True, False]])
    settled, new, mask = nat.partition(now, prev)
    assert settled.tolist() == [[False, False, True, False, True]]
    assert new.tolist() == [[False, True, False, False, False]]
    assert mask.tolist() == now.tolist()
    total = settled.int() + new.int() + mask.int()
    assert torch.equal(total, torch.ones_like(total))


def test_select_tokens_static_k_ascending_ties_to_lower_index():
    score = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0, 0.0],
                          [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    idx = nat.select_tokens(score, 3)
    assert idx.shape == (2, 3)
    assert idx[0].tolist() == [1, 2, 4]
    # row 1 has one positive: padding takes the lowest-index others
    assert idx[1].tolist() == [0, 1, 2]
    # continuous scores keep their order (the tie-break is below float32 resolution)
    conf = torch.tensor([[0.5, 0.50001, 0.2, 0.9]])
    assert nat.select_tokens(conf, 2)[0].tolist() == [1, 3]
    assert nat.select_tokens(conf, 10).shape == (1, 4)


def test_disentangled_mask_pattern():
    is_mask = torch.tensor([[False, False, True, False]])
    revkey = torch.tensor([[4, 2, -1, 4]])      # tokens 0 and 3 revealed first, token 1 later
    m = nat.disentangled_mask(None, is_mask, revkey)[0, 0]
    assert m[2].all()                            # a mask query attends to everything
    assert m[0].tolist() == [True, False, False, True]   # early token: only early visible tokens
    assert m[1].tolist() == [True, True, False, True]    # later token: everything visible so far
    assert not m[:, 2][[0, 1, 3]].any()          # no visible token attends to a mask token
    sub = nat.disentangled_mask(torch.tensor([[1, 2]]), is_mask, revkey)[0, 0]
    assert torch.equal(sub, m[[1, 2]])


def test_cosine_counts_match_the_samplers_rule():
    from vprune.testbed.maskgit import mask_schedule
    counts = nat.cosine_mask_counts(256, 12)
    assert counts[0] == 256 and len(counts) == 12
    assert all(a > b for a, b in zip(counts, counts[1:]))
    assert counts[1:] == [max(1, c) for c in mask_schedule(256, 12)]
    assert counts[1] == math.floor(256 * math.cos(math.pi / 2 / 12))


def _step(rt, is_mask, cond):
    plan = rt.begin(is_mask, cond)
    rt.build(is_mask)
    rt.end()
    return plan


def test_runtime_plans_restart_full_and_subset_sizes():
    rt = nat.NATRuntime("cache", refresh=3, n_layers=1)
    b, n = 2, 32
    lab = torch.tensor([1, 2])
    masks = [torch.ones(b, n, dtype=torch.bool)]
    for keep in (24, 5, 3, 1):
        m = torch.zeros(b, n, dtype=torch.bool)
        m[:, :keep] = True
        masks.append(m)
    plans = [_step(rt, m, [lab]) for m in masks]
    # step 1 would compute every token (all were masked before): it runs as a full step
    # sizes are rounded up to multiples of SUBSET_MULTIPLE (8)
    assert [p.kind for p in plans] == ["restart", "full", "subset", "full", "subset"]
    assert [p.k for p in plans] == [32, 32, 24, 32, 8]
    # all-masked input again: a new generation restarts the same stream
    again = _step(rt, masks[0], [lab])
    assert again.kind == "restart" and again.stream is plans[0].stream
    assert len(rt.streams) == 1


def test_runtime_separate_streams_per_conditioning_and_lru_bound():
    rt = nat.NATRuntime("cache", refresh=4, n_layers=1)
    m = torch.ones(1, 4, dtype=torch.bool)
    s_cond = _step(rt, m, [torch.tensor([3])]).stream
    s_unc = _step(rt, m, [torch.tensor([10])]).stream
    assert s_cond is not s_unc
    part = torch.tensor([[True, True, False, False]])
    assert _step(rt, part, [torch.tensor([3])]).stream is s_cond
    assert _step(rt, part, [torch.tensor([10])]).stream is s_unc
    for c in range(20):
        _step(rt, m, [torch.tensor([100 + c])])
    assert len(rt.streams) == nat.STREAMS_PER_SHAPE
    # other shapes get their own streams, bounded in all
    for b in range(2, 8):
        _step(rt, torch.ones(b, 4, dtype=torch.bool), [torch.arange(b)])
    assert len(rt.streams) <= nat.MAX_STREAMS
    rt.reset()
    assert rt.streams == []


def test_more_masks_than_before_restarts():
    rt = nat.NATRuntime("disentangle", refresh=100, n_layers=1)
    lab = [torch.tensor([0])]
    _step(rt, torch.ones(1, 4, dtype=torch.bool), lab)
    _step(rt, torch.tensor([[True, False, False, True]]), lab)
    p = _step(rt, torch.tensor([[True, True, False, True]]), lab)
    assert p.kind == "restart"


@pytest.mark.parametrize("kwargs, field", [
    ({"mode": "fast"}, "mode"), ({"refresh": 0}, "refresh"), ({"refresh": 1.5}, "refresh"),
    ({"cuda_graphs": 1}, "cuda_graphs")])
def test_config_errors_name_field_value_and_range(kwargs, field):
    with pytest.raises(ValueError) as e:
        vprune.NATCache(**kwargs)
    msg = str(e.value)
    assert field in msg and repr(list(kwargs.values())[0]) in msg and "allowed" in msg


def test_config_roundtrip():
    c = vprune.NATCache(mode="reuse", refresh=3, cuda_graphs=True)
    assert vprune.TechniqueConfig.from_dict(c.to_dict()) == c


def test_row_caches_follow_the_computed_rows():
    """full_map / token_norm / merge_rows / set_confidence (TokenIO path) against plain scatters."""
    torch.manual_seed(0)
    rt = nat.NATRuntime("reuse", refresh=100, n_layers=1)
    b, n, lab = 2, 16, [torch.tensor([1, 2])]
    x, y, z, c = torch.randn(b, 3, 4, 4), torch.randn(b, n, 5), torch.randn(b, 7, 4, 4), torch.rand(b, n)
    rt.begin(torch.ones(b, n, dtype=torch.bool), lab)
    assert rt.build(torch.ones(b, n, dtype=torch.bool)).idx is None
    assert rt.full_map("dw", x) is x and rt.merge_rows("out", z) is z
    assert rt.token_norm("grn", y) is None               # full step: the host computes it
    rt.set_confidence(c)
    rt.end()
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[:, :12] = True
    assert rt.begin(mask, lab).kind == "subset"
    idx = rt.build(mask).idx
    k = idx.shape[1]
    assert k == 8 and torch.equal(idx, idx.sort(1).values)
    xr, yr, zr, cr = torch.randn(b, 3, k, 1), torch.randn(b, k, 5), torch.randn(b, 7, k, 1), torch.rand(b, k)

    def put(full, rows, dim):    # full with its token rows idx replaced (tokens: dim 1, or dims 2.. flattened)
        if dim == 1:
            return full.scatter(1, idx[:, :, None].expand(-1, -1, full.shape[2]), rows)
        f = full.flatten(2)
        return f.scatter(2, idx[:, None, :].expand(-1, f.shape[1], -1), rows.flatten(2)).view(full.shape)

    want_map = put(x, xr, 2)
    got_map = rt.full_map("dw", xr)
    assert torch.equal(got_map, want_map)
    assert torch.equal(rt.rows_of(got_map), xr.flatten(2))
    assert torch.equal(rt.token_norm("grn", yr), torch.norm(put(y, yr, 1), p=2, dim=1))
    assert torch.equal(rt.take(y), y.gather(1, idx[:, :, None].expand(-1, -1, 5)))
    merged = rt.merge_rows("out", zr)
    assert torch.equal(merged, put(z, zr, 2))
    merged.zero_()                                     # the caller gets a copy
    assert torch.equal(rt.merge_rows("out", zr), put(z, zr, 2))
    rt.set_confidence(cr)
    assert torch.equal(rt.host.stream.conf, c.scatter(1, idx, cr))
    rt.end()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64])
def test_flat_row_helpers_equal_gather_and_scatter(dtype):
    """take_rows / put_rows on flat [B*N, ...] views == gather / scatter_ with an expanded index."""
    g = torch.Generator().manual_seed(0)
    for b, n, k, rest in [(3, 13, 5, (7,)), (2, 9, 9, (3, 5)), (5, 17, 1, ()), (1, 11, 4, (6,))]:
        x = (torch.randn(b, n, *rest, generator=g) * 100).to(dtype)
        idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b)])   # unsorted, distinct
        ix = idx.view(b, k, *([1] * len(rest))).expand(b, k, *rest)
        flat = nat.flat_rows(idx, n)
        assert flat.dtype == torch.int64 and flat.shape == (b * k,)
        offsets = torch.arange(b)[:, None] * n
        assert torch.equal(nat.flat_rows(idx, n, offsets), flat)
        assert torch.equal(nat.take_rows(x, flat, idx), x.gather(1, ix))
        assert torch.equal(nat.gather_rows(x, idx), x.gather(1, ix))
        rows = (torch.randn(b, k, *rest, generator=g) * 100).to(dtype)
        want = x.clone().scatter_(1, ix, rows)
        cache = x.clone()
        assert nat.put_rows(cache, flat, rows) is cache and torch.equal(cache, want)
        if rest:     # strided views: rows of a transposed source, a cache without a flat view
            xt = x.transpose(-1, 1).contiguous().transpose(-1, 1)
            assert torch.equal(nat.take_rows(xt, flat, idx), x.gather(1, ix))
            src = rows.transpose(0, 1).contiguous().transpose(0, 1)
            cache = x.clone()
            assert torch.equal(nat.put_rows(cache, flat, src), want)
    # a K/V cache [B, H, N, D] kept token-major: written through its [B, N, H, D] view
    kc = torch.randn(2, 6, 3, 4, generator=g)                      # [B, N, H, D] memory
    view = kc.transpose(1, 2)                                       # [B, H, N, D]
    idx = torch.tensor([[0, 4], [5, 1]])
    new = torch.randn(2, 3, 2, 4, generator=g)                      # [B, H, k, D]
    want = view.clone().scatter_(2, idx[:, None, :, None].expand(-1, 3, -1, 4), new)
    nat.put_rows(view.transpose(1, 2), nat.flat_rows(idx, 6), new.transpose(1, 2))
    assert torch.equal(view, want)
    with pytest.raises(RuntimeError):    # no flat view: refuse rather than write into a copy
        nat.put_rows(view, nat.flat_rows(idx, 3), new)
