"""LLaVA integration: the patch/unpatch invariants and in-LLM pruning on a tiny random LLaVA."""
from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

import vprune
from vprune.errors import AlreadyPatchedError, MissingInputsError, NotPatchedError

from _pruning_refs import kept_columns, masked_reference
from _tiny_models import LLAVA_IMAGE_TOKEN, llava_prompt, tiny_llava

TEXTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]]


@pytest.fixture(scope="module")
def model():
    return tiny_llava(seed=0)


@pytest.fixture(scope="module")
def inputs():
    return llava_prompt(TEXTS, [1, 1], seed=0)


def _snapshot(m):
    """Everything a patch may touch: class, attn implementations, hooks, instance attributes."""
    hooks = []
    attrs = []
    for name, mod in m.named_modules():
        hooks.append((name, len(mod._forward_pre_hooks), len(mod._forward_hooks)))
        attrs.append((name, type(mod), tuple(sorted(k for k in mod.__dict__ if "vprune" in k))))
    return (type(m), m.config.text_config._attn_implementation, m.config.vision_config._attn_implementation,
            m.config._attn_implementation, tuple(hooks), tuple(attrs))


def _greedy(m, inp, n=5, **kw):
    """Greedy decode that never emits the image token (a reference re-run must not see new images)."""
    with torch.no_grad():
        return m.generate(**inp, max_new_tokens=n, do_sample=False, suppress_tokens=[LLAVA_IMAGE_TOKEN], **kw)


def test_keep_all_is_bit_identical_logits_and_generate(model, inputs):
    with torch.no_grad():
        ref = model(**inputs).logits
    ref_gen = _greedy(model, inputs, output_logits=True, return_dict_in_generate=True)
    with vprune.patched(model, keep=1.0):
        with torch.no_grad():
            out = model(**inputs).logits
        gen = _greedy(model, inputs, output_logits=True, return_dict_in_generate=True)
        st = vprune.stats(model)
    assert torch.equal(out, ref)
    assert torch.equal(gen.sequences, ref_gen.sequences)
    for a, b in zip(gen.logits, ref_gen.logits):  # every step, batch 2 with left padding
        assert torch.equal(a, b)
    assert st["pruned"] and st["visual_tokens_before"] == st["visual_tokens_after"] == [16, 16]


def test_unpatch_restores_bit_identical_behaviour(model, inputs):
    with torch.no_grad():  # first: a model's first forward may install transformers' own recording hooks
        ref = model(**inputs).logits
    before = _snapshot(model)
    vprune.patch(model, keep=0.25)
    assert _snapshot(model) != before
    with torch.no_grad():
        assert model(**inputs).logits.shape[1] < ref.shape[1]
    vprune.unpatch(model)
    assert _snapshot(model) == before
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
    from transformers.modeling_utils import AttentionInterface
    assert not any(k.startswith("vprune_") for k in AttentionInterface._global_mapping)


def test_patch_twice_and_unpatch_unpatched(model):
    vprune.patch(model, keep=0.5)
    try:
        assert vprune.patch(model, keep=0.5) is model  # equal config: no-op
        with pytest.raises(AlreadyPatchedError, match="already patched"):
            vprune.patch(model, keep=0.25)
    finally:
        vprune.unpatch(model)
    with pytest.raises(NotPatchedError, match="not patched"):
        vprune.unpatch(model)


def test_failed_patch_leaves_model_as_it_was(model, inputs, monkeypatch):
    from vprune.integrations.llava import LlavaIntegration

    with torch.no_grad():  # first: a model's first forward may install transformers' own recording hooks
        ref = model(**inputs).logits
    before = _snapshot(model)

    def boom(self, *a, **k):
        raise RuntimeError("forced failure after the layer hooks were installed")

    monkeypatch.setattr(LlavaIntegration, "_install_call_hooks", boom)
    with pytest.raises(RuntimeError, match="forced failure"):
        vprune.patch(model, keep=0.25)
    assert not vprune.api.is_patched(model)
    assert _snapshot(model) == before
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)


@pytest.mark.parametrize("bad, match", [
    (dict(keep=0.0), "keep"),
    (dict(keep=-3), "keep"),
    (dict(keep=1.5), "keep"),
    (dict(layer=0), "layer"),
    (dict(layer=4), r"allowed an int in \[1, 3\]"),
    (dict(strategy="nope"), "strategy"),
    (dict(strategy="dual"), "strategy='dual' is invalid"),
])
def test_bad_configs_raise_clear_errors(model, bad, match):
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        vprune.patch(model, **bad)
    assert _snapshot(model) == before


