"""An undo log for in-place patches: class swaps, attribute sets and hooks, reversed exactly.

Every change a patch makes to a host model goes through one ``UndoLog`` so that ``unpatch`` (and a
patch that fails halfway) restores the model bit for bit: the original class, the original
``__dict__`` entries (or their absence) and no leftover hooks.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple, Type

_MISSING = object()
_SUBCLASS_CACHE: Dict[Tuple[type, str, Tuple[str, ...]], type] = {}


def vprune_subclass(original: Type[Any], namespace: Dict[str, Any], tag: str = "") -> Type[Any]:
    """A visible subclass ``VPrune<Original>`` of ``original`` overriding the given members.

    Subclasses are cached per (original, tag, member names) so that patching many instances does
    not create many classes; ``tag`` tells apart integrations that override the same names.
    """
    key = (original, tag, tuple(sorted(namespace)))
    cls = _SUBCLASS_CACHE.get(key)
    if cls is None:
        body = dict(namespace)
        body["__module__"] = original.__module__
        body["_vprune_original_class"] = original
        cls = type(f"VPrune{original.__name__}", (original,), body)
        _SUBCLASS_CACHE[key] = cls
    return cls


class UndoLog:
    """Records changes in order and reverses them in the opposite order."""

    def __init__(self) -> None:
        self._undo: List[Tuple[str, Callable[[], None]]] = []

    def __len__(self) -> int:
        return len(self._undo)

    def swap_class(self, obj: Any, new_cls: type) -> None:
        """Set ``obj.__class__ = new_cls``, remembering the original class."""
        old_cls = obj.__class__
        obj.__class__ = new_cls

        def restore() -> None:
            obj.__class__ = old_cls

        self._undo.append((f"class of {old_cls.__name__}", restore))

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set an instance attribute (in ``__dict__``), remembering the old entry or its absence."""
        old = obj.__dict__.get(name, _MISSING)
        object.__setattr__(obj, name, value)

        def restore() -> None:
            if old is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                object.__setattr__(obj, name, old)

        self._undo.append((f"attribute {name}", restore))

    def add_hook(self, handle: Any) -> None:
        """Keep a ``RemovableHandle`` (or anything with ``remove()``) to remove on undo."""
        self._undo.append(("hook", handle.remove))

    def on_undo(self, fn: Callable[[], None], what: str = "callback") -> None:
        """Run ``fn`` on undo (in reverse order with everything else)."""
        self._undo.append((what, fn))

    def undo(self) -> None:
        """Reverse every recorded change, newest first; raise the first failure after trying all."""
        errors: List[BaseException] = []
        while self._undo:
            what, fn = self._undo.pop()
            try:
                fn()
            except BaseException as exc:  # keep undoing the rest before reporting
                errors.append(RuntimeError(f"undoing {what} failed: {exc}"))
        if errors:
            raise errors[0]
