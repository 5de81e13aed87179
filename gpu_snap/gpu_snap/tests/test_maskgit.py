"""NATCache on the testbed MaskGIT (timm blocks): exactness, unpatch, hook counts, batch, CFG."""
import os

import pytest
import torch

import vprune
from vprune import nat
from vprune.errors import AlreadyPatchedError, IncompatibleModelError, NotPatchedError
from vprune.testbed import maskgit as mg

STEPS = 8


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)      # tiny matrices: threads only add contention on a shared machine
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = mg.TinyMaskGIT(mg.MaskGITConfig(dim=32, depth=3, heads=2)).eval()
    # a random model is near-uniform; sharpen it so that sampling depends on the context
    with torch.no_grad():
        m.head.weight.mul_(20)
    return m


LABELS = torch.tensor([0, 3, 7])


def _run(model, cfg="batch", guidance=2.0, labels=LABELS, seed=1):
    """Tokens and every step's logits (recorded by a hook on the model)."""
    logits = []
    h = model.register_forward_hook(lambda mod, a, out: logits.append(out.detach().clone()))
    try:
        toks = mg.sample(model, labels, steps=STEPS, guidance=guidance, seed=seed, cfg=cfg)
    finally:
        h.remove()
    return toks, logits


def _equal(a, b):
    return torch.equal(a[0], b[0]) and len(a[1]) == len(b[1]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


@pytest.mark.parametrize("cfg", ["batch", "two_pass"])
def test_cache_refresh_1_is_bit_identical_to_vanilla(model, cfg):
    ref = _run(model, cfg)
    with vprune.patched(model, vprune.NATCache(mode="cache", refresh=1)):
        out = _run(model, cfg)
    assert _equal(out, ref)


@pytest.mark.parametrize("cfg", ["batch", "two_pass"])
def test_disentangle_cache_is_lossless(model, cfg):
    with vprune.patched(model, vprune.NATCache(mode="disentangle", refresh=1)):
        uncached = _run(model, cfg)
    with vprune.patched(model, vprune.NATCache(mode="disentangle", refresh=1000)):
        cached = _run(model, cfg)
        frac = vprune.stats(model)["tokens_computed_fraction"]
    assert frac < 0.9                       # the cache really skipped settled tokens
    assert _equal(cached, uncached)


def test_disentangle_changes_the_pattern(model):
    ref = _run(model)
    with vprune.patched(model, vprune.NATCache(mode="disentangle", refresh=1)):
        out = _run(model)
    assert not all(torch.equal(x, y) for x, y in zip(out[1][1:], ref[1][1:]))


def _expected_k(mode, refresh, steps, n):
    counts = nat.cosine_mask_counts(n, steps)
    ks = []
    for s in range(steps):
        if s == 0 or s % refresh == 0:
            ks.append(n)
        elif mode == "reuse":
            new = counts[s - 1] - counts[s]
            k = min(new + max(1, min(counts[s], max(1, new))), counts[s - 1])
            k = -(-k // nat.SUBSET_MULTIPLE) * nat.SUBSET_MULTIPLE
            ks.append(k if k < n else n)
        else:
            k = -(-counts[s - 1] // nat.SUBSET_MULTIPLE) * nat.SUBSET_MULTIPLE
            ks.append(k if k < n else n)
    return ks


@pytest.mark.parametrize("mode, refresh", [("cache", 3), ("disentangle", 100), ("reuse", 4)])
def test_tokens_per_block_follow_the_schedule(model, mode, refresh):
    seen = {i: [] for i in range(len(model.blocks))}
    with vprune.patched(model, vprune.NATCache(mode=mode, refresh=refresh)):
        # registered after patching, so they see what each block really computes
        handles = [blk.register_forward_pre_hook(lambda mod, a, i=i: seen[i].append(tuple(a[0].shape)))
                   for i, blk in enumerate(model.blocks)]
        try:
            _run(model)
        finally:
            for h in handles:
                h.remove()
    exp = _expected_k(mode, refresh, STEPS, mg.N_TOKENS)
    for i, shapes in seen.items():
        assert [s[1] for s in shapes] == exp, f"block {i}"
        assert all(s[0] == 2 * len(LABELS) for s in shapes)   # CFG batch: [uncond; cond]


def test_reuse_and_cache_stay_close_to_vanilla(model):
    ref = _run(model)
    for mode, r in (("cache", 4), ("reuse", 3)):
        with vprune.patched(model, vprune.NATCache(mode=mode, refresh=r)):
            out = _run(model)
        # the first step is always full: identical logits there
        assert torch.equal(out[1][0], ref[1][0])
        assert out[0].shape == ref[0].shape and (out[0] < mg.CODEBOOK_SIZE).all()


def test_two_pass_cfg_keeps_separate_streams(model):
    with vprune.patched(model, vprune.NATCache(mode="cache", refresh=4)):
        _run(model, cfg="two_pass")
        rt = model._vprune.runtime
        assert len(rt.streams) == 2
        assert {h["stream"] for h in rt.history} == {s.sid for s in rt.streams}


def test_batch_rows_are_independent(model):
    cfg = vprune.NATCache(mode="disentangle", refresh=1000)
    with vprune.patched(model, cfg):
        both = mg.sample(model, LABELS, steps=STEPS, guidance=1.0, seed=5)
    # the sampler draws its noise per batch, so compare logits of one step instead
    x = both.clone()
    x[:, ::2] = model.mask_id
    with vprune.patched(model, cfg):
        full = model(x, LABELS)
        one = model(x[1:2], LABELS[1:2])
    assert torch.allclose(full[1:2], one, atol=1e-5)


def test_unpatch_restores_everything(model):
    ref = _run(model)
    cls = type(model)
    attn_cls = [type(b.attn) for b in model.blocks]
    dicts = [set(b.attn.__dict__) for b in model.blocks]
    vprune.patch(model, vprune.NATCache(mode="reuse", refresh=2))
    assert type(model).__name__ == "VPruneTinyMaskGIT"
    _run(model)
    vprune.unpatch(model)
    assert type(model) is cls and [type(b.attn) for b in model.blocks] == attn_cls
    assert [set(b.attn.__dict__) for b in model.blocks] == dicts
    assert not model.blocks[0]._forward_pre_hooks and not model.blocks[-1]._forward_hooks
    assert "_vprune" not in model.__dict__
    assert _equal(_run(model), ref)
    with pytest.raises(NotPatchedError):
        vprune.unpatch(model)


def test_patch_twice_and_errors(model):
    cfg = vprune.NATCache(mode="cache", refresh=2)
    with vprune.patched(model, cfg):
        assert vprune.patch(model, cfg) is model        # equal config: no-op
        with pytest.raises(AlreadyPatchedError):
            vprune.patch(model, vprune.NATCache(mode="reuse"))
        with pytest.raises(ValueError, match="attn_mask"):
            model(torch.zeros(1, mg.N_TOKENS, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                  attn_mask=torch.ones(1, 1, mg.N_TOKENS, mg.N_TOKENS, dtype=torch.bool))
        st = vprune.stats(model)
        assert st["integration"] == "maskgit-timm" and st["targets"][0] == "blocks.0.attn"
        vprune.reset(model)
        assert model._vprune.runtime.streams == []


def test_structure_check_leaves_model_unchanged():
    m = mg.TinyMaskGIT(mg.MaskGITConfig(dim=16, depth=1, heads=2))
    m.mask_id = "x"
    with pytest.raises(IncompatibleModelError, match="mask_id"):
        vprune.patch(m, vprune.NATCache())
    assert type(m) is mg.TinyMaskGIT and "_vprune" not in m.__dict__


def test_no_blocks_raises_no_targets():
    m = mg.TinyMaskGIT(mg.MaskGITConfig(dim=16, depth=1, heads=2))
    m.blocks = torch.nn.ModuleList()
    with pytest.raises(vprune.NoTargetsError):
        vprune.patch(m, vprune.NATCache())
    assert type(m) is mg.TinyMaskGIT


def test_failed_patch_is_undone(model, monkeypatch):
    from vprune.integrations import maskgit as integ

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(integ, "vprune_subclass", boom)
    with pytest.raises(RuntimeError, match="boom"):
        vprune.patch(model, vprune.NATCache())
    assert type(model) is mg.TinyMaskGIT and not vprune.is_patched(model)
    assert not model.blocks[0]._forward_pre_hooks and "_vprune_nat" not in model.blocks[0].attn.__dict__


def test_tokenizer_roundtrip_and_determinism():
    a, la = mg.make_dataset(20, seed=3)
    b, lb = mg.make_dataset(20, seed=3)
    assert (a == b).all() and (la == lb).all()
    tok = mg.encode(a)
    assert tok.shape == (20, mg.N_TOKENS) and tok.max() < mg.CODEBOOK_SIZE
    assert (mg.encode(mg.decode(tok)) == tok).all()


@pytest.mark.skipif(not os.path.exists(mg.WEIGHTS), reason="testbed weights not built")
def test_shipped_weights_generate_recognisable_shapes():
    torch.set_num_threads(1)
    model, clf = mg.load_pretrained()
    labels = torch.arange(20) % mg.NUM_CLASSES
    toks = mg.sample(model, labels, steps=8, guidance=2.0, seed=0)
    with torch.no_grad():
        acc = (clf(toks).argmax(-1) == labels).float().mean().item()
    assert acc >= 0.5
