"""The one state object a patched model carries as ``model._vprune``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .config import TechniqueConfig
from .undo import UndoLog


@dataclass
class VPruneState:
    """Everything vprune knows about one patched model.

    config: the technique config the model was patched with.
    integration: the integration object that applied the patch (its ``reset``/``stats`` are used).
    undo: the log that ``unpatch`` reverses.
    targets / skipped: what the patch acts on, and what it expected but could not act on.
    runtime: technique-specific state (per-call scratch, temporal history, caches), owned by the
        integration; ``begin_call`` clears the per-call part.
    last: what the last call did, as the integration recorded it (tensors kept on device; turned
        into Python values only when ``vprune.stats`` is called, so the hot path never syncs).
    calls: forward calls seen since the patch.
    """

    config: TechniqueConfig
    integration: Any
    undo: UndoLog = field(default_factory=UndoLog)
    targets: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    runtime: Any = None
    last: Optional[Dict[str, Any]] = None
    calls: int = 0
