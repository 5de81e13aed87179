"""The in-LLM pruning machinery (integrations/_llm_pruning.py): helpers, scoring against eager
attention, selection rules (ties, NaN, equal counts per row), one SDPA call per layer, and reuse on
a plain Llama stack (the OpenVLA layout: visual tokens right after BOS)."""
from __future__ import annotations

from types import SimpleNamespace
from typing import List

import pytest
import torch

pytest.importorskip("transformers")

import vprune
from vprune.config import VisualPruning
from vprune.integrations import _llm_pruning as lp
from vprune.undo import UndoLog

from _pruning_refs import fastv_reference, kept_columns, masked_reference
from _tiny_models import (LLAVA_IMAGE_TOKEN, QWEN_IMAGE_TOKEN, llava_prompt, qwen_prompt, tiny_llava,
                          tiny_qwen)

TEXTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]]


# ---------------------------------------------------------------------------------- helpers
def test_groups_from_mask_runs_splits_and_token_changes():
    ids = torch.tensor([[1, 9, 9, 9, 9, 2, 9, 9, 0], [9, 9, 8, 8, 3, 3, 3, 3, 3]])
    vis = (ids == 9) | (ids == 8)
    assert [[list(g) for g in row] for row in lp.groups_from_mask(vis)] == [[[1, 2, 3, 4], [6, 7]], [[0, 1, 2, 3]]]
    split = lp.groups_from_mask(vis, split=2, token_ids=ids)
    assert [[list(g) for g in row] for row in split] == [[[1, 2], [3, 4], [6, 7]], [[0, 1], [2, 3]]]
    # a run that is not a multiple of the split is left whole
    assert [list(g) for g in lp.groups_from_mask(vis[:1], split=3)[0]] == [[1, 2, 3, 4], [6, 7]]
    assert [[list(g) for g in row] for row in lp.groups_from_ranges(2, [(1, 4)])] == [[[1, 2, 3]]] * 2


def test_gather_tokens_matches_indexing_for_every_layout():
    g = torch.Generator().manual_seed(0)
    b, n, d = 2, 7, 4
    idx = torch.tensor([[0, 2, 3, 6], [1, 2, 5, 6]])
    rows = torch.arange(b).unsqueeze(1)
    cos = torch.randn(1, n, d, generator=g)  # position_ids [1, L]: broadcast over the batch
    assert torch.equal(lp.gather_tokens(cos, idx, -2, -3), cos.expand(b, n, d)[rows, idx])
    mrope = torch.randn(3, b, n, d, generator=g)
    want = torch.stack([mrope[i][rows, idx] for i in range(3)])
    assert torch.equal(lp.gather_tokens(mrope, idx, -2, -3), want)
    pid = torch.arange(3 * b * n).view(3, b, n)
    assert torch.equal(lp.gather_tokens(pid, idx, -1, -2), torch.stack([pid[i][rows, idx] for i in range(3)]))
    mask = torch.rand(b, 1, n, n, generator=g) > 0.5
    r = lp.gather_tokens(mask, idx, 2, 0)
    assert torch.equal(r, torch.stack([mask[i, :, idx[i]] for i in range(b)]))
    c = lp.gather_tokens(mask, idx, 3, 0)
    assert torch.equal(c, torch.stack([mask[i][..., idx[i]] for i in range(b)]))


def test_padding_from_mask_reads_2d_4d_and_dicts():
    am = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    want = am.bool()
    assert torch.equal(lp.padding_from_mask(am, 4), want)
    four = (torch.ones(4, 4, dtype=torch.bool).tril() & want[:, None, :]).unsqueeze(1)  # [B, 1, L, L]
    assert torch.equal(lp.padding_from_mask(four, 4), want)
    additive = torch.where(four, 0.0, torch.finfo(torch.float32).min)
    assert torch.equal(lp.padding_from_mask({"full_attention": additive}, 4), want)
    assert lp.padding_from_mask(None, 4) is None


def _bare_pruner(keep, strategy="fastv"):
    cfg = VisualPruning(keep=keep, layer=1, strategy=strategy)
    text = SimpleNamespace(_attn_implementation="sdpa")
    return lp.LLMPruner(text, [], cfg, lp.ROW_MODES[strategy])


