"""A tiny closed-loop 2D manipulation task for the testbed robot policy (numpy + PIL, seeded).

Three objects of distinct colours (red, green, blue, yellow, purple) and random shapes (square,
circle, triangle) lie on a textured table; one is the target, named in the instruction ("pick up the
red square"), the others are distractors. A white, open, U-shaped gripper moves above them.

The camera is mounted on the gripper (a wrist view, ``egocentric=True``, the default): the
``size`` x ``size`` frame (64 px) is centred on the gripper, which is always drawn at the centre, and
the table, its texture and the objects shift as the gripper moves. Objects and the gripper start in
a 29 px region, so the target is always in view. ``egocentric=False`` renders a fixed top-down view.

Action: ``[dx, dy, grip]`` in [-1, 1]. The gripper moves by ``round(dx * max_step)``,
``round(dy * max_step)`` pixels (``max_step`` = 1); ``grip > 0`` closes it, which ends the episode:
success if the gripper centre is within ``tolerance`` (2 px, Chebyshev) of the target's centre,
failure otherwise (closing on a distractor or on the table). An episode also ends, failed, after
``max_steps`` (48) steps.

Consecutive frames are temporally continuous: the scene shifts by at most one pixel a step.

The scripted expert (``expert_action``) moves straight to the target one pixel per step and closes
when within 1 px. Expert episodes take 12-28 steps (about 19 on average).

    env = PickEnv(seed=0)
    obs = env.reset()                       # {"image": uint8 [H, W, 3], "instruction": str}
    obs, reward, done, info = env.step(env.expert_action())
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
}
SHAPES: Tuple[str, ...] = ("square", "circle", "triangle")
BACKGROUND = (120, 100, 80)
GRIPPER_COLOR = (245, 245, 245)
ACTION_DIM = 3


@dataclass
class SceneObject:
    color: str
    shape: str
    x: int
    y: int


class PickEnv:
    """One episode at a time of the pick task. ``reset(seed)`` makes an episode reproducible.

    size: image side in pixels. n_objects: objects on the table (target included, <= 5).
    max_steps: steps before the episode ends as a failure. max_step: pixels per unit action.
    tolerance: Chebyshev distance (px) from the target centre at which closing succeeds.
    """

    def __init__(self, seed: Optional[int] = None, size: int = 64, n_objects: int = 3,
                 max_steps: int = 48, max_step: int = 1, tolerance: int = 2, object_size: int = 8,
                 egocentric: bool = True, spread: int = 29):
        if not 1 <= n_objects <= len(COLORS):
            raise ValueError(f"n_objects={n_objects} is invalid: allowed 1..{len(COLORS)}")
        self.size = size
        self.egocentric = egocentric
        self.spread = spread
        self.n_objects = n_objects
        self.max_steps = max_steps
        self.max_step = max_step
        self.tolerance = tolerance
        self.object_size = object_size
        self._seed = seed
        self._rng = np.random.default_rng(seed)
        self.objects: List[SceneObject] = []
        self.target = 0
        self.gripper = np.zeros(2, dtype=np.int64)
        self.steps = 0
        self.done = True
        self.closed = False
        self.success = False
        self._texture: Optional[np.ndarray] = None

    # --- episode -------------------------------------------------------------------------------
    def reset(self, seed: Optional[int] = None) -> Dict[str, Any]:
        """Start a new episode (``seed`` makes it reproducible) and return the first observation."""
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        rng = self._rng
        s, half = self.size, self.object_size // 2
        if self.egocentric:  # everything within ``spread`` px, so the target is always in view
            lo = (s - self.spread) // 2
            hi = lo + self.spread - 1
        else:
            lo, hi = half + 2, s - half - 3
        colors = rng.choice(len(COLORS), size=self.n_objects, replace=False)
        names = list(COLORS)
        self.objects = []
        while len(self.objects) < self.n_objects:
            x, y = (int(v) for v in rng.integers(lo, hi + 1, size=2))
            if all(max(abs(x - o.x), abs(y - o.y)) >= self.object_size + 4 for o in self.objects):
                shape = SHAPES[int(rng.integers(len(SHAPES)))]
                self.objects.append(SceneObject(names[colors[len(self.objects)]], shape, x, y))
        self.target = int(rng.integers(self.n_objects))
        t = self.objects[self.target]
        while True:
            g = rng.integers(lo, hi + 1, size=2) if self.egocentric else rng.integers(6, s - 6, size=2)
            if max(abs(int(g[0]) - t.x), abs(int(g[1]) - t.y)) >= self.object_size + 4:
                break
        self.gripper = g.astype(np.int64)
        # a static per-episode texture: the only thing that changes between frames is the gripper
        self._texture = rng.integers(-8, 9, size=(2 * s, 2 * s, 1)).astype(np.int16)
        self.steps = 0
        self.done = False
        self.closed = False
        self.success = False
        return self.observe()

    @property
    def instruction(self) -> str:
        t = self.objects[self.target]
        return f"pick up the {t.color} {t.shape}"

    def target_offset(self) -> np.ndarray:
        """Target centre minus gripper centre, in pixels (int [2])."""
        t = self.objects[self.target]
        return np.array([t.x, t.y], dtype=np.int64) - self.gripper

    def expert_action(self) -> np.ndarray:
        """The scripted expert's action for the current state: float32 [3] in [-1, 1]."""
        d = self.target_offset()
        if np.abs(d).max() <= 1:
            return np.array([0.0, 0.0, 1.0], dtype=np.float32)
        move = np.clip(d, -self.max_step, self.max_step) / self.max_step
        return np.array([move[0], move[1], -1.0], dtype=np.float32)

    def step(self, action: Any) -> Tuple[Dict[str, Any], float, bool, Dict[str, Any]]:
        """Apply ``action`` ([dx, dy, grip]); returns (obs, reward, done, info).

        reward is 1.0 on the successful close, else 0.0; info has "success", "steps", "closed".
        """
        if self.done:
            raise RuntimeError("step() called on a finished episode: call reset() first")
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape[0] != ACTION_DIM or not np.all(np.isfinite(a)):
            raise ValueError(f"action must be {ACTION_DIM} finite numbers [dx, dy, grip], got {action!r}")
        a = np.clip(a, -1.0, 1.0)
        self.steps += 1
        if a[2] > 0:
            self.closed = True
            self.success = bool(np.abs(self.target_offset()).max() <= self.tolerance)
            self.done = True
        else:
            move = np.rint(a[:2] * self.max_step).astype(np.int64)
            self.gripper = np.clip(self.gripper + move, 0, self.size - 1)
        if self.steps >= self.max_steps:
            self.done = True
        info = {"success": self.success, "steps": self.steps, "closed": self.closed}
        return self.observe(), float(self.success), self.done, info

    # --- rendering -----------------------------------------------------------------------------
    def observe(self) -> Dict[str, Any]:
        return {"image": self.render(), "instruction": self.instruction}

    def render(self) -> np.ndarray:
        """The current frame: uint8 [size, size, 3]."""
        s, half = self.size, self.object_size // 2
        # world -> view shift: the wrist view keeps the gripper at the centre
        if self.egocentric:
            ox, oy = s // 2 - int(self.gripper[0]), s // 2 - int(self.gripper[1])
        else:
            ox, oy = 0, 0
        img = Image.new("RGB", (s, s), BACKGROUND)
        draw = ImageDraw.Draw(img)
        for o in self.objects:
            x, y = o.x + ox, o.y + oy
            box = [x - half, y - half, x + half - 1, y + half - 1]
            c = COLORS[o.color]
            if o.shape == "square":
                draw.rectangle(box, fill=c)
            elif o.shape == "circle":
                draw.ellipse(box, fill=c)
            else:
                draw.polygon([(x, y - half), (x - half, y + half - 1), (x + half - 1, y + half - 1)], fill=c)
        gx, gy = int(self.gripper[0]) + ox, int(self.gripper[1]) + oy
        w = 1 if self.closed else half + 1
        # U-shaped gripper: a bar above the centre and two prongs around it (closed: prongs together)
        draw.rectangle([gx - w - 1, gy - half - 2, gx + w + 1, gy - half - 1], fill=GRIPPER_COLOR)
        draw.rectangle([gx - w - 1, gy - half - 2, gx - w, gy + 2], fill=GRIPPER_COLOR)
        draw.rectangle([gx + w, gy - half - 2, gx + w + 1, gy + 2], fill=GRIPPER_COLOR)
        arr = np.asarray(img, dtype=np.int16)
        if self._texture is not None:  # the texture is fixed to the table (world), so it moves too
            tx, ty = s // 2 - ox, s // 2 - oy
            arr = arr + self._texture[ty:ty + s, tx:tx + s]
        return np.clip(arr, 0, 255).astype(np.uint8)


def run_expert(seed: int, **env_kwargs: Any) -> Dict[str, Any]:
    """Roll out the scripted expert for one seeded episode; returns {"success", "steps"}."""
    env = PickEnv(**env_kwargs)
    env.reset(seed)
    info: Dict[str, Any] = {"success": False, "steps": 0}
    while not env.done:
        _, _, _, info = env.step(env.expert_action())
    return {"success": bool(info["success"]), "steps": int(info["steps"])}
