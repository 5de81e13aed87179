"""OpenVLA integration: dual-level temporal-aware pruning on OpenVLA-structured policies.

Runs on transformers 5.x and on transformers 4.40.1 + timm 0.9.16 (``.ci/compat_venv.sh``). Hosts: a tiny
random-weight model with OpenVLA's class name and call behaviour (``_openvla_tiny``) and the testbed
policy class (``vprune.testbed.policy.TestbedVLAPolicy``, random weights here; the trained one if shipped).
"""
import numpy as np
import pytest
import torch

import _openvla_tiny as T
import vprune
from vprune.errors import AlreadyPatchedError, IncompatibleModelError, MissingInputsError
from vprune.integrations import _compat
from vprune.integrations.openvla import OpenVLAIntegration, default_layer, reset_rows
from vprune.integrations.registry import find_integration

NEW_TRANSFORMERS = _compat.transformers_version() >= (4, 50)


@pytest.fixture(autouse=True)
def _no_grad():
    """Inference only, scoped to this module's tests (a module-level switch leaks into other files)."""
    with torch.no_grad():
        yield


# ----------------------------------------------------------------------------------- helpers
def _testbed(seed=0, fused=False):
    from vprune.testbed.policy import TestbedVLAConfig, TestbedVLAPolicy, default_text_config

    torch.manual_seed(seed)
    text = default_text_config()
    text.num_hidden_layers = 4
    cfg = TestbedVLAConfig(image_size=32, patch_size=8, vision_dim=32, vision_depth=2, vision_heads=2,
                           use_fused_vision_backbone=fused, text_config=text)
    model = TestbedVLAPolicy(cfg).eval()
    for p in model.parameters():  # random weights with some spread, so attention is not uniform
        p.add_(torch.randn_like(p) * 0.1)
    return model


def _host(kind, seed=0, fused=False, attn="sdpa"):
    if kind == "tiny":
        return T.build(seed=seed, fused=fused, attn=attn)
    model = _testbed(seed, fused)
    if attn != "sdpa":
        model.language_model.config._attn_implementation = attn
        if not NEW_TRANSFORMERS:  # 4.40 picks the attention class at construction
            pytest.skip("attention implementation switch needs transformers >= 4.50")
    return model


def _act(model, ids, pix, **kw):
    return np.asarray(model.predict_action(ids, pixel_values=pix, **kw))


def _cache_of(out):
    for name in ("cache", "past_key_values"):
        c = getattr(out, name, None)
        if c is not None:
            return c
    return None


def _greedy(model, ids, pix, steps, mask=None):
    """Prefill + ``steps`` cached decode forwards; returns (logits of each call's last row, tokens)."""
    out = model(input_ids=ids, pixel_values=pix, attention_mask=mask, use_cache=True)
    logits, toks = [out.logits[:, -1].clone()], []
    cache = _cache_of(out)
    for _ in range(steps):
        tok = logits[-1].argmax(-1, keepdim=True)
        toks.append(tok)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        kw = {"attention_mask": mask} if mask is not None and not isinstance(model, T.OpenVLAForActionPrediction) else {}
        out = model(input_ids=tok, past_key_values=cache, use_cache=True, **kw)
        logits.append(out.logits[:, -1].clone())
        cache = _cache_of(out)
    return logits, toks


def _layers(model):
    return model.language_model.model.layers


def _runtime(model):
    return model.__dict__["_vprune"].runtime


def _no_hooks(module):
    """No hook, vprune subclass or vprune attribute left on any submodule."""
    for m in module.modules():
        if m._forward_hooks or m._forward_pre_hooks or hasattr(type(m), "_vprune_original_class") \
                or any(name.startswith("_vprune") for name in m.__dict__):
            return False
    return True


# ------------------------------------------------------------------------- matching / config
def test_registry_matches_by_class_name_and_structure():
    m = T.build()
    assert isinstance(find_integration(m), OpenVLAIntegration)
    pytest.importorskip("vprune.testbed.policy")
    assert isinstance(find_integration(_testbed()), OpenVLAIntegration)


def test_default_config_for_vlas():
    m = T.build(n_layers=4)
    vprune.patch(m)
    cfg = m._vprune.config
    assert cfg.strategy == "dual" and cfg.layer == 2 and cfg.action_layer == 1 and cfg.keep == 0.25
    vprune.unpatch(m)
    assert [default_layer(d) for d in (2, 3, 4, 6, 8, 12, 32)] == [1, 1, 2, 3, 3, 3, 3]


def test_missing_structure_raises_and_leaves_model_unchanged():
    m = T.build()
    del m.projector
    with pytest.raises(IncompatibleModelError, match="projector"):
        vprune.patch(m)
    assert type(m) is T.OpenVLAForActionPrediction and not vprune.is_patched(m) and _no_hooks(m)


def test_fused_backbone_without_fused_featurizer_is_rejected():
    m = T.build(fused=True)
    del m.vision_backbone.fused_featurizer
    with pytest.raises(IncompatibleModelError, match="fused_featurizer"):
        vprune.patch(m)


@pytest.mark.parametrize("field,value", [("layer", 4), ("action_layer", 9), ("cuda_graph", True)])
def test_out_of_range_layers_raise_before_any_change(field, value):
    m = T.build(n_layers=4)
    with pytest.raises(ValueError, match=field):
        vprune.patch(m, vprune.VisualPruning(**{field: value}))
    assert type(m) is T.OpenVLAForActionPrediction and _no_hooks(m)


def test_patch_twice_and_unpatch_errors():
    m = T.build()
    vprune.patch(m, keep=0.5)
    vprune.patch(m, keep=0.5)  # equal config: no-op
    with pytest.raises(AlreadyPatchedError):
        vprune.patch(m, keep=0.25)
    vprune.unpatch(m)
    with pytest.raises(vprune.errors.NotPatchedError):
        vprune.unpatch(m)


# ----------------------------------------------------------------------- bit-exact invariants
@pytest.mark.parametrize("kind", ["tiny", "testbed"])
def test_keep_all_is_bit_identical_and_unpatch_restores(kind):
    m = _host(kind)
    ids, pix = T.inputs(seed=1)
    want_logits, _ = _greedy(m, ids, pix, 3)
    want = _act(m, ids, pix)
    vprune.patch(m, vprune.VisualPruning(keep=1.0, warmup=0))
    for _ in range(2):  # pruning path active (no warm-up), nothing dropped
        assert np.array_equal(_act(m, ids, pix), want)
    got_logits, _ = _greedy(m, ids, pix, 3)
    assert all(torch.equal(a, b) for a, b in zip(got_logits, want_logits))
    st = vprune.stats(m)
    assert st["per_sample"][0]["visual_after"] == st["per_sample"][0]["visual_before"]
    vprune.unpatch(m)
    assert type(m).__name__ == type(m).__mro__[0].__name__ and not type(m).__name__.startswith("VPrune")
    assert _no_hooks(m) and "_vprune" not in m.__dict__
    # after unpatch: original behaviour, with pruning having happened in between
    vprune.patch(m, keep=0.25, warmup=0)
    _act(m, ids, pix)
    vprune.unpatch(m)
    assert np.array_equal(_act(m, ids, pix), want)
    got_logits, _ = _greedy(m, ids, pix, 3)
    assert all(torch.equal(a, b) for a, b in zip(got_logits, want_logits))


