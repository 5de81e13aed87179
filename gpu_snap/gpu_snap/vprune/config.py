"""Technique configs: small, validated, serialisable dataclasses that are the user's vocabulary.

Each config is frozen (so two configs compare by value: patching twice with an equal config is a
no-op) and validated on construction: a bad value raises ``ValueError`` naming the field, the value
and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Type, Union

_CONFIG_CLASSES: Dict[str, Type["TechniqueConfig"]] = {}


def _fail(cls_name: str, field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{cls_name}.{field}={value!r} is invalid: allowed {allowed}")


def _check_int(cls_name: str, field: str, value: Any, lo: int, hi: Optional[int] = None,
               optional: bool = False) -> None:
    if value is None and optional:
        return
    bound = f"an int in [{lo}, {hi}]" if hi is not None else f"an int >= {lo}"
    if optional:
        bound += " or None"
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        _fail(cls_name, field, value, bound)


def _check_float(cls_name: str, field: str, value: Any, lo: float, hi: float,
                 lo_open: bool = False, hi_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        _fail(cls_name, field, value, f"a number in {left}{lo}, {hi}{right}")


def _check_choice(cls_name: str, field: str, value: Any, choices: tuple, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value not in choices:
        extra = " or None" if optional else ""
        _fail(cls_name, field, value, f"one of {list(choices)}{extra}")


@dataclass(frozen=True)
class TechniqueConfig:
    """Base of every technique config. Subclasses set ``technique`` and implement ``validate``."""

    technique: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.technique:
            _CONFIG_CLASSES[cls.technique] = cls

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable dict; ``from_dict`` reads it back."""
        return {"technique": self.technique, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: Dict[str, Any]) -> "TechniqueConfig":
        """Rebuild a config from ``to_dict`` output (the ``technique`` key picks the class)."""
        data = dict(data)
        name = data.pop("technique", None)
        if name not in _CONFIG_CLASSES:
            raise ValueError(f"unknown technique {name!r}: allowed {sorted(_CONFIG_CLASSES)}")
        cls = _CONFIG_CLASSES[name]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {unknown}: allowed {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "TechniqueConfig":
        """A copy with some fields changed (validated again)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {unknown}: allowed {sorted(known)}")
        return dataclasses.replace(self, **changes)


VISUAL_STRATEGIES = ("fastv", "semantic", "divprune", "random", "dual", "action")


@dataclass(frozen=True)
class VisualPruning(TechniqueConfig):
    """Keep ``keep`` visual tokens per image inside the LLM from decoder layer ``layer`` on.

    keep: a fraction in (0, 1] of each image's visual tokens (float) or an absolute count >= 1 per
        image (int). A count larger than an image's token count keeps all of that image's tokens
        (clamped; ``vprune.stats`` reports requested and kept counts).
    layer: K, the first decoder layer that sees only the kept tokens (layers 0..K-1 see all of them;
        scores come from layer K-1). None: the integration's default (2 for VLMs, 3 for VLAs).
    strategy: how tokens are chosen (see ``vprune.selection``). None: the integration's default
        ("fastv" for VLMs, "dual" for VLAs).
    semantic: for "dual"/"semantic" on VLAs: "last" (the last prompt row, FastV's) or
        "prefill_mean" (column mean over all prefill rows).
    action_layer: decoder layer whose action-decode attention gives the action score (None: the
        middle layer).
    history, decay: temporal smoothing of the action score over the previous ``history`` control
        steps, newest weighted 1, older by ``decay`` ** age.
    warmup: unpruned control steps at the start of each episode (None: ``history``).
    seed: seed of the "random" strategy.
    cuda_graph: run the pruned part of each prefill (decoder layers ``layer``..N-1 over the kept
        tokens) as a captured CUDA graph, one per (batch, kept length, dtype, mask, cache use, ...),
        captured on first use and replayed afterwards (LLaVA and Qwen2-VL; a prefill of a few hundred
        kept tokens is launch-bound in eager mode). Needs the model on CUDA: a prefill with CPU inputs
        raises. Decode steps stay eager. Each graph holds its own copy of the pruned layers' K/V for
        one prefill (see ``integrations._llm_pruning``).
    """

    technique: ClassVar[str] = "visual_pruning"

    keep: Union[float, int] = 0.25
    layer: Optional[int] = None
    strategy: Optional[str] = None
    semantic: str = "last"
    action_layer: Optional[int] = None
    history: int = 3
    decay: float = 0.8
    warmup: Optional[int] = None
    seed: int = 0
    cuda_graph: bool = False

    def validate(self) -> None:
        name = type(self).__name__
        k = self.keep
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            _fail(name, "keep", k, "a fraction in (0, 1] (float) or a token count >= 1 (int)")
        if isinstance(k, float):
            _check_float(name, "keep", k, 0.0, 1.0, lo_open=True)
        elif k < 1:
            _fail(name, "keep", k, "a fraction in (0, 1] (float) or a token count >= 1 (int)")
        _check_int(name, "layer", self.layer, 1, optional=True)
        _check_choice(name, "strategy", self.strategy, VISUAL_STRATEGIES, optional=True)
        _check_choice(name, "semantic", self.semantic, ("last", "prefill_mean"))
        _check_int(name, "action_layer", self.action_layer, 0, optional=True)
        _check_int(name, "history", self.history, 1)
        _check_float(name, "decay", self.decay, 0.0, 1.0, lo_open=True)
        _check_int(name, "warmup", self.warmup, 0, optional=True)
        _check_int(name, "seed", self.seed, 0)
        if not isinstance(self.cuda_graph, bool):
            _fail(name, "cuda_graph", self.cuda_graph, "True or False")

    def budget(self, n_tokens: int) -> int:
        """Tokens kept out of an image of ``n_tokens`` visual tokens (at least 1, at most all)."""
        if n_tokens <= 0:
            return 0
        if isinstance(self.keep, float):
            return max(1, min(n_tokens, int(round(self.keep * n_tokens))))
        return min(n_tokens, int(self.keep))

    @property
    def effective_warmup(self) -> int:
        return self.history if self.warmup is None else self.warmup


@dataclass(frozen=True)
class WindowDiffusion(TechniqueConfig):
    """Window-Diffusion for masked diffusion LMs (see ``vprune.window``).

    active: still-masked positions computed each step (the leftmost ones).
    window: masked positions attended to (active + frozen buffer); far-field masks beyond it are skipped.
    refresh: steps per phase; each phase starts with a full forward that refreshes every cached K/V.
    threshold: confidence-threshold parallel decoding (Fast-dLLM): each step unmasks every candidate
        above it (at least one); None: the fixed ``steps`` schedule (one token per step when
        ``steps == gen_length``).
    cuda_graph: run the cheap steps as CUDA graphs (static window shapes; CUDA models only).
    """

    technique: ClassVar[str] = "window_diffusion"

    active: int = 16
    window: int = 64
    refresh: int = 32
    threshold: Optional[float] = None
    cuda_graph: bool = False

    def validate(self) -> None:
        name = type(self).__name__
        _check_int(name, "active", self.active, 1)
        _check_int(name, "window", self.window, 1)
        _check_int(name, "refresh", self.refresh, 1)
        if self.active > self.window:
            _fail(name, "active", self.active, f"at most window={self.window}")
        if self.threshold is not None:
            _check_float(name, "threshold", self.threshold, 0.0, 1.0, lo_open=True)
        if not isinstance(self.cuda_graph, bool):
            _fail(name, "cuda_graph", self.cuda_graph, "True or False")


NAT_MODES = ("cache", "disentangle", "reuse")


@dataclass(frozen=True)
class NATCache(TechniqueConfig):
    """Visible/mask disentangling for masked image generators (see ``vprune.nat``).

    mode: "cache" (A), "disentangle" (C) or "reuse" (B).
    refresh: a full forward every ``refresh`` sampling steps (1: every step is full, i.e. no cache;
        for "cache" that is bit-identical to the unpatched model, for "disentangle" it is the
        uncached reference of the same attention pattern).
    cuda_graphs: on CUDA (and without autograd), run each step as a captured CUDA graph, one per
        (stream, step kind, computed-token count); the first generation captures, later ones replay.
        Eager steps are launch-bound, so fewer tokens only pay off inside graphs.
    """

    technique: ClassVar[str] = "nat_cache"

    mode: str = "cache"
    refresh: int = 4
    cuda_graphs: bool = False

    def validate(self) -> None:
        name = type(self).__name__
        _check_choice(name, "mode", self.mode, NAT_MODES)
        _check_int(name, "refresh", self.refresh, 1)
        if not isinstance(self.cuda_graphs, bool):
            _fail(name, "cuda_graphs", self.cuda_graphs, "True or False")
