"""Window-Diffusion core: partition, schedule, selection, samplers (vprune.window)."""
import pytest
import torch

import vprune
from vprune import window as W
from vprune.integrations.llada import LLaDAEngine, diffusion_generate
from vprune.testbed.dlm import tiny_llada

torch.set_num_threads(1)
MASK = 1


@pytest.fixture(scope="module")
def model():
    return tiny_llada(0, vocab_size=40, mask_token_id=MASK)


def _prompts(b=3, p=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 40, (b, p), generator=g)
    am = torch.ones_like(ids)
    for i in range(b):
        am[i, : (i * 2) % p] = 0  # row 0 unpadded, others left-padded
    ids[am == 0] = 0
    return ids, am


# ---------------------------------------------------------------------------------------------
def test_partition_hand_built():
    m = torch.tensor([[0, 0, 1, 1, 0, 1, 1, 1, 1, 0],
                      [1, 0, 1, 0, 1, 0, 1, 0, 1, 0]], dtype=torch.bool)
    act, buf, far = W.partition(m, active=2, window=4)
    assert act.nonzero().tolist() == [[0, 2], [0, 3], [1, 0], [1, 2]]
    assert buf.nonzero().tolist() == [[0, 5], [0, 6], [1, 4], [1, 6]]
    assert far.nonzero().tolist() == [[0, 7], [0, 8], [1, 8]]
    # disjoint and covering every mask
    assert torch.equal(act | buf | far, m) and not (act & buf).any() and not (buf & far).any()
    assert W.mask_rank(m)[0].tolist() == [-1, -1, 0, 1, -1, 2, 3, 4, 5, -1]
    # fewer masks than the window: no far-field
    act, buf, far = W.partition(torch.tensor([[1, 0, 1]], dtype=torch.bool), 1, 8)
    assert act.nonzero().tolist() == [[0, 0]] and buf.nonzero().tolist() == [[0, 2]] and not far.any()
    with pytest.raises(ValueError, match="active=5"):
        W.partition(m, 5, 4)


def test_transfer_schedule_and_selection():
    assert W.transfer_schedule(10, 4) == [3, 3, 2, 2]
    assert sum(W.transfer_schedule(256, 256)) == 256
    inf = float("-inf")
    conf = torch.tensor([[0.5, 0.9, 0.9, inf, 0.1], [inf, inf, 0.2, 0.2, inf]])
    # ties go to the lower index; never a non-candidate
    assert W.select_transfer(conf, 2, None).nonzero().tolist() == [[0, 1], [0, 2], [1, 2], [1, 3]]
    assert W.select_transfer(conf, 1, None).nonzero().tolist() == [[0, 1], [1, 2]]
    sel = W.select_transfer(conf, None, 0.4)
    assert sel.nonzero().tolist() == [[0, 0], [0, 1], [0, 2], [1, 2]]  # row 1: only its best
    none = torch.full((1, 3), inf)
    assert not W.select_transfer(none, None, 0.5).any() and not W.select_transfer(none, 2, None).any()


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gen,block,steps", [(16, 16, 16), (16, 8, 8), (24, 8, 24)])
@pytest.mark.parametrize("batch", [1, 3])
def test_refresh1_full_window_equals_vanilla(model, gen, block, steps, batch):
    ids, am = _prompts(batch)
    v = diffusion_generate(model, ids, am, gen_length=gen, steps=steps, block_length=block)
    for active in (1, gen):
        cfg = vprune.WindowDiffusion(active=active, window=gen, refresh=1)
        w = diffusion_generate(model, ids, am, config=cfg, gen_length=gen, steps=steps, block_length=block)
        assert torch.equal(v, w)


def test_refresh1_full_window_equals_vanilla_threshold(model):
    ids, am = _prompts(3)
    st_v, st_w = {}, {}
    v = diffusion_generate(model, ids, am, gen_length=16, block_length=8, threshold=0.2, stats=st_v)
    cfg = vprune.WindowDiffusion(active=4, window=16, refresh=1, threshold=0.2)
    w = diffusion_generate(model, ids, am, config=cfg, gen_length=16, block_length=8, stats=st_w)
    assert torch.equal(v, w) and st_v["steps"] == st_w["steps"]


def test_batch_rows_match_single_rows_window(model):
    """Left padding: each row decoded in a padded batch equals that row alone (same greedy
    decisions; RoPE is relative so shifted absolute positions only change rounding)."""
    ids, am = _prompts(3)
    cfg = vprune.WindowDiffusion(active=3, window=6, refresh=4)
    both = diffusion_generate(model, ids, am, config=cfg, gen_length=16, steps=16)
    for i in range(3):
        real = ids[i][am[i].bool()][None]
        one = diffusion_generate(model, real, None, config=cfg, gen_length=16, steps=16)
        assert torch.equal(one[0, -16:], both[i, -16:])