def test_plan_gives_each_image_its_budget_and_every_row_the_same_count():
    pruner = _bare_pruner(keep=0.25)
    groups = [[range(2, 18)], [range(1, 17), range(18, 26)]]  # row 0: one image; row 1: 16 + 8 tokens
    with _no_warning():
        plan = pruner._plan(groups, 2, 30, torch.device("cpu"), None)
    assert plan.requested == [[4], [4, 2]]
    assert plan.dropped == 12  # row 0 can drop 12, row 1 would drop 18: both drop 12
    assert plan.budgets == [[4], [7, 5]]  # row 1's 6 extra tokens spread over its images
    assert plan.keep_len == 18
    assert plan.score_rows.tolist() == [[29], [29]]


def test_plan_with_an_image_less_row_warns():
    pruner = _bare_pruner(keep=0.5)
    with pytest.warns(lp.VPruneWarning, match=r"rows \[1\] have no visual tokens"):
        plan = pruner._plan([[range(1, 5)], []], 2, 8, torch.device("cpu"), None)
    assert plan.dropped == 0 and plan.budgets == [[4], []]


class _no_warning:
    def __enter__(self):
        import warnings
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


# --------------------------------------------------------------------------------- scoring
def _host(kind, seed):
    if kind == "llava":
        m = tiny_llava(seed=seed)
        inp = llava_prompt(TEXTS, [1, 2], seed=seed)
        vis = inp["input_ids"] == LLAVA_IMAGE_TOKEN
        return m, inp, vis, 16
    m = tiny_qwen("2.5", seed=seed)
    inp = qwen_prompt(TEXTS, [[(4, 8)], [(4, 8), (4, 4)]], seed=seed)
    return m, inp, inp["input_ids"] == QWEN_IMAGE_TOKEN, None


@pytest.mark.parametrize("kind, seed", [("llava", 0), ("llava", 1), ("llava", 2), ("qwen", 0), ("qwen", 1)])
def test_fastv_keep_set_equals_eager_attention_reference(kind, seed):
    m, inp, vis, split = _host(kind, seed)
    with vprune.patched(m, keep=0.25, layer=2):
        with torch.no_grad():
            m(**inp)
        st = vprune.stats(m)
    groups = lp.groups_from_mask(vis, split=split)
    budgets = [[img["kept"] for img in row] for row in st["per_image"]]
    assert fastv_reference(m, inp, 2, groups, budgets) == st["kept_indices"]


def test_semantic_keep_set_equals_text_rows_reference():
    m, inp, vis, split = _host("llava", 3)
    with vprune.patched(m, keep=0.25, layer=2, strategy="semantic"):
        with torch.no_grad():
            m(**inp)
        st = vprune.stats(m)
    rows = inp["attention_mask"].bool() & ~vis
    budgets = [[img["kept"] for img in row] for row in st["per_image"]]
    assert fastv_reference(m, inp, 2, lp.groups_from_mask(vis, split=split), budgets, rows=rows) == st["kept_indices"]


def test_scores_match_eager_attention_probabilities(monkeypatch):
    m, inp, vis, _ = _host("llava", 4)
    seen = {}
    original = lp.LLMPruner._score

    def spy(self, plan, query, key, scale):
        seen["scores"] = original(self, plan, query, key, scale)
        return seen["scores"]

    monkeypatch.setattr(lp.LLMPruner, "_score", spy)
    with vprune.patched(m, keep=0.25, layer=3):
        with torch.no_grad():
            m(**inp)
    from _pruning_refs import _text_attention
    with _text_attention(m, "eager"), torch.no_grad():
        att = m(**inp, output_attentions=True).attentions[2]
    torch.testing.assert_close(seen["scores"], att[:, :, -1].float().mean(1), atol=1e-6, rtol=0)


def test_ties_go_to_the_lower_index():
    """Zero queries at layer K-1 give uniform attention: every visual score ties exactly."""
    m, inp, vis, _ = _host("llava", 5)
    with torch.no_grad():
        m.model.language_model.layers[1].self_attn.q_proj.weight.zero_()
        m.model.language_model.layers[1].self_attn.q_proj.bias = None
    with vprune.patched(m, keep=3, layer=2):
        with torch.no_grad():
            m(**inp)
        st = vprune.stats(m)
    for b, kept in enumerate(st["kept_indices"]):
        pos = torch.nonzero(vis[b]).flatten().tolist()
        images = [pos[i:i + 16] for i in range(0, len(pos), 16)]
        budgets = [img["kept"] for img in st["per_image"][b]]
        assert kept == sorted(p for img, k in zip(images, budgets) for p in img[:k])


