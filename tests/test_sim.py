"""The testbed's closed-loop 2D pick task: determinism, expert success, temporal continuity, rules."""
import numpy as np
import pytest

from vprune.testbed.sim import COLORS, SHAPES, PickEnv, run_expert


def _rollout_frames(seed):
    env = PickEnv()
    obs = env.reset(seed)
    frames, actions = [obs["image"]], []
    while not env.done:
        a = env.expert_action()
        actions.append(a)
        obs, _, _, _ = env.step(a)
        frames.append(obs["image"])
    return obs["instruction"], frames, actions, env.success


def test_reset_is_deterministic_per_seed():
    a, b = _rollout_frames(7), _rollout_frames(7)
    assert a[0] == b[0]
    assert len(a[1]) == len(b[1])
    assert all(np.array_equal(x, y) for x, y in zip(a[1], b[1]))
    c = _rollout_frames(8)
    assert not np.array_equal(a[1][0], c[1][0])


def test_observation_format_and_instruction():
    env = PickEnv()
    obs = env.reset(0)
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
    words = obs["instruction"].split()
    assert words[:3] == ["pick", "up", "the"] and words[3] in COLORS and words[4] in SHAPES
    colors = [o.color for o in env.objects]
    assert len(set(colors)) == len(colors) == 3  # the colour names the target uniquely


def test_expert_succeeds_on_every_seed_in_a_few_dozen_steps():
    results = [run_expert(s) for s in range(100)]
    assert all(r["success"] for r in results)
    steps = [r["steps"] for r in results]
    assert 5 <= min(steps) and max(steps) <= 30
    assert 12 <= np.mean(steps) <= 20


def test_frames_are_temporally_continuous():
    _, frames, _, _ = _rollout_frames(3)
    for f0, f1 in zip(frames[:-2], frames[1:-1]):  # the last frame shows the closed gripper
        changed = np.any(f0 != f1, axis=-1)
        ys, xs = np.nonzero(changed)
        assert changed.sum() < 0.06 * changed.size  # only the gripper moved, by <= 2 px
        if len(ys):
            assert ys.max() - ys.min() <= 14 and xs.max() - xs.min() <= 18


def test_closing_on_a_distractor_fails_and_episode_times_out():
    env = PickEnv()
    env.reset(1)
    other = next(o for i, o in enumerate(env.objects) if i != env.target)
    env.gripper = np.array([other.x, other.y])
    _, reward, done, info = env.step([0, 0, 1])
    assert done and not info["success"] and reward == 0.0
    env = PickEnv(max_steps=5)
    env.reset(1)
    for _ in range(5):
        _, _, done, info = env.step([0, 0, -1])
    assert done and not info["success"] and info["steps"] == 5
    with pytest.raises(RuntimeError):
        env.step([0, 0, -1])


def test_action_validation_and_bounds():
    env = PickEnv()
    env.reset(2)
    with pytest.raises(ValueError):
        env.step([0.0, 1.0])
    with pytest.raises(ValueError):
        env.step([np.nan, 0, 0])
    for _ in range(40):
        if env.done:
            break
        env.step([5.0, -5.0, -1.0])  # clipped to [-1, 1]: stays in the image
    assert 0 <= env.gripper[0] < env.size and 0 <= env.gripper[1] < env.size
