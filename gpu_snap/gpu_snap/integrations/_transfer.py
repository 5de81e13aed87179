"""Host -> device uploads of small host-built tensors (plans, keep indices) in one copy.

Pruning decisions made on the host (NumPy plans and selections) go to the device as views of one
pinned buffer, copied ``non_blocking``: one transfer and no sync, where a copy per tensor costs a
launch each and a pageable copy synchronises.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch


#: Byte alignment of each tensor in a packed upload (kernels see the same pointer alignment as for
#: a tensor of its own: Triton specialises on 16-byte divisibility).
PACK_ALIGN = 64


def to_device(tensors: Sequence[Optional[torch.Tensor]], device: Any) -> Tuple[List[Optional[torch.Tensor]], Any]:
    """Host tensors -> ``device`` as views of one buffer, in one copy; None entries stay None.

    Returns (device tensors, the host buffer). On CUDA the buffer is pinned and the copy
    ``non_blocking`` (no sync; the caching host allocator keeps the block until the copy is done,
    and the caller holds the buffer for the call besides). On the CPU the tensors come back as given
    (no copy). Values, dtypes and shapes are those of the inputs (each view is contiguous).
    """
    device = torch.device(device)
    if device.type == "cpu":
        return list(tensors), None
    return _packed_copy(tensors, device, pin=device.type == "cuda")


def _packed_copy(tensors: Sequence[Optional[torch.Tensor]], device: torch.device,
                 pin: bool) -> Tuple[List[Optional[torch.Tensor]], torch.Tensor]:
    """Pack ``tensors`` into one uint8 host buffer (pinned if ``pin``), copy it to ``device`` once and
    return typed, shaped views of the copy."""
    offsets: List[int] = []
    total = 0
    for t in tensors:
        offsets.append(total)
        if t is not None:
            total += -(-t.numel() * t.element_size() // PACK_ALIGN) * PACK_ALIGN
    host = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=pin)
    for t, off in zip(tensors, offsets):
        if t is not None:
            _typed_view(host, off, t).copy_(t)
    dev = host.to(device, non_blocking=pin)
    return [None if t is None else _typed_view(dev, off, t) for t, off in zip(tensors, offsets)], host


def _typed_view(buf: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """The bytes of ``buf`` from ``offset`` seen as a contiguous tensor of ``like``'s dtype and shape."""
    nbytes = like.numel() * like.element_size()
    return buf[offset:offset + nbytes].view(like.dtype).view(like.shape)
