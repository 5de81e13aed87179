"""A toy host model and integration for testing the patch machinery without any host library."""
from typing import Any, Dict

import torch

import vprune
from vprune.integrations.registry import Integration, register
from vprune.undo import vprune_subclass


class ToyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def _patched_forward(self, x):
    self._vprune.calls += 1
    return self.linear(x) * self.scale


class ToyIntegration(Integration):
    name = "toy"
    techniques = ("visual_pruning",)

    def default_config(self, model: Any, **overrides: Any) -> vprune.VisualPruning:
        return vprune.VisualPruning(**overrides)

    def apply(self, model: Any, config: Any, state: Any) -> None:
        state.undo.swap_class(model, vprune_subclass(type(model), {"forward": _patched_forward}, tag="toy"))
        state.undo.set_attr(model, "scale", 2.0)
        state.undo.add_hook(model.register_forward_hook(lambda m, i, o: None))
        state.targets.append("linear")
        if config.seed == 13:
            raise RuntimeError("planned failure after changing the model")

    def reset(self, model: Any, state: Any) -> None:
        state.calls = 0

    def stats(self, model: Any, state: Any) -> Dict[str, Any]:
        return {}


register("ToyModel", __name__, "ToyIntegration")
