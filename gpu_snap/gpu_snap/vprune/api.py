"""patch / unpatch / patched / reset / stats / generate: the one-line API.

``patch`` finds the integration for the model's class through the registry, builds or checks the
config, and applies the patch with every change recorded in an undo log; a patch that fails halfway
is undone before the error propagates, so the model is left exactly as it was.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Optional

from .config import TechniqueConfig
from .errors import AlreadyPatchedError, NotPatchedError
from .state import VPruneState

STATE_ATTR = "_vprune"


def _state(model: Any, action: str) -> VPruneState:
    state = getattr(model, "__dict__", {}).get(STATE_ATTR)
    if not isinstance(state, VPruneState):
        raise NotPatchedError(
            f"cannot {action} {type(model).__name__}: it is not patched by vprune "
            f"(call vprune.patch(model, ...) first)")
    return state


def is_patched(model: Any) -> bool:
    """True if ``model`` carries a vprune patch."""
    return isinstance(getattr(model, "__dict__", {}).get(STATE_ATTR), VPruneState)


def patch(model: Any, config: Optional[TechniqueConfig] = None, **overrides: Any) -> Any:
    """Patch ``model`` in place and return it.

    config: a technique config (``VisualPruning``, ``WindowDiffusion``, ``NATCache``); None lets the
        integration pick the technique and defaults that fit the model (``keep=...`` etc. as keywords).
    overrides: field changes applied on top of ``config`` (or of the default config).

    Patching an already patched model with an equal config is a no-op; with a different config it
    raises ``AlreadyPatchedError`` (unpatch first).
    """
    from vprune.integrations.registry import find_integration  # the registry is data, not a host import

    integration = find_integration(model)
    if config is None:
        config = integration.default_config(model, **overrides)
    else:
        if not isinstance(config, TechniqueConfig):
            raise TypeError(
                f"config must be a vprune config (VisualPruning, WindowDiffusion, NATCache), "
                f"got {type(config).__name__}")
        if overrides:
            config = config.replace(**overrides)
    if config.technique not in integration.techniques:
        raise ValueError(
            f"{type(config).__name__} cannot be applied to {type(model).__name__}: "
            f"the {integration.name} integration supports {list(integration.techniques)}")
    if not is_patched(model):
        integration.check_structure(model)  # before range checks: a wrong host is the first error
    config = integration.resolve_config(model, config)

    if is_patched(model):
        current = _state(model, "patch")
        if current.config == config:
            return model
        raise AlreadyPatchedError(
            f"{type(model).__name__} is already patched with {current.config}; "
            f"call vprune.unpatch(model) before patching with {config}")

    state = VPruneState(config=config, integration=integration)
    try:
        integration.apply(model, config, state)
        state.undo.set_attr(model, STATE_ATTR, state)
    except BaseException:
        state.undo.undo()
        raise
    return model


def unpatch(model: Any) -> Any:
    """Undo ``patch`` exactly: original class, attributes, hooks. Returns the model."""
    state = _state(model, "unpatch")
    state.undo.undo()
    return model


@contextlib.contextmanager
def patched(model: Any, config: Optional[TechniqueConfig] = None, **overrides: Any) -> Iterator[Any]:
    """``with vprune.patched(model, keep=0.25): ...`` patches for the block and always unpatches."""
    patch(model, config, **overrides)
    try:
        yield model
    finally:
        unpatch(model)


def reset(model: Any) -> None:
    """Clear temporal state (action-attention history, caches): call at each new episode/request."""
    state = _state(model, "reset")
    state.integration.reset(model, state)


def stats(model: Any) -> Dict[str, Any]:
    """What the patch targets and what the last call kept and skipped (plain Python values)."""
    state = _state(model, "read stats of")
    out: Dict[str, Any] = {
        "integration": state.integration.name,
        "config": state.config.to_dict(),
        "targets": list(state.targets),
        "skipped": list(state.skipped),
        "calls": state.calls,
    }
    out.update(state.integration.stats(model, state))
    return out


def generate(model: Any, *args: Any, **kwargs: Any) -> Any:
    """Run the patched technique's own sampler (e.g. the windowed diffusion-LM sampler)."""
    state = _state(model, "generate with")
    return state.integration.generate(model, state, *args, **kwargs)