def test_nan_scores_raise_a_clear_error():
    m, inp, _, _ = _host("llava", 6)
    with torch.no_grad():
        m.model.language_model.layers[1].self_attn.q_proj.weight.fill_(float("nan"))
    with vprune.patched(m, keep=0.25, layer=2):
        with pytest.raises(ValueError, match="NaN"):
            with torch.no_grad():
                m(**inp)


def test_each_text_layer_makes_exactly_one_sdpa_call(monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa_mod

    m, inp, _, _ = _host("llava", 0)
    calls = []
    real = sdpa_mod.sdpa_attention_forward

    def counting(module, *a, **k):
        calls.append(getattr(module, "layer_idx", None))
        assert not k.get("output_attentions")
        return real(module, *a, **k)

    with vprune.patched(m, keep=0.25):
        monkeypatch.setattr(sdpa_mod, "sdpa_attention_forward", counting)
        with torch.no_grad():
            m(**inp)
    text_calls = [c for c in calls if c is not None]
    assert sorted(text_calls) == [0, 1, 2, 3]


# ------------------------------------------------------------------- reuse on a plain stack
def test_reuse_on_a_plain_llama_with_visual_tokens_after_bos():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg._attn_implementation = "sdpa"
    m = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 60, (2, 26), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 1
    am = torch.ones_like(ids)
    with torch.no_grad():
        ref_full = m(ids, attention_mask=am).logits

    config = VisualPruning(keep=0.5, layer=2, strategy="fastv")
    pruner = lp.LLMPruner(m.config, m.model.layers, config, "last", host_name="LlamaForCausalLM")
    undo = UndoLog()
    pruner.install(undo)
    try:
        pruner.begin_call(lp.groups_from_ranges(2, [(1, 17)]), batch=2, seq_len=26, device=ids.device,
                          attention_mask=am)
        with torch.no_grad():
            out = m(ids, attention_mask=am).logits
        pruner.end_call()
        st = pruner.stats()
    finally:
        undo.undo()
    assert st["visual_tokens_after"] == [8, 8] and out.shape[1] == 26 - 8
    vis = torch.zeros_like(ids, dtype=torch.bool)
    vis[:, 1:17] = True
    cols = kept_columns(ids, vis, st["kept_indices"])
    ref = masked_reference(m, {"input_ids": ids, "attention_mask": am}, 2, cols)
    for b in range(2):
        torch.testing.assert_close(out[b], ref[b, cols[b]], atol=1e-5, rtol=0)
    with torch.no_grad():  # undone: bit-identical again
        assert torch.equal(m(ids, attention_mask=am).logits, ref_full)


# --------------------------------------------------------------- the Triton kernels (interpreted)
_TRITON_CHILD = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from _tiny_models import LLAVA_IMAGE_TOKEN, llava_prompt, tiny_llava
from _pruning_refs import kept_columns, masked_reference
import vprune
from vprune.kernels import backend_for
assert backend_for(torch.zeros(1)) == "triton"
m = tiny_llava(seed=7, attn="eager")
inp = llava_prompt([[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]], [1, 1], seed=7)
with vprune.patched(m, keep=0.25):
    with torch.no_grad():
        gen = m.generate(**inp, max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         suppress_tokens=[LLAVA_IMAGE_TOKEN])
    st = vprune.stats(m)
seq, length = gen.sequences, inp["input_ids"].shape[1]
n = seq.shape[1] - length
cols = torch.cat([kept_columns(inp["input_ids"], inp["input_ids"] == LLAVA_IMAGE_TOKEN, st["kept_indices"]),
                  torch.ones(2, n, dtype=torch.bool)], 1)
am = torch.cat([inp["attention_mask"], torch.ones(2, n, dtype=torch.long)], 1)
pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 1)
ref = masked_reference(m, {"input_ids": seq, "attention_mask": am, "pixel_values": inp["pixel_values"],
                           "position_ids": pos}, 2, cols)
err = max(float((gen.logits[t] - ref[:, length - 1 + t]).abs().max()) for t in range(n))
print("MAXERR", err)
assert err < 1e-5, err
"""


def test_pruning_through_the_triton_kernels_matches_masked_reference():
    """Selection and every gather (hidden states, cos/sin, eager float masks rows and columns) through
    the Triton kernels, run by the interpreter in a child process (how they run on GPUs, minus the GPU)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", VPRUNE_KERNELS="triton")
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", _TRITON_CHILD, here], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "MAXERR" in proc.stdout


