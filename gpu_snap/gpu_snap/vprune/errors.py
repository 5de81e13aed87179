"""Exceptions raised by vprune. Every message says what was wrong and what is allowed."""
from __future__ import annotations


class VPruneError(Exception):
    """Base class of every error vprune raises on purpose."""


class UnsupportedModelError(VPruneError, TypeError):
    """No integration is registered for the model's class (or any of its base classes)."""


class IncompatibleModelError(VPruneError):
    """The class name matched an integration, but the attributes it needs are missing."""


class NoTargetsError(VPruneError):
    """A patch matched nothing it could act on (no layers, no visual tokens, ...)."""


class AlreadyPatchedError(VPruneError):
    """`patch` was called on a model that already carries a different vprune patch."""


class NotPatchedError(VPruneError):
    """`unpatch`, `reset` or `stats` was called on a model that vprune did not patch."""


class MissingInputsError(VPruneError):
    """A patched model ran a step in which the tokens it prunes never appeared (e.g. the vision tower did not run)."""


class VPruneWarning(UserWarning):
    """A patched model ran a call in a way the patch could not (fully) act on: the call ran, and the
    message says what was not pruned or cached and why."""
