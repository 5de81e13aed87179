"""patch / unpatch / patched / reset / stats with a minimal registered integration (no host library)."""
import pytest
import torch

import vprune
from vprune.undo import vprune_subclass
from integrations_fixture import ToyIntegration, ToyModel  # noqa: F401  (tests/ is on sys.path)


@pytest.fixture
def toy():
    torch.manual_seed(0)
    return ToyModel()


def test_unsupported_model_names_class_and_lists_supported():
    with pytest.raises(vprune.UnsupportedModelError) as exc:
        vprune.patch(torch.nn.Linear(2, 2), keep=0.5)
    assert "Linear" in str(exc.value) and "LlavaForConditionalGeneration" in str(exc.value)


def test_patch_then_unpatch_is_bit_exact(toy):
    x = torch.randn(3, 8)
    before = toy(x)
    state_before = {k: v.clone() for k, v in toy.state_dict().items()}
    vprune.patch(toy, keep=0.5)
    assert type(toy).__name__ == "VPruneToyModel"
    assert not torch.equal(toy(x), before)  # the patch does something
    vprune.unpatch(toy)
    assert type(toy) is ToyModel
    assert "_vprune" not in toy.__dict__ and "scale" not in toy.__dict__
    assert torch.equal(toy(x), before)
    assert all(torch.equal(state_before[k], v) for k, v in toy.state_dict().items())
    assert not toy._forward_hooks


def test_patch_twice_equal_is_noop_different_raises(toy):
    vprune.patch(toy, keep=0.5)
    vprune.patch(toy, keep=0.5)
    with pytest.raises(vprune.AlreadyPatchedError, match="unpatch"):
        vprune.patch(toy, keep=0.25)
    vprune.unpatch(toy)


def test_unpatch_unpatched_raises(toy):
    with pytest.raises(vprune.NotPatchedError, match="not patched"):
        vprune.unpatch(toy)
    for fn in (vprune.reset, vprune.stats):
        with pytest.raises(vprune.NotPatchedError):
            fn(toy)


def test_failed_patch_leaves_model_exactly_as_it_was(toy):
    x = torch.randn(3, 8)
    before = toy(x)
    with pytest.raises(RuntimeError, match="planned failure"):
        vprune.patch(toy, keep=0.5, seed=13)  # seed=13 makes ToyIntegration fail after its changes
    assert type(toy) is ToyModel and not vprune.is_patched(toy)
    assert not toy._forward_hooks and "scale" not in toy.__dict__
    assert torch.equal(toy(x), before)


def test_patched_context_manager_always_unpatches(toy):
    x = torch.randn(2, 8)
    before = toy(x)
    with pytest.raises(KeyError):
        with vprune.patched(toy, keep=0.5):
            assert vprune.is_patched(toy)
            raise KeyError("user error inside the block")
    assert not vprune.is_patched(toy)
    assert torch.equal(toy(x), before)


def test_config_object_and_overrides(toy):
    vprune.patch(toy, vprune.VisualPruning(keep=0.5), keep=0.75)
    assert vprune.stats(toy)["config"]["keep"] == 0.75
    vprune.unpatch(toy)
    with pytest.raises(TypeError, match="vprune config"):
        vprune.patch(toy, {"keep": 0.5})
    with pytest.raises(ValueError, match="supports"):
        vprune.patch(toy, vprune.NATCache())
    assert not vprune.is_patched(toy)


def test_stats_and_reset_reach_the_integration(toy):
    vprune.patch(toy, keep=0.5)
    toy(torch.randn(2, 8))
    s = vprune.stats(toy)
    assert s["integration"] == "toy" and s["targets"] == ["linear"] and s["calls"] == 1
    vprune.reset(toy)
    assert vprune.stats(toy)["calls"] == 0
    vprune.unpatch(toy)


def test_class_swap_reuses_one_subclass_per_host_class():
    a = vprune_subclass(ToyModel, {"extra": 1}, tag="t")
    b = vprune_subclass(ToyModel, {"extra": 2}, tag="t")
    assert a is b and a.__name__ == "VPruneToyModel" and issubclass(a, ToyModel)


def test_import_changes_nothing_in_host_libraries():
    import subprocess
    import sys
    code = ("import transformers.models.llama.modeling_llama as m; before = dict(vars(m)); "
            "import vprune; after = dict(vars(m)); "
            "changed = [k for k in before if before[k] is not after.get(k)]; "
            "assert not changed and set(before) == set(after), changed; "
            "from transformers import AttentionInterface; "
            "assert not any('vprune' in k for k in AttentionInterface._global_mapping), 'registered at import'")
    subprocess.run([sys.executable, "-c", code], check=True)