# --------------------------------------------------------------------------- pruning itself
@pytest.mark.parametrize("kind", ["tiny", "testbed"])
def test_layers_from_k_receive_m_visual_tokens_and_stats_agree(kind):
    m = _host(kind)
    ids, pix = T.inputs(seed=2)
    vprune.patch(m, vprune.VisualPruning(keep=0.25, warmup=0))
    k = m._vprune.config.layer
    seen = {}

    def counter(i):
        def hook(mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(i, []).append(h.shape[1])
        return hook

    # on each layer's attention: the rows the layer computes (a pruned layer cuts its inputs in forward)
    handles = [layer.self_attn.register_forward_pre_hook(counter(i), with_kwargs=True)
               for i, layer in enumerate(_layers(m))]
    try:
        _, toks = _greedy(m, ids, pix, 2)
    finally:
        for h in handles:
            h.remove()
    n = m.config.num_patches if hasattr(m.config, "num_patches") else 16
    length = ids.shape[1] + n
    mk = n // 4
    st = vprune.stats(m)
    for i, lens in seen.items():
        prefill = lens[0]
        assert prefill == (length if i < k else length - n + mk), (i, lens)
        assert lens[1:] == [1, 1]
    s = st["per_sample"][0]
    assert s["visual_before"] == n and s["visual_after"] == mk and not s["warmup"] and s["pruned"]
    assert s["kept_indices"] == sorted(set(s["kept_indices"])) and all(0 <= j < n for j in s["kept_indices"])
    assert st["layer"] == k and st["flops_skipped"] > 0
    vprune.unpatch(m)


def _masked_reference(model, k, blocked, ids, pix, toks):
    """Unpatched model, pruned visual columns hidden as keys in layers >= k: the logits pruning must give."""
    def hook(mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        q_len = h.shape[1]
        cols = blocked.shape[1] + (0 if q_len > 1 else len(state["seen"]))
        keys = torch.zeros(h.shape[0], cols, dtype=torch.bool)
        keys[:, : blocked.shape[1]] = blocked
        neg = torch.finfo(h.dtype).min
        if q_len > 1:
            causal = torch.ones(q_len, cols, dtype=torch.bool).triu(1)
            bad = causal.unsqueeze(0) | keys.unsqueeze(1)
        else:
            bad = keys.unsqueeze(1)
        kw = dict(kwargs)
        kw["attention_mask"] = torch.zeros(bad.shape, dtype=h.dtype).masked_fill(bad, neg).unsqueeze(1)
        return args, kw

    state = {"seen": []}
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in _layers(model)[k:]]
    try:
        out = model(input_ids=ids, pixel_values=pix, use_cache=True)
        logits = [out.logits[:, -1]]
        cache = _cache_of(out)
        for tok in toks:
            state["seen"].append(tok)
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1])
            cache = _cache_of(out)
    finally:
        for h in handles:
            h.remove()
    return logits


