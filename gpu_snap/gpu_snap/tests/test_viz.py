"""Kept-token overlays and the PIL plots used by `vprune demo` / `vprune eval vla`."""
import numpy as np
import pytest
from PIL import Image

from vprune import viz


def _frame():
    rng = np.random.default_rng(0)
    return rng.integers(60, 255, size=(64, 64, 3), dtype=np.uint8)


def test_kept_patches_unchanged_pruned_dimmed():
    img = _frame()
    out = np.asarray(viz.overlay_kept_tokens(img, [0, 9, 63], grid=8, scale=1, dim=0.25))
    assert out.shape == img.shape
    # interior of kept patch 9 (row 1, col 1) is unchanged (the outline is on its border)
    np.testing.assert_array_equal(out[9:15, 9:15], img[9:15, 9:15])
    # pruned patch 1 (row 0, col 1) is dimmed
    np.testing.assert_array_equal(out[2:6, 10:14], (img[2:6, 10:14].astype(np.float32) * 0.25).astype(np.uint8))


def test_all_kept_when_indices_none_and_scaling():
    img = _frame()
    out = viz.overlay_kept_tokens(img, None, grid=8, scale=4)
    assert out.size == (256, 256)
    np.testing.assert_array_equal(np.asarray(out)[::4, ::4], img)


def test_float_pixel_values_and_rectangular_grid():
    pix = np.zeros((3, 32, 48), dtype=np.float32) - 1.0  # [C, H, W] in [-1, 1]
    out = viz.overlay_kept_tokens(pix, [0, 5], grid=(2, 3), scale=1)
    assert out.size == (48, 32)


def test_out_of_range_index_raises():
    with pytest.raises(ValueError, match="out of range"):
        viz.overlay_kept_tokens(_frame(), [64], grid=8)


def test_kept_indices_from_stats():
    stats = {"per_sample": [{"visual_before": 8, "kept_indices": [1, 2, 6, 7], "pruned": True}], "images": 2}
    assert viz.kept_indices_from_stats(stats, image=0) == [1, 2]
    assert viz.kept_indices_from_stats(stats, image=1) == [2, 3]
    assert viz.kept_indices_from_stats({"per_sample": [{"pruned": False, "kept_indices": [0]}]}) is None
    assert viz.kept_indices_from_stats({"per_sample": []}) is None


def test_panel_and_line_plot(tmp_path):
    a = viz.overlay_kept_tokens(_frame(), [3], grid=8)
    path = viz.save_panel([a, a], str(tmp_path / "p.png"), titles=["x", "y"], caption="c")
    assert Image.open(path).size[0] > 2 * a.width
    path = viz.line_plot(["100%", "50%"], {"dual": [1.0, 0.9], "fastv": [1.0, None]}, str(tmp_path / "l.png"))
    assert Image.open(path).size == (560, 360)