@pytest.mark.parametrize("strategy", ["fastv", "semantic", "divprune", "random"])
def test_pruned_matches_masked_reference(strategy):
    m = tiny_llava(seed=1)
    inp = llava_prompt(TEXTS, [1, 2], seed=1)
    with vprune.patched(m, keep=0.25, strategy=strategy):
        with torch.no_grad():
            out = m(**inp).logits
        st = vprune.stats(m)
    vis = inp["input_ids"] == LLAVA_IMAGE_TOKEN
    cols = kept_columns(inp["input_ids"], vis, st["kept_indices"])
    ref = masked_reference(m, inp, 2, cols)
    am = inp["attention_mask"].bool()
    for b in range(2):
        keep = torch.nonzero(cols[b]).flatten()
        assert out.shape[1] == keep.numel()
        valid = am[b, keep]
        torch.testing.assert_close(out[b][valid], ref[b, keep][valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn, cache", [("sdpa", None), ("eager", None), ("sdpa", "static"), ("eager", "static")])
def test_generate_pruned_matches_masked_reference_every_step(attn, cache):
    """KV-cached decode after a pruned prefill: positions continue after the unpruned length, mask
    columns of layers >= K follow the pruned cache (eager / padded SDPA / StaticCache)."""
    m = tiny_llava(seed=2, attn=attn)
    inp = llava_prompt(TEXTS, [1, 1], seed=2)
    kw = dict(output_logits=True, return_dict_in_generate=True)
    if cache:
        kw["cache_implementation"] = cache
    with vprune.patched(m, keep=0.25):
        gen = _greedy(m, inp, n=4, **kw)
        st = vprune.stats(m)
    seq, length = gen.sequences, inp["input_ids"].shape[1]
    n_new = seq.shape[1] - length
    vis = inp["input_ids"] == LLAVA_IMAGE_TOKEN
    cols = torch.cat([kept_columns(inp["input_ids"], vis, st["kept_indices"]),
                      torch.ones(2, n_new, dtype=torch.bool)], dim=1)
    am = torch.cat([inp["attention_mask"], torch.ones(2, n_new, dtype=torch.long)], dim=1)
    pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 1)  # what generate uses with left padding
    ref = masked_reference(m, {"input_ids": seq, "attention_mask": am, "pixel_values": inp["pixel_values"],
                               "position_ids": pos}, 2, cols)
    for t in range(n_new):
        torch.testing.assert_close(gen.logits[t], ref[:, length - 1 + t], atol=1e-5, rtol=0)


def test_sampling_generate_works_pruned(model, inputs):
    with vprune.patched(model, keep=0.25):
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=5)
        st = vprune.stats(model)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 4)
    assert st["visual_tokens_after"] == [4, 4]


def test_layers_from_k_receive_fewer_tokens_and_cache_is_smaller(model, inputs):
    seen = {}

    def count(i):
        def hook(mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            seen[i] = h.shape[1]
        return hook

    with vprune.patched(model, keep=4, layer=2):
        handles = [layer.register_forward_pre_hook(count(i), with_kwargs=True)
                   for i, layer in enumerate(model.model.language_model.layers)]
        try:
            with torch.no_grad():
                out = model(**inputs, use_cache=True)
        finally:
            for h in handles:
                h.remove()
        st = vprune.stats(model)
    full = inputs["input_ids"].shape[1]
    assert seen == {0: full, 1: full, 2: full - 12, 3: full - 12}
    assert st["tokens_before"] == full and st["tokens_after"] == full - 12
    assert st["visual_tokens_after"] == [4, 4] and all(len(k) == 4 for k in st["kept_indices"])
    assert 0 < st["flops_skipped"][0] < 1
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    assert lengths == [full, full, full - 12, full - 12]


def test_several_images_get_a_budget_each():
    m = tiny_llava(seed=3)
    inp = llava_prompt([[5, 6, 7, 8], [9, 10, 11]], [2, 2], seed=3)
    with vprune.patched(m, keep=0.25):
        with torch.no_grad():
            m(**inp)
        st = vprune.stats(m)
    assert [[img["kept"] for img in row] for row in st["per_image"]] == [[4, 4], [4, 4]]
    ids = inp["input_ids"]
    for b, kept in enumerate(st["kept_indices"]):
        pos = torch.nonzero(ids[b] == LLAVA_IMAGE_TOKEN).flatten().tolist()
        first, second = set(pos[:16]), set(pos[16:])
        assert len(first & set(kept)) == 4 and len(second & set(kept)) == 4
        assert kept == sorted(kept)


def test_prompt_without_image_is_untouched(model):
    inp = llava_prompt(TEXTS, [0, 0])
    with torch.no_grad():
        ref = model(**inp).logits
    ref_gen = _greedy(model, inp)
    with vprune.patched(model, keep=0.25):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with torch.no_grad():
                out = model(**inp).logits
            gen = _greedy(model, inp)
        st = vprune.stats(model)
    assert torch.equal(out, ref) and torch.equal(gen, ref_gen)
    assert st["pruned"] is False


def test_batch_with_an_image_less_row_warns_and_prunes_nothing(model):
    inp = llava_prompt(TEXTS, [1, 0])
    with torch.no_grad():
        ref = model(**inp).logits
    with vprune.patched(model, keep=0.25):
        with pytest.warns(UserWarning, match="same number of tokens"):
            with torch.no_grad():
                out = model(**inp).logits
    assert torch.equal(out, ref)


def test_missing_visual_inputs_are_reported(model, inputs):
    with vprune.patched(model, keep=0.25):
        no_tokens = llava_prompt(TEXTS, [0, 0])
        no_tokens["pixel_values"] = inputs["pixel_values"]
        with pytest.raises(MissingInputsError, match="no image token"):
            model(**no_tokens)
        no_pixels = {k: v for k, v in inputs.items() if k != "pixel_values"}
        with pytest.warns(UserWarning, match="vision tower did not run"):
            with torch.no_grad():
                model(**no_pixels)
        with torch.no_grad():
            embeds = model.get_input_embeddings()(inputs["input_ids"])
        with pytest.warns(UserWarning, match="cannot locate"):
            with torch.no_grad():
                out = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                            pixel_values=inputs["pixel_values"])
        assert out.logits.shape[1] == inputs["input_ids"].shape[1]  # ran unpruned