@pytest.mark.parametrize("kind", ["tiny", "testbed"])
@pytest.mark.parametrize("keep", [0.25, 0.5])
def test_pruned_logits_match_masked_reference(kind, keep):
    m = _host(kind)
    ids, pix = T.inputs(seed=3)
    vprune.patch(m, vprune.VisualPruning(keep=keep, warmup=0))
    got, toks = _greedy(m, ids, pix, 3)
    st = vprune.stats(m)
    k = st["layer"]
    vprune.unpatch(m)
    n = st["per_sample"][0]["visual_before"]
    blocked = torch.zeros(1, ids.shape[1] + n, dtype=torch.bool)
    pruned = sorted(set(range(n)) - set(st["per_sample"][0]["kept_indices"]))
    blocked[0, [1 + j for j in pruned]] = True
    want = _masked_reference(m, k, blocked, ids, pix, toks)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_scores_match_eager_attention_weights():
    """Semantic score = last prompt row at layer K-1; action rows at the action layer, 0 for pruned
    tokens: both equal the eager attention probabilities of the same rows."""
    m = T.build(attn="eager", n_layers=4)
    ids, pix = T.inputs(seed=4)
    vprune.patch(m, vprune.VisualPruning(keep=0.5, layer=1, action_layer=2, warmup=0))
    _, toks = _greedy(m, ids, pix, 2)
    rt = _runtime(m)
    sem, act = rt.semantic.clone(), (rt.action_sum / rt.action_rows).clone()
    kept = rt.kept_visual[0].tolist()
    assert rt.action_rows == 3  # the last prompt row + 2 decode steps
    vprune.unpatch(m)
    n = sem.shape[1]
    patches = m.projector(m.vision_backbone(pix))
    emb = m.get_input_embeddings()(torch.cat([ids] + toks, dim=1))
    mm = torch.cat([emb[:, :1], patches, emb[:, 1:]], dim=1)
    length = ids.shape[1] + n
    # layer K-1 = 0 is unpruned: plain eager attention
    out = m.language_model(inputs_embeds=mm[:, :length], output_attentions=True)
    torch.testing.assert_close(sem, out.attentions[0][:, :, -1, 1:1 + n].mean(1), atol=1e-6, rtol=1e-5)
    # action layer 2 >= K: pruned visual columns hidden as keys from layer 1 on
    pruned = [1 + j for j in range(n) if j not in kept]
    bad = torch.ones(mm.shape[1], mm.shape[1], dtype=torch.bool).triu(1)
    bad_pruned = bad.clone()
    bad_pruned[:, pruned] = True

    def hook_for(bad_keys):
        additive = torch.zeros(bad_keys.shape).masked_fill(bad_keys, torch.finfo(torch.float32).min)[None, None]

        def hook(mod, args, kwargs):
            kw = dict(kwargs)
            kw["attention_mask"] = additive
            return args, kw
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(bad if i < 1 else bad_pruned), with_kwargs=True)
               for i, layer in enumerate(_layers(m))]
    try:
        out = m.language_model(inputs_embeds=mm, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    rows = out.attentions[2][0, :, length - 1:length + 2, 1:1 + n].mean(0)  # [3, N]
    want = rows.mean(0, keepdim=True)
    assert torch.all(want[0, [j for j in range(n) if j not in kept]] == 0)
    torch.testing.assert_close(act, want, atol=1e-6, rtol=1e-5)


def test_prefill_mean_semantic_variant_runs_and_prunes():
    m = T.build()
    ids, pix = T.inputs(seed=5)
    vprune.patch(m, vprune.VisualPruning(keep=0.25, semantic="prefill_mean", warmup=0))
    _act(m, ids, pix)
    assert vprune.stats(m)["per_sample"][0]["visual_after"] == 4
    vprune.unpatch(m)


@pytest.mark.parametrize("strategy", ["fastv", "semantic", "action", "divprune", "random"])
def test_other_strategies_keep_exactly_m(strategy):
    m = T.build()
    ids, pix = T.inputs(seed=6)
    vprune.patch(m, vprune.VisualPruning(keep=5, strategy=strategy, warmup=0))
    _act(m, ids, pix)
    _act(m, ids, pix)
    s = vprune.stats(m)["per_sample"][0]
    assert s["visual_after"] == 5 and len(set(s["kept_indices"])) == 5
    vprune.unpatch(m)


# --------------------------------------------------------------------------- temporal flow
def test_warmup_steps_are_unpruned_but_record_history():
    m = T.build()
    ids, pix = T.inputs(seed=7)
    vprune.patch(m, keep=0.25)  # history 3, warm-up 3
    rt = _runtime(m)
    flags = []
    for step in range(5):
        _act(m, ids, pix)
        s = vprune.stats(m)["per_sample"][0]
        flags.append((s["warmup"], s["visual_after"]))
        # the history holds every completed control step, warm-up ones included
        filled = 0 if rt.history.filled is None else int(rt.history.filled[0])
        assert filled == min(step, 3)
    assert flags == [(True, 16)] * 3 + [(False, 4)] * 2
    vprune.reset(m)
    _act(m, ids, pix)
    assert vprune.stats(m)["per_sample"][0]["warmup"] is True
    assert rt.history.filled is None or int(rt.history.filled[0]) == 0
    vprune.unpatch(m)


def test_action_history_steers_selection():
    """After warm-up the action score comes from the history: with semantic scores fixed, changing the
    recorded history changes which tokens are kept (the union differs)."""
    m = T.build()
    ids, pix = T.inputs(seed=8)
    vprune.patch(m, vprune.VisualPruning(keep=4, warmup=0, history=1))
    rt = _runtime(m)
    n = 16
    picks = []
    for hot in ([0, 1, 2, 3], [12, 13, 14, 15]):
        rt.history.reset()
        fake = torch.zeros(1, n)
        fake[0, hot] = 1.0
        rt.history.record(fake)
        rt.active = False  # nothing pending to commit
        _greedy(m, ids, pix, 0)
        picks.append(vprune.stats(m)["per_sample"][0]["kept_indices"])
    assert picks[0] != picks[1]
    vprune.unpatch(m)


class PolicyWithReset(T.OpenVLAForActionPrediction):
    """A host whose class has its own reset() (matched through the MRO)."""

    def reset(self):
        self.__dict__["host_resets"] = self.__dict__.get("host_resets", 0) + 1
        return "host"


def test_policy_own_reset_also_clears_history_and_is_restored_by_unpatch():
    torch.manual_seed(0)
    m = PolicyWithReset(T.build().config).eval()
    ids, pix = T.inputs(seed=9)
    vprune.patch(m, keep=0.25, warmup=1)
    _act(m, ids, pix)
    _act(m, ids, pix)
    assert vprune.stats(m)["per_sample"][0]["warmup"] is False
    assert m.reset() == "host" and m.host_resets == 1
    _act(m, ids, pix)
    assert vprune.stats(m)["per_sample"][0]["warmup"] is True  # new episode
    vprune.unpatch(m)
    assert type(m) is PolicyWithReset and m.reset() == "host" and m.host_resets == 2


@pytest.mark.parametrize("kind", ["tiny", "testbed"])
def test_batch_rows_are_separate_environments(kind):
    m = _host(kind)
    ids, pix = T.inputs(seed=10, batch=2)
    single = []
    vprune.patch(m, vprune.VisualPruning(keep=0.25, warmup=1, history=2))
    for b in range(2):
        vprune.reset(m)
        for _ in range(3):
            _greedy(m, ids[b:b + 1], pix[b:b + 1], 2)
        single.append(vprune.stats(m)["per_sample"][0]["kept_indices"])
    vprune.reset(m)
    for _ in range(3):
        _greedy(m, ids, pix, 2)
    st = vprune.stats(m)["per_sample"]
    assert [s["kept_indices"] for s in st] == single  # each row equals its own single-row run
    hist = _runtime(m).history
    assert hist.smoothed().shape[0] == 2 and not torch.equal(hist.smoothed()[0], hist.smoothed()[1])
    # a new episode in row 1 only: its warm-up restarts (the batch runs unpruned this step), row 0 keeps history
    reset_rows(m, [1])
    assert hist.has_history().tolist() == [True, False]
    _greedy(m, ids, pix, 2)
    st = vprune.stats(m)["per_sample"]
    assert [s["warmup"] for s in st] == [False, True] and st[0]["visual_after"] == 16
    _greedy(m, ids, pix, 2)
    assert [s["visual_after"] for s in vprune.stats(m)["per_sample"]] == [4, 4]
    vprune.unpatch(m)


# ------------------------------------------------------------------------- cameras / backbones
@pytest.mark.parametrize("fused", [False, True])
def test_per_camera_budgets_with_two_images(fused):
    m = T.build(fused=fused)
    ids, pix = T.inputs(seed=11, fused=fused, images=2)
    vprune.patch(m, vprune.VisualPruning(keep=0.25, warmup=0))
    _greedy(m, ids, pix, 1)
    st = vprune.stats(m)
    s = st["per_sample"][0]
    assert st["images"] == 2 and st["budgets"] == [4, 4] and s["visual_before"] == 32
    idx = s["kept_indices"]
    assert len([j for j in idx if j < 16]) == 4 and len([j for j in idx if j >= 16]) == 4
    vprune.unpatch(m)


def test_fused_backbone_single_image_prunes_and_keep_all_is_exact():
    m = T.build(fused=True)
    ids, pix = T.inputs(seed=12, fused=True)
    want = _act(m, ids, pix)
    with vprune.patched(m, vprune.VisualPruning(keep=1.0, warmup=0)):
        assert np.array_equal(_act(m, ids, pix), want)
    with vprune.patched(m, vprune.VisualPruning(keep=0.25, warmup=0)):
        _act(m, ids, pix)
        assert vprune.stats(m)["per_sample"][0]["visual_after"] == 4


def test_bad_channel_count_raises():
    m = T.build(fused=True)
    ids, pix = T.inputs(seed=13)  # 3 channels for a fused (3 + 3) backbone
    vprune.patch(m, keep=0.25)
    with pytest.raises(ValueError, match="multiple of 6"):
        m(input_ids=ids, pixel_values=pix)
    vprune.unpatch(m)


# -------------------------------------------------------------------- the vision tower must run
def test_prefill_without_pixels_raises():
    m = T.build()
    ids, _ = T.inputs(seed=14)
    vprune.patch(m, keep=0.25)
    with pytest.raises(MissingInputsError, match="pixel_values"):
        m(input_ids=ids, use_cache=True)
    vprune.unpatch(m)


class HostSkippingVision(T.OpenVLAForActionPrediction):
    """A broken host: given pixel_values, it still runs the LLM on the text alone."""

    def forward(self, input_ids=None, pixel_values=None, past_key_values=None, use_cache=None, **kwargs):
        return self.language_model(input_ids=input_ids, past_key_values=past_key_values, use_cache=use_cache)


def test_vision_tower_skipped_by_host_raises():
    """The projector never ran in a prefill: caught at the LLM's first layer, before any compute."""
    torch.manual_seed(0)
    m = HostSkippingVision(T.build().config).eval()
    ids, pix = T.inputs(seed=15)
    vprune.patch(m, keep=0.25)
    with pytest.raises(MissingInputsError, match="vision tower"):
        m(input_ids=ids, pixel_values=pix, use_cache=True)
    vprune.unpatch(m)


@pytest.mark.parametrize("kind", ["tiny", "testbed"])
def test_generate_without_kv_cache_raises(kind):
    m = _host(kind)
    ids, pix = T.inputs(seed=19)
    vprune.patch(m, keep=0.25)
    with pytest.raises(vprune.errors.VPruneError, match="use_cache=True"):
        _act(m, ids, pix, use_cache=False)
    assert _runtime(m).generate_prefills is None
    _act(m, ids, pix)  # with the cache it works; the history saw one control step per call
    assert vprune.stats(m)["control_steps"] == 2
    vprune.unpatch(m)


def test_remote_code_generate_on_new_transformers_raises_naming_the_bug():
    """OpenVLA's prepare_inputs_for_generation ('past_key_values is not None') on transformers >= 4.50
    turns the first generate step into a 1-token decode without the image: the patched model says so.
    On transformers 4.40.1 the same host works and prunes."""
    m = T.build(remote_code_prepare=True)
    ids, pix = T.inputs(seed=16)
    vprune.patch(m, keep=0.25, warmup=0)
    if NEW_TRANSFORMERS:
        with pytest.raises(MissingInputsError, match="4.50"):
            _act(m, ids, pix)
    else:
        _act(m, ids, pix)
        assert vprune.stats(m)["per_sample"][0]["visual_after"] == 4
    vprune.unpatch(m)



def test_action_layer_below_k_records_zero_for_pruned_tokens():
    """ALGORITHMS.md section 1: tokens pruned at a step contribute 0 to its action score. With the action
    layer below K (the 4-layer testbed: K=2, action layer 1) the pruned tokens are still keys there and
    get attention; the recorded row must still be 0 for them, and the eager attention for the kept ones."""
    m = T.build(attn="eager", n_layers=4)
    ids, pix = T.inputs(seed=5)
    vprune.patch(m, vprune.VisualPruning(keep=0.5, layer=2, action_layer=1, warmup=0))
    _, toks = _greedy(m, ids, pix, 2)
    rt = _runtime(m)
    act = (rt.action_sum / rt.action_rows).clone()
    kept = rt.kept_visual[0].tolist()
    assert rt.action_rows == 3
    vprune.unpatch(m)
    n = act.shape[1]
    pruned = [j for j in range(n) if j not in kept]
    assert pruned and torch.all(act[0, pruned] == 0)
    patches = m.projector(m.vision_backbone(pix))
    emb = m.get_input_embeddings()(torch.cat([ids] + toks, dim=1))
    mm = torch.cat([emb[:, :1], patches, emb[:, 1:]], dim=1)
    length = ids.shape[1] + n
    att = m.language_model(inputs_embeds=mm, output_attentions=True).attentions[1]  # layer 1 < K: unpruned
    want = att[0, :, length - 1:length + 2, 1:1 + n].mean(0).mean(0)
    torch.testing.assert_close(act[0, kept], want[kept], atol=1e-6, rtol=1e-5)
    assert want[pruned].sum() > 0  # the pruned tokens did get attention there

# ------------------------------------------------------------------------ the trained testbed
def test_trained_testbed_policy_if_shipped():
    testbed = pytest.importorskip("vprune.testbed")
    try:
        policy = testbed.load_policy()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    proc = testbed.load_processor()
    env = testbed.PickEnv()
    obs = env.reset(seed=0)
    inputs = proc(testbed.prompt_for(obs["instruction"]), obs["image"])
    want = policy.predict_action(**inputs)
    with vprune.patched(policy, vprune.VisualPruning(keep=1.0, warmup=0)):
        assert np.array_equal(policy.predict_action(**inputs), want)
    with vprune.patched(policy, keep=0.25):
        for _ in range(4):
            policy.predict_action(**inputs)
        s = vprune.stats(policy)["per_sample"][0]
        assert s["visual_after"] == policy.config.num_patches // 4 and not s["warmup"]
    assert np.array_equal(policy.predict_action(**inputs), want)


# --------------------------------------------------------------------- chunked heads / padding
def test_chunked_action_head_uses_the_action_query_rows():
    m = T.build(attn="eager", n_layers=4)
    m.config.action_query_rows = 3
    ids, pix = T.inputs(seed=17, prompt_len=8)
    # layers 0-1 see every token (K=2): the scores at layer 1 are the unpatched model's
    vprune.patch(m, vprune.VisualPruning(keep=0.5, layer=2, action_layer=1, warmup=0))
    m(input_ids=ids, pixel_values=pix, use_cache=True)
    rt = _runtime(m)
    assert rt.action_rows == 3 and vprune.stats(m)["action_query_rows"] == 3 and rt.kept_visual is not None
    sem, act = rt.semantic.clone(), (rt.action_sum / rt.action_rows).clone()
    kept = torch.zeros_like(act, dtype=torch.bool).scatter_(1, rt.kept_visual, True)
    vprune.unpatch(m)
    patches = m.projector(m.vision_backbone(pix))
    emb = m.get_input_embeddings()(ids)
    mm = torch.cat([emb[:, :1], patches, emb[:, 1:]], dim=1)
    att = m.language_model(inputs_embeds=mm, output_attentions=True).attentions
    length, n = mm.shape[1], patches.shape[1]
    want = att[1][:, :, length - 3:, 1:1 + n].mean(1).mean(1)  # the tokens pruned at the step count 0
    torch.testing.assert_close(act, torch.where(kept, want, torch.zeros_like(want)), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sem, att[1][:, :, length - 4, 1:1 + n].mean(1), atol=1e-6, rtol=1e-5)
    m.config.action_query_rows = 0
    vprune.patch(m, keep=0.5)
    with pytest.raises(ValueError, match="action_query_rows"):
        m(input_ids=ids, pixel_values=pix)
    vprune.unpatch(m)


def test_left_padded_batch_matches_masked_reference():
    """The testbed policy with a left-padded row: pruned logits of every real row equal the unpatched
    model with the pruned visual columns (and the padding) hidden as keys from layer K on."""
    m = _testbed(seed=1)
    ids, pix = T.inputs(seed=18, batch=2, prompt_len=7)
    ids[0, :2] = 0  # row 0: two pad tokens on the left, BOS after them
    ids[0, 2] = 1
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    want_all, want_toks = _greedy(m, ids, pix, 2, mask=mask)
    vprune.patch(m, vprune.VisualPruning(keep=1.0, warmup=0))
    got_all, _ = _greedy(m, ids, pix, 2, mask=mask)
    assert all(torch.equal(a, b) for a, b in zip(got_all, want_all))
    vprune.unpatch(m)
    vprune.patch(m, vprune.VisualPruning(keep=0.25, warmup=0))
    got, toks = _greedy(m, ids, pix, 2, mask=mask)
    st = vprune.stats(m)
    k = st["layer"]
    vprune.unpatch(m)
    n = st["per_sample"][0]["visual_before"]
    length = ids.shape[1] + n
    pad = torch.zeros(2, length, dtype=torch.bool)
    pad[0, 0] = True  # the first pad stays in front of the patches, the second follows them
    pad[0, 1 + n] = True
    blocked_pruned = pad.clone()
    for b in range(2):
        kept = st["per_sample"][b]["kept_indices"]
        blocked_pruned[b, [1 + j for j in range(n) if j not in kept]] = True

    def run(blocked_late, toks):
        state = {"t": 0}

        def hook_for(blocked):
            def hook(mod, args, kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                q_len = h.shape[1]
                cols = length + (0 if q_len > 1 else state["t"])
                keys = torch.zeros(2, cols, dtype=torch.bool)
                keys[:, :length] = blocked
                if q_len > 1:
                    bad = torch.ones(q_len, cols, dtype=torch.bool).triu(1).unsqueeze(0) | keys.unsqueeze(1)
                    bad = bad & ~torch.eye(q_len, cols, dtype=torch.bool).unsqueeze(0)  # pad rows: no NaN
                else:
                    bad = keys.unsqueeze(1)
                kw = dict(kwargs)
                kw["attention_mask"] = torch.zeros(bad.shape).masked_fill(bad, torch.finfo(torch.float32).min)[:, None]
                return args, kw
            return hook

        handles = [layer.register_forward_pre_hook(hook_for(pad if i < k else blocked_late), with_kwargs=True)
                   for i, layer in enumerate(_layers(m))]
        try:
            out = m(input_ids=ids, pixel_values=pix, attention_mask=mask, use_cache=True)
            logits, cache, am = [out.logits[:, -1]], _cache_of(out), mask
            for tok in toks:
                state["t"] += 1
                am = torch.cat([am, am.new_ones(2, 1)], dim=1)
                out = m(input_ids=tok, past_key_values=cache, attention_mask=am, use_cache=True)
                logits.append(out.logits[:, -1])
                cache = _cache_of(out)
        finally:
            for h in handles:
                h.remove()
        return logits

    for a, b in zip(run(pad, want_toks), want_all):  # the reference machinery reproduces the host itself
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    for a, b in zip(got, run(blocked_pruned, toks)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------ CPU fast paths (overhead)
def _rollout_record(policy, proc, seeds, keep=0.25, strategy="dual", semantic="last"):
    """Closed-loop episodes of the testbed policy: per step, kept indices, the action taken and the
    history's bytes (the smoothed action scores the next selection reads)."""
    from vprune.testbed.sim import PickEnv
    from vprune.testbed.tokenizer import prompt_for

    rec = []
    vprune.patch(policy, keep=keep, strategy=strategy, semantic=semantic)
    try:
        rt = _runtime(policy)
        for seed in seeds:
            vprune.reset(policy)
            env = PickEnv()
            obs = env.reset(seed)
            while not env.done:
                inputs = proc(prompt_for(obs["instruction"]), obs["image"])
                with torch.inference_mode():
                    action = policy.predict_action(**inputs, do_sample=False)
                kept = vprune.stats(policy)["per_sample"][0]
                hist = rt.history.scores
                rec.append((kept["kept_indices"] if kept["pruned"] else None, np.asarray(action).tolist(),
                            None if hist is None else hist.numpy().tobytes()))
                obs, _, _, _ = env.step(action)
    finally:
        vprune.unpatch(policy)
    return rec


def _count_calls(monkeypatch, name):
    """A dict whose "calls" counts, from now on, the calls of ``vprune.integrations.openvla.<name>``."""
    from vprune.integrations import openvla

    seen = {"calls": 0}
    original = getattr(openvla, name)

    def counted(*args, **kwargs):
        seen["calls"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(openvla, name, counted)
    return seen


def _count_handed_queries(monkeypatch):
    """A dict whose "queries" counts, from now on, the rows that took their layer's handed-over query
    (``_captured_queries`` returned one)."""
    from vprune.integrations import openvla

    used = {"queries": 0}
    original = openvla._captured_queries

    def counted(*args):
        q = original(*args)
        used["queries"] += q is not None
        return q

    monkeypatch.setattr(openvla, "_captured_queries", counted)
    return used


def _count_prefill_mean_fast(monkeypatch):
    """A dict whose "calls" counts the runs of prefill_mean's CPU fast path from now on."""
    return _count_calls(monkeypatch, "_plan_mean_scores")


@pytest.mark.parametrize("keep,semantic", [(0.25, "last"), (0.125, "last"), (0.25, "prefill_mean")])
def test_fast_paths_keep_the_same_tokens_as_the_general_paths(monkeypatch, keep, semantic):
    """The CPU fast paths (slice rows, reused semantic row, deferred decode rows, prefill_mean's rows
    through the plan, NumPy selection) change no number: over seeded closed-loop episodes of the
    trained testbed policy the kept tokens, the actions and the action history are bit-identical to
    the general code paths."""
    testbed = pytest.importorskip("vprune.testbed")
    from vprune.integrations import openvla

    policy, proc = testbed.load_policy(), testbed.load_processor()
    seen = _count_prefill_mean_fast(monkeypatch)
    batched = _rollout_record(policy, proc, [1, 2], keep=keep, semantic=semantic)
    monkeypatch.setattr(openvla, "_BATCHED_DECODE", False)  # each action row scored alone
    fast = _rollout_record(policy, proc, [1, 2], keep=keep, semantic=semantic)
    assert (seen["calls"] > 0) == (semantic == "prefill_mean")  # the fast path ran
    monkeypatch.setattr(openvla, "_FAST_PATHS", False)  # the reference
    general = _rollout_record(policy, proc, [1, 2], keep=keep, semantic=semantic)
    assert len(fast) == len(general) > 10
    assert sum(r[0] is not None for r in fast) > 5
    for step, (a, b) in enumerate(zip(fast, general)):
        assert a == b, f"step {step} differs"
    # rows scored together (decode rows over the last row's keys, prefill_mean's last row from its
    # all-rows attention): the same tokens and actions, the history within fp32 rounding
    _assert_close_episodes(batched, general)


def test_row_scores_equal_the_query_keys_path():
    """The lean one-row scorers (``_row_scores``, the cached-plan ``_plan_row_scores`` and several rows
    at once through ``_plan_rows_scores``) equal _query_keys + attention_row_scores bit for bit (GQA
    testbed LM)."""
    from vprune.integrations import openvla
    from vprune.scoring import attention_row_scores

    m = _testbed(seed=3)
    ids, pix = T.inputs(seed=21, prompt_len=6)
    vprune.patch(m, vprune.VisualPruning(keep=0.5, warmup=0))
    integ = OpenVLAIntegration()
    got = []

    def hook(mod, args, kwargs, out):
        q, k, scale = integ._query_keys(mod, 1, args, kwargs, None)
        want = attention_row_scores(q, k, None, scale)
        hidden = kwargs["hidden_states"] if not args else args[0]
        cos, sin = _compat.rope_cos_sin(mod, hidden, kwargs)
        geometry = _compat.attention_geometry(mod)
        assert geometry[0] != geometry[1]  # grouped-query attention
        row = openvla._row_scores(mod, geometry, hidden[:, -1:], cos[:, -1:], sin[:, -1:], k, None)
        got.append(torch.equal(row, want))
        plan = openvla._row_plan(mod, geometry)  # the CPU fp32 plan: the same numbers
        got.append(plan is not None and torch.equal(openvla._plan_row_scores(
            plan, hidden[:, -1:], cos[:, -1:], sin[:, -1:], k), want))
        jobs.append((plan, (hidden[:, -1], cos[:, -1:], sin[:, -1:], k), want))

    jobs = []
    h = _layers(m)[1].self_attn.register_forward_hook(hook, with_kwargs=True)
    try:
        _greedy(m, ids, pix, 2)
    finally:
        h.remove()
        vprune.unpatch(m)
    assert got and all(got)
    # the rows of a control step (prefill and decode rows: other key counts) scored together, with
    # RoPE once on the stacked queries: each row's numbers unchanged
    assert len(jobs) == 3 and jobs[0][0] is jobs[2][0]
    together = openvla._plan_rows_scores(jobs[0][0], [job for _, job, _ in jobs])
    assert all(torch.equal(a, want) for a, (_, _, want) in zip(together, jobs))


def test_overhead_timers_in_stats_and_no_action_scoring_for_fastv():
    m = _testbed(seed=4)
    ids, pix = T.inputs(seed=22)
    vprune.patch(m, vprune.VisualPruning(keep=0.25, warmup=0))
    _act(m, ids, pix)
    ov = vprune.stats(m)["overhead_ms"]
    assert set(ov) == {"scoring", "selection", "other", "total"}
    assert ov["scoring"] > 0 and ov["selection"] > 0
    assert abs(ov["total"] - ov["scoring"] - ov["selection"] - ov["other"]) < 1e-9
    vprune.unpatch(m)
    vprune.patch(m, keep=0.25, strategy="fastv")  # fastv never reads action scores: none are computed
    for _ in range(5):
        _act(m, ids, pix)
    rt = _runtime(m)
    assert rt.history.scores is None and vprune.stats(m)["per_sample"][0]["pruned"]
    vprune.unpatch(m)
    vprune.patch(m, keep=1.0)  # every token kept: nothing scored, nothing recorded
    for _ in range(5):
        _act(m, ids, pix)
    rt = _runtime(m)
    assert rt.history.scores is None and rt.semantic is None and not vprune.stats(m)["per_sample"][0]["pruned"]
    vprune.unpatch(m)


def _record_steps(model, config, batch, steps=4):
    """Control steps of a patched host: per step the keep sets, actions, history bytes and semantic
    score bytes."""
    vprune.patch(model, config)
    rec = []
    try:
        for step in range(steps):
            ids, pix = T.inputs(seed=30 + step, batch=batch)
            act = _act(model, ids, pix)
            st = vprune.stats(model)
            rt = _runtime(model)
            hist = rt.history.scores
            rec.append(([s["kept_indices"] for s in st["per_sample"]], act.tolist(),
                        None if hist is None else hist.numpy().tobytes(), rt.semantic.numpy().tobytes()))
    finally:
        vprune.unpatch(model)
    return rec


@pytest.mark.parametrize("semantic", ["last", "prefill_mean"])
@pytest.mark.parametrize("layer,action_layer", [(1, 2), (2, 1), (2, 3)])
@pytest.mark.parametrize("batch", [1, 2])
def test_fast_paths_match_the_general_paths_for_any_action_layer(monkeypatch, layer, action_layer, batch,
                                                                 semantic):
    """The CPU fast paths (plan-batched rows, NumPy sums of the deferred decode rows, prefill_mean's
    rows through the plan, NumPy selection) against the general code on the testbed LM for action
    layers below, at and above K (pruned tokens' columns scattered back, or zeroed) and batch 1 / 2:
    the same keep sets, tokens, semantic scores and history bits over several control steps."""
    from vprune.integrations import openvla

    def run(fast, batched=False):
        monkeypatch.setattr(openvla, "_FAST_PATHS", fast)
        monkeypatch.setattr(openvla, "_BATCHED_DECODE", batched)  # off: each action row scored alone
        config = vprune.VisualPruning(keep=0.25, layer=layer, action_layer=action_layer, warmup=1,
                                      semantic=semantic)
        return _record_steps(_testbed(seed=5), config, batch)

    seen = _count_prefill_mean_fast(monkeypatch)
    fast = run(True)
    assert (seen["calls"] == 4) == (semantic == "prefill_mean")  # the fast path ran at every step
    general = run(False)
    assert seen["calls"] in (0, 4)  # and only there
    assert fast == general
    assert fast[-1][2] is not None
    together = _count_calls(monkeypatch, "_plan_batched_rows")
    _assert_close_records(run(True, batched=True), general)  # rows scored together: fp32 rounding
    assert together["calls"] >= 3  # every step after the first scored its predecessor's decode rows so


@pytest.mark.parametrize("kind,attn", [("tiny", "sdpa"), ("tiny", "eager"), ("testbed", "sdpa")])
@pytest.mark.parametrize("batch", [1, 2])
def test_prefill_mean_fast_path_scores_equal_the_general_path(monkeypatch, kind, attn, batch):
    """prefill_mean's CPU fast path gives semantic scores equal (torch.equal) to the general path's
    on both hosts (the cached causal bias, or the host's 4-D mask under eager attention; MHA and GQA),
    and the same keep sets, actions and history."""
    from vprune.integrations import openvla

    def run(fast, batched=False):
        monkeypatch.setattr(openvla, "_FAST_PATHS", fast)
        monkeypatch.setattr(openvla, "_BATCHED_DECODE", batched)  # off: each action row scored alone
        config = vprune.VisualPruning(keep=0.25, semantic="prefill_mean", warmup=1)
        return _record_steps(_host(kind, seed=6, attn=attn), config, batch, steps=3)

    seen = _count_prefill_mean_fast(monkeypatch)
    fast = run(True)
    assert seen["calls"] == 3
    general = run(False)
    for a, b in zip(fast, general):
        assert torch.equal(torch.frombuffer(bytearray(a[3]), dtype=torch.float32),
                           torch.frombuffer(bytearray(b[3]), dtype=torch.float32))
    assert fast == general
    batched = run(True, batched=True)  # the last row from the all-rows attention: the same semantic
    assert [r[3] for r in batched] == [r[3] for r in general]  # scores, the history within rounding
    _assert_close_records(batched, general)


# ------------------------------------------------------- batched decode rows (general path, any device)
def _assert_close_episodes(batched, general):
    """Records of ``_rollout_record``: the same keep sets and actions, history within fp32 rounding."""
    assert len(batched) == len(general)
    for step, (a, b) in enumerate(zip(batched, general)):
        assert a[:2] == b[:2], f"step {step} differs"
        assert (a[2] is None) == (b[2] is None)
        if a[2] is not None:
            torch.testing.assert_close(torch.frombuffer(bytearray(a[2]), dtype=torch.float32),
                                       torch.frombuffer(bytearray(b[2]), dtype=torch.float32),
                                       atol=1e-6, rtol=1e-5)


def _assert_close_records(batched, general, atol=1e-6):
    """Records of ``_record_steps``: the same keep sets and actions; history and semantic bytes equal
    within fp32 rounding."""
    assert len(batched) == len(general)
    for a, b in zip(batched, general):
        assert a[0] == b[0] and a[1] == b[1]
        for x, y in ((a[2], b[2]), (a[3], b[3])):
            assert (x is None) == (y is None)
            if x is not None:
                torch.testing.assert_close(torch.frombuffer(bytearray(x), dtype=torch.float32),
                                           torch.frombuffer(bytearray(y), dtype=torch.float32), atol=atol, rtol=1e-5)


@pytest.mark.parametrize("kind,attn", [("tiny", "sdpa"), ("tiny", "eager"), ("testbed", "sdpa")])
@pytest.mark.parametrize("layer,action_layer", [(1, 2), (2, 1), (2, 3)])
@pytest.mark.parametrize("batch", [1, 2])
def test_batched_decode_rows_match_the_per_row_general_path(monkeypatch, kind, attn, layer, action_layer, batch):
    """The general path's decode rows kept and scored together (``_batched_rows_total``: one q_proj,
    RoPE with each row's cos/sin, the last row's keys with a per-row length mask, or the host's mask
    rows under eager attention) against each row scored inside its decode forward: the same keep sets
    and actions, history and semantic scores equal within fp32 rounding, for action layers below, at
    and above K."""
    from vprune.integrations import openvla

    seen = _count_calls(monkeypatch, "_batched_rows_total")
    monkeypatch.setattr(openvla, "_FAST_PATHS", False)

    def run(batched):
        monkeypatch.setattr(openvla, "_BATCHED_DECODE", batched)
        config = vprune.VisualPruning(keep=0.25, layer=layer, action_layer=action_layer, warmup=1)
        return _record_steps(_host(kind, seed=7, attn=attn), config, batch)

    batched = run(True)
    assert seen["calls"] >= 3  # every step after the first scored its predecessor's rows batched
    general = run(False)
    assert seen["calls"] in (3, 4)
    _assert_close_records(batched, general)
    assert batched[-1][2] is not None


def test_batched_decode_rows_over_testbed_episodes(monkeypatch):
    """Closed-loop episodes of the trained testbed policy on the general path: decode rows scored
    batched keep the same tokens and take the same actions as rows scored one by one; the history
    differs by fp32 rounding only."""
    testbed = pytest.importorskip("vprune.testbed")
    from vprune.integrations import openvla

    policy, proc = testbed.load_policy(), testbed.load_processor()
    monkeypatch.setattr(openvla, "_FAST_PATHS", False)
    batched = _rollout_record(policy, proc, [1, 2, 3])
    monkeypatch.setattr(openvla, "_BATCHED_DECODE", False)
    general = _rollout_record(policy, proc, [1, 2, 3])
    assert len(batched) == len(general) > 10 and sum(r[0] is not None for r in batched) > 5
    _assert_close_episodes(batched, general)


@pytest.mark.parametrize("action_layer", [1, 3])
def test_batched_decode_rows_with_padding_mask_and_prefix_keys(monkeypatch, action_layer):
    """A left-padded batch (the host's mask rows): every kept row's keys are a prefix of the last
    row's (the cache replaces its keys at each update), and the batched scores equal the per-row
    scores within fp32 rounding."""
    from vprune.integrations import openvla

    monkeypatch.setattr(openvla, "_FAST_PATHS", False)
    m = _testbed(seed=1)
    ids, pix = T.inputs(seed=18, batch=2, prompt_len=7)
    ids[0, :2] = 0
    ids[0, 2] = 1
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    vprune.patch(m, vprune.VisualPruning(keep=0.25, warmup=0, action_layer=action_layer))
    try:
        _greedy(m, ids, pix, 4, mask=mask)
        rows = list(_runtime(m).pending)
    finally:
        vprune.unpatch(m)
    assert len(rows) == 4 and all(rec[6] is not None for rec in rows) and openvla._batchable(rows)
    last = rows[-1][5]
    for rec in rows:
        assert torch.equal(rec[5], last[..., :rec[5].shape[-2], :])
    want = None
    for rec in rows:
        vis = openvla._score_decode_row(rec)
        want = vis if want is None else want + vis
    got = openvla._batched_rows_total(None, rows)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert float((got - want).abs().max()) < 1e-6


@pytest.mark.skipif(not NEW_TRANSFORMERS, reason="queries are handed over on transformers >= 4.48 only")
@pytest.mark.parametrize("semantic", ["last", "prefill_mean"])
@pytest.mark.parametrize("layer,action_layer", [(2, 3), (2, 1)])
@pytest.mark.parametrize("batch", [1, 2])
def test_rows_off_the_plan_use_the_layers_own_queries(monkeypatch, layer, action_layer, batch, semantic):
    """Where no ``_RowPlan`` scores the rows (a GPU, another dtype; forced here on the CPU), the
    semantic row (prefill_mean: every prefill row, through a ``_QueryPlan``), the prefill action row and
    the deferred decode rows take the scoring layers' own post-RoPE queries (no q_proj, no RoPE) and
    the decode rows are scored in one batched computation with the additive causal bias: the same
    keep sets and actions as the reference path (each row recomputed and scored alone), action
    history and semantic scores within fp32 rounding."""
    from vprune.integrations import openvla

    config = vprune.VisualPruning(keep=0.25, layer=layer, action_layer=action_layer, warmup=1, semantic=semantic)
    reference = {}
    with monkeypatch.context() as ref:
        ref.setattr(openvla, "_FAST_PATHS", False)
        ref.setattr(openvla, "_BATCHED_DECODE", False)
        reference = _record_steps(_host("testbed", seed=7), config, batch)
    handed = _count_handed_queries(monkeypatch)
    handed["batched_with_queries"] = 0
    original_batched = openvla._batched_rows_total

    def batched(total, rows):
        handed["batched_with_queries"] += all(rec[9] is not None for rec in rows)
        return original_batched(total, rows)

    monkeypatch.setattr(openvla, "_row_plan", lambda *args: None)  # the accelerator's route on the CPU
    monkeypatch.setattr(openvla, "_batched_rows_total", batched)
    means = _count_prefill_mean_fast(monkeypatch)
    got = _record_steps(_host("testbed", seed=7), config, batch)
    _assert_close_records(got, reference)
    assert means["calls"] == (len(got) if semantic == "prefill_mean" else 0)  # every prefill's rows
    decode_rows = np.asarray(got[0][1]).shape[-1] - 1  # action tokens after the prefill's
    # the semantic row (or rows) seeds the first action row at K-1
    rows_per_step = (1 if action_layer == layer - 1 else 2) + decode_rows
    assert decode_rows >= 1 and handed["queries"] == len(got) * rows_per_step
    assert handed["batched_with_queries"] == len(got) - 1  # each step's rows, at the next step's scoring
    monkeypatch.setattr(openvla, "_HANDED_QUERIES", False)  # the diagnostic switch: every query recomputed
    handed.update(queries=0, batched_with_queries=0)
    _assert_close_records(_record_steps(_host("testbed", seed=7), config, batch), reference)
    assert handed == {"queries": 0, "batched_with_queries": 0}


def test_padding_free_is_known_without_reading_an_accelerators_mask():
    """No padding is known from the host's layer-0 mask alone (None: transformers dropped it after
    finding no padding) without reading the 2-D mask, which on an accelerator would sync; a CPU mask is
    read; an accelerator's mask the host kept means padding may be there."""
    from vprune.integrations import openvla

    on_device = torch.ones(2, 9, device="meta")  # any read of it would fail
    assert openvla._padding_free(on_device, {"attention_mask": None})
    assert not openvla._padding_free(on_device, {"attention_mask": torch.zeros(2, 1, 9, 9, device="meta")})
    assert not openvla._padding_free(on_device, {})  # the host passed no mask keyword: unknown
    cpu = torch.ones(2, 9, dtype=torch.long)
    assert openvla._padding_free(cpu, {"attention_mask": torch.zeros(2, 1, 9, 9)})
    cpu[0, 0] = 0
    assert not openvla._padding_free(cpu, {"attention_mask": torch.zeros(2, 1, 9, 9)})


@pytest.mark.parametrize("kind", ["tiny", "testbed"])
def test_the_hosts_layer_mask_is_none_exactly_without_padding(kind):
    """``_padding_free``'s premise, on the installed transformers (4.40.1 in the compat venv, 5.x):
    under SDPA the host hands decoder layer 0 no mask for an all-ones 2-D mask, and a mask tensor
    for a left-padded batch."""
    m = _host(kind, seed=13)
    seen = []
    hook = _layers(m)[0].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs.get("attention_mask", "absent")), with_kwargs=True)
    ids, pix = T.inputs(seed=23, batch=2)
    mask = torch.ones_like(ids)
    try:
        with torch.no_grad():
            m(input_ids=ids, pixel_values=pix, attention_mask=mask)
            ids[0, :2], mask[0, :2] = 0, 0
            m(input_ids=ids, pixel_values=pix, attention_mask=mask)
    finally:
        hook.remove()
    assert seen[0] is None
    assert isinstance(seen[1], torch.Tensor)


@pytest.mark.skipif(not NEW_TRANSFORMERS, reason="queries are handed over on transformers >= 4.48 only")
def test_bf16_prefill_mean_scores_the_handed_over_queries_in_fp32(monkeypatch):
    """A bf16 policy (no ``_RowPlan``: the dtype of a GPU deployment) with ``semantic="prefill_mean"``:
    every prefill's rows are scored from the layer's own bf16 queries in fp32 (``_QueryPlan``), and
    keep the tokens and take the actions of the reference path."""
    from vprune.integrations import openvla

    config = vprune.VisualPruning(keep=0.25, layer=2, action_layer=3, warmup=1, semantic="prefill_mean")

    def run():
        with torch.no_grad():
            model = _testbed(seed=7).to(torch.bfloat16)
        vprune.patch(model, config)
        rec = []
        try:
            for step in range(4):
                ids, pix = T.inputs(seed=30 + step)
                act = _act(model, ids, pix.to(torch.bfloat16))
                rt = _runtime(model)
                rec.append(([s["kept_indices"] for s in vprune.stats(model)["per_sample"]], act.tolist(),
                            rt.semantic.dtype, rt.semantic.clone()))
        finally:
            vprune.unpatch(model)
        return rec

    means = _count_prefill_mean_fast(monkeypatch)
    got = run()
    assert means["calls"] == 4
    with monkeypatch.context() as ref:
        for flag in ("_FAST_PATHS", "_BATCHED_DECODE", "_HANDED_QUERIES"):
            ref.setattr(openvla, flag, False)
        want = run()
    for a, b in zip(got, want):
        assert a[:2] == b[:2] and a[2] == b[2] == torch.float32
        torch.testing.assert_close(a[3], b[3], atol=1e-6, rtol=1e-5)


def test_batched_rows_with_handed_over_queries_equal_recomputed_ones(monkeypatch):
    """Decode rows that carry their layer's query: each query has the bits of one row's q_proj + RoPE,
    and ``_batched_rows_total`` on them equals, within fp32 rounding, the same rows with the queries
    recomputed and each row scored alone."""
    from vprune.integrations import openvla

    monkeypatch.setattr(openvla, "_row_plan", lambda *args: None)  # keep the rows for the general scorer
    m = _testbed(seed=12)
    ids, pix = T.inputs(seed=19, batch=2)
    vprune.patch(m, vprune.VisualPruning(keep=0.25, warmup=0, action_layer=3))
    try:
        _greedy(m, ids, pix, 4)
        rows = list(_runtime(m).pending)
    finally:
        vprune.unpatch(m)
    assert len(rows) == 4 and openvla._batchable(rows)
    if NEW_TRANSFORMERS:
        assert all(rec[9] is not None and rec[9].shape == (2, 4, 1, rec[5].shape[-1]) for rec in rows)
        for attn, geometry, h_row, cos_r, sin_r, *_, q in rows:  # the bits one row's q_proj + RoPE give
            assert torch.equal(q.select(2, 0), openvla._row_query(attn, geometry, h_row, cos_r, sin_r))
    recomputed = [rec[:9] + (None,) for rec in rows]
    got = openvla._batched_rows_total(None, rows)
    # the recomputing path projects the R rows in one matmul, which rounds in another order
    torch.testing.assert_close(got, openvla._batched_rows_total(None, recomputed), atol=1e-6, rtol=1e-5)
    want = None
    for rec in recomputed:
        vis = openvla._score_decode_row(rec)
        want = vis if want is None else want + vis
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 2])
def test_host_selection_on_cuda_keeps_the_torch_paths_tokens(monkeypatch, batch):
    """On CUDA, dual's loop on the host (one copy of scores + similarities, one pinned upload of the
    keep indices) keeps the same tokens as the torch path: the same keep sets, actions and history
    bits over several control steps."""
    from vprune.integrations import openvla

    def run(host):
        monkeypatch.setattr(openvla, "_HOST_SELECT", host)
        model = _testbed(seed=8).cuda()
        vprune.patch(model, vprune.VisualPruning(keep=0.25, warmup=1))
        rec = []
        try:
            for step in range(4):
                ids, pix = T.inputs(seed=40 + step, batch=batch)
                act = _act(model, ids.cuda(), pix.cuda())
                st = vprune.stats(model)
                hist = _runtime(model).history.scores
                rec.append(([s["kept_indices"] for s in st["per_sample"]], act.tolist(),
                            None if hist is None else hist.cpu().numpy().tobytes()))
        finally:
            vprune.unpatch(model)
        return rec

    seen = _count_calls(monkeypatch, "dual_select_packed")
    host = run(True)
    assert seen["calls"] == 3  # every pruned step (the first is warm-up)
    assert host == run(False)
    assert seen["calls"] == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("padding_known", [True, False])
