"""vprune.nested: tensors in nested args/kwargs (what the CUDA-graph paths copy before a replay)."""
import torch

from vprune.nested import copy_into, map_tensors


def test_map_tensors_rebuilds_containers_and_keeps_other_values():
    t = torch.arange(6.0).view(2, 3)
    obj = {"a": (t, [t, 3]), "b": None, "c": "x"}
    out = map_tensors(obj, lambda x: x * 2)
    assert isinstance(out["a"], tuple) and isinstance(out["a"][1], list)
    assert torch.equal(out["a"][0], t * 2) and torch.equal(out["a"][1][0], t * 2)
    assert out["a"][1][1] == 3 and out["b"] is None and out["c"] == "x"
    assert torch.equal(t, torch.arange(6.0).view(2, 3))  # the input is untouched


def test_copy_into_writes_every_tensor_in_place():
    dst = {"a": (torch.zeros(2), [torch.zeros(3)]), "n": 1}
    keep = dst["a"][0]
    copy_into(dst, {"a": (torch.ones(2), [torch.full((3,), 2.0)]), "n": 5})
    assert dst["a"][0] is keep and torch.equal(keep, torch.ones(2))
    assert torch.equal(dst["a"][1][0], torch.full((3,), 2.0)) and dst["n"] == 1
