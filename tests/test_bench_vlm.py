"""`vprune bench vlm|vla --tiny` (CPU smoke runs of the GPU benchmarks' code paths) and `eval vlm` helpers."""
import argparse

import pytest
import torch

from vprune.cli import build_parser


def _args(*argv):
    return build_parser().parse_args(list(argv))


def test_bench_vlm_tiny_runs_and_reports(capsys):
    from vprune.bench import vlm

    args = _args("bench", "vlm", "--tiny", "--batch", "2", "--keep", "4", "--new-tokens", "2")
    assert vlm.run(args) == 0
    out = capsys.readouterr().out
    assert "| 2 | 4/16 |" in out and "over ideal" in out


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


def test_bench_vla_tiny_runs(capsys):
    from vprune.bench import vla

    args = _args("bench", "vla", "--tiny", "--keep", "0.25")
    assert vla.run(args) == 0
    out = capsys.readouterr().out
    assert "25% (4)" in out


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
