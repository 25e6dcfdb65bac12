"""draw_kept (d2pruner_kernels/draw.py): every bad argument is a TypeError / ValueError naming
it (issue 21, item 8); a bool mask is a documented mask; `crop` lays the grid over the part of
the picture the processor kept (item 14: LLaVA's centre crop of a non-square picture)."""
import numpy as np
import pytest
import torch

pytest.importorskip("PIL")

from d2pruner_kernels.draw import draw_kept  # noqa: E402

G = torch.Generator().manual_seed(0)
PIXELS = torch.randint(0, 256, (96, 64, 3), generator=G, dtype=torch.uint8).numpy()  # 96 x 64
GRID = (4, 4)  # cells of 24 x 16 px


def drawn(*args, **kwargs) -> np.ndarray:
    return np.asarray(draw_kept(*args, **kwargs))


def kept_cells(out: np.ndarray, src: np.ndarray, grid=GRID, box=None) -> list:
    """The cells (row-major) whose inner pixels are untouched: the ones drawn as kept."""
    left, top, right, bottom = box or (0, 0, src.shape[1], src.shape[0])
    gh, gw = grid
    h, w = (bottom - top) // gh, (right - left) // gw
    cells = []
    for r in range(gh):
        for c in range(gw):
            y, x = top + r * h + 3, left + c * w + 3
            if np.array_equal(out[y:y + h - 6, x:x + w - 6], src[y:y + h - 6, x:x + w - 6]):
                cells.append(r * gw + c)
    return cells


def test_indices_and_masks_draw_the_same_cells():
    want = [5, 10, 15]
    assert kept_cells(drawn(PIXELS, torch.tensor(want), GRID), PIXELS) == want
    mask = torch.zeros(16, dtype=torch.bool)
    mask[want] = True
    for m in (mask, mask.numpy(), mask.view(4, 4)):  # a bool mask is a mask, not [0, 1]
        assert kept_cells(drawn(PIXELS, m, GRID), PIXELS) == want
    for idx in (want, np.array(want, np.int32), torch.tensor(want, dtype=torch.int16),
                range(5, 16, 5)):
        assert kept_cells(drawn(PIXELS, idx, GRID), PIXELS) == want
    assert kept_cells(drawn(PIXELS, [], GRID), PIXELS) == []


@pytest.mark.parametrize("kept, error, message", [
    (torch.ones(15, dtype=torch.bool), ValueError,
     r"kept as a bool mask must have one entry per token: \[16\] or \[4, 4\]"),
    (torch.ones(2, 8, dtype=torch.bool), ValueError, r"kept as a bool mask"),
    (torch.tensor([[0, 1], [2, 3]]), ValueError,
     r"kept must be 1-D: the indices of one image \(pruner.kept\[b\]\[i\]\), got shape \[2, 2\]"),
    (torch.tensor([1.0, 2.7]), TypeError, r"kept must hold integer token indices .* float32"),
    ([1.5], TypeError, r"kept must hold integer token indices"),
    (np.array([0, 16]), ValueError, r"kept indices must be in \[0, 16\) for grid \(4, 4\), got \[16\]"),
    ([-1, 3], ValueError, r"kept indices must be in \[0, 16\) .*got \[-1\]"),
    (torch.tensor(3), ValueError, r"kept must be 1-D"),
    ("0, 1", TypeError, r"kept must be a tensor, an array or a list of token indices, got str"),
    (None, TypeError, r"kept must be a tensor, an array or a list"),
])
def test_bad_kept_raises_naming_it(kept, error, message):
    with pytest.raises(error, match=message):
        draw_kept(PIXELS, kept, GRID)


@pytest.mark.parametrize("highlight, error, message", [
    ([16], ValueError, r"highlight indices must be in \[0, 16\) for grid \(4, 4\), got \[16\]"),
    ([-1], ValueError, r"highlight indices must be in \[0, 16\)"),
    ([4], ValueError, r"highlight indices must be among kept, got \[4\] \(not kept\)"),
    ([5.0], TypeError, r"highlight must hold integer token indices"),
    ([[5]], ValueError, r"highlight must be 1-D"),
])
def test_bad_highlight_raises_naming_it(highlight, error, message):
    with pytest.raises(error, match=message):
        draw_kept(PIXELS, [5, 10], GRID, highlight=highlight)


def test_highlight_is_drawn_in_its_colour():
    out = drawn(PIXELS, [5, 10], GRID, highlight=torch.tensor([10]),
                highlight_outline=(255, 0, 255))
    assert tuple(out[2 * 24, 2 * 16 + 5]) == (255, 0, 255)       # cell 10's top edge
    assert tuple(out[1 * 24, 1 * 16 + 5]) == (255, 255, 255)     # cell 5's: plain outline


@pytest.mark.parametrize("grid, error, message", [
    ((4, 4.5), TypeError, r"grid must hold ints, got float 4.5"),
    ((4.0, 4), TypeError, r"grid must hold ints, got float 4.0"),
    ((True, 4), TypeError, r"grid must hold ints, got bool"),
    ((0, 4), ValueError, r"grid must hold positive ints, got \(0, 4\)"),
    ((4,), ValueError, r"grid must be \(H, W\) or \(t, H, W\)"),
    (16, ValueError, r"grid must be \(H, W\) or \(t, H, W\)"),
    ((97, 4), ValueError, r"grid \(97, 4\) has more cells across than the image has pixels "
                          r"\(64x96\)"),
    ((4, 65), ValueError, r"grid \(4, 65\) has more cells across than the image has pixels"),
])
def test_bad_grid_raises_naming_it(grid, error, message):
    with pytest.raises(error, match=message):
        draw_kept(PIXELS, [0], grid)


