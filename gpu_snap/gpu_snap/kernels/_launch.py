"""A thin launch cache for compiled Triton kernels: skips ``JITFunction.run``'s per-call binding.

Measured on the H100 host (triton 3.6): launching even an empty ``@triton.jit`` kernel costs ~11 us of
host time per call, more than the select kernel's device time (~5 us), so in an eager model the
host cost would decide the op's time. ``FastLauncher`` keeps the ``CompiledKernel`` that a normal
launch returns, under a key made of everything Triton specialises on for *our* arguments (the
caller passes it: dtypes, constexprs, warps, and the 16-byte alignment / ==1 / int-width classes of
the specialised arguments), and later calls its compiled launcher directly.

Safety: the key is at least as fine as Triton's own specialisation, so a cached kernel is only
reused for arguments Triton would have compiled identically. Any surprise from the launcher's
private calling convention (it has been stable through triton 3.x) disables the fast path for the
process and falls back to the normal launch. Under ``TRITON_INTERPRET=1``, or when a launch hook
(profiler) is installed, the normal launch is always used.
"""
from __future__ import annotations

from typing import Any, Dict, Hashable, Sequence, Tuple

from ._triton import HAS_TRITON, INTERPRET, triton

_ENABLED = HAS_TRITON and not INTERPRET
DISABLED_REASON = "" if _ENABLED else "triton missing or TRITON_INTERPRET=1"


_RUNTIME_KNOBS = getattr(getattr(triton, "knobs", None), "runtime", None) if HAS_TRITON else None


def _no_launch_hooks() -> bool:
    """True when no launch hook (a profiler such as proton) is installed. Since triton 3.4 the
    hooks are ``HookChain`` objects that are never None; an empty chain has no ``calls``."""
    rt = _RUNTIME_KNOBS
    if rt is None:  # triton < 3.4: hooks live on CompiledKernel; assume none (the JIT passes None too)
        return True
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


def int_class(v: int) -> Tuple[bool, bool, bool]:
    """What Triton may specialise an int argument on: == 1, divisible by 16, needs 64 bits."""
    return v == 1, v % 16 == 0, not -(1 << 31) <= v < (1 << 31)


def ptr_class(t: Any) -> bool:
    """What Triton specialises a pointer argument on: 16-byte alignment."""
    return t.data_ptr() % 16 == 0


class FastLauncher:
    """``launcher(key, grid, args, num_warps)``: launch ``fn`` with all its arguments (constexprs
    included, in signature order), reusing the compiled kernel cached under (current device, ``key``).
    ``key`` must hold every dtype, constexpr and specialisation class of the arguments."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.cache: Dict[Hashable, Any] = {}
        self.fast_calls = 0  # launches that took the cached path (diagnostics for kernels/tune.py)
        self._driver = None

    def _driver_api(self) -> Any:
        if self._driver is None:
            self._driver = triton.runtime.driver.active
        return self._driver

    def __call__(self, key: Hashable, grid: Tuple[int, int, int], args: Sequence[Any], num_warps: int) -> None:
        global _ENABLED, DISABLED_REASON
        if _ENABLED:
            # Triton compiles and loads per current device (not the tensors' device): key on it too
            drv = self._driver_api()
            device = drv.get_current_device()
            ck = self.cache.get((device, key))
            if ck is not None:
                if _no_launch_hooks():
                    try:
                        ck.run(grid[0], grid[1], grid[2], drv.get_current_stream(device), ck.function,
                               ck.packed_metadata, None, None, None, *args)
                        self.fast_calls += 1
                        return
                    except (TypeError, AttributeError, ValueError, SystemError) as exc:
                        _ENABLED = False  # unknown launcher convention: normal launches from now on
                        DISABLED_REASON = f"{type(exc).__name__}: {exc}"
        ck = self.fn[grid](*args, num_warps=num_warps)
        if _ENABLED and ck is not None and hasattr(ck, "packed_metadata") and hasattr(ck, "function"):
            self.cache[(self._driver_api().get_current_device(), key)] = ck


def fast_path_enabled() -> bool:
    """Whether launches currently bypass ``JITFunction.run`` (false under the interpreter)."""
    return _ENABLED