def test_attention_implementation_changed_after_patching_is_an_error(model, inputs):
    with vprune.patched(model, keep=0.25):
        cfg = model.config.text_config
        patched_name = cfg._attn_implementation
        object.__setattr__(cfg, "_attn_implementation_internal", "sdpa")
        try:
            with pytest.raises(MissingInputsError, match="attention implementation is 'sdpa'"):
                with torch.no_grad():
                    model(**inputs)
        finally:
            object.__setattr__(cfg, "_attn_implementation_internal", patched_name)


def test_flash_attention_model_is_refused(model):
    from vprune.errors import IncompatibleModelError

    cfg = model.config.text_config
    object.__setattr__(cfg, "_attn_implementation_internal", "flash_attention_2")
    try:
        with pytest.raises(IncompatibleModelError, match="sdpa"):
            vprune.patch(model, keep=0.25)
        assert not vprune.api.is_patched(model)
    finally:
        object.__setattr__(cfg, "_attn_implementation_internal", "sdpa")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs(dtype):
    m = tiny_llava(seed=4, dtype=dtype)
    inp = llava_prompt(TEXTS, [1, 1], seed=4, dtype=dtype)
    with vprune.patched(m, keep=0.25):
        with torch.no_grad():
            out = m(**inp).logits
            gen = m.generate(**inp, max_new_tokens=3, do_sample=False)
        st = vprune.stats(m)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert gen.shape[1] == inp["input_ids"].shape[1] + 3
    assert st["visual_tokens_after"] == [4, 4]


def test_inner_model_call_is_pruned_and_reset_clears_the_record(model, inputs):
    with vprune.patched(model, keep=0.25):
        with torch.no_grad():
            out = model.model(**inputs)  # LlavaModel directly: the hooks sit there
        assert out.last_hidden_state.shape[1] == inputs["input_ids"].shape[1] - 12
        assert vprune.stats(model)["pruned"]
        vprune.reset(model)
        assert vprune.stats(model)["pruned"] is False


def test_labels_on_a_pruned_prefill_raise_a_clear_error(model, inputs):
    with vprune.patched(model, keep=0.25):
        with pytest.raises(ValueError, match="labels= cannot apply"):
            model(**inputs, labels=inputs["input_ids"])
    with torch.no_grad():  # unpatched: the loss works
        assert model(**inputs, labels=inputs["input_ids"]).loss is not None


def test_structure_errors_name_what_is_missing():
    from vprune.errors import IncompatibleModelError, NoTargetsError

    one_layer = tiny_llava(seed=0, layers=1)
    with pytest.raises(NoTargetsError, match="1 decoder layer"):
        vprune.patch(one_layer, keep=0.25)
    broken = tiny_llava(seed=0, layers=2)
    broken.model.language_model.layers = torch.nn.ModuleList()
    with pytest.raises(NoTargetsError, match="no decoder layers"):
        vprune.patch(broken, keep=0.25)
    no_token = tiny_llava(seed=0, layers=2)
    no_token.config.image_token_id = None
    with pytest.raises(IncompatibleModelError, match="config.image_token_id"):
        vprune.patch(no_token, keep=0.25, layer=1)
    assert not any(vprune.api.is_patched(m) for m in (one_layer, broken, no_token))
