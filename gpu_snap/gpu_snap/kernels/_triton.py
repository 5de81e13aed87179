"""Whether Triton is importable here, and whether it runs interpreted (``TRITON_INTERPRET=1``).

Both answers are fixed at import: Triton decides at ``@triton.jit`` time whether a kernel is
compiled or interpreted, so the environment variable must be set before ``vprune.kernels`` loads.
"""
from __future__ import annotations

import os

try:  # Triton is optional: torch-only environments (macOS, Windows, CPU wheels) use the references.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
    TRITON_IMPORT_ERROR = ""
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())
