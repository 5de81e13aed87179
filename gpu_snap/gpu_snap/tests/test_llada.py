"""LLaDA integration: registry match, structural check, patch/unpatch, vprune.generate."""
import pytest
import torch

import vprune
from vprune.integrations.llada import diffusion_generate
from vprune.integrations.registry import find_integration
from vprune.testbed import dlm
from vprune.testbed.dlm import tiny_llada

torch.set_num_threads(1)
MASK = 1


@pytest.fixture()
def model():
    return tiny_llada(0, vocab_size=40, mask_token_id=MASK)


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_registry_matches_testbed_class_by_name(model):
    assert find_integration(model).name == "llada"


@torch.no_grad()
def test_patch_generate_unpatch_bit_exact(model):
    ids = torch.randint(2, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[1, :3] = 0
    x = torch.cat([ids, torch.full((2, 16), MASK)], 1)
    kv = torch.cat([am, torch.ones(2, 16, dtype=torch.long)], 1)
    before = model(x, attention_mask=kv).logits
    cls, keys, n_hooks = type(model), set(model.__dict__), _hooks(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    vanilla = diffusion_generate(model, ids, am, gen_length=16, steps=16)

    vprune.patch(model, vprune.WindowDiffusion(active=4, window=8, refresh=4))
    assert type(model).__name__ == "VPruneLLaDAModelLM" and isinstance(model, cls)
    assert torch.equal(model(x, attention_mask=kv).logits, before)  # forward unchanged while patched
    out = vprune.generate(model, ids, am, gen_length=16, steps=16)
    assert out.shape == (2, 25) and torch.equal(out[:, :9], ids)
    s = vprune.stats(model)
    assert s["integration"] == "llada" and s["sampler"] == "window" and s["refreshes"] >= 4 and s["cheap_steps"] > 0
    again = vprune.generate(model, ids, am, gen_length=16, steps=16, window=False)
    assert torch.equal(again, vanilla) and vprune.stats(model)["sampler"] == "vanilla"
    assert _hooks(model) == n_hooks  # refresh hooks live only during the call

    vprune.patch(model, vprune.WindowDiffusion(active=4, window=8, refresh=4))  # equal config: no-op
    with pytest.raises(vprune.AlreadyPatchedError):
        vprune.patch(model, vprune.WindowDiffusion(active=2, window=8, refresh=4))

    vprune.unpatch(model)
    assert type(model) is cls and set(model.__dict__) == keys and _hooks(model) == n_hooks
    assert torch.equal(model(x, attention_mask=kv).logits, before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    with pytest.raises(vprune.NotPatchedError):
        vprune.unpatch(model)
    with pytest.raises(vprune.NotPatchedError):
        vprune.generate(model, ids, gen_length=16)


def test_refresh1_window_equals_vanilla_through_api(model):
    ids = torch.randint(2, 40, (1, 5), generator=torch.Generator().manual_seed(4))
    v = diffusion_generate(model, ids, gen_length=16, steps=16, block_length=8)
    with vprune.patched(model, vprune.WindowDiffusion(active=16, window=16, refresh=1)):
        w = vprune.generate(model, ids, gen_length=16, steps=16, block_length=8)
    assert torch.equal(v, w)


def test_structural_check_names_missing_parts():
    class LLaDAModelLM(torch.nn.Module):  # right name, wrong insides
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.transformer = torch.nn.ModuleDict(dict(wte=torch.nn.Embedding(4, 4)))

    m = LLaDAModelLM()
    with pytest.raises(vprune.IncompatibleModelError, match="ln_f"):
        vprune.patch(m, vprune.WindowDiffusion())
    assert type(m) is LLaDAModelLM and "_vprune" not in m.__dict__


def test_block_missing_attribute_is_reported(model):
    del model.model.transformer.blocks[1].up_proj
    with pytest.raises(vprune.IncompatibleModelError, match=r"block 1\.up_proj"):
        vprune.patch(model, vprune.WindowDiffusion())


def test_failed_apply_leaves_model_unchanged(model, monkeypatch):
    from vprune.integrations import llada

    def boom(self, model, config, state):
        state.undo.swap_class(model, type("X", (type(model),), {}))
        raise RuntimeError("boom")

    monkeypatch.setattr(llada.LLaDAIntegration, "apply", boom)
    cls = type(model)
    with pytest.raises(RuntimeError, match="boom"):
        vprune.patch(model, vprune.WindowDiffusion())
    assert type(model) is cls and not vprune.is_patched(model)


def test_testbed_task_roundtrip():
    ps = dlm.make_problems(50, seed=1)
    for p in ps:
        ans = p.answer_ids()
        assert 64 <= len(ans) <= 224 and len(ans) % 4 == 0
        assert len(p.target()) == dlm.GEN_LENGTH
    ids, am = dlm.left_pad([p.prompt_ids() for p in ps[:4]])
    assert ids.shape[0] == 4 and (am.sum(1) == torch.tensor([len(p.prompt_ids()) for p in ps[:4]])).all()
    tgt = torch.tensor([p.target() for p in ps[:4]])
    assert dlm.exact_match(tgt, ps[:4]) == [True] * 4
