"""`vprune bench vlm|vla --tiny` (CPU runs of the GPU benchmarks' code paths, end to end), the timing
harness they share, and `eval vlm` helpers."""
import json
import random

import pytest
import torch

from vprune.cli import build_parser


def _args(*argv):
    return build_parser().parse_args(list(argv))


def _stats_ok(s, runs):
    assert s["runs"] == runs and len(s["all_ms"]) == runs
    assert s["min_ms"] <= s["q1_ms"] <= s["median_ms"] <= s["q3_ms"] <= s["max_ms"]
    assert s["ms"] == s["median_ms"] > 0


def test_bench_vlm_tiny_end_to_end(capsys, tmp_path):
    from vprune.bench import vlm

    path = tmp_path / "vlm.json"
    args = _args("bench", "vlm", "--tiny", "--batch", "2", "--keep", "16", "4", "--new-tokens", "2",
                 "--rounds", "2", "--gen-rounds", "2", "--out", str(path))
    assert vlm.run(args) == 0
    out = capsys.readouterr().out
    assert json.loads(path.read_text())["rows"][1]["keep"] == 4
    assert "| 2 | 4/16 |" in out and "| 2 | 16/16 |" in out and "patched/ideal" in out and "interleaved" in out
    res = args._result
    assert {"card", "date", "versions", "command", "timing"} <= set(res)
    assert res["timing"]["prefill_rounds"] == 2 and res["timing"]["generate_rounds"] == 2
    assert [(r["batch"], r["keep"]) for r in res["rows"]] == [(2, 16), (2, 4)]
    for r in res["rows"]:
        for what in ("prefill", "generate"):
            for variant in ("unpatched", "patched", "ideal", "short_input"):
                _stats_ok(r[what][variant], 2)
            assert r[f"{what}_speedup"] > 0 and r[f"{what}_patched_over_ideal"] > 0
        c = r["checks"]
        # the patch computes what the ideal computes on the rows it kept: the same logits, the same first token
        assert c["prefill_max_abs_diff_vs_staged"] < 1e-5 and c["prefill_argmax_matches_staged"]
        assert c["first_token_matches_staged"]
        assert r["kept_measured"] == r["keep"]
    full = res["rows"][0]["checks"]
    assert full["prefill_logits_bit_identical_to_unpatched"] and full["tokens_identical_to_unpatched"]
    assert full["tokens_agree_with_unpatched"] == 1.0
    assert res["unpatch_checks"] == {k: {"class_restored": True, "hooks_left": 0, "logits_bit_identical": True}
                                     for k in ("16", "4", "16+graph", "4+graph")}
    # patched+graph (the CPU stand-in of the captured graph): timed with the others, the eager patch bit for bit
    assert res["cuda_graph_variant"] == "no-capture CPU stand-in"
    assert "patched+graph | graph speedup | graph/ideal |" in out and "patched+graph prefill = eager patch" in out
    for r in res["rows"]:
        _stats_ok(r["prefill"]["patched_graph"], 2)
        assert r["prefill_graph_speedup"] > 0 and r["prefill_graph_over_ideal"] > 0
        assert r["checks"]["graph_prefill_bit_identical_to_patched"]
        assert r["checks"]["graph_last_prefill"] == "replayed"
    assert "patched_graph" not in res["rows"][0]["generate"]


def test_bench_vlm_without_the_graph_variant(capsys):
    from vprune.bench import vlm

    args = _args("bench", "vlm", "--tiny", "--batch", "1", "--keep", "4", "--no-generate", "--rounds", "1",
                 "--no-cuda-graph")
    assert vlm.run(args) == 0
    out = capsys.readouterr().out
    res = args._result
    assert res["cuda_graph_variant"] is None and "patched_graph" not in res["rows"][0]["prefill"]
    assert "patched+graph" not in out and set(res["unpatch_checks"]) == {"4"}


