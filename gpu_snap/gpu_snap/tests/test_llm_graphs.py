"""VisualPruning(cuda_graph=True): the static-buffer / private-cache / pass-through bookkeeping of the
graph path, checked on the CPU with ``NoCaptureBackend`` (its capture runs the body for the output
tensors; its replay re-runs the body built at capture time and copies the results into those tensors,
so a later call sees its inputs only through the static buffers, as a real replay does).

Graph mode must give exactly what the eager patched model gives: prefill logits, every generate step,
the KV cache contents, over consecutive calls with different inputs of one shape (replays) and new
shapes (new graphs). A real-GPU check is ``python3 -m vprune.bench.vlm_graph_check``.
"""
from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

import vprune
from vprune.errors import IncompatibleModelError
from vprune.integrations import _llm_pruning as lp

from _tiny_models import LLAVA_IMAGE_TOKEN, llava_prompt, qwen_prompt, tiny_llava, tiny_qwen

TEXTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]]
TEXTS_B = [[15, 14, 13, 12], [11, 10, 9, 8, 7, 6, 5]]  # the same layout, other tokens
QWEN_SUPPRESS = [120, 121, 122, 123]


class CountingBackend(lp.NoCaptureBackend):
    def __init__(self):
        super().__init__()
        self.captures = 0
        self.replays = 0

    def capture(self, body, device):
        self.captures += 1
        return super().capture(body, device)

    def replay(self, graph, outputs):
        self.replays += 1
        super().replay(graph, outputs)


def _graph_patch(m, **kw):
    vprune.patch(m, vprune.VisualPruning(cuda_graph=True, **kw))
    backend = CountingBackend()
    m._vprune.runtime.graph_backend = backend
    return backend


def _cache_of(out):
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def _run(m, inp, suppress, n_new=4):
    """Prefill logits + KV cache, then greedy generate: sequences and every step's logits."""
    with torch.no_grad():
        out = m(**inp, use_cache=True)
        gen = m.generate(**inp, max_new_tokens=n_new, do_sample=False, suppress_tokens=suppress,
                         output_logits=True, return_dict_in_generate=True)
    return {"logits": out.logits, "cache": _cache_of(out), "seq": gen.sequences, "steps": list(gen.logits)}


def _assert_same(a, b):
    assert torch.equal(a["logits"], b["logits"])
    assert len(a["cache"]) == len(b["cache"])
    for (ka, va), (kb, vb) in zip(a["cache"], b["cache"]):
        assert torch.equal(ka, kb) and torch.equal(va, vb)
    assert torch.equal(a["seq"], b["seq"])
    assert len(a["steps"]) == len(b["steps"])
    for x, y in zip(a["steps"], b["steps"]):
        assert torch.equal(x, y)


def _llava_case():
    m = tiny_llava(seed=5)
    inputs = [llava_prompt(TEXTS, [1, 1], seed=5), llava_prompt(TEXTS_B, [1, 1], seed=6)]
    new_shape = llava_prompt([[5, 6, 7], [8, 9, 10, 11]], [1, 1], seed=7)
    return m, inputs, new_shape, [LLAVA_IMAGE_TOKEN]


def _qwen_case():
    m = tiny_qwen("2.5", seed=5)
    grids = [[(4, 8)], [(4, 8)]]
    inputs = [qwen_prompt(TEXTS, grids, seed=5), qwen_prompt(TEXTS_B, grids, seed=6)]
    new_shape = qwen_prompt([[5, 6, 7], [8, 9, 10, 11]], [[(4, 4)], [(4, 4)]], seed=7)
    return m, inputs, new_shape, QWEN_SUPPRESS


