"""Where each image token's cell lies in the image.

The processor turns an image into tiles (MM1.5 splitting: the grid's tiles, then the whole
image as an overview; or the whole image alone), and the connector turns each tile into a
`side x side` grid of tokens. These functions run that layout backwards: token cell -> tile
pixel -> canvas -> image pixel, for each of the processor's resize modes. Dense pre-training
labels a token with what lies under its cell, and the box-attention loss finds the tokens
inside a box.
"""

import numpy as np

from mm1_mlx import splitting
from mm1_mlx.config import PreprocessConfig
from mm1_mlx.processor import WHOLE_IMAGE, shortest_edge_size


def fitted_to_image(points: np.ndarray, size: tuple[int, int], canvas: tuple[int, int]):
    """Canvas pixels -> image pixels, for an image fitted into `canvas` (aspect ratio kept,
    centred), as `processor.place_in_canvas` draws it."""
    left, top, right, bottom = splitting.fitted_box(size, canvas)
    return (points - (left, top)) * np.array(size) / (right - left, bottom - top)


def cell_centres(
    size: tuple[int, int], grid: splitting.Grid, config: PreprocessConfig, side: int
) -> np.ndarray:
    """[tiles, side * side, 2]: the image pixel (x, y) under the centre of each token's cell,
    tiles in the processor's order (the grid's row-major, then the overview), tokens row-major."""
    tile = config.image_size
    offsets = (np.arange(side) + 0.5) * tile / side
    ys, xs = np.meshgrid(offsets, offsets, indexing="ij")
    cells = np.stack([xs.ravel(), ys.ravel()], axis=-1)
    whole = resized_to_image(cells, size, config)
    if grid == WHOLE_IMAGE:
        return whole[None]
    canvas = splitting.canvas_size(grid, tile)
    tiles = [
        fitted_to_image(cells + np.array(box[:2]), size, canvas)
        for box in splitting.tile_boxes(grid, tile)
    ]
    return np.stack([*tiles, whole])


def resized_to_image(points: np.ndarray, size: tuple[int, int], config: PreprocessConfig):
    """Pixels of the whole image's encoder input -> image pixels, for each of
    `processor.resize_image`'s modes."""
    tile = config.image_size
    if config.resize_mode == "squash":
        return points * np.array(size) / tile
    if config.resize_mode == "pad":
        return fitted_to_image(points, size, (tile, tile))
    # "crop": resized to the shortest edge, then the centre square (as centre_square rounds)
    resized = shortest_edge_size(size, config)
    corner = ((resized[0] - tile) // 2, (resized[1] - tile) // 2)
    return (points + corner) * np.array(size) / resized
