"""Action-attention history across control steps (VLA-Pruner's temporal smoothing), per batch element.

A robot policy is called once per control step. At each step the attention that the decoded action
tokens paid to the visual tokens (at a middle decoder layer) is recorded as one score vector per
batch element, ``S(t) [B, N]``, with 0 for tokens that were pruned at that step. The action score
used to choose tokens at step ``t`` is the smoothed history of the previous ``w`` steps::

    S_hat(t) = sum_{i=1..w} gamma^(i-1) * S(t-i)            (newest step weighted 1)

(VLA-Pruner's reference code weighted the *oldest* step highest: a confirmed bug, not followed here.)
Steps not recorded yet (at the start of an episode) contribute nothing.

The first ``warmup`` control steps of each episode run unpruned; their action scores are still
recorded, so that pruning starts with a full history. Everything is per batch element (row ``b`` of
every call is the same environment), and ``reset(rows)`` clears some or all rows: a new episode.

Pure tensor logic; no knowledge of any host model.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Union

import torch


def temporal_weights(window: int, decay: float, device: Optional[torch.device] = None) -> torch.Tensor:
    """[window] fp32 weights, newest first: ``decay ** i`` for i = 0..window-1 (the newest weighted 1)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window={window!r} is invalid: allowed an int >= 1")
    if not (isinstance(decay, (int, float)) and 0.0 < float(decay) <= 1.0):
        raise ValueError(f"decay={decay!r} is invalid: allowed a number in (0, 1]")
    return float(decay) ** torch.arange(window, dtype=torch.float32, device=device)