@pytest.mark.parametrize("batch", [1, 2])
def test_cuda_steps_keep_the_reference_paths_tokens(monkeypatch, batch, padding_known):
    """On CUDA the default route (slice rows, handed-over queries, decode rows batched with the causal
    bias, host selection) keeps the same tokens and takes the same actions as the reference path
    (every query recomputed, each row scored alone, the torch selection); the action history within
    fp32 rounding. Also with padding taken as unknown (the gathered-row route of padded batches)."""
    from vprune.integrations import openvla

    if not padding_known:
        monkeypatch.setattr(openvla, "_padding_free", lambda *args: False)

    def run():
        model = _testbed(seed=8).cuda()
        vprune.patch(model, vprune.VisualPruning(keep=0.25, warmup=1, action_layer=3))
        rec = []
        try:
            for step in range(4):
                ids, pix = T.inputs(seed=40 + step, batch=batch)
                act = _act(model, ids.cuda(), pix.cuda(), attention_mask=torch.ones_like(ids).cuda())
                rt = _runtime(model)
                hist = rt.history.scores
                rec.append(([s["kept_indices"] for s in vprune.stats(model)["per_sample"]], act.tolist(),
                            None if hist is None else hist.cpu(), rt.dense))
        finally:
            vprune.unpatch(model)
        return rec

    used = _count_handed_queries(monkeypatch)
    got = run()
    assert all(r[3] for r in got) or not padding_known  # the slice-row route under test
    # every step's decode rows; on the slice-row route also its semantic row and prefill action row
    # (the gathered-row route recomputes those two; a transformers that drops an all-ones mask before
    # the model sees it leaves no mask to doubt, so that step takes the slice-row route anyway)
    decode_rows = np.asarray(got[0][1]).shape[-1] - 1
    want_handed = sum(decode_rows + (2 if r[3] else 0) for r in got)
    assert used["queries"] == (want_handed if NEW_TRANSFORMERS else 0)
    for flag in ("_FAST_PATHS", "_BATCHED_DECODE", "_HOST_SELECT", "_HANDED_QUERIES"):
        monkeypatch.setattr(openvla, flag, False)
    want = run()
    for step, (a, b) in enumerate(zip(got, want)):
        assert a[0] == b[0], f"step {step}: kept {a[0]} vs the reference's {b[0]}"
        assert a[1] == b[1], f"step {step}: action {a[1]} vs the reference's {b[1]}"
        assert (a[2] is None) == (b[2] is None)
        if a[2] is not None:
            torch.testing.assert_close(a[2], b[2], atol=1e-5, rtol=1e-4, msg=lambda m: f"step {step}: {m}")


