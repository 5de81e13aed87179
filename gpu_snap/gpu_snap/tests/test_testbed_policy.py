"""The shipped testbed robot policy: OpenVLA structure, committed weights, generation, closed loop."""
import json

import numpy as np
import pytest
import torch

from vprune.testbed import POLICY_CONFIG, load_policy, load_processor
from vprune.testbed.policy import TestbedVLAConfig, TestbedVLAPolicy, cache_length
from vprune.testbed.sim import PickEnv
from vprune.testbed.tokenizer import ActionTokenizer, TestbedProcessor, TestbedTokenizer, build_vocab, prompt_for

# The bar the shipped weights are meant to clear on seeds 0..9. The weights committed so far were
# trained on the CPU within minutes and do NOT reach it (see vla_policy_config.json "measured"): the
# test is an expected failure until weights trained longer (e.g. on a GPU) are committed.
SUCCESS_BAR = 0.8


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return load_policy()


@pytest.fixture(scope="module")
def processor():
    return load_processor()


def _inputs(processor, seed=0, n=1):
    env = PickEnv()
    obs = [env.reset(seed + i) for i in range(n)]
    prompts = [prompt_for(o["instruction"]) for o in obs]
    if n == 1:
        return processor(prompts[0], obs[0]["image"])
    return processor(prompts, [o["image"] for o in obs])


def test_openvla_structure(policy):
    from timm.models.vision_transformer import VisionTransformer
    from transformers import LlamaForCausalLM

    assert type(policy).__name__ == "TestbedVLAPolicy"
    assert isinstance(policy.vision_backbone.featurizer, VisionTransformer)
    assert not policy.vision_backbone.use_fused_vision_backbone
    assert isinstance(policy.language_model, LlamaForCausalLM)
    assert policy.projector.fc1.in_features == policy.vision_backbone.embed_dim
    assert policy.projector.fc2.out_features == policy.language_model.config.hidden_size
    assert policy.config.n_action_bins == 256
    assert policy.get_action_dim() == 3 and "pick2d" in policy.norm_stats
    assert policy.config.num_patches == 64
    assert len(policy.language_model.model.layers) >= 4


def test_registered_with_the_openvla_integration(policy):
    from vprune.integrations.registry import match_host_class

    assert match_host_class(policy) == "TestbedVLAPolicy"


def test_weights_and_config_are_committed_and_small():
    import os

    from vprune.testbed import POLICY_WEIGHTS

    assert os.path.getsize(POLICY_WEIGHTS) < 8 * 2**20
    with open(POLICY_CONFIG) as f:
        cfg = json.load(f)
    assert TestbedVLAConfig(**cfg).text_config.num_hidden_layers == cfg["text_config"]["num_hidden_layers"]


def test_featurizer_returns_patch_tokens(policy, processor):
    inp = _inputs(processor)
    with torch.no_grad():
        feats = policy.vision_backbone(inp["pixel_values"])
    assert feats.shape == (1, 64, policy.vision_backbone.embed_dim)


def test_predict_action_shapes_and_range(policy, processor):
    with torch.no_grad():
        a = policy.predict_action(**_inputs(processor), do_sample=False)
        b = policy.predict_action(**_inputs(processor, n=3), do_sample=False)
    assert a.shape == (3,) and b.shape == (3, 3)
    assert np.all(np.abs(b) <= 1.0)
    np.testing.assert_allclose(b[0], a, atol=1e-6)  # batching does not change row 0


def test_vision_tower_runs_on_the_first_step_only(policy, processor):
    calls = []
    h = policy.vision_backbone.featurizer.register_forward_hook(lambda *args: calls.append(1))
    seen = []
    orig = policy.forward

    def spy(*args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen.append((cache_length(cache), kwargs.get("pixel_values") is not None))
        return orig(*args, **kwargs)

    policy.forward = spy
    try:
        with torch.no_grad():
            policy.predict_action(**_inputs(processor), do_sample=False)
    finally:
        del policy.forward
        h.remove()
    assert len(calls) == 1
    assert len(seen) == 3  # prefill + 2 decode steps for 3 action tokens
    assert seen[0] == (0, True)
    assert all(past > 0 and not pix for past, pix in seen[1:])


def test_generate_matches_uncached_greedy_decoding(policy, processor):
    inp = _inputs(processor, seed=4)
    with torch.no_grad():
        out = policy.generate(**inp, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        ids = inp["input_ids"]
        for _ in range(3):  # full recompute, no cache: positions and visual tokens from scratch
            logits = policy(input_ids=ids, pixel_values=inp["pixel_values"], use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out[:, -3:], ids[:, -3:])
    assert bool((out[:, -3:] >= policy.vocab_size - 256).all())  # action tokens are the last ids


def test_action_tokenizer_round_trip():
    at = ActionTokenizer(vocab_size=320, n_bins=256)
    a = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    ids = at.encode(a)
    assert ids.min() >= 320 - 256 and ids.max() <= 319
    np.testing.assert_allclose(at.decode(ids), a, atol=1 / 128)


def test_tokenizer_prompt():
    tok = TestbedTokenizer(build_vocab())
    ids = tok.encode(prompt_for("pick up the red square"))
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert max(ids) < 64


def test_fused_backbone_variant_runs():
    cfg = TestbedVLAConfig(use_fused_vision_backbone=True)
    model = TestbedVLAPolicy(cfg).eval()
    proc = TestbedProcessor(TestbedTokenizer(build_vocab()), fused=True)
    obs = PickEnv().reset(0)
    inp = proc(prompt_for(obs["instruction"]), obs["image"])
    assert inp["pixel_values"].shape[1] == 6
    with torch.no_grad():
        assert model.vision_backbone(inp["pixel_values"]).shape[-1] == model.vision_backbone.embed_dim
        assert model.predict_action(**inp).shape == (3,)


def test_unpruned_closed_loop_success(policy, processor):
    from vprune.testbed.policy_rollout import rollout

    res = rollout(policy, processor, range(10), batch=5)
    assert res["success_rate"] >= SUCCESS_BAR, res["episodes"]


def test_keep_set_probe_measures_target_coverage(policy, processor):
    """vla_probe reads the keep sets and the frames' patch contents: the budget is exact, coverages are
    shares, and the prefill-mean semantic score keeps most of the target (the probe can tell configs apart)."""
    from vprune.evaluation.vla_probe import _parse_config, probe_config

    r = probe_config(policy, processor, [0, 1], _parse_config("dual:prefill_mean", 0.25, None), batch=2)
    assert r["pruned_steps"] > 0 and r["tokens_kept"] == pytest.approx(0.25)
    assert 0.0 <= r["gripper_patches_kept"] <= 1.0
    assert r["target_patches_kept"] > 0.5
    assert _parse_config("fastv", 0.5, 3) == {"keep": 0.5, "strategy": "fastv", "layer": 3}