class ActionHistory:
    """Per-batch-element history of action scores over the last ``window`` control steps.

    window: w, the number of past control steps kept. decay: gamma. warmup: unpruned steps at the
    start of each episode (counted per row).

    Storage (allocated on the first ``record``): ``scores [B, w, N]`` fp32, newest step at index 0;
    ``recorded`` (Python ints, one per row) how many of the w slots hold a recorded step (``filled``
    is the same as an int64 tensor); ``steps`` (Python ints) control steps started since the row's
    last reset. Counts live on the host: warm-up and "has history" need no device sync or tensor op.

    The batch size and the token count are fixed within an episode: a call with another shape raises
    ``ValueError`` saying to call ``vprune.reset(model)`` (a new episode) first.
    """

    def __init__(self, window: int = 3, decay: float = 0.8, warmup: int = 3) -> None:
        self.weights = temporal_weights(window, decay)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup={warmup!r} is invalid: allowed an int >= 0")
        self.window = window
        self.decay = float(decay)
        self.warmup = warmup
        self.scores: Optional[torch.Tensor] = None  # [B, w, N] fp32, newest first
        self.steps: List[int] = []                  # per row: control steps started since reset
        self.recorded: List[int] = []               # per row: recorded steps held (at most w)
        self._weights_on: Optional[torch.Tensor] = None  # ``weights`` [B, 1, w] on the scores' device

    # ----------------------------------------------------------------------------------- shape
    @property
    def batch(self) -> Optional[int]:
        return None if self.scores is None else self.scores.shape[0]

    @property
    def n_tokens(self) -> Optional[int]:
        return None if self.scores is None else self.scores.shape[2]

    @property
    def filled(self) -> Optional[torch.Tensor]:
        """int64 [B]: recorded steps held per row (None before anything was recorded)."""
        if self.scores is None:
            return None
        return torch.tensor(self.recorded, dtype=torch.int64, device=self.scores.device)

    def _ensure(self, batch: int, n: int, device: torch.device) -> None:
        if self.scores is None:
            self.scores = torch.zeros(batch, self.window, n, dtype=torch.float32, device=device)
            self.recorded = [0] * batch
            if len(self.steps) != batch:
                self.steps = [0] * batch
            return
        if self.scores.shape[0] != batch or self.scores.shape[2] != n:
            raise ValueError(
                f"action history holds batch={self.scores.shape[0]} x {self.scores.shape[2]} visual tokens, "
                f"but this control step has batch={batch} x {n}: the batch size and the image layout "
                f"must stay fixed within an episode; call vprune.reset(model) at a new episode")
        if self.scores.device != device:
            self.scores = self.scores.to(device)

    # ----------------------------------------------------------------------------- per step
    def begin_step(self, batch: int) -> List[bool]:
        """Start a control step for ``batch`` rows; returns, per row, whether it is a warm-up step
        (the first ``warmup`` steps since the row's reset). Python bools: no device sync."""
        if self.scores is not None and self.scores.shape[0] != batch:
            self._ensure(batch, self.scores.shape[2], self.scores.device)  # raises with the message
        if len(self.steps) != batch:
            if any(self.steps):
                raise ValueError(
                    f"action history has {len(self.steps)} rows but this control step has batch={batch}: "
                    f"call vprune.reset(model) at a new episode")
            self.steps = [0] * batch
        warm = [s < self.warmup for s in self.steps]
        self.steps = [s + 1 for s in self.steps]
        return warm

    def record(self, scores: torch.Tensor) -> None:
        """Append one control step's action scores ``[B, N]`` (0 for pruned tokens) as the newest."""
        if scores.dim() != 2:
            raise ValueError(f"action scores must be [B, N], got shape {tuple(scores.shape)}")
        b, n = scores.shape
        held = self.scores
        if held is None or held.shape[0] != b or held.shape[2] != n or not (held.is_cpu and scores.is_cpu):
            self._ensure(b, n, scores.device)  # (a CPU history needs no device check: none of its cost)
        new = scores if scores.dtype is torch.float32 and not scores.requires_grad else scores.detach().float()
        # newest first: two calls (unbind, stack) where unsqueeze + slice + cat took three
        self.scores = torch.stack((new, *self.scores.unbind(1)[: self.window - 1]), dim=1)
        self.recorded = [min(r + 1, self.window) for r in self.recorded]

    def smoothed(self) -> Optional[torch.Tensor]:
        """``S_hat [B, N]`` fp32: the decay-weighted sum of the recorded steps (newest weighted 1);
        None before anything was recorded. Rows with nothing recorded are all zero (see ``has_history``)."""
        if self.scores is None:
            return None
        b, window, n = self.scores.shape
        w = self._weights_on  # the weights as [B, 1, w] on the scores' device, cached
        if w is None or w.shape[0] != b or not (w.is_cpu and self.scores.is_cpu or w.device == self.scores.device):
            w = self._weights_on = self.weights.to(self.scores.device).view(1, 1, window).expand(b, 1, window)
        # [w] @ [B, w, N]: the weighted sum over the window, as the bmm that matmul runs for it
        # ([B, 1, w] x [B, w, N]) without matmul's view calls (einsum took several more ops; the same
        # fp32 values in tests/test_temporal.py)
        return torch.bmm(w, self.scores).view(b, n)

    def has_history(self) -> Optional[torch.Tensor]:
        """bool [B]: rows with at least one recorded step (None before anything was recorded)."""
        if self.scores is None:
            return None
        return torch.tensor([r > 0 for r in self.recorded], dtype=torch.bool, device=self.scores.device)

    def all_rows_recorded(self) -> bool:
        """Whether every row has at least one recorded step (a host-side answer: no device sync)."""
        return self.scores is not None and min(self.recorded) > 0

    # -------------------------------------------------------------------------------- reset
    def reset(self, rows: Optional[Union[int, Sequence[int], Iterable[int]]] = None) -> None:
        """Clear the history and the warm-up counter of ``rows`` (default: every row, and forget the
        batch size and token count so the next episode may use other shapes)."""
        if rows is None:
            self.scores = None
            self.steps = []
            self.recorded = []
            return
        idx = [rows] if isinstance(rows, int) else list(rows)
        batch = len(self.steps) if self.scores is None else self.scores.shape[0]
        for r in idx:
            if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < max(batch, 1):
                raise ValueError(f"reset row {r!r} is invalid: allowed ints in [0, {batch})")
        if self.scores is not None:  # out of place: the tensors may come from torch.inference_mode()
            sel = torch.tensor(idx, dtype=torch.long, device=self.scores.device)
            self.scores = self.scores.index_fill(0, sel, 0.0)
        for r in idx:
            if r < len(self.steps):
                self.steps[r] = 0
            if r < len(self.recorded):
                self.recorded[r] = 0
