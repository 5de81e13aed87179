"""NATCache modes cache/reuse on aMUSEd run the whole UVit2DModel forward on the computed rows.

Tiny UVit2DModel with ConvNeXt/attention down- and up-blocks (num_res_blocks=2), random weights,
the real AmusedScheduler loop with classifier-free guidance as one [uncond; cond] batch. Checks:
full steps stay bit-identical, a cheap step computing every row equals vanilla, cheap steps equal a
plain-torch reference (the unmodified model where, at every token-mixing point, the tokens not
computed this step hold their value from when they were last computed), and each per-token module
sees exactly the planned number of rows.
"""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import vprune  # noqa: E402
from vprune import nat  # noqa: E402
from vprune.integrations.amused import amused_generate  # noqa: E402

STEPS = 8
GRID = 8
N = GRID * GRID
B = 2
MASK_ID = 39


pytestmark = pytest.mark.usefixtures("one_thread")  # exact comparisons: one intra-op thread (conftest)


def tiny(res_blocks=2):
    torch.manual_seed(0)
    m = diffusers.UVit2DModel(hidden_size=32, cond_embed_dim=16, micro_cond_encode_dim=4, micro_cond_embed_dim=20,
                              encoder_hidden_size=16, vocab_size=40, codebook_size=32, in_channels=16,
                              block_out_channels=16, num_res_blocks=res_blocks, block_num_heads=2,
                              num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              sample_size=GRID).eval()
    with torch.no_grad():
        m.mlm_layer.conv2.weight.mul_(30)         # sharpen the head: sampling depends on the context
        for ub in (m.down_block, m.up_block):      # GRN is zero-initialised (identity): make it act
            for rb in ub.res_blocks:
                rb.channelwise_norm.gamma.normal_(0, 1.0)
                rb.channelwise_norm.beta.normal_(0, 0.1)
    return m


def _text(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2 * B, 5, 16, generator=g), torch.randn(2 * B, 16, generator=g),
            torch.tensor([[16.0, 16, 0, 0, 6]]).expand(2 * B, 5))


def generate(m, seed=0):
    """(tokens, [(input ids, logits) per call]) of a guided generation (B images, batch 2B)."""
    ehs, pooled, mc = _text()
    calls = []
    h = m.register_forward_hook(lambda mod, a, kw, o: calls.append((a[0].clone(), o.detach().clone())),
                                with_kwargs=True)
    try:
        with torch.no_grad():
            toks = amused_generate(m, diffusers.AmusedScheduler(mask_token_id=MASK_ID), ehs, pooled, mc, batch=B,
                                   grid=GRID, steps=STEPS, guidance=3.0, generator=torch.Generator().manual_seed(seed))
    finally:
        h.remove()
    return toks, calls


def record_idx(m):
    """Per call: the rows computed ([B', k] int64) or None (full step)."""
    rt, seen = m._vprune.runtime, []
    build = rt.build

    def wrapped(is_mask):
        dev = build(is_mask)
        seen.append(None if dev.idx is None else dev.idx.clone())
        return dev

    rt.build = wrapped
    return seen


def reference_logits(vanilla, calls, idxs):
    """Plain torch: the unmodified model per call; at each depthwise conv input, GRN input and
    transformer-layer input the rows not computed this call take their value from the last call
    that computed them; their logits likewise."""
    cache, comp = {}, {}

    def keep_fresh(key, view):
        def pre(mod, args):
            x = args[0]
            if key in cache:
                x = torch.where(view(comp["m"], x), x, cache[key])
            cache[key] = x
            return (x,) + tuple(args[1:])
        return pre

    chw = lambda c, x: c.view(x.shape[0], 1, *x.shape[2:])          # noqa: E731  [B, C, H, W]
    hwc = lambda c, x: c.view(x.shape[0], *x.shape[1:-1], 1)         # noqa: E731  [B, H, W, C]
    nc = lambda c, x: c.view(x.shape[0], -1, 1)                      # noqa: E731  [B, N, C]
    hooks = []
    for name, ub in (("down", vanilla.down_block), ("up", vanilla.up_block)):
        for j, rb in enumerate(ub.res_blocks):
            hooks.append(rb.depthwise.register_forward_pre_hook(keep_fresh((name, j, "dw"), chw)))
            hooks.append(rb.channelwise_norm.register_forward_pre_hook(keep_fresh((name, j, "grn"), hwc)))
    for i, layer in enumerate(vanilla.transformer_layers):
        hooks.append(layer.register_forward_pre_hook(keep_fresh(("layer", i), nc)))
    ehs, pooled, mc = _text()
    outs = []
    try:
        with torch.no_grad():
            for (ids, _), idx in zip(calls, idxs):
                m = torch.ones(ids.shape[0], N, dtype=torch.bool)
                if idx is not None:
                    m = torch.zeros_like(m).scatter_(1, idx, True)
                comp["m"] = m
                logits = vanilla(ids, micro_conds=mc, pooled_text_emb=pooled, encoder_hidden_states=ehs)
                logits = keep_fresh("logits", chw)(None, (logits,))[0]
                outs.append(logits)
    finally:
        for h in hooks:
            h.remove()
    return outs