def test_scoring_layers_hand_over_their_queries_and_compute_the_same(monkeypatch):
    """On transformers >= 4.48 the scoring layers' attention hands its post-RoPE queries to the
    CPU fast path (a per-module config copy naming a registered attention function that calls the
    stock one): prefill_mean's rows and the deferred decode rows use them; the model's outputs are
    unchanged (keep=1.0 gives the unpatched logits) and unpatch restores each module's config."""
    from vprune.integrations import openvla

    m = _testbed(seed=9)
    layers = _layers(m)
    configs = [layer.self_attn.config for layer in layers]
    ids, pix = T.inputs(seed=50)
    want, _ = _greedy(m, ids, pix, 3)
    vprune.patch(m, vprune.VisualPruning(keep=1.0, warmup=0))
    got, _ = _greedy(m, ids, pix, 3)
    captures = dict(_runtime(m).captures)
    vprune.unpatch(m)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(layer.self_attn.config is cfg for layer, cfg in zip(layers, configs)) and _no_hooks(m)
    if not NEW_TRANSFORMERS:  # no AttentionInterface: nothing handed over, the rows are recomputed
        assert captures == {}
        return
    assert sorted(captures) == [1]  # K-1 = the action layer = 1 on a 4-layer testbed
    from transformers.modeling_utils import AttentionInterface
    assert _compat.CAPTURE_NAME not in AttentionInterface._global_mapping  # removed with the last user
    used = _count_handed_queries(monkeypatch)
    rec = _record_steps(m, vprune.VisualPruning(keep=0.25, semantic="prefill_mean", warmup=1), batch=1, steps=3)
    decode_rows = len(rec[0][1]) - 1  # action tokens after the prefill's
    assert decode_rows >= 1 and used["queries"] == 3 * (1 + decode_rows)  # every prefill, every decode row


