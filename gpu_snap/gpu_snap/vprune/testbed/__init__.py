"""Tiny trained models, synthetic tasks and a closed-loop robot sim, shipped with vprune (no download).

Robot policy (OpenVLA-structured, see ``policy.py``) and its 2D pick task (``sim.py``):

    from vprune.testbed import load_policy, load_processor, PickEnv, prompt_for
    policy, processor = load_policy(), load_processor()
    env = PickEnv(); obs = env.reset(seed=0)
    action = policy.predict_action(**processor(prompt_for(obs["instruction"]), obs["image"]))
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
POLICY_WEIGHTS = os.path.join(HERE, "vla_policy.safetensors")
POLICY_CONFIG = os.path.join(HERE, "vla_policy_config.json")


def load_policy(weights: Optional[str] = None, config: Optional[str] = None, dtype: Any = None) -> Any:
    """The shipped testbed robot policy (``TestbedVLAPolicy``), in eval mode on the CPU."""
    import torch
    from safetensors.torch import load_file

    from .policy import TestbedVLAConfig, TestbedVLAPolicy

    weights = weights or POLICY_WEIGHTS
    config = config or POLICY_CONFIG
    if not os.path.exists(weights):
        raise FileNotFoundError(
            f"testbed policy weights not found at {weights}: train them with "
            f"`python -m vprune.testbed.train_policy`")
    with open(config) as f:
        cfg = TestbedVLAConfig(**json.load(f))
    policy = TestbedVLAPolicy(cfg)
    state = load_file(weights)
    missing, unexpected = policy.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"testbed policy weights do not match the model: missing {missing}, "
                           f"unexpected {unexpected}")
    if dtype is not None:
        policy = policy.to(dtype)
    return policy.eval()


def load_processor(fused: bool = False) -> Any:
    """The shipped word-level tokenizer + image processor (``TestbedProcessor``)."""
    from .tokenizer import TestbedProcessor

    return TestbedProcessor.from_pretrained(fused=fused)


def __getattr__(name: str) -> Any:  # lazy: importing vprune.testbed stays cheap
    if name in ("PickEnv", "run_expert"):
        from . import sim
        return getattr(sim, name)
    if name in ("prompt_for", "TestbedProcessor", "TestbedTokenizer", "ActionTokenizer"):
        from . import tokenizer
        return getattr(tokenizer, name)
    if name in ("TestbedVLAPolicy", "TestbedVLAConfig"):
        from . import policy
        return getattr(policy, name)
    if name in ("load_vlm", "VLMTokenizer"):  # the testbed VLM (vlm.py, vqa.py)
        from . import vlm
        return getattr(vlm, name)
    raise AttributeError(name)
