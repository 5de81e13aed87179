"""Host class name -> integration.

Matching is by class *name* along the model's MRO, so a host library need not be importable (and is
never imported) until a model of that class is patched: OpenVLA's and LLaDA's remote code match
without vprune knowing their modules. A name match is followed by the integration's structural check
(``check_structure``), which raises a clear error if the attributes it needs are missing.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, List, Optional, Tuple

from vprune.config import TechniqueConfig
from vprune.errors import UnsupportedModelError

# host class name -> (module, integration class). Keep sorted by integration.
_HOSTS: Dict[str, Tuple[str, str]] = {
    "UVit2DModel": ("vprune.integrations.amused", "AmusedIntegration"),
    "DreamModel": ("vprune.integrations.dream", "DreamIntegration"),
    "LLaDAModelLM": ("vprune.integrations.llada", "LLaDAIntegration"),
    "LlavaForConditionalGeneration": ("vprune.integrations.llava", "LlavaIntegration"),
    "TinyMaskGIT": ("vprune.integrations.maskgit", "MaskGITIntegration"),
    "OpenVLAForActionPrediction": ("vprune.integrations.openvla", "OpenVLAIntegration"),
    "TestbedVLAPolicy": ("vprune.integrations.openvla", "OpenVLAIntegration"),
    "Qwen2VLForConditionalGeneration": ("vprune.integrations.qwen2_vl", "Qwen2VLIntegration"),
    "Qwen2_5_VLForConditionalGeneration": ("vprune.integrations.qwen2_vl", "Qwen2VLIntegration"),
}

_INSTANCES: Dict[Tuple[str, str], "Integration"] = {}


class Integration:
    """What every integration provides. Subclasses live one per host family in this package.

    name: short name shown by ``vprune info`` and ``vprune.stats``.
    techniques: technique names (``TechniqueConfig.technique``) this integration can apply.
    tested_on: host versions this integration is tested on (shown by ``vprune info``).
    """

    name: str = ""
    techniques: Tuple[str, ...] = ()
    tested_on: str = ""

    def check_structure(self, model: Any) -> None:
        """Raise ``IncompatibleModelError`` naming the missing attributes, before anything changes."""

    def default_config(self, model: Any, **overrides: Any) -> TechniqueConfig:
        """The config ``vprune.patch(model, **overrides)`` uses when no config is given."""
        raise NotImplementedError

    def resolve_config(self, model: Any, config: TechniqueConfig) -> TechniqueConfig:
        """Fill integration defaults (e.g. ``layer=None``) and check ranges against the model."""
        return config

    def apply(self, model: Any, config: TechniqueConfig, state: Any) -> None:
        """Patch ``model`` in place, recording every change in ``state.undo``."""
        raise NotImplementedError

    def reset(self, model: Any, state: Any) -> None:
        """Clear temporal state (new episode / new request)."""

    def stats(self, model: Any, state: Any) -> Dict[str, Any]:
        """Plain-Python summary of the last call (may sync the device: never called in a hot path)."""
        return {}

    def generate(self, model: Any, state: Any, *args: Any, **kwargs: Any) -> Any:
        """``vprune.generate``: the technique's own sampler, where the host has none."""
        raise NotImplementedError(f"{self.name} has no vprune.generate entry point")


def register(host_class_name: str, module: str, class_name: str) -> None:
    """Add a host class (by name) served by ``module.class_name`` (e.g. for third-party integrations)."""
    _HOSTS[host_class_name] = (module, class_name)


def supported_hosts() -> Dict[str, Tuple[str, str]]:
    """host class name -> (integration module, integration class)."""
    return dict(_HOSTS)


def load_integration(module: str, class_name: str) -> Integration:
    key = (module, class_name)
    if key not in _INSTANCES:
        cls = getattr(importlib.import_module(module), class_name)
        _INSTANCES[key] = cls()
    return _INSTANCES[key]


def match_host_class(model: Any) -> Optional[str]:
    """The first class name along ``type(model).__mro__`` that has an integration."""
    for cls in type(model).__mro__:
        original = cls.__dict__.get("_vprune_original_class")
        name = (original or cls).__name__
        if name in _HOSTS:
            return name
    return None


def find_integration(model: Any) -> Integration:
    """The integration for ``model``; ``UnsupportedModelError`` listing what is supported otherwise."""
    name = match_host_class(model)
    if name is None:
        listed = ", ".join(sorted(_HOSTS))
        raise UnsupportedModelError(
            f"vprune has no integration for {type(model).__name__} "
            f"(module {type(model).__module__}); supported host classes: {listed}")
    return load_integration(*_HOSTS[name])


def integrations_table() -> List[Dict[str, Any]]:
    """One row per host class: its integration's name, techniques and tested versions."""
    rows = []
    for host, (module, cls_name) in sorted(_HOSTS.items()):
        row: Dict[str, Any] = {"host_class": host, "integration": f"{module}.{cls_name}"}
        try:
            integ = load_integration(module, cls_name)
            row.update(name=integ.name, techniques=list(integ.techniques), tested_on=integ.tested_on)
        except Exception as exc:  # an integration that fails to import is shown, not hidden
            row.update(error=f"{type(exc).__name__}: {exc}")
        rows.append(row)
    return rows
