"""vprune: make already-loaded multimodal and diffusion models faster by computing fewer tokens.

    import vprune
    vprune.patch(model, keep=0.25)   # picks the technique that fits the model
    vprune.unpatch(model)            # bit-exact original behaviour again

Importing vprune changes nothing in any host library.
"""
from .api import generate, is_patched, patch, patched, reset, stats, unpatch
from .config import NATCache, TechniqueConfig, VisualPruning, WindowDiffusion
from .errors import (AlreadyPatchedError, IncompatibleModelError, MissingInputsError, NoTargetsError,
                     NotPatchedError, UnsupportedModelError, VPruneError, VPruneWarning)

__version__ = "0.1.0"

__all__ = [
    "patch", "unpatch", "patched", "reset", "stats", "generate", "is_patched",
    "VisualPruning", "WindowDiffusion", "NATCache", "TechniqueConfig",
    "VPruneError", "UnsupportedModelError", "IncompatibleModelError", "NoTargetsError",
    "AlreadyPatchedError", "NotPatchedError", "MissingInputsError", "VPruneWarning", "__version__",
]