def test_two_patched_models_share_the_attention_name_and_beams_work():
    from transformers.modeling_utils import AttentionInterface

    a, inp_a, _, _ = _host("llava", 8)
    b, inp_b, _, _ = _host("qwen", 8)
    with torch.no_grad():
        ref_a = a.generate(**inp_a, max_new_tokens=3, num_beams=2, do_sample=False)
    vprune.patch(a, keep=1.0)
    vprune.patch(b, keep=0.25)
    try:
        with torch.no_grad():  # beams of one prompt share its keep set: cache reordering stays valid
            assert torch.equal(a.generate(**inp_a, max_new_tokens=3, num_beams=2, do_sample=False), ref_a)
            b.generate(**inp_b, max_new_tokens=3, num_beams=2, do_sample=False)
        vprune.unpatch(a)
        assert "vprune_sdpa" in AttentionInterface._global_mapping  # still used by b
        with torch.no_grad():
            assert b(**inp_b).logits.shape[1] < inp_b["input_ids"].shape[1]
    finally:
        vprune.unpatch(b)
    assert "vprune_sdpa" not in AttentionInterface._global_mapping


def test_deferred_nan_check_raises_at_the_end_and_selects_the_same(monkeypatch):
    """On a device the NaN check waits for the end of the forward (no mid-stack host sync): the
    error is the same, and without NaN the keep set equals the immediate path's."""
    import vprune.integrations._llm_pruning as lp

    m, inp, _, _ = _host("llava", 6)
    with vprune.patched(m, keep=0.25, layer=2):
        with torch.no_grad():
            m(**inp)
        immediate = vprune.stats(m)["kept_indices"]
    monkeypatch.setattr(lp, "DEFERRED_NAN_CHECK_DEVICES", ("cpu", "cuda"))
    seen = []
    real = lp.select_topk
    monkeypatch.setattr(lp, "select_topk", lambda s, k: seen.append(k) or real(s, k))
    with vprune.patched(m, keep=0.25, layer=2):
        with torch.no_grad():
            m(**inp)
        assert vprune.stats(m)["kept_indices"] == immediate
    assert len(seen) >= 2  # the deferred path ran (per bucket, then the keep set)
    with torch.no_grad():
        m.model.language_model.layers[1].self_attn.q_proj.weight.fill_(float("nan"))
    layers_run = []
    hook = m.model.language_model.layers[-1].register_forward_hook(lambda *a: layers_run.append(1))
    with vprune.patched(m, keep=0.25, layer=2):
        with pytest.raises(ValueError, match=r"NaN \(batch rows \[0"):
            with torch.no_grad():
                m(**inp)
    hook.remove()
    assert layers_run, "the error came before the last layer ran: the check was not deferred"