def test_bench_vla_tiny_end_to_end(capsys, tmp_path):
    from vprune.bench import vla

    path = tmp_path / "vla.json"
    args = _args("bench", "vla", "--tiny", "--keep", "1.0", "0.25", "--rounds", "2", "--out", str(path))
    assert vla.run(args) == 0
    out = capsys.readouterr().out
    assert json.loads(path.read_text())["rows"][1]["keep"] == 4
    assert "| 25% (4) |" in out and "| 100% (16) |" in out and "patched/ideal" in out
    res = args._result
    assert res["timing"]["rounds"] == 2
    assert len(res["rows"]) == 2
    for r in res["rows"]:
        for variant in ("unpatched", "patched", "ideal", "short_input"):
            _stats_ok(r["step"][variant], 2)
        for variant in ("unpatched", "ideal", "short_input"):
            _stats_ok(r["prefill"][variant], 2)
        c = r["checks"]
        assert c["first_token_matches_staged"] and c["first_logits_max_abs_diff_vs_staged"] < 1e-5
        assert not c["in_warmup"] and c["kept"] == [r["keep"]]
        assert not c["timed_steps_in_warmup"] and c["timed_steps_kept_k"]
        assert c["control_steps_during_timing"] == res["timing"]["warmup"] + 2
    assert res["rows"][0]["checks"]["tokens_identical_to_unpatched"]
    assert res["rows"][1]["checks"]["pruned"]
    assert all(v == {"class_restored": True, "hooks_left": 0, "tokens_identical": True}
               for v in res["unpatch_checks"].values())


def _fake_device_time(monkeypatch, module):
    """The device-time columns on the CPU: a fake profiler that reports 1 ms per call."""
    monkeypatch.setattr(module, "device_time_available", lambda device: True)
    monkeypatch.setattr(module, "device_time", lambda fn, device, runs: (fn(), {"ms": 1.0, "runs": runs})[1])


def test_bench_vlm_device_columns(monkeypatch, capsys):
    from vprune.bench import vlm

    _fake_device_time(monkeypatch, vlm)
    args = _args("bench", "vlm", "--tiny", "--batch", "1", "--keep", "4", "--new-tokens", "2", "--rounds", "1",
                 "--gen-rounds", "1", "--device-time", "all", "--device-runs", "1")
    assert vlm.run(args) == 0
    out = capsys.readouterr().out
    assert "device: unpatched | patched | ideal" in out and "| 1.0 | 1.0 | 1.0 | 1.00x | 1.000 |" in out
    row = args._result["rows"][0]
    assert row["prefill_device_speedup"] == 1.0 and row["generate_device"]["ideal"]["ms"] == 1.0
    assert row["prefill_device_graph_speedup"] == 1.0 and row["prefill_device_graph_over_ideal"] == 1.0
    assert "| 1.0 | 1.0 | 1.0 | 1.00x | 1.000 | 1.0 | 1.00x | 1.000 |" in out


def test_bench_vla_device_columns(monkeypatch, capsys):
    from vprune.bench import vla

    _fake_device_time(monkeypatch, vla)
    args = _args("bench", "vla", "--tiny", "--keep", "0.25", "--rounds", "1", "--device-runs", "1")
    assert vla.run(args) == 0
    out = capsys.readouterr().out
    assert "host ms: unpatched | patched | ideal" in out and "speedup if only the ideal's device time" in out
    row = args._result["rows"][0]
    assert row["device_patched_over_ideal"] == 1.0
    assert row["host_ms"]["patched"] == row["step"]["patched"]["ms"] - 1.0


def test_interleaved_rounds_shuffle_and_count():
    from vprune.bench import vlm

    calls = []
    variants = {n: (lambda n=n: calls.append(n)) for n in "abcd"}
    times = vlm.interleaved(variants, torch.device("cpu"), warmup=2, rounds=5, seed=3)
    assert calls[:8] == list("aabbccdd")  # warm-up first, untimed
    timed = calls[8:]
    rounds = [timed[i:i + 4] for i in range(0, 20, 4)]
    assert all(sorted(r) == list("abcd") for r in rounds)  # every variant once per round
    assert len({tuple(r) for r in rounds}) > 1  # in changing orders
    rng = random.Random(3)
    expect = []
    for _ in range(5):
        order = list("abcd")
        rng.shuffle(order)
        expect.append(order)
    assert rounds == expect  # seeded
    assert {n: len(t) for n, t in times.items()} == {n: 5 for n in "abcd"}


def test_summarize_and_shifted():
    from vprune.bench import vlm

    s = vlm.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["median_ms"], s["q1_ms"], s["q3_ms"], s["iqr_ms"], s["min_ms"], s["max_ms"]) == (3, 2, 4, 2, 1, 5)
    assert vlm.summarize([7.0])["iqr_ms"] == 0.0
    t = vlm.shifted(s, -1.0, "x")
    assert (t["ms"], t["q1_ms"], t["iqr_ms"], t["all_ms"][0], t["note"]) == (2, 1, 2, 4.0, "x")


