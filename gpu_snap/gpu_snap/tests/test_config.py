"""Config validation and serialisation."""
import json

import pytest

import vprune
from vprune.config import TechniqueConfig


@pytest.mark.parametrize("keep", [0, 0.0, -1, -0.5, 1.5, float("nan"), float("inf"), True, "half", None])
def test_bad_keep_names_field_value_and_range(keep):
    with pytest.raises(ValueError) as exc:
        vprune.VisualPruning(keep=keep)
    msg = str(exc.value)
    assert "VisualPruning.keep" in msg and repr(keep) in msg and "allowed" in msg


@pytest.mark.parametrize("field,value", [("layer", 0), ("layer", -2), ("strategy", "fastest"),
                                         ("history", 0), ("decay", 0.0), ("decay", 1.5),
                                         ("semantic", "mean"), ("warmup", -1), ("seed", -1),
                                         ("cuda_graph", 1), ("cuda_graph", "yes"), ("cuda_graph", None)])
def test_bad_fields(field, value):
    with pytest.raises(ValueError, match=f"VisualPruning.{field}="):
        vprune.VisualPruning(**{field: value})


def test_budget_fraction_and_count_are_clamped():
    assert vprune.VisualPruning(keep=0.25).budget(576) == 144
    assert vprune.VisualPruning(keep=1.0).budget(576) == 576
    assert vprune.VisualPruning(keep=0.001).budget(100) == 1
    assert vprune.VisualPruning(keep=64).budget(576) == 64
    assert vprune.VisualPruning(keep=1000).budget(576) == 576
    assert vprune.VisualPruning(keep=64).budget(0) == 0


@pytest.mark.parametrize("cfg", [vprune.VisualPruning(keep=64, layer=3, strategy="dual"),
                                 vprune.VisualPruning(keep=64, layer=2, cuda_graph=True),
                                 vprune.WindowDiffusion(), vprune.NATCache()])
def test_round_trip_through_json(cfg):
    data = json.loads(json.dumps(cfg.to_dict()))
    assert TechniqueConfig.from_dict(data) == cfg


def test_from_dict_rejects_unknown_technique_and_fields():
    with pytest.raises(ValueError, match="unknown technique"):
        TechniqueConfig.from_dict({"technique": "magic"})
    with pytest.raises(ValueError, match="no field"):
        TechniqueConfig.from_dict({"technique": "visual_pruning", "kep": 0.5})


def test_replace_validates_and_rejects_unknown_fields():
    cfg = vprune.VisualPruning()
    assert cfg.replace(keep=0.5).keep == 0.5
    with pytest.raises(ValueError):
        cfg.replace(keep=2.0)
    with pytest.raises(TypeError, match="no field"):
        cfg.replace(kep=0.5)


def test_configs_compare_by_value():
    assert vprune.VisualPruning(keep=0.5) == vprune.VisualPruning(keep=0.5)
    assert vprune.VisualPruning(keep=0.5) != vprune.VisualPruning(keep=0.25)


def test_visual_pruning_cuda_graph_defaults_off_and_compares_by_value():
    assert vprune.VisualPruning().cuda_graph is False
    assert vprune.VisualPruning(cuda_graph=True) != vprune.VisualPruning()
    assert vprune.VisualPruning(cuda_graph=True).to_dict()["cuda_graph"] is True