# ------------------------------------------------------------------ host planning, one transfer
class _OnDevice(torch.Tensor):
    """A CPU tensor standing in for a CUDA one: it says it is on cuda:0, and every read that would
    copy it to the host (a device sync on a GPU) is recorded in ``reads`` and returns plain CPU data.
    Other ops keep the subclass, so a value computed from it and read later is recorded too."""

    reads: List[str] = []
    HOST_READS = {"cpu", "item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
                  "__array__", "__repr__", "__format__", "argwhere", "unique", "masked_select"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == torch.Tensor.device.__get__:
            return torch.device("cuda", 0)
        name = getattr(func, "__name__", "")
        if name in cls.HOST_READS or (name == "to" and _to_cpu(args[1:], kwargs)):
            cls.reads.append(name)
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
                return out.as_subclass(torch.Tensor) if isinstance(out, torch.Tensor) else out
        return super().__torch_function__(func, types, args, kwargs)


def _to_cpu(args: tuple, kwargs: dict) -> bool:
    """Whether ``Tensor.to(*args, **kwargs)`` names the CPU as its target."""
    targets = list(args) + [kwargs.get("device")]
    return any((isinstance(t, torch.device) and t.type == "cpu") or (isinstance(t, str) and t.startswith("cpu"))
               for t in targets)


def _as_device_inputs(inp: dict) -> dict:
    return {k: v.as_subclass(_OnDevice) if isinstance(v, torch.Tensor) else v for k, v in inp.items()}


class _FilledCache:
    """A KV cache holding ``n`` tokens, as a decode step sees it."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.n


@pytest.mark.parametrize("kind", ["llava", "qwen"])
def test_prefill_planning_copies_the_inputs_to_the_host_once(kind, monkeypatch):
    """The planning of a prefill reads its device inputs once (ids and mask in one copy; a second read
    would be a second sync on a GPU), plans from host tensors only, and sends the plan to the device
    in one packed copy whose views equal the plan made from CPU inputs. A decode step reads nothing."""
    m, inp, _, _ = _host(kind, 0)
    uploads: List[list] = []

    def packed_to_device(tensors, device):
        assert not any(isinstance(t, _OnDevice) for t in tensors), "the plan was computed from device tensors"
        uploads.append(list(tensors))
        return lp._packed_copy(tensors, torch.device("cpu"), pin=False)

    with vprune.patched(m, keep=0.25, layer=2):
        st = m._vprune
        pruner = st.runtime
        st.integration.begin_call(m, pruner, dict(inp))
        want = pruner.call.plan
        pruner.end_call(failed=True)

        monkeypatch.setattr(lp, "to_device", packed_to_device)
        _OnDevice.reads = []
        st.integration.begin_call(m, pruner, _as_device_inputs(inp))
        got = pruner.call.plan
        pruner.end_call(failed=True)
        assert _OnDevice.reads == ["cpu"], f"device->host reads in the planning: {_OnDevice.reads}"
        assert len(uploads) == 1
        for name in ("visual", "score_rows", "row_weights", "key_valid"):
            a, b = getattr(got, name), getattr(want, name)
            assert a.dtype == b.dtype and torch.equal(a, b), name
        assert [(b.n, b.k) for b in got.buckets] == [(b.n, b.k) for b in want.buckets]
        for a, b in zip(got.buckets, want.buckets):
            assert torch.equal(a.rows, b.rows) and torch.equal(a.positions, b.positions)
        assert (got.budgets, got.valid_len, got.keep_len) == (want.budgets, want.valid_len, want.keep_len)

        _OnDevice.reads = []
        step = {"input_ids": inp["input_ids"][:, -1:], "attention_mask": inp["attention_mask"],
                "past_key_values": _FilledCache(inp["input_ids"].shape[1])}
        st.integration.begin_call(m, pruner, _as_device_inputs(step))
        pruner.end_call()
        assert _OnDevice.reads == [], f"device->host reads in a decode step: {_OnDevice.reads}"
        assert len(uploads) == 1


def test_the_read_counter_sees_the_syncs_it_must_catch():
    """The stand-in records the usual ways a device value reaches the host (else the test above could
    pass with a sync in the planning)."""
    t = torch.tensor([[1, 0, 1]]).as_subclass(_OnDevice)
    _OnDevice.reads = []
    int(t.sum()), bool(t.any()), t.tolist(), t.to("cpu"), torch.nonzero(t), t.numpy(), t[0, 0].item()
    assert _OnDevice.reads == ["__int__", "__bool__", "tolist", "to", "nonzero", "numpy", "item"]
    assert t.device.type == "cuda" and isinstance(t.cpu(), torch.Tensor) and not isinstance(t.cpu(), _OnDevice)


def test_packed_copy_returns_equal_contiguous_aligned_views():
    parts = [torch.rand(3, 5) > 0.5, None, torch.arange(7).view(1, 7), torch.rand(2, 1).expand(2, 3),
             torch.zeros(0, 4, dtype=torch.long), torch.tensor([[1.5], [0.0]], dtype=torch.float32)]
    out, host = lp._packed_copy(parts, torch.device("cpu"), pin=False)
    assert out[1] is None
    base = host.data_ptr()
    for a, b in zip(parts, out):
        if a is None:
            continue
        assert b.dtype == a.dtype and b.shape == a.shape and torch.equal(a, b) and b.is_contiguous()
        assert (b.data_ptr() - base) % lp.PACK_ALIGN == 0
    assert lp.to_device(parts, "cpu")[0] == parts  # the CPU needs no copy


def test_pruning_through_packed_plan_tensors_is_bit_identical(monkeypatch):
    """A prefill and its decode steps with the plan's tensors as views of one packed buffer (what a
    device gets) give the same logits and keep sets as with separate tensors."""
    m, inp, _, _ = _host("llava", 4)

    def run():
        with vprune.patched(m, keep=0.25, layer=2):
            with torch.no_grad():
                gen = m.generate(**inp, max_new_tokens=3, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, suppress_tokens=[LLAVA_IMAGE_TOKEN])
            return gen, vprune.stats(m)["kept_indices"]

    ref, ref_kept = run()
    monkeypatch.setattr(lp, "to_device", lambda ts, device: lp._packed_copy(ts, torch.device("cpu"), pin=False))
    got, kept = run()
    assert kept == ref_kept and torch.equal(got.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, ref.logits))