def test_refresh_1_is_vanilla_and_unpatch_restores():
    m = tiny()
    ref = generate(m)
    grns = [rb.channelwise_norm for ub in (m.down_block, m.up_block) for rb in ub.res_blocks]
    procs = {n: type(p) for n, p in m.attn_processors.items()}
    for mode in ("cache", "reuse"):
        vprune.patch(m, vprune.NATCache(mode=mode, refresh=1))
        assert all("forward" in g.__dict__ for g in grns)
        out = generate(m)
        vprune.unpatch(m)
        assert torch.equal(out[0], ref[0])
        assert all(torch.equal(a[1], b[1]) for a, b in zip(out[1], ref[1]))
    assert all("forward" not in g.__dict__ for g in grns)
    assert {n: type(p) for n, p in m.attn_processors.items()} == procs
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())
    assert torch.equal(generate(m)[0], ref[0])


@pytest.mark.parametrize("mode", ["cache", "reuse"])
def test_cheap_step_over_every_row_equals_vanilla(mode):
    m = tiny()
    vanilla = copy.deepcopy(m)
    with vprune.patched(m, vprune.NATCache(mode=mode, refresh=1000)):
        rt = m._vprune.runtime
        begin = rt.begin

        def every_row(is_mask, cond):            # turn each cheap step into one over all N rows
            plan = begin(is_mask, cond)
            if plan.kind != nat.KIND_RESTART:
                plan.kind, plan.k = nat.KIND_SUBSET, plan.n
            return plan

        rt.begin = every_row
        idxs = record_idx(m)
        _, calls = generate(m)
    assert sum(i is not None for i in idxs) == STEPS - 1
    ehs, pooled, mc = _text()
    with torch.no_grad():
        for ids, logits in calls:
            want = vanilla(ids, micro_conds=mc, pooled_text_emb=pooled, encoder_hidden_states=ehs)
            # exact: row caches only move values, and the GRN statistic is the module's own reduction
            assert torch.equal(logits, want)
            assert logits.stride() == want.stride()     # the same (token-major) layout as vanilla's


@pytest.mark.parametrize("mode, refresh", [("cache", 3), ("cache", 1000), ("reuse", 4)])
def test_cheap_steps_equal_plain_reference(mode, refresh):
    m = tiny()
    vanilla = copy.deepcopy(m)
    with vprune.patched(m, vprune.NATCache(mode=mode, refresh=refresh)):
        idxs = record_idx(m)
        _, calls = generate(m)
    assert any(i is not None and i.shape[1] < N for i in idxs)
    ref = reference_logits(vanilla, calls, idxs)
    ehs, pooled, mc = _text()
    stale_matters = 0.0
    for (ids, got), want, idx in zip(calls, ref, idxs):
        assert torch.equal(got, want)       # exact (fp32, one thread): see test above
        if idx is not None:
            with torch.no_grad():      # the reference differs from simply recomputing every token
                fresh = vanilla(ids, micro_conds=mc, pooled_text_emb=pooled, encoder_hidden_states=ehs)
            rows = idx[:, None, :].expand(-1, fresh.shape[1], -1)
            diff = (fresh.flatten(2).gather(2, rows) - want.flatten(2).gather(2, rows)).abs().max()
            stale_matters = max(stale_matters, float(diff))
    assert stale_matters > 1e-2


