"""Kept-token overlays: which visual tokens a pruned model kept, drawn on its input image (PIL).

    img = vprune.viz.overlay_kept_tokens(frame, kept_indices, grid=8)      # PIL image
    vprune.viz.save_panel([img_a, img_b], "kept.png", titles=["unpruned", "dual 25%"])
    kept = vprune.viz.kept_indices_from_stats(vprune.stats(policy))        # sample 0, image 0

Kept patches are shown at full brightness with a coloured outline; pruned patches are dimmed
(blended towards black by ``dim``). Indices are positions in the image's own token grid, row-major
(token i covers row ``i // grid_w``, column ``i % grid_w``), as ``vprune.stats`` reports them.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

Grid = Union[int, Tuple[int, int]]


def _grid_hw(grid: Grid) -> Tuple[int, int]:
    if isinstance(grid, int):
        return grid, grid
    h, w = grid
    return int(h), int(w)


def _to_uint8(image: Any) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (3, 6) and arr.shape[-1] not in (3, 6):  # [C, H, W] tensor-like
        arr = arr[:3].transpose(1, 2, 0)
    if arr.dtype != np.uint8:  # float in [-1, 1] or [0, 1]
        arr = arr.astype(np.float32)
        arr = (arr + 1.0) * 127.5 if arr.min() < 0 else arr * 255.0
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return arr[..., :3]


def overlay_kept_tokens(image: Any, kept_indices: Optional[Iterable[int]], grid: Grid,
                        scale: int = 4, dim: float = 0.25,
                        color: Tuple[int, int, int] = (255, 215, 0)) -> Image.Image:
    """The image (upscaled by ``scale``, nearest) with kept tokens highlighted and pruned ones dimmed.

    image: uint8 [H, W, 3] array, a PIL image, or a float [3, H, W] pixel tensor/array.
    kept_indices: token indices kept (None: all kept). grid: tokens per side, or (rows, cols).
    dim: brightness of pruned patches (0 black, 1 unchanged).
    """
    arr = _to_uint8(image)
    h, w = arr.shape[:2]
    gh, gw = _grid_hw(grid)
    n = gh * gw
    kept = np.ones(n, dtype=bool)
    if kept_indices is not None:
        kept[:] = False
        idx = np.asarray(list(kept_indices), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"kept index out of range for a {gh}x{gw} grid: {idx.min()}..{idx.max()}")
        kept[idx] = True
    ys = (np.arange(h) * gh // h)[:, None]
    xs = (np.arange(w) * gw // w)[None, :]
    keep_px = kept[ys * gw + xs]
    out = arr.astype(np.float32)
    out[~keep_px] *= dim
    img = Image.fromarray(out.astype(np.uint8)).resize((w * scale, h * scale), Image.NEAREST)
    if kept_indices is not None:
        draw = ImageDraw.Draw(img)
        ph, pw = h * scale / gh, w * scale / gw
        for i in np.flatnonzero(kept):
            r, c = divmod(int(i), gw)
            draw.rectangle([round(c * pw), round(r * ph), round((c + 1) * pw) - 1, round((r + 1) * ph) - 1],
                           outline=color, width=max(1, scale // 2))
    return img


def kept_indices_from_stats(stats: Dict[str, Any], sample: int = 0, image: int = 0) -> Optional[List[int]]:
    """Kept indices of one sample's image from ``vprune.stats(model)`` (None if nothing was pruned).

    Reads ``stats["per_sample"][sample]["kept_indices"]`` (positions in the sample's visual tokens);
    with several images per sample the tokens come in equal consecutive blocks and ``image`` picks one,
    returned relative to that image's grid.
    """
    per = stats.get("per_sample") or []
    if sample >= len(per):
        return None
    row = per[sample]
    if not row.get("pruned", True):
        return None
    idx = list(row.get("kept_indices", []))
    n_images = int(stats.get("images", 1) or 1)
    if n_images > 1:
        per_img = int(row["visual_before"]) // n_images
        lo, hi = image * per_img, (image + 1) * per_img
        idx = [i - lo for i in idx if lo <= i < hi]
    return idx


def _label(img: Image.Image, text: str, height: int = 14) -> Image.Image:
    out = Image.new("RGB", (img.width, img.height + height), (255, 255, 255))
    out.paste(img, (0, height))
    ImageDraw.Draw(out).text((2, 1), text, fill=(0, 0, 0))
    return out


def save_panel(images: Sequence[Image.Image], path: str, titles: Optional[Sequence[str]] = None,
               caption: Optional[str] = None, pad: int = 4) -> str:
    """Images side by side (with optional titles above and a caption below), saved as PNG."""
    if titles is not None:
        images = [_label(im, t) for im, t in zip(images, titles)]
    width = sum(im.width for im in images) + pad * (len(images) + 1)
    height = max(im.height for im in images) + 2 * pad + (16 if caption else 0)
    panel = Image.new("RGB", (width, height), (255, 255, 255))
    x = pad
    for im in images:
        panel.paste(im, (x, pad))
        x += im.width + pad
    if caption:
        ImageDraw.Draw(panel).text((pad, height - 15), caption, fill=(0, 0, 0))
    panel.save(path)
    return path


_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def line_plot(x_labels: Sequence[str], series: Dict[str, Sequence[Optional[float]]], path: str,
              title: str = "", ylabel: str = "", y_range: Tuple[float, float] = (0.0, 1.0),
              size: Tuple[int, int] = (560, 360)) -> str:
    """A small line chart (PIL only, no matplotlib): one line per series over categorical x values."""
    w, h = size
    left, right, top, bottom = 48, 130, 28, 36
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    pw, ph = w - left - right, h - top - bottom
    lo, hi = y_range
    d.rectangle([left, top, left + pw, top + ph], outline=(0, 0, 0))
    for i in range(6):
        v = lo + (hi - lo) * i / 5
        y = top + ph - ph * i / 5
        d.line([left, y, left + pw, y], fill=(225, 225, 225))
        d.text((4, y - 6), f"{v:.1f}" if hi <= 1.0 else f"{v:.0f}", fill=(0, 0, 0))
    n = len(x_labels)
    xs = [left + pw * (i + 0.5) / n for i in range(n)]
    for x, lab in zip(xs, x_labels):
        d.text((x - 3 * len(lab), top + ph + 6), lab, fill=(0, 0, 0))
    for k, (name, ys) in enumerate(series.items()):
        c = _PALETTE[k % len(_PALETTE)]
        pts = [(x, top + ph - ph * (y - lo) / (hi - lo)) for x, y in zip(xs, ys) if y is not None]
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
        d.line([left + pw + 10, top + 10 + 16 * k, left + pw + 28, top + 10 + 16 * k], fill=c, width=2)
        d.text((left + pw + 32, top + 4 + 16 * k), name, fill=(0, 0, 0))
    d.text((left, 8), title, fill=(0, 0, 0))
    d.text((left + pw // 2 - 3 * len(ylabel), h - 14), ylabel, fill=(0, 0, 0))
    img.save(path)
    return path