@pytest.mark.parametrize("case", [_llava_case, _qwen_case], ids=["llava", "qwen2.5-vl"])
def test_graph_equals_eager_patched_over_calls_and_shapes(case):
    m, inputs, new_shape, suppress = case()
    with vprune.patched(m, keep=0.25):
        eager = [_run(m, inp, suppress) for inp in inputs + [new_shape]]
    backend = _graph_patch(m, keep=0.25)
    try:
        first = _run(m, inputs[0], suppress)
        # LLaVA: the forward and generate's prefill share a key; Qwen: generate adds text position ids
        kinds = backend.captures
        assert kinds == (1 if case is _llava_case else 2) and backend.replays == 2
        second = _run(m, inputs[1], suppress)  # same shape, other values: replays only
        assert backend.captures == kinds and backend.replays == 4
        third = _run(m, new_shape, suppress)  # a new kept length: new graphs
        assert backend.captures == 2 * kinds and backend.replays == 6
        st = vprune.stats(m)
    finally:
        vprune.unpatch(m)
    assert eager[0]["logits"].shape[1] < inputs[0]["input_ids"].shape[1]  # really pruned
    assert not torch.equal(eager[0]["logits"], eager[1]["logits"])  # the second call has other values
    for got, want in zip((first, second, third), eager):
        _assert_same(got, want)
    last = "replayed" if kinds == 1 else "captured"  # Qwen: generate's prefill of the new shape is new
    assert st["cuda_graph"] == {"last_prefill": last, "graphs": 2 * kinds, "captured": 2 * kinds, "replays": 6}
    assert st["pruned_layers"] == 2


def _last_layer_outputs(m):
    """Keep what the last decoder layer returns (a tensor the host may hold on to)."""
    seen = []
    handle = m.model.language_model.layers[-1].register_forward_hook(lambda mod, a, out: seen.append(out))
    return seen, handle


@pytest.mark.parametrize("case", [_llava_case, _qwen_case], ids=["llava", "qwen2.5-vl"])
def test_use_cache_false_inference_mode_and_no_aliased_outputs(case):
    m, inputs, _, _ = case()
    with vprune.patched(m, keep=0.25):
        with torch.no_grad():
            want = [m(**inp, use_cache=False).logits for inp in inputs]
    backend = _graph_patch(m, keep=0.25)
    seen, handle = _last_layer_outputs(m)
    try:
        with torch.inference_mode():  # buffers made here must take a later no_grad call's inputs
            first = m(**inputs[0], use_cache=False).logits
        first_seen = seen[0].clone()
        with torch.no_grad():
            second = m(**inputs[1], use_cache=False).logits
            kept = torch.equal(seen[0], first_seen)  # the next replay did not overwrite the first call's output
            again = m(**inputs[0], use_cache=False).logits
    finally:
        handle.remove()
        vprune.unpatch(m)
    assert backend.captures == 1 and backend.replays == 3
    assert torch.equal(first, want[0]) and torch.equal(second, want[1]) and torch.equal(again, want[0])
    assert kept


def test_keep_all_with_graph_is_bit_identical_to_unpatched():
    m, inputs, _, suppress = _llava_case()
    ref = _run(m, inputs[0], suppress)
    backend = _graph_patch(m, keep=1.0)
    try:
        got = _run(m, inputs[0], suppress)
    finally:
        vprune.unpatch(m)
    assert backend.replays == 2
    _assert_same(got, ref)


def _snapshot(m):
    mods = [(name, type(mod), len(mod._forward_pre_hooks), len(mod._forward_hooks), tuple(sorted(mod.__dict__)))
            for name, mod in m.named_modules()]
    return type(m), m.config.text_config._attn_implementation, tuple(mods)


def test_unpatch_restores_and_frees_the_graphs():
    m, inputs, _, _ = _llava_case()
    with torch.no_grad():
        ref = m(**inputs[0]).logits
    before = _snapshot(m)  # after a first forward: transformers installs its own output hooks lazily
    _graph_patch(m, keep=0.25)
    pruner = m._vprune.runtime
    layers = m.model.language_model.layers
    assert all("forward" in layers[i].__dict__ for i in range(2, 4)) and "forward" not in layers[1].__dict__
    with torch.no_grad():
        m(**inputs[0])
    assert len(pruner.graphs) == 1
    vprune.reset(m)  # a new request keeps the shape-keyed graphs
    assert len(pruner.graphs) == 1
    vprune.unpatch(m)
    assert len(pruner.graphs) == 0
    assert _snapshot(m) == before
    with torch.no_grad():
        assert torch.equal(m(**inputs[0]).logits, ref)


