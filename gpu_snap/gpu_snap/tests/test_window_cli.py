"""`vprune bench dlm --tiny` and `vprune eval dlm` smoke tests (CPU, small)."""
import json
import os

import pytest
import torch

from vprune import cli
from vprune.testbed import dlm

torch.set_num_threads(1)


def test_bench_dlm_tiny(tmp_path):
    out = tmp_path / "b.json"
    assert cli.main(["bench", "dlm", "--tiny", "--gens", "16", "--batches", "2", "--vanilla-steps", "2",
                     "--active", "4", "--window", "8", "--refresh", "4", "--parallel-tps", "2",
                     "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    r = data["results"][0]
    assert r["gen_length"] == 16 and r["batch"] == 2 and r["vanilla_timed_steps"] == 2
    assert r["refreshes"] == 4 and r["cheap_steps"] == 12 and 0 < r["computed_tokens_rel"] < 1
    assert r["parallel_steps"] == 8 and "window_parallel_speedup" in r
    assert {"card", "date", "versions", "command", "notes"} <= set(data)


def test_bench_dlm_without_cuda_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert cli.main(["bench", "dlm", "--quick"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.exists(dlm.WEIGHTS), reason="testbed weights not trained yet")
def test_eval_dlm_small(tmp_path):
    out = tmp_path / "e.json"
    assert cli.main(["eval", "dlm", "--n", "4", "--batch", "4", "--only", "0,6", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    assert [r["setting"] for r in res] == ["vanilla", "window + parallel 0.9"]
    assert res[1]["tokens_per_step"] > 1.0 and res[1]["computed_tokens_rel"] < 1.0
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in res)


def test_eval_dlm_settings_parser():
    from vprune.evaluation import dlm as ev

    s = ev.parse_settings("16/64/1,16/all/32,vanilla:32,16/64/32@0.9,vanilla@0.9:64", 256)
    assert s[0].name == "vanilla" and s[0].config is None  # the baseline is prepended
    assert (s[1].config.active, s[1].config.window, s[1].config.refresh) == (16, 64, 1)
    assert s[2].config.window == 256  # 'all': no far-field
    assert s[3].config is None and s[3].block_length == 32 and s[3].threshold is None
    assert s[4].config.threshold == 0.9 and s[4].block_length is None
    assert s[5].config is None and s[5].threshold == 0.9 and s[5].block_length == 64
    assert [x.name for x in ev.parse_settings(None, 256)] == [x.name for x in ev.SETTINGS]
    abl = ev.parse_settings("ablation", 256)
    assert abl[0].name == "vanilla" and len(abl) == 8  # vanilla not repeated
    for bad, msg in [("16/64", "A/W/R"), ("a/64/32", "ints"), ("16/64/32@x", "threshold"),
                     ("vanilla:x", "block length"), ("32/16/4", "active=32"), ("vanilla@2", "threshold=2")]:
        with pytest.raises(ValueError, match=msg):
            ev.parse_settings(bad, 256)


def test_eval_dlm_statistics():
    from vprune.evaluation import dlm as ev

    lo, hi = ev.wilson(48, 64)
    assert abs(lo - 0.632) < 1e-3 and abs(hi - 0.840) < 1e-3  # 48/64
    assert ev.wilson(0, 10)[0] == 0.0 and ev.wilson(10, 10)[1] == 1.0
    assert ev.mcnemar_p(0, 0) == 1.0
    assert abs(ev.mcnemar_p(0, 5) - 2 / 32) < 1e-12 and abs(ev.mcnemar_p(3, 10) - 0.0923) < 1e-3
    assert 0.0 < ev.mcnemar_p(600, 700) < 0.01 and ev.mcnemar_p(2000, 2000) == 1.0  # m > 1023: no float overflow
    same = [True, False] * 50
    assert ev.paired_ratio_ci(same, same) == (1.0, 1.0)  # paired: identical outcomes, no spread
    lo, hi = ev.paired_ratio_ci([True] * 40 + [False] * 60, [True] * 50 + [False] * 50)
    assert lo < 0.8 < hi and hi < 1.0


@pytest.mark.skipif(not os.path.exists(dlm.WEIGHTS), reason="testbed weights not trained yet")
def test_eval_dlm_settings_cli(tmp_path):
    out = tmp_path / "s.json"
    assert cli.main(["eval", "dlm", "--n", "3", "--batch", "2", "--settings", "16/64/32@0.9,vanilla@0.9",
                     "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    res = data["results"]
    assert [r["setting"] for r in res] == ["vanilla", "window 16/64/32@0.9", "vanilla@0.9"]
    for r in res:
        assert r["n"] == 3 and 0 <= r["correct"] <= 3 and len(r["solved"]) == r["correct"]
        lo, hi = r["accuracy_ci95"]
        assert 0.0 <= lo <= r["accuracy"] <= hi <= 1.0
        assert r["vanilla_only"] + r["setting_only"] <= 3 and 0.0 <= r["mcnemar_p"] <= 1.0
    assert res[1]["config"]["threshold"] == 0.9 and res[2]["threshold"] == 0.9