def test_every_mask_decoded_and_prompt_kept(model):
    ids, am = _prompts(3)
    for thr in (None, 0.3):
        cfg = vprune.WindowDiffusion(active=2, window=5, refresh=3, threshold=thr)
        trace = []
        out = diffusion_generate(model, ids, am, config=cfg, gen_length=24, steps=24, block_length=8, trace=trace)
        assert torch.equal(out[:, :7], ids)
        assert out.shape == (3, 31)
        # the decoded set at the end: each gen position decided exactly once (schedule sums to 24)
        assert len(trace) >= 24 // 8 if thr else len(trace) == 24


# ---------------------------------------------------------------------------------------------
def _reference_kv(model, tokens, key_valid):
    """Plain-torch K/V per layer (post-RoPE K, V) of a full forward, from the module weights."""
    eng = LLaDAEngine(model)
    tr, cfg = model.model.transformer, model.model.config
    b, t = tokens.shape
    x = tr.wte(tokens)
    sin, cos = eng.blocks[0].rotary_emb.get_rotary_embedding(t, tokens.device)
    bias = None if key_valid is None else (~key_valid)[:, None, None, :].float() * torch.finfo(torch.float).min
    out = []
    for blk in eng.blocks:
        h = blk.attn_norm(x)
        q = blk.q_proj(h).view(b, t, eng.n_heads, eng.head_dim).transpose(1, 2)
        k = blk.k_proj(h).view(b, t, eng.n_kv_heads, eng.head_dim).transpose(1, 2)
        v = blk.v_proj(h).view(b, t, eng.n_kv_heads, eng.head_dim).transpose(1, 2)

        def rope(z):
            z1, z2 = z.chunk(2, dim=-1)
            return z * cos + torch.cat((-z2, z1), -1) * sin
        q, k = rope(q), rope(k)
        out.append((k, v))
        s = (q @ k.transpose(-1, -2)) / eng.head_dim ** 0.5
        if bias is not None:
            s = s + bias
        a = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)
        x = x + blk.attn_out(a)
        h = blk.ff_norm(x)
        x = x + blk.ff_out(torch.nn.functional.silu(blk.ff_proj(h)) * blk.up_proj(h))
    logits = tr.ff_out(tr.ln_f(x))
    return out, logits


@torch.no_grad()
def test_refresh_cache_equals_fresh_full_forward(model):
    ids, am = _prompts(3)
    tokens = torch.cat([ids, torch.full((3, 9), MASK)], 1)
    kv = torch.cat([am.bool(), torch.ones(3, 9, dtype=torch.bool)], 1)
    eng = LLaDAEngine(model)
    cache = W.WindowKVCache(eng.n_layers, 3, eng.n_kv_heads, 20, eng.head_dim, torch.float32, torch.device("cpu"))
    logits = eng.full_forward(tokens, kv, cache)
    ref, ref_logits = _reference_kv(model, tokens, kv)
    assert torch.equal(logits, model(tokens, attention_mask=kv.long()).logits)  # the host's own forward
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for layer, (k, v) in enumerate(ref):
        torch.testing.assert_close(cache.k[layer][:, :, :16], k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.v[layer][:, :, :16], v, rtol=1e-5, atol=1e-5)
        assert not cache.k[layer][:, :, 16:].any()  # nothing past the refreshed prefix