def test_trace_busy_counts_overlap_once():
    from vprune.bench import vlm

    ev = [{"ph": "X", "cat": "kernel", "ts": 0, "dur": 10}, {"ph": "X", "cat": "kernel", "ts": 5, "dur": 10},
          {"ph": "X", "cat": "gpu_memcpy", "ts": 20, "dur": 5}, {"ph": "X", "cat": "cpu_op", "ts": 0, "dur": 100},
          {"ph": "i", "cat": "kernel", "ts": 50}]
    got = vlm.trace_busy(ev)
    assert got == {"busy_ms": 0.02, "sum_ms": 0.025, "count": 3.0}


def test_profiled_busy_reads_a_real_trace():
    """The export-and-parse path on the CPU (the GPU run reads kernel events the same way)."""
    from torch.profiler import ProfilerActivity

    from vprune.bench import vlm

    x = torch.randn(64, 64)
    got = vlm.profiled_busy(lambda: [x @ x for _ in range(3)], torch.device("cpu"), [ProfilerActivity.CPU],
                            ["cpu_op"])
    assert got["count"] >= 3 and got["busy_ms"] > 0
    assert vlm.device_time(lambda: None, torch.device("cpu"), 3) is None


def test_shared_clone_shares_weights_and_patching_it_leaves_the_original_alone():
    import vprune
    from vprune.bench import vlm

    dev = torch.device("cpu")
    model, _ = vlm.build_llava(vlm.LLAVA_TINY, dev, torch.float32)
    inputs = vlm.llava_inputs(vlm.LLAVA_TINY, 1, 12, dev, torch.float32)
    hooks, cls = vlm.hook_count(model), type(model)
    clone = vprune.patch(vlm.shared_clone(model), vprune.VisualPruning(keep=4, layer=2, strategy="fastv"))
    assert all(a is b for a, b in zip(model.parameters(), clone.parameters()))
    assert type(model) is cls and vlm.hook_count(model) == hooks and not vprune.api.is_patched(model)
    with torch.no_grad():
        ref = model(**inputs, logits_to_keep=1).logits
        clone(**inputs, logits_to_keep=1)
        assert torch.equal(model(**inputs, logits_to_keep=1).logits, ref)
        vprune.unpatch(clone)
        assert torch.equal(clone(**inputs, logits_to_keep=1).logits, ref)


def test_staged_prefill_matches_pruned_reference():
    """The ideal prefill keeping every row equals the plain model's last logits."""
    from vprune.bench import vlm

    dev = torch.device("cpu")
    model, n_img = vlm.build_llava(vlm.LLAVA_TINY, dev, torch.float32)
    inputs = vlm.llava_inputs(vlm.LLAVA_TINY, 2, 12, dev, torch.float32)
    with torch.no_grad():
        ref = model(**inputs, logits_to_keep=1).logits
        emb, vis = vlm.llava_embeds(model, inputs)
        keep_all = vlm.keep_index(emb.shape[1], vis, n_img, 2)
        out = vlm.staged_prefill(vlm.text_model_of(model), model.lm_head, emb, keep_all, layer=2)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    assert len(model.model.language_model.layers) == 4  # the layer swap was undone


def test_bench_requires_cuda_without_tiny(monkeypatch):
    from vprune.bench import vlm

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA"):
        vlm.require_device(tiny=False)


def test_eval_vlm_table_and_plot(tmp_path):
    from vprune.evaluation import vlm as ev

    res = {"unpruned": 0.8, "text_only_prior": 0.36, "blank_image": 0.3, "shuffled_image": 0.33, "chance": 0.365,
           "samples": 10, "layer": 2, "visual_tokens": 64,
           "cells": [{"strategy": s, "keep": k, "accuracy": 0.8 * k ** 0.1, "relative": k ** 0.1}
                     for s in ("fastv", "random") for k in (1.0, 0.25, 0.05)]}
    md = ev.table_markdown(res, [1.0, 0.25, 0.05], ["fastv", "random"])
    assert "| fastv |" in md and "25% (16)" in md
    path = tmp_path / "p.png"
    ev.plot_png(res, [1.0, 0.25, 0.05], ["fastv", "random"], str(path))
    from PIL import Image

    assert Image.open(path).size == (760, 480)
