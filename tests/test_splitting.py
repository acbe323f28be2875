"""MM1.5 dynamic image splitting: grid choice on a table of image sizes, and the geometry."""

import pytest

from mm1_mlx.config import SPLITTING_DEFAULTS
from mm1_mlx.errors import UserError
from mm1_mlx.splitting import (
    candidate_grids,
    fit_size,
    fitted_box,
    prompt_layout,
    select_grid,
    split_range,
    tile_boxes,
)

R = 672  # MM1.5's sub-image size


@pytest.mark.parametrize(
    "size, n_range, grid, why",
    [
        ((672, 672), (1, 9), (1, 1), "fits one tile exactly"),
        ((1344, 1344), (4, 9), (2, 2), "2x2 and 3x3 both hold it unpadded: fewer tiles"),
        ((2688, 672), (4, 9), (1, 4), "wide: one row"),
        ((672, 2688), (4, 9), (4, 1), "tall: one column"),
        ((1344, 1008), (4, 9), (2, 3), "4:3 pads least in 2016x1344 (upscaled 4/3)"),
        ((672, 672), (4, 9), (2, 2), "n_min 4 forces upscaling"),
        ((100, 100), (4, 9), (2, 2), "tiny: upscaled into the smallest square grid"),
        ((100, 200), (1, 9), (2, 1), "tiny tall: no padding beats fewer tiles"),
        ((4000, 3000), (4, 9), (3, 3), "too big for all: 3x3 keeps the most area"),
        ((8000, 1000), (4, 9), (1, 8), "too big, 8:1: 1x8 and 1x9 keep as much, 1x8 pads less"),
        ((672, 672), (2, 2), (1, 2), "1x2 and 2x1 tie: fewer rows"),
    ],
)
def test_grid_selection(size, n_range, grid, why):
    assert select_grid(size, R, *n_range) == grid, why


def test_candidate_grids_are_all_grids_in_the_tile_range():
    expected = {(h, w) for h in range(1, 10) for w in range(1, 10) if 4 <= h * w <= 9}
    grids = candidate_grids(4, 9)
    assert set(grids) == expected and len(grids) == len(expected)
    assert candidate_grids(1, 1) == [(1, 1)]


@pytest.mark.parametrize(
    "size, box, fitted",
    [
        ((200, 100), (48, 48), (48, 24)),
        ((48, 48), (96, 48), (48, 48)),
        ((1, 1000), (48, 48), (1, 48)),
    ],
)
def test_fit_size_keeps_the_aspect_ratio(size, box, fitted):
    assert fit_size(size, box) == fitted


def test_tiles_are_row_major():
    assert tile_boxes((2, 3), 10) == [
        (0, 0, 10, 10), (10, 0, 20, 10), (20, 0, 30, 10),
        (0, 10, 10, 20), (10, 10, 20, 20), (20, 10, 30, 20),
    ]  # fmt: skip


def test_prompt_layout_marks_each_tile_then_the_overview():
    expected = "(1,1)<image>(1,2)<image>(2,1)<image>(2,2)<image>(overview)<image>"
    assert prompt_layout((2, 2), "<image>") == expected


@pytest.mark.parametrize(
    "settings, num_images, overrides, expected",
    [
        ({}, 1, {}, None),  # off by default
        ({}, 1, {"split": True}, (4, 9)),
        ({"enabled": True}, 2, {}, (4, 9)),
        ({"enabled": True}, 3, {}, None),  # 3 images or more: never split
        ({"enabled": True}, 1, {"split": False}, None),
        ({"enabled": True}, 1, {"n_min": 1, "n_max": 16}, (1, 16)),
        ({"enabled": True, "max_images": 5}, 4, {}, (4, 9)),
    ],
)
def test_split_range(settings, num_images, overrides, expected):
    assert split_range({**SPLITTING_DEFAULTS, **settings}, num_images, **overrides) == expected


@pytest.mark.parametrize("n_min, n_max", [(0, 4), (5, 4)])
def test_split_range_refuses_a_bad_range(n_min, n_max):
    with pytest.raises(UserError, match="n_min <= n_max"):
        split_range(SPLITTING_DEFAULTS, 1, split=True, n_min=n_min, n_max=n_max)


def test_a_fitted_image_is_centred_in_its_canvas():
    assert fitted_box((160, 320), (128, 128)) == (32, 0, 96, 128)
    assert fitted_box((160, 320), (128, 256)) == (0, 0, 128, 256)
    wide = fitted_box((300, 100), (128, 128))
    assert wide == (0, 42, 128, 85)  # 43 rows high, 85 rows of padding