def test_grids_as_numpy_ints_or_a_tensor_row():
    want = kept_cells(drawn(PIXELS, [3], GRID), PIXELS)
    assert kept_cells(drawn(PIXELS, [3], (np.int64(4), np.int64(4))), PIXELS) == want == [3]
    assert kept_cells(drawn(PIXELS, [3], torch.tensor([4, 4])), PIXELS) == want


@pytest.mark.parametrize("image, error, message", [
    ("picture.png", TypeError, r"image must be a PIL image, a NumPy array or a tensor, got str"),
    (np.zeros((8, 8, 4), np.uint8), ValueError, r"image must be a PIL image, HxWx3"),
    (np.zeros((0, 8, 3), np.uint8), ValueError, r"image must be"),
    (np.zeros((8, 8, 3), bool), TypeError, r"image must hold uint8 values or floats"),
])
def test_bad_image_raises_naming_it(image, error, message):
    with pytest.raises(error, match=message):
        draw_kept(image, [0], (2, 2))


def test_frames():
    out = draw_kept([PIXELS, PIXELS], [0, 17], (2, 4, 4))
    assert out.size == (128, 96)
    a = np.asarray(out)
    assert kept_cells(a[:, :64], PIXELS) == [0] and kept_cells(a[:, 64:], PIXELS) == [1]
    stacked = draw_kept(np.stack([PIXELS, PIXELS]), [0, 17], (2, 4, 4))
    assert np.array_equal(np.asarray(stacked), a)
    with pytest.raises(ValueError, match=r"grid \(2, 4, 4\) has 2 frames: pass a list of 2 "
                       r"images, got one ndarray"):
        draw_kept(PIXELS, [0], (2, 4, 4))
    with pytest.raises(ValueError, match=r"pass a list of 2 images, got 3"):
        draw_kept([PIXELS] * 3, [0], (2, 4, 4))
    mask = np.zeros((2, 4, 4), bool)
    mask[1, 0, 1] = True
    assert np.array_equal(np.asarray(draw_kept([PIXELS, PIXELS], mask, (2, 4, 4))),
                          np.asarray(draw_kept([PIXELS, PIXELS], [17], (2, 4, 4))))


# -- crop: the part of the picture the model saw (issue 21, item 14) ------------------------------

def test_crop_lays_the_grid_over_the_box_and_dims_the_rest():
    wide = np.ascontiguousarray(PIXELS.transpose(1, 0, 2))  # 64 high x 96 wide
    box = (16, 0, 80, 64)  # the central 64 x 64 square
    out = drawn(wide, [5, 10], GRID, crop="center")
    assert np.array_equal(out, drawn(wide, [5, 10], GRID, crop=box))
    assert kept_cells(out, wide, box=box) == [5, 10]  # cells of 16 x 16 px in the box
    for strip in (out[:, :16], out[:, 80:]):  # outside the crop: never seen, dimmed
        assert strip.astype(float).mean() < 0.8 * wide[:, :16].astype(float).mean()
    # without the crop the same indices land elsewhere (cells of 16 x 24 px): what the
    # documentation warns about for non-square LLaVA pictures
    assert kept_cells(drawn(wide, [5, 10], GRID), wide, box=(0, 0, 96, 64)) == [5, 10]
    assert not np.array_equal(drawn(wide, [5, 10], GRID), out)
    tall = drawn(PIXELS, [0], GRID, crop="center")  # 96 high x 64 wide: rows 16..80
    assert kept_cells(tall, PIXELS, box=(0, 16, 64, 80)) == [0]


@pytest.mark.parametrize("crop, error, message", [
    ("middle", ValueError, r"crop must be None, 'center' or \(left, top, right, bottom\)"),
    ((0, 0, 64), ValueError, r"crop must be None, 'center'"),
    ((0, 0, 65, 96), ValueError, r"crop \(0, 0, 65, 96\) must be a non-empty box inside the "
                                 r"image of 64x96 pixels"),
    ((10, 0, 10, 96), ValueError, r"must be a non-empty box"),
    ((0.5, 0, 64, 96), TypeError, r"crop must hold int pixel coordinates, got float 0.5"),
    ((0, 0, 3, 96), ValueError, r"grid \(4, 4\) has more cells across than the image has "
                                r"pixels \(3x96 in the crop\)"),
])
def test_bad_crop_raises_naming_it(crop, error, message):
    with pytest.raises(error, match=message):
        draw_kept(PIXELS, [0], GRID, crop=crop)


def test_a_token_layout_draws_each_piece_over_its_picture():
    """InternVL-like: two 2x2 tiles stitched into a 2x4 picture, then a 2x2 thumbnail. Token
    4 (tile 1's first) is cell (0, 2) of the stitched picture, by hand."""
    from d2pruner_kernels import TokenLayout
    layout = TokenLayout.tiles(1, 2, (2, 2)) + TokenLayout.grid(2, 2)
    g = np.random.default_rng(0)
    stitched = g.integers(0, 255, (20, 40, 3), dtype=np.uint8)
    thumb = g.integers(0, 255, (20, 20, 3), dtype=np.uint8)
    got = np.asarray(draw_kept([stitched, thumb], [1, 4, 9], layout, highlight=[4]))
    left = np.asarray(draw_kept(stitched, [1, 2], (2, 4), highlight=[2]))
    right = np.asarray(draw_kept(thumb, [1], (2, 2)))
    assert np.array_equal(got, np.concatenate([left, right], axis=1))
    with pytest.raises(ValueError, match=r"has 2 pieces: pass a list of 2 pictures"):
        draw_kept(stitched, [1], layout)
    with pytest.raises(ValueError, match=r"kept indices must be in \[0, 12\)"):
        draw_kept([stitched, thumb], [12], layout)
