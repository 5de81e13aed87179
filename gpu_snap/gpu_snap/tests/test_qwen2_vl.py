"""Qwen2-VL / Qwen2.5-VL integration: in-LLM pruning with mRoPE on tiny random models."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import vprune
from vprune.errors import AlreadyPatchedError, NotPatchedError

from _pruning_refs import kept_columns, masked_reference
from _tiny_models import QWEN_IMAGE_TOKEN, QWEN_VIDEO_TOKEN, qwen_prompt, tiny_qwen

TEXTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]
GRIDS = [[(4, 4)], [(4, 8), (4, 4)]]  # row 0: one 4-token image; row 1: an 8-token and a 4-token image


def _greedy(m, inp, n=4, **kw):
    """Greedy decode that never emits vision special tokens (a reference re-run must not see new images)."""
    with torch.no_grad():
        return m.generate(**inp, max_new_tokens=n, do_sample=False, suppress_tokens=[120, 121, 122, 123], **kw)


def _snapshot(m):
    hooks = tuple((name, len(mod._forward_pre_hooks), len(mod._forward_hooks)) for name, mod in m.named_modules())
    attrs = tuple((name, tuple(k for k in mod.__dict__ if "vprune" in k)) for name, mod in m.named_modules())
    return (type(m), m.config.text_config._attn_implementation, m.config.vision_config._attn_implementation,
            hooks, attrs)


@pytest.mark.parametrize("version", ["2.5", "2"])
def test_keep_all_is_bit_identical_and_unpatch_restores(version):
    m = tiny_qwen(version, seed=0)
    inp = qwen_prompt(TEXTS, GRIDS, seed=0)
    before = _snapshot(m)
    with torch.no_grad():
        ref = m(**inp).logits
    ref_gen = _greedy(m, inp, output_logits=True, return_dict_in_generate=True)
    with vprune.patched(m, keep=1.0):
        with torch.no_grad():
            out = m(**inp).logits
        gen = _greedy(m, inp, output_logits=True, return_dict_in_generate=True)
        assert vprune.stats(m)["pruned"]
    assert torch.equal(out, ref) and torch.equal(gen.sequences, ref_gen.sequences)
    assert all(torch.equal(a, b) for a, b in zip(gen.logits, ref_gen.logits))
    vprune.patch(m, keep=0.25)
    with pytest.raises(AlreadyPatchedError):
        vprune.patch(m, keep=0.5)
    vprune.unpatch(m)
    with pytest.raises(NotPatchedError):
        vprune.unpatch(m)
    assert _snapshot(m) == before
    with torch.no_grad():
        assert torch.equal(m(**inp).logits, ref)


@pytest.mark.parametrize("version, attn", [("2.5", "sdpa"), ("2.5", "eager"), ("2", "sdpa")])
def test_prefill_and_decode_match_masked_reference(version, attn):
    """Logits of every generated step equal the unpatched model with pruned keys hidden from layer K
    on (mRoPE positions from the host's own get_rope_index, not renumbered)."""
    m = tiny_qwen(version, seed=1, attn=attn)
    inp = qwen_prompt(TEXTS, GRIDS, seed=1)
    rope_deltas = []
    with torch.no_grad():
        m(**inp)
    rope_deltas.append(m.model.rope_deltas.clone())
    with vprune.patched(m, keep=0.25):
        gen = _greedy(m, inp, output_logits=True, return_dict_in_generate=True)
        st = vprune.stats(m)
        rope_deltas.append(m.model.rope_deltas.clone())
    assert torch.equal(rope_deltas[0], rope_deltas[1])  # rope_deltas untouched
    seq, length = gen.sequences, inp["input_ids"].shape[1]
    n_new = seq.shape[1] - length
    vis = inp["input_ids"] == QWEN_IMAGE_TOKEN
    cols = torch.cat([kept_columns(inp["input_ids"], vis, st["kept_indices"]),
                      torch.ones(2, n_new, dtype=torch.bool)], dim=1)
    full = dict(inp, input_ids=seq,
                attention_mask=torch.cat([inp["attention_mask"], torch.ones(2, n_new, dtype=torch.long)], 1),
                mm_token_type_ids=torch.cat([inp["mm_token_type_ids"], torch.zeros(2, n_new, dtype=torch.int)], 1))
    ref = masked_reference(m, full, 2, cols)
    valid = full["attention_mask"].bool()
    for b in range(2):  # the prefill's last row and every decode step
        for t in range(n_new):
            torch.testing.assert_close(gen.logits[t][b], ref[b, length - 1 + t], atol=1e-5, rtol=0)
    with vprune.patched(m, keep=0.25):  # the plain prefill forward, every kept row
        with torch.no_grad():
            out = m(**inp).logits
    for b in range(2):
        keep = torch.nonzero(cols[b, :length]).flatten()
        ok = valid[b, keep]
        torch.testing.assert_close(out[b][ok], ref[b, keep][ok], atol=1e-5, rtol=0)


def test_kept_tokens_keep_their_mrope_rows():
    m = tiny_qwen("2.5", seed=2)
    inp = qwen_prompt(TEXTS, GRIDS, seed=2)
    seen = {}

    def grab(tag):
        def hook(mod, args, kwargs):
            seen[tag] = tuple(t.clone() for t in kwargs["position_embeddings"])
        return hook

    layer2 = m.model.language_model.layers[2]
    h = layer2.register_forward_pre_hook(grab("full"), with_kwargs=True)
    with torch.no_grad():
        m(**inp)
    h.remove()
    with vprune.patched(m, keep=0.5):
        h = layer2.register_forward_pre_hook(grab("pruned"), with_kwargs=True)  # runs after vprune's hook
        try:
            with torch.no_grad():
                m(**inp)
        finally:
            h.remove()
        st = vprune.stats(m)
    vis = inp["input_ids"] == QWEN_IMAGE_TOKEN
    cols = kept_columns(inp["input_ids"], vis, st["kept_indices"])
    for full, pruned in zip(seen["full"], seen["pruned"]):
        for b in range(2):
            assert torch.equal(pruned[b], full[b, cols[b]])  # sliced bit for bit
        renumbered = full[:, : pruned.shape[1]]
        assert not torch.equal(pruned, renumbered)


def test_several_images_and_a_video_each_get_a_budget():
    m = tiny_qwen("2.5", seed=3)
    inp = qwen_prompt([[5, 6, 7, 8]], [[(4, 8), (4, 4)]], seed=3)
    # append a one-frame-pair video (t=1, 4x4 patches -> 4 tokens) after the images
    ids = inp["input_ids"][0].tolist()
    video = [122] + [QWEN_VIDEO_TOKEN] * 4 + [123]
    ids = ids[:-2] + video + ids[-2:]
    inp["input_ids"] = torch.tensor([ids])
    inp["attention_mask"] = torch.ones_like(inp["input_ids"])
    inp["mm_token_type_ids"] = ((inp["input_ids"] == QWEN_IMAGE_TOKEN).int()
                                + 2 * (inp["input_ids"] == QWEN_VIDEO_TOKEN).int())
    inp["pixel_values_videos"] = torch.randn(16, 3 * 2 * 2 * 2, generator=torch.Generator().manual_seed(0))
    inp["video_grid_thw"] = torch.tensor([[1, 4, 4]])
    with vprune.patched(m, keep=0.5):
        with torch.no_grad():
            out = m(**inp).logits
        st = vprune.stats(m)
    assert [img["tokens"] for img in st["per_image"][0]] == [8, 4, 4]
    assert [img["kept"] for img in st["per_image"][0]] == [4, 2, 2]
    assert out.shape[1] == inp["input_ids"].shape[1] - 8
    vis = (inp["input_ids"] == QWEN_IMAGE_TOKEN) | (inp["input_ids"] == QWEN_VIDEO_TOKEN)
    ref = masked_reference(m, inp, 2, kept_columns(inp["input_ids"], vis, st["kept_indices"]))
    cols = kept_columns(inp["input_ids"], vis, st["kept_indices"])[0]
    torch.testing.assert_close(out[0], ref[0, cols], atol=1e-5, rtol=0)


def test_text_only_prompt_untouched_and_sampling_works():
    m = tiny_qwen("2.5", seed=4)
    text_only = qwen_prompt(TEXTS, [[], []], seed=4)
    with torch.no_grad():
        ref = m(**text_only).logits
    with vprune.patched(m, keep=0.25):
        with torch.no_grad():
            assert torch.equal(m(**text_only).logits, ref)
        assert vprune.stats(m)["pruned"] is False
        inp = qwen_prompt(TEXTS, GRIDS, seed=4)
        torch.manual_seed(0)
        with torch.no_grad():
            out = m.generate(**inp, max_new_tokens=3, do_sample=True, top_k=4)
        assert out.shape[1] == inp["input_ids"].shape[1] + 3
        assert vprune.stats(m)["visual_tokens_after"] == [1, 9]  # row 1 (12 tokens) drops as many as row 0 (3)


def test_layer_out_of_range_and_bf16():
    m = tiny_qwen("2.5", seed=5, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"allowed an int in \[1, 3\]"):
        vprune.patch(m, keep=0.25, layer=4)
    inp = qwen_prompt(TEXTS, GRIDS, seed=5, dtype=torch.bfloat16)
    with vprune.patched(m, keep=0.5, layer=1):
        with torch.no_grad():
            out = m(**inp).logits
            gen = m.generate(**inp, max_new_tokens=2, do_sample=False)
        st = vprune.stats(m)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert gen.shape[1] == inp["input_ids"].shape[1] + 2
    assert st["layer"] == 1 and st["tokens_after"] == st["tokens_before"] - 2
