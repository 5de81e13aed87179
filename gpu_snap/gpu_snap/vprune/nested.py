"""Tensors inside nested tuples / lists / dicts (a call's args and kwargs): map over them, or copy one
such structure into another of the same shape. The CUDA-graph paths use these to keep static copies
of a call's inputs and to refill them before each replay."""
from __future__ import annotations

from typing import Any, Callable

import torch


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``obj`` with every tensor ``t`` replaced by ``fn(t)`` (tuples, lists and dicts rebuilt, other
    values kept as they are)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def copy_into(dst: Any, src: Any) -> None:
    """Copy the tensors of ``src`` into the matching tensors of ``dst`` (same structure), in place."""
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, (tuple, list)):
        for d, s in zip(dst, src):
            copy_into(d, s)
    elif isinstance(dst, dict):
        for k in dst:
            copy_into(dst[k], src[k])
