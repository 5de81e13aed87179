"""`vprune demo` and `vprune eval vla` end to end on the shipped testbed policy (tiny settings)."""
import json

import pytest

from PIL import Image

from vprune.cli import main


def test_demo_prints_table_and_writes_png(tmp_path, capsys):
    png, js = tmp_path / "demo.png", tmp_path / "demo.json"
    assert main(["demo", "--episodes", "1", "--png", str(png), "--json", str(js), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "unpruned" in out and "dual 25%" in out and "LLM FLOPs skipped" in out
    assert "vprune's own time" in out
    assert Image.open(png).size[0] > 256
    rows = json.loads(js.read_text())["rows"]
    assert rows[0]["visual_tokens_per_step"] == 64
    assert rows[1]["visual_tokens_per_step"] < 64 and rows[1]["flops_skipped_frac"] > 0


def test_eval_vla_table_plot_and_checks(tmp_path, capsys):
    plot, js = tmp_path / "eval.png", tmp_path / "eval.json"
    argv = ["eval", "vla", "--episodes", "2", "--batch", "2", "--keeps", "1.0,0.25", "--strategies",
            "dual,dual:prefill_mean", "--overhead-episodes", "1", "--overhead-strategy", "dual:prefill_mean",
            "--plot", str(plot), "--json", str(js), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "dual" in out and "25%" in out
    res = json.loads(js.read_text())
    assert {c["keep"] for c in res["configs"]} == {1.0, 0.25}
    assert {c["strategy"] for c in res["configs"]} == {None, "dual", "dual:prefill_mean"}
    assert [c["target"] for c in res["checks"]][:2] == ["dual @25% >= 95% of unpruned success",
                                                        "dual:prefill_mean @25% >= 95% of unpruned success"]
    o = res["overhead"]
    assert o["strategy"] == "dual:prefill_mean"
    assert o["measured"] and o["overhead_ms_per_step"] > 0 and o["pruned_steps"] > 0
    assert 0 < o["scoring_selection_frac"] <= o["overhead_frac"] < 1 and o["unpruned_step_ms"] > 0
    assert set(o["by_part_ms_per_step"]) == {"scoring", "selection", "other"}
    assert "pruning overhead of dual:prefill_mean (scoring + selection + diversity)" in out
    assert Image.open(plot).size == (560, 360)


def test_eval_vla_strategy_specs():
    from vprune.evaluation.vla import strategy_kwargs

    assert strategy_kwargs("fastv") == {"strategy": "fastv"}
    assert strategy_kwargs("dual:prefill_mean") == {"strategy": "dual", "semantic": "prefill_mean"}
    for bad in ("", "dual:", ":last"):
        with pytest.raises(ValueError, match="strategy"):
            strategy_kwargs(bad)
    with pytest.raises(ValueError, match="semantic"):  # the config names the bad semantic score
        main(["eval", "vla", "--episodes", "1", "--strategies", "dual:nope", "--no-progress"])


def test_demo_semantic_option(tmp_path, capsys):
    png = tmp_path / "demo.png"
    assert main(["demo", "--episodes", "1", "--semantic", "prefill_mean", "--png", str(png), "--no-progress"]) == 0
    assert "dual:prefill_mean 25% (K=2)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="semantic"):
        main(["demo", "--episodes", "1", "--semantic", "middle", "--no-progress"])
