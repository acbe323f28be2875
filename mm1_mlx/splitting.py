"""MM1.5 dynamic image splitting: which grid of sub-images an image gets, and where they lie.

Pure geometry, asked for by processor.py, which does the pixels and the tokens. Sizes are
(width, height) like PIL's, grids are (rows, columns) = (n_h, n_w), and every sub-image ("tile")
is tile x tile pixels, the encoder's input size.

Grid choice (MM1.5's dynamic splitting, Zhang et al. 2024, arXiv:2409.20566): the candidates are
all grids with n_min <= rows * columns <= n_max. The image is fitted into each grid's canvas
(columns * tile by rows * tile), keeping its aspect ratio. If some canvases hold the image
without downscaling it, the one with the least padding (canvas area minus fitted image area)
wins; otherwise the one keeping the largest image area. Ties go to fewer tiles, then fewer rows,
so the choice is deterministic.

In the prompt a split image is its tiles, row-major, then an overview of the whole image, each
behind a short text marker (`prompt_layout`). A 1x1 grid needs no splitting: such an image is
encoded as without splitting, one block, no markers.
"""

from collections.abc import Sequence
from typing import Any

from mm1_mlx.boxes import PixelBox
from mm1_mlx.errors import UserError

Size = tuple[int, int]  # (width, height)
Grid = tuple[int, int]  # (rows, columns)

WHOLE_IMAGE: Grid = (1, 1)  # the grid of an image that is not split: one tile, the whole picture
OVERVIEW_MARKER = "(overview)"


def tile_marker(row: int, column: int) -> str:
    """The text before a tile's image tokens: its 1-based position, e.g. "(1,2)"."""
    return f"({row + 1},{column + 1})"


def split_range(
    settings: dict[str, Any],
    num_images: int,
    split: bool | None = None,
    n_min: int | None = None,
    n_max: int | None = None,
) -> tuple[int, int] | None:
    """The (n_min, n_max) tile range for a prompt with `num_images` images, or None: no splitting.

    `settings` is PreprocessConfig.splitting; `split`, `n_min`, `n_max` override it per call.
    Prompts with `max_images` images or more are never split (MM1.5 trains that way).
    """
    enabled = settings["enabled"] if split is None else split
    if not enabled or num_images >= settings["max_images"]:
        return None
    low = settings["n_min"] if n_min is None else n_min
    high = settings["n_max"] if n_max is None else n_max
    if not 1 <= low <= high:
        raise UserError(f"image splitting needs 1 <= n_min <= n_max, not n_min={low} n_max={high}")
    return low, high


def image_grids(
    sizes: Sequence[Size],
    tile: int,
    settings: dict[str, Any],
    split: bool | None = None,
    n_min: int | None = None,
    n_max: int | None = None,
) -> list[Grid]:
    """The grid each image of a prompt is split into, from the sizes of all the prompt's
    images; WHOLE_IMAGE where it is not split (`split_range` for the other arguments)."""
    grid_range = split_range(settings, len(sizes), split, n_min, n_max)
    if grid_range is None:
        return [WHOLE_IMAGE] * len(sizes)
    return [select_grid(size, tile, *grid_range) for size in sizes]


def num_tiles(grid: Grid) -> int:
    """Tiles of an image split into `grid`: the grid's and the overview, or just the whole."""
    return 1 if grid == WHOLE_IMAGE else grid[0] * grid[1] + 1


def candidate_grids(n_min: int, n_max: int) -> list[Grid]:
    return [
        (rows, columns)
        for rows in range(1, n_max + 1)
        for columns in range(1, n_max // rows + 1)
        if rows * columns >= n_min
    ]


def canvas_size(grid: Grid, tile: int) -> Size:
    return grid[1] * tile, grid[0] * tile


def fit_size(size: Size, box: Size) -> Size:
    """The largest size with `size`'s aspect ratio that fits in `box` (each side at least 1)."""
    scale = min(box[0] / size[0], box[1] / size[1])
    width = min(box[0], max(1, round(size[0] * scale)))
    height = min(box[1], max(1, round(size[1] * scale)))
    return width, height


def fitted_box(size: Size, canvas: Size) -> PixelBox:
    """Where an image of `size` lies once fitted into `canvas`, centred (the rest is padding)."""
    inner = fit_size(size, canvas)
    left, top = (canvas[0] - inner[0]) // 2, (canvas[1] - inner[1]) // 2
    return left, top, left + inner[0], top + inner[1]


def grid_preference(size: Size, grid: Grid, tile: int) -> tuple:
    """Sort key of a grid for an image of `size`: the smallest key is the best grid."""
    canvas = canvas_size(grid, tile)
    fitted = fit_size(size, canvas)
    fitted_area = fitted[0] * fitted[1]
    padding = canvas[0] * canvas[1] - fitted_area
    holds = size[0] <= canvas[0] and size[1] <= canvas[1]  # no downscaling
    lost_area = 0 if holds else -fitted_area  # compared only among downscaling grids
    return (not holds, lost_area, padding, grid[0] * grid[1], grid[0])


def select_grid(size: Size, tile: int, n_min: int, n_max: int) -> Grid:
    """The grid an image of `size` is split into (module docstring)."""
    return min(candidate_grids(n_min, n_max), key=lambda grid: grid_preference(size, grid, tile))


def tile_boxes(grid: Grid, tile: int) -> list[PixelBox]:
    """The tiles' crop boxes in the grid's canvas, row-major."""
    return [
        (column * tile, row * tile, (column + 1) * tile, (row + 1) * tile)
        for row in range(grid[0])
        for column in range(grid[1])
    ]


def prompt_layout(grid: Grid, image_token: str) -> str:
    """What an image's one `<image>` marker becomes: itself for the whole image; for a split
    one "(1,1)<image>(1,2)<image>...(overview)<image>", one `<image>` per tile, row-major, the
    overview last."""
    if grid == WHOLE_IMAGE:
        return image_token
    tiles = [
        tile_marker(row, column) + image_token
        for row in range(grid[0])
        for column in range(grid[1])
    ]
    return "".join(tiles) + OVERVIEW_MARKER + image_token