def test_failed_patch_after_the_layer_changes_leaves_the_model_as_it_was(monkeypatch):
    """A patch that fails after the layer overrides and the first query capture were installed undoes
    them all: classes, configs, hooks, attributes and the registered attention name."""
    from vprune.integrations import openvla

    m = _testbed(seed=10)
    ids, pix = T.inputs(seed=51)
    want = _act(m, ids, pix)
    cls, layer_classes = type(m), [type(layer) for layer in _layers(m)]
    configs = [layer.self_attn.config for layer in _layers(m)]
    original = _compat.capture_queries
    calls = {"n": 0}

    def capture_then_fail(attn, undo):
        calls["n"] += 1
        original(attn, undo)
        raise RuntimeError("forced failure after the first capture")

    monkeypatch.setattr(openvla._compat, "capture_queries", capture_then_fail)
    with pytest.raises(RuntimeError, match="forced failure"):
        vprune.patch(m, keep=0.25, action_layer=1)
    assert calls["n"] == 1 and not vprune.is_patched(m) and _no_hooks(m)
    assert type(m) is cls and [type(layer) for layer in _layers(m)] == layer_classes
    assert all(layer.self_attn.config is cfg for layer, cfg in zip(_layers(m), configs))
    if NEW_TRANSFORMERS:
        from transformers.modeling_utils import AttentionInterface
        assert _compat.CAPTURE_NAME not in AttentionInterface._global_mapping
    assert np.array_equal(_act(m, ids, pix), want)


