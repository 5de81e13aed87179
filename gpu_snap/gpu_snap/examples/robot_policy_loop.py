"""The control loop a robotics user writes, with vprune as the one added line.

Runs the shipped testbed policy (an OpenVLA-structured VLA, no download) in its closed-loop 2D pick
task. With OpenVLA itself the loop is the same: load the policy with
``AutoModelForVision2Seq.from_pretrained("openvla/openvla-7b", trust_remote_code=True)`` and its
processor, and use your environment instead of ``PickEnv``.

    python examples/robot_policy_loop.py                 # pruned (dual, 25% of visual tokens)
    python examples/robot_policy_loop.py --unpruned      # the same episodes without vprune
"""
import argparse
import time

import numpy as np
import torch

import vprune
from vprune.testbed import PickEnv, load_policy, load_processor, prompt_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--unpruned", action="store_true")
    args = parser.parse_args()

    policy = load_policy()          # OpenVLA: AutoModelForVision2Seq.from_pretrained(..., trust_remote_code=True)
    processor = load_processor()    # OpenVLA: AutoProcessor.from_pretrained(..., trust_remote_code=True)
    if not args.unpruned:
        vprune.patch(policy, keep=args.keep)   # <- the one added line (dual-level pruning for VLAs)

    env = PickEnv()
    successes, latencies, own_ms = [], [], []
    for episode in range(args.episodes):
        obs = env.reset(seed=episode)
        if vprune.is_patched(policy):
            vprune.reset(policy)               # new episode: clear the action-attention history
        prompt = prompt_for(obs["instruction"])  # "In: What action should the robot take to ...?\nOut:"
        done, info = False, {"success": False}
        while not done:
            inputs = processor(prompt, obs["image"])
            t0 = time.perf_counter()
            with torch.inference_mode():
                action = policy.predict_action(**inputs, unnorm_key="pick2d", do_sample=False)
            latencies.append(time.perf_counter() - t0)
            if vprune.is_patched(policy):       # vprune's own host time in that step (scoring, selection, ...)
                own_ms.append(vprune.stats(policy)["overhead_ms"]["total"])
            obs, reward, done, info = env.step(action)
        successes.append(info["success"])
        print(f"episode {episode}: {'success' if info['success'] else 'failure'} in {info['steps']} steps "
              f"({obs['instruction']})")

    label = "unpruned" if args.unpruned else f"vprune keep={args.keep}"
    print(f"{label}: success rate {np.mean(successes) * 100:.0f}% over {args.episodes} episodes, "
          f"{np.mean(latencies) * 1e3:.1f} ms per step ({len(latencies)} steps)")
    if vprune.is_patched(policy):
        st = vprune.stats(policy)
        row = (st.get("per_sample") or [{}])[0]
        print(f"last step kept {row.get('visual_after')} of {row.get('visual_before')} visual tokens "
              f"from layer {st.get('layer')}; vprune's own time {np.mean(own_ms):.2f} ms per step "
              f"(warm-up steps included)")


if __name__ == "__main__":
    main()