@torch.no_grad()
def test_cheap_step_right_after_refresh_equals_full_forward_rows(model):
    """With the tokens unchanged since the refresh, a cheap step over any query subset gives the
    full forward's logits at those rows (cached K/V of the others are exact)."""
    ids, am = _prompts(3)
    tokens = torch.cat([ids, torch.full((3, 9), MASK)], 1)
    kv = torch.cat([am.bool(), torch.ones(3, 9, dtype=torch.bool)], 1)
    eng = LLaDAEngine(model)
    cache = W.WindowKVCache(eng.n_layers, 3, eng.n_kv_heads, 16, eng.head_dim, torch.float32, torch.device("cpu"))
    full = eng.full_forward(tokens, kv, cache)
    qpos = torch.tensor([[7, 8, 12], [9, 10, 15], [7, 14, 15]])
    valid = torch.tensor([[True, True, True], [True, True, False], [True, True, True]])
    write = torch.where(valid, qpos, torch.full_like(qpos, 16))
    logits = eng.window_forward(tokens.gather(1, qpos), qpos, write, kv, cache)
    for i in range(3):
        for j in range(3):
            if valid[i, j]:
                torch.testing.assert_close(logits[i, j], full[i, qpos[i, j]], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def test_work_per_step_counted_by_hooks_matches_schedule(model):
    ids, am = _prompts(2, p=5)
    counts = []
    h = model.model.transformer.blocks[0].q_proj.register_forward_hook(
        lambda m, i, o: counts.append(i[0].shape[0] * i[0].shape[1]))
    try:
        trace, st = [], {}
        cfg = vprune.WindowDiffusion(active=2, window=6, refresh=4)
        diffusion_generate(model, ids, am, config=cfg, gen_length=16, steps=16, trace=trace, stats=st)
    finally:
        h.remove()
    assert counts == [t["rows"] for t in trace]
    assert sum(counts) == st["computed_tokens"]
    kinds = [t["kind"] for t in trace]
    # one token per step, window 6 >= active 2 + refresh 4 - 1: every phase runs its full 4 steps
    assert kinds == (["refresh"] + ["cheap"] * 3) * 4
    first = trace[0]
    assert first["e"] == 5 + 6 and counts[0] == 2 * (5 + 6)  # prompt + window; far-field not computed
    for t in trace:
        if t["kind"] == "cheap":
            q = t["query"]
            # active (2) + decoded this phase; never beyond the phase's prefix
            assert all(len(r) <= 2 + 3 for r in q) and t["rows"] == 2 * max(len(r) for r in q)
            assert all(p < t["kmax"] for r in q for p in r)
    # vanilla computes every position every step
    counts.clear()
    h = model.model.transformer.blocks[0].q_proj.register_forward_hook(
        lambda m, i, o: counts.append(i[0].shape[0] * i[0].shape[1]))
    try:
        diffusion_generate(model, ids, am, gen_length=16, steps=16)
    finally:
        h.remove()
    assert counts == [2 * 21] * 16


def test_active_and_window_sets_in_trace(model):
    ids = torch.randint(2, 40, (1, 4), generator=torch.Generator().manual_seed(1))
    trace = []
    cfg = vprune.WindowDiffusion(active=3, window=5, refresh=2)
    diffusion_generate(model, ids, None, config=cfg, gen_length=12, steps=12, trace=trace)
    t0 = trace[0]
    assert [p for _, p in t0["active"]] == [4, 5, 6] and [p for _, p in t0["buffer"]] == [7, 8]
    assert t0["e"] == 9
    # cheap step right after: queries = 3 active masks + the token decoded at the refresh
    q = trace[1]["query"][0]
    assert len(q) == 4 and all(4 <= p < 9 for p in q)


def test_phase_ends_early_when_active_leaves_window(model):
    ids = torch.randint(2, 40, (1, 4), generator=torch.Generator().manual_seed(2))
    trace = []
    cfg = vprune.WindowDiffusion(active=3, window=4, refresh=8)
    diffusion_generate(model, ids, None, config=cfg, gen_length=12, steps=12, trace=trace)
    kinds = [t["kind"] for t in trace]
    # after 2 decodes in a 4-mask window only 2 remain < active 3: refresh (not every 8 steps)
    assert kinds[:4] == ["refresh", "cheap", "refresh", "cheap"]


# ---------------------------------------------------------------------------------------------
def test_bad_configs_and_arguments(model):
    with pytest.raises(ValueError, match=r"WindowDiffusion.active=65.*window=64"):
        vprune.WindowDiffusion(active=65, window=64)
    with pytest.raises(ValueError, match=r"refresh=0"):
        vprune.WindowDiffusion(refresh=0)
    with pytest.raises(ValueError, match=r"window=0"):
        vprune.WindowDiffusion(window=0)
    with pytest.raises(ValueError, match=r"threshold=1.5"):
        vprune.WindowDiffusion(threshold=1.5)
    with pytest.raises(ValueError, match=r"cuda_graph"):
        vprune.WindowDiffusion(cuda_graph="yes")
    ids, _ = _prompts(1)
    with pytest.raises(ValueError, match="block_length=5"):
        diffusion_generate(model, ids, gen_length=16, block_length=5)
    with pytest.raises(ValueError, match="steps=3"):
        diffusion_generate(model, ids, gen_length=16, block_length=8, steps=3)
    with pytest.raises(ValueError, match="remasking='x'"):
        diffusion_generate(model, ids, gen_length=16, remasking="x")
    with pytest.raises(ValueError, match="gen_length=0"):
        diffusion_generate(model, ids, gen_length=0)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA"):
        diffusion_generate(model, ids, config=vprune.WindowDiffusion(cuda_graph=True), gen_length=16)
    with pytest.raises(ValueError, match="attention_mask shape"):
        diffusion_generate(model, ids, torch.ones(1, 3), gen_length=16)
    assert vprune.WindowDiffusion.from_dict(vprune.WindowDiffusion(threshold=0.9).to_dict()).threshold == 0.9


def test_temperature_sampling_is_seeded(model):
    ids, am = _prompts(2)
    cfg = vprune.WindowDiffusion(active=2, window=6, refresh=4)
    a = diffusion_generate(model, ids, am, config=cfg, gen_length=16, temperature=1.0,
                           generator=torch.Generator().manual_seed(3))
    b = diffusion_generate(model, ids, am, config=cfg, gen_length=16, temperature=1.0,
                           generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