@pytest.mark.parametrize("mode", ["cache", "reuse"])
def test_each_per_token_module_computes_the_planned_rows(mode):
    m = tiny()
    seen = {}

    def count(name, tokens):
        return lambda mod, a: seen.setdefault(name, []).append(tokens(a[0]))

    rows_nchw = lambda x: x.shape[2] * x.shape[3]     # noqa: E731
    rows_nhwc = lambda x: x.shape[1] * x.shape[2]     # noqa: E731
    with vprune.patched(m, vprune.NATCache(mode=mode, refresh=3)):
        mods = {"embed": (m.embed, lambda x: x[0].numel()), "mlm": (m.mlm_layer, rows_nchw)}
        for name, ub in (("down", m.down_block), ("up", m.up_block)):
            for j, rb in enumerate(ub.res_blocks):
                mods[f"{name}{j}.res"] = (rb, rows_nchw)
                mods[f"{name}{j}.linear_1"] = (rb.channelwise_linear_1, rows_nhwc)
                mods[f"{name}{j}.grn"] = (rb.channelwise_norm, rows_nhwc)
                mods[f"{name}{j}.dw"] = (rb.depthwise, rows_nchw)     # after vprune's hook: full map
            for j, ab in enumerate(ub.attention_blocks):
                mods[f"{name}{j}.attn"] = (ab, lambda x: x.shape[1])
        for i, layer in enumerate(m.transformer_layers):
            mods[f"layer{i}"] = (layer, lambda x: x.shape[1])
        hooks = [mod.register_forward_pre_hook(count(name, fn)) for name, (mod, fn) in mods.items()]
        try:
            generate(m)
        finally:
            for h in hooks:
                h.remove()
        planned = [h["k"] for h in m._vprune.runtime.history]
    assert len(planned) == STEPS and min(planned) < N
    if mode == "cache":     # cache: every token still masked in the previous input, rounded up to 8
        counts = nat.cosine_mask_counts(N, STEPS)
        exp = [N if s % 3 == 0 else min(N, -(-counts[s - 1] // nat.SUBSET_MULTIPLE) * nat.SUBSET_MULTIPLE)
               for s in range(STEPS)]
        assert planned == exp
    for name, rows in seen.items():
        assert rows == ([N] * STEPS if name.endswith(".dw") else planned), name


def test_block_text_kv_once_per_generation():
    m = tiny()
    calls = []
    with vprune.patched(m, vprune.NATCache(mode="cache", refresh=4)):
        h = m.up_block.attention_blocks[1].attn1.to_k.register_forward_hook(lambda *a: calls.append(1))
        try:
            generate(m)
        finally:
            h.remove()
        kinds = [h["kind"] for h in m._vprune.runtime.history]
    assert len(calls) == sum(k != nat.KIND_SUBSET for k in kinds) < STEPS


def test_disentangle_keeps_stack_only_path():
    m = tiny()
    with vprune.patched(m, vprune.NATCache(mode="disentangle")):
        st = vprune.stats(m)
        assert st["tokens_computed_scope"] == "blocks"
        assert not any("forward" in rb.channelwise_norm.__dict__ for rb in m.down_block.res_blocks)
        assert m.transformer_layers[0]._forward_pre_hooks
    with vprune.patched(m, vprune.NATCache(mode="cache")):
        assert vprune.stats(m)["tokens_computed_scope"] == "forward"
        assert not m.transformer_layers[0]._forward_pre_hooks


def test_cheap_step_moves_rows_without_gather_or_scatter():
    """Row bookkeeping of a cheap step: index_select / index_copy_ of whole rows, no gather/scatter
    with an expanded index, and no float32 square/sub over rows for the GRN statistic."""
    m = tiny()
    ehs, pooled, mc = _text()
    ids = torch.full((2 * B, GRID, GRID), MASK_ID)
    flat = ids.view(2 * B, -1)
    g = torch.Generator().manual_seed(0)
    with vprune.patched(m, vprune.NATCache(mode="cache", refresh=1000)), torch.no_grad():
        run = lambda: m(ids, micro_conds=mc, pooled_text_emb=pooled, encoder_hidden_states=ehs)  # noqa: E731
        run()                                                  # restart
        flat[:, : N // 2] = torch.randint(0, 32, (2 * B, N // 2), generator=g)
        run()                                                  # full (every token was masked)
        flat[:, N // 2: 3 * N // 4] = torch.randint(0, 32, (2 * B, N // 4), generator=g)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run()
        assert m._vprune.runtime.history[-1]["kind"] == nat.KIND_SUBSET
    ops = [e.name for e in prof.events()]
    n_res, n_layers = 2 * len(m.down_block.res_blocks), len(m.transformer_layers)
    assert not {"aten::gather", "aten::scatter_", "aten::scatter", "aten::square"} & set(ops)
    # K and V per layer, depthwise map and GRN rows per ConvNeXt block, the logits
    assert ops.count("aten::index_copy_") == 2 * n_layers + 2 * n_res + 1
    assert ops.count("aten::linalg_vector_norm") == n_res
