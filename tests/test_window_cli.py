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