@pytest.mark.skipif(not NEW_TRANSFORMERS, reason="transformers >= 4.50 routes SDPA through sdpa_attention_forward")
def test_every_layer_keeps_sdpa_and_no_attention_weights_are_requested(monkeypatch):
    """DESIGN.md invariant 4 on the patched policy (the query-capturing layers included): each LLM
    layer makes exactly one SDPA call per forward and none asks for attention weights."""
    import transformers.integrations.sdpa_attention as sdpa_mod

    calls = []
    real = sdpa_mod.sdpa_attention_forward

    def counting(module, *a, **k):
        calls.append(module.layer_idx)
        assert not k.get("output_attentions")
        return real(module, *a, **k)

    from transformers.modeling_utils import AttentionInterface

    # the registry entry the layers look up, and the module attribute the capture's stock call reads
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", counting)
    monkeypatch.setattr(sdpa_mod, "sdpa_attention_forward", counting)
    m = _testbed(seed=11)
    ids, pix = T.inputs(seed=52)
    vprune.patch(m, vprune.VisualPruning(keep=0.25, warmup=0))
    try:
        _act(m, ids, pix)
        pruned = vprune.stats(m)["per_sample"][0]["pruned"]
    finally:
        vprune.unpatch(m)
    depth = len(_layers(m))
    forwards = calls.count(0)
    assert pruned and forwards >= 2 and all(calls.count(i) == forwards for i in range(depth))
    assert len(calls) == depth * forwards
