"""Dream integration: shifted logits, padding-aware RoPE positions, patched diffusion_generate."""
import pytest
import torch

import vprune
from vprune import window as W
from vprune.integrations.dream import DreamEngine, diffusion_generate
from vprune.integrations.registry import find_integration
from vprune.testbed.dlm_dream import tiny_dream

torch.set_num_threads(1)


@pytest.fixture()
def model():
    return tiny_dream(0)


def _prompts(b=3, p=6):
    ids = torch.randint(2, 48, (b, p), generator=torch.Generator().manual_seed(5))
    am = torch.ones_like(ids)
    for i in range(b):
        am[i, : (2 * i) % p] = 0
    ids[am == 0] = 0
    return ids, am


def test_registry(model):
    assert find_integration(model).name == "dream"


@pytest.mark.parametrize("batch", [1, 3])
def test_vanilla_equals_host_sampler_and_refresh1_window_equals_vanilla(model, batch):
    ids, am = _prompts(batch)
    host = model.diffusion_generate(ids, attention_mask=am, max_new_tokens=12)
    v = diffusion_generate(model, ids, am, gen_length=12, steps=12)
    w = diffusion_generate(model, ids, am, config=vprune.WindowDiffusion(active=3, window=12, refresh=1),
                           gen_length=12, steps=12)
    assert torch.equal(host, v) and torch.equal(v, w)


@torch.no_grad()
def test_cheap_step_right_after_refresh_equals_full_forward(model):
    """Cached K/V after a refresh are exact: a cheap step over a query subset reproduces the host
    forward's rows (padding-aware RoPE positions included)."""
    ids, am = _prompts(3)
    x = torch.cat([ids, torch.full((3, 8), 1)], 1)
    kv = torch.cat([am.bool(), torch.ones(3, 8, dtype=torch.bool)], 1)
    run = W._setup(ids, am, 8, 1, padding_aware_positions=True)
    eng = DreamEngine(model)
    cache = W.WindowKVCache(eng.n_layers, 3, eng.n_kv_heads, 14, eng.head_dim, torch.float32, torch.device("cpu"))
    full = eng.full_forward(x, kv, cache, run.pos_ids)
    assert torch.equal(full, model(x, kv[:, None, None, :], run.pos_ids).logits)
    qpos = torch.tensor([[6, 7, 13], [5, 9, 10], [8, 11, 12]])
    logits = eng.window_forward(x.gather(1, qpos), run.pos_ids.gather(1, qpos), qpos, kv, cache)
    for i in range(3):
        for j in range(3):
            torch.testing.assert_close(logits[i, j], full[i, qpos[i, j]], rtol=1e-4, atol=1e-4)


def test_cheap_steps_include_left_neighbours_of_active(model):
    ids = torch.randint(2, 48, (1, 5), generator=torch.Generator().manual_seed(6))
    trace = []
    diffusion_generate(model, ids, config=vprune.WindowDiffusion(active=2, window=6, refresh=4),
                       gen_length=12, steps=12, trace=trace)
    cheap = [t for t in trace if t["kind"] == "cheap"]
    assert cheap
    for t in cheap:
        q = set(t["query"][0])
        assert t["active"] and all(p in q and p - 1 in q for _, p in t["active"])


def test_patched_diffusion_generate_and_unpatch(model):
    ids, am = _prompts(3)
    host = model.diffusion_generate(ids, attention_mask=am, max_new_tokens=12)
    cls = type(model)
    vprune.patch(model, vprune.WindowDiffusion(active=3, window=6, refresh=4))
    assert type(model).__name__ == "VPruneDreamModel"
    out = model.diffusion_generate(ids, attention_mask=am, max_new_tokens=12, steps=12, alg="maskgit_plus")
    assert out.shape == host.shape and torch.equal(out[:, :6], ids)
    assert vprune.stats(model)["cheap_steps"] > 0
    res = model.diffusion_generate(ids, attention_mask=am, max_new_tokens=12, steps=12, alg="entropy",
                                   return_dict_in_generate=True)
    assert res.sequences.shape == host.shape
    with pytest.raises(NotImplementedError, match="top_p"):
        model.diffusion_generate(ids, max_new_tokens=12, top_p=0.9)
    with pytest.raises(ValueError, match="alg='bogus'"):
        model.diffusion_generate(ids, max_new_tokens=12, alg="bogus")
    vprune.unpatch(model)
    assert type(model) is cls and "_vprune" not in model.__dict__
    assert torch.equal(model.diffusion_generate(ids, attention_mask=am, max_new_tokens=12), host)


def test_dream_default_window_and_structure_error():
    m = tiny_dream(0)
    vprune.patch(m)
    assert vprune.stats(m)["config"]["window"] == 128
    vprune.unpatch(m)

    class DreamModel(torch.nn.Module):
        pass

    with pytest.raises(vprune.IncompatibleModelError, match="embed_tokens"):
        vprune.patch(DreamModel(), vprune.WindowDiffusion())
