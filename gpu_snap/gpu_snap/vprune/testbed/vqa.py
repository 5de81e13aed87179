"""Synthetic visual question answering over rendered scenes (numpy + PIL, seeded, no download).

A scene is a ``size`` x ``size`` RGB image (64 px by default: 8 x 8 = 64 patches of 8 px) on a grey,
lightly textured background with 1 to 4 objects. Each object has a colour (red, green, blue,
yellow, purple) and a shape (square, circle, triangle); no two objects share both. By default every
object is 16 px wide and sits on the patch grid (``grid=8``: it covers exactly 2 x 2 patches, so 4-16
of the 64 visual tokens show an object), with at least one empty patch between objects
(``grid=0``: 14-18 px objects anywhere, at least 2 px apart).

Questions (every answer is a single word, so accuracy is exact):

    color     what color is the <shape> ?                        red green blue yellow purple
    shape     what shape is the <color> object ?                 square circle triangle
    side      is the <color> <shape> on the left or the right ?  left right
    height    is the <color> <shape> at the top or the bottom ?  top bottom
    count     how many objects are there ?                        one two three four
    count_c   how many <color> objects are there ?               zero one two three
    count_s   how many <shape>s are there ?                       zero one two three
    left_of   is the <color> <shape> left of the <color> <shape> ?   yes no
    above     is the <color> <shape> above the <color> <shape> ?     yes no

The question type is drawn uniformly, then the answer uniformly among that type's answers, then
scenes are drawn until one has a question with that answer: the answer is (close to) independent of
the question text, so a model that does not look at the image is near chance (``text_prior``
measures the best text-only guess: the most frequent answer of each question string in a training
sample). Objects asked about on the left/right (top/bottom) are at least 4 px from the middle line,
and relation pairs are at least 6 px apart on the asked axis, so answers are never borderline.

    gen = VQAGenerator(seed=0)
    sample = gen.sample()      # VQASample(image=uint8 [64, 64, 3], question=str, answer=str, qtype=str)
    samples = make_dataset(1000, seed=1)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

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
BACKGROUND = (128, 128, 128)
NUMBERS = ("zero", "one", "two", "three", "four")

QTYPES: Tuple[str, ...] = ("color", "shape", "side", "height", "count", "count_c", "count_s", "left_of", "above")
ANSWERS: Dict[str, Tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "side": ("left", "right"),
    "height": ("top", "bottom"),
    "count": ("one", "two", "three", "four"),
    "count_c": ("zero", "one", "two", "three"),
    "count_s": ("zero", "one", "two", "three"),
    "left_of": ("yes", "no"),
    "above": ("yes", "no"),
}

# Every word a question or an answer can use (the tokenizer's vocabulary is built from this list).
WORDS: Tuple[str, ...] = (
    "user", ":", "assistant", "?", "what", "color", "shape", "is", "the", "object", "objects", "on",
    "left", "right", "or", "at", "top", "bottom", "how", "many", "are", "there", "of", "above",
    "yes", "no", *COLORS, *SHAPES, "squares", "circles", "triangles", *NUMBERS,
)


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    x: int  # centre, pixels
    y: int
    size: int  # side of the bounding box, pixels

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class VQASample:
    image: np.ndarray  # uint8 [H, W, 3]
    question: str
    answer: str
    qtype: str
    objects: List[SceneObject] = field(default_factory=list)


def render(objects: Sequence[SceneObject], size: int = 64, texture_seed: int = 0) -> np.ndarray:
    """Draw ``objects`` on the textured background: uint8 [size, size, 3] (deterministic)."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        h = o.size // 2
        box = [o.x - h, o.y - h, o.x - h + o.size - 1, o.y - h + o.size - 1]
        c = COLORS[o.color]
        if o.shape == "square":
            draw.rectangle(box, fill=c)
        elif o.shape == "circle":
            draw.ellipse(box, fill=c)
        else:
            draw.polygon([(o.x, box[1]), (box[0], box[3]), (box[2], box[3])], fill=c)
    arr = np.asarray(img, dtype=np.int16)
    noise = np.random.default_rng(texture_seed).integers(-10, 11, size=(size, size, 1), dtype=np.int16)
    return np.clip(arr + noise, 0, 255).astype(np.uint8)


def _count_word(n: int) -> str:
    return NUMBERS[n]


def _plural(shape: str) -> str:
    return shape + "s"


