"""Closed-loop rollouts of a policy in ``sim.PickEnv``: what training, tests, the demo and eval share.

``rollout(policy, processor, seeds, batch=...)`` runs one episode per seed. With ``batch`` > 1 the
episodes of a batch run in lock-step through one ``predict_action`` call per step; the batch keeps
its rows fixed until all its episodes end (a finished episode keeps feeding its last frame and its
actions are ignored), so per-row temporal state (vprune's action-attention history) stays aligned
with its episode. ``vprune.reset(policy)`` is called before each batch when the policy is patched.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .sim import PickEnv
from .tokenizer import prompt_for


def rollout(policy: Any, processor: Any, seeds: Sequence[int], batch: int = 1,
            on_step: Optional[Callable[[Dict[str, Any]], None]] = None,
            on_episode: Optional[Callable[[Dict[str, Any]], None]] = None,
            env_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Run one episode per seed; returns success_rate, per-episode results and step timings.

    on_step(info): called after each policy step with {"episode_index" (index in ``seeds`` of the
        batch's first episode), "episode_rows", "step", "latency_s", "images" (the frames the policy
        saw), "instructions"}.
    on_episode(result): called when an episode ends ({"seed", "success", "steps"}).
    Returned "step_latency_s": wall time of each ``predict_action`` call (a batched call counts once).
    """
    import vprune

    patched = vprune.is_patched(policy)
    results: List[Dict[str, Any]] = []
    latencies: List[float] = []
    seeds = list(seeds)
    for start in range(0, len(seeds), batch):
        chunk = seeds[start:start + batch]
        envs = [PickEnv(**(env_kwargs or {})) for _ in chunk]
        obs = [env.reset(seed) for env, seed in zip(envs, chunk)]
        prompts = [prompt_for(o["instruction"]) for o in obs]
        if patched:
            vprune.reset(policy)
        done = [False] * len(chunk)
        step = 0
        while not all(done):
            images = [o["image"] for o in obs]
            inputs = processor(prompts if len(chunk) > 1 else prompts[0],
                               images if len(chunk) > 1 else images[0])
            t0 = time.perf_counter()
            with torch.inference_mode():
                actions = policy.predict_action(**inputs, do_sample=False)
            latencies.append(time.perf_counter() - t0)
            actions = np.asarray(actions).reshape(len(chunk), -1)
            for i, env in enumerate(envs):
                if done[i]:
                    continue
                obs[i], _, d, info = env.step(actions[i])
                if d:
                    done[i] = True
                    res = {"seed": chunk[i], "success": bool(info["success"]), "steps": int(info["steps"])}
                    results.append(res)
                    if on_episode is not None:
                        on_episode(res)
            step += 1
            if on_step is not None:
                on_step({"episode_index": start, "episode_rows": len(chunk), "step": step,
                         "latency_s": latencies[-1], "images": images,
                         "instructions": [o["instruction"] for o in obs]})
    results.sort(key=lambda r: seeds.index(r["seed"]))
    return {
        "success_rate": float(np.mean([r["success"] for r in results])) if results else 0.0,
        "episodes": results,
        "step_latency_s": latencies,
        "steps": int(sum(r["steps"] for r in results)),
    }