def test_cpu_inputs_with_the_real_backend_raise_a_clear_error():
    m, inputs, _, _ = _llava_case()
    with vprune.patched(m, vprune.VisualPruning(keep=0.25, cuda_graph=True)):
        with pytest.raises(IncompatibleModelError, match="needs CUDA tensors"):
            with torch.no_grad():
                m(**inputs[0])
        with torch.no_grad():  # a call without visual tokens is not pruned: no graph, no error
            m(**llava_prompt(TEXTS, [0, 0]))


def test_calls_the_graph_cannot_take_run_eagerly_with_a_warning():
    m, inputs, _, _ = _llava_case()
    with vprune.patched(m, keep=0.25):
        want = m(**inputs[0]).logits.detach()  # autograd on
        with torch.no_grad():
            want_hidden = m(**inputs[0], output_hidden_states=True).hidden_states
    backend = _graph_patch(m, keep=0.25)
    try:
        with pytest.warns(UserWarning, match="autograd is enabled"):
            got = m(**inputs[0]).logits.detach()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the same reason warns once
            m(**inputs[0])
        with pytest.warns(UserWarning, match="output_hidden_states"):
            with torch.no_grad():
                hidden = m(**inputs[0], output_hidden_states=True).hidden_states
        assert vprune.stats(m)["cuda_graph"]["last_prefill"].startswith("eager: output_hidden_states")
        with pytest.warns(UserWarning, match="StaticCache|StaticLayer"):
            with torch.no_grad():
                m.generate(**inputs[0], max_new_tokens=2, do_sample=False, cache_implementation="static")
    finally:
        vprune.unpatch(m)
    assert backend.captures == 0
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(hidden, want_hidden))


def test_graphs_are_bounded_least_recently_used_first():
    m, inputs, new_shape, _ = _llava_case()
    backend = _graph_patch(m, keep=0.25)
    pruner = m._vprune.runtime
    pruner.max_graphs = 1
    try:
        with torch.no_grad():
            for inp in (inputs[0], new_shape, inputs[1]):
                m(**inp)
    finally:
        vprune.unpatch(m)
    assert backend.captures == 3 and backend.replays == 3


def test_signature_and_static_buffers():
    t = torch.arange(6.0).view(2, 3)
    sig = lp.graph_signature(((t,), {"m": None, "u": True, "pe": (t, t.t())}))
    assert sig == lp.graph_signature(((t + 1,), {"u": True, "m": None, "pe": (t, t.t())}))
    assert sig != lp.graph_signature(((t,), {"m": None, "u": False, "pe": (t, t.t())}))
    assert sig != lp.graph_signature(((t,), {"m": None, "u": True, "pe": (t, t.t().contiguous())}))  # strides
    with pytest.raises(lp._NotKeyable):
        lp.graph_signature(object())
    s = lp.static_clone({"a": (t.t(),)})
    assert s["a"][0] is not t and s["a"][0].stride() == t.t().stride() and torch.equal(s["a"][0], t.t())
    lp.copy_into(s, {"a": (t.t() * 2,)})
    assert torch.equal(s["a"][0], t.t() * 2)


def test_gpu_check_script_runs_its_checks_with_the_cpu_stand_in():
    from vprune.bench import vlm_graph_check

    lines = []
    assert vlm_graph_check.check(torch.device("cpu"), torch.float32, standin=True, log=lines.append)
    assert len(lines) == 5 and all(line.startswith("PASS") for line in lines)
    assert sum("bit-identical" in line for line in lines) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_cuda_graphs_equal_the_eager_patch(dtype):
    from vprune.bench import vlm_graph_check

    lines = []
    ok = vlm_graph_check.check(torch.device("cuda"), dtype, log=lines.append)
    assert ok, "\n".join(lines)