def scene_questions(objects: Sequence[SceneObject], size: int = 64) -> Dict[str, List[Tuple[str, str]]]:
    """Every valid (question, answer) of each type for a scene (types with none are left out)."""
    out: Dict[str, List[Tuple[str, str]]] = {t: [] for t in QTYPES}
    mid = size / 2.0
    for s in SHAPES:
        with_s = [o for o in objects if o.shape == s]
        if len(with_s) == 1:
            out["color"].append((f"what color is the {s} ?", with_s[0].color))
        out["count_s"].append((f"how many {_plural(s)} are there ?", _count_word(len(with_s))))
    for c in COLORS:
        with_c = [o for o in objects if o.color == c]
        if len(with_c) == 1:
            out["shape"].append((f"what shape is the {c} object ?", with_c[0].shape))
        out["count_c"].append((f"how many {c} objects are there ?", _count_word(len(with_c))))
    out["count"].append(("how many objects are there ?", _count_word(len(objects))))
    for o in objects:
        if abs(o.x + 0.5 - mid) >= 4:
            out["side"].append((f"is the {o.name} on the left or the right ?", "left" if o.x < mid else "right"))
        if abs(o.y + 0.5 - mid) >= 4:
            out["height"].append((f"is the {o.name} at the top or the bottom ?", "top" if o.y < mid else "bottom"))
    for a in objects:
        for b in objects:
            if a is b:
                continue
            if abs(a.x - b.x) >= 6:
                out["left_of"].append((f"is the {a.name} left of the {b.name} ?", "yes" if a.x < b.x else "no"))
            if abs(a.y - b.y) >= 6:
                out["above"].append((f"is the {a.name} above the {b.name} ?", "yes" if a.y < b.y else "no"))
    return {t: qa for t, qa in out.items() if qa}


class VQAGenerator:
    """Seeded stream of balanced VQA samples (see the module docstring).

    size: image side (px). max_objects: objects per scene are 1..max_objects.
    min_size, max_size: object bounding-box side range (px).
    """

    def __init__(self, seed: int = 0, size: int = 64, max_objects: int = 4, min_size: int = 16, max_size: int = 16,
                 qtypes: Sequence[str] = QTYPES, grid: int = 8):
        unknown = [t for t in qtypes if t not in QTYPES]
        if unknown:
            raise ValueError(f"unknown question types {unknown}: allowed {list(QTYPES)}")
        self.rng = np.random.default_rng(seed)
        self.size = size
        self.max_objects = max_objects
        self.min_size = min_size
        self.max_size = max_size
        self.qtypes = tuple(qtypes)
        self.grid = grid

    def scene(self) -> List[SceneObject]:
        rng, s = self.rng, self.size
        n = int(rng.integers(1, self.max_objects + 1))
        pairs = [(c, sh) for c in COLORS for sh in SHAPES]
        chosen = rng.choice(len(pairs), size=n, replace=False)
        objects: List[SceneObject] = []
        tries = 0
        while len(objects) < n:
            tries += 1
            if tries > 500:  # crowded: start over
                return self.scene()
            size = int(rng.integers(self.min_size, self.max_size + 1))
            h = size // 2
            if self.grid:  # boxes on the patch grid: top-left corners at multiples of `grid`
                cells = (s - size) // self.grid + 1
                x, y = (int(v) * self.grid + h for v in rng.integers(0, cells, size=2))
                gap = self.grid
            else:
                x, y = (int(v) for v in rng.integers(h + 1, s - (size - h) - 1, size=2))
                gap = 2
            if all(max(abs(x - o.x), abs(y - o.y)) >= (size + o.size) // 2 + gap for o in objects):
                c, sh = pairs[int(chosen[len(objects)])]
                objects.append(SceneObject(c, sh, x, y, size))
        return objects

    def sample(self, qtype: Optional[str] = None) -> VQASample:
        rng = self.rng
        qtype = qtype or self.qtypes[int(rng.integers(len(self.qtypes)))]
        answers = ANSWERS[qtype]
        want = answers[int(rng.integers(len(answers)))]
        for _ in range(10000):
            objects = self.scene()
            qa = [p for p in scene_questions(objects, self.size).get(qtype, []) if p[1] == want]
            if qa:
                question, answer = qa[int(rng.integers(len(qa)))]
                image = render(objects, self.size, texture_seed=int(rng.integers(2 ** 31)))
                return VQASample(image, question, answer, qtype, objects)
        raise RuntimeError(f"no scene with a {qtype!r} question answered {want!r} in 10000 draws")


def make_dataset(n: int, seed: int, **kwargs) -> List[VQASample]:
    """``n`` samples from ``VQAGenerator(seed, **kwargs)`` (the same seed gives the same samples)."""
    gen = VQAGenerator(seed=seed, **kwargs)
    return [gen.sample() for _ in range(n)]


def text_prior(train: Sequence[VQASample], test: Sequence[VQASample]) -> float:
    """Accuracy on ``test`` of the best text-only guess learned from ``train``: the most frequent
    answer of each question string (unseen questions: the most frequent answer of their type)."""
    by_q: Dict[str, Dict[str, int]] = {}
    by_t: Dict[str, Dict[str, int]] = {}
    for s in train:
        for table, key in ((by_q, s.question), (by_t, s.qtype)):
            d = table.setdefault(key, {})
            d[s.answer] = d.get(s.answer, 0) + 1
    correct = 0
    for s in test:
        d = by_q.get(s.question) or by_t.get(s.qtype) or {}
        guess = max(sorted(d), key=lambda a: d[a]) if d else ""
        correct += guess == s.answer
    return correct / max(1, len(test))


def chance(qtypes: Sequence[str] = QTYPES) -> float:
    """Accuracy of a uniform guess among each type's answers, averaged over types (uniform mix)."""
    return float(np.mean([1.0 / len(ANSWERS[t]) for t in qtypes]))
