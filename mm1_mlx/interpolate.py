"""Bicubic resizing of feature grids, matching PyTorch's `interpolate(mode="bicubic")`."""

from functools import lru_cache

import mlx.core as mx
import numpy as np

# PyTorch's (and OpenCV's) bicubic kernel parameter; PIL uses -0.5.
CUBIC_A = -0.75


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Weights of the 4 taps at offsets -1, 0, 1, 2 for fractional positions t: [n] -> [n, 4]."""
    a = CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] matrix M with M @ x == 1-D bicubic resize of x (align_corners=False).

    Like PyTorch given an output size: source position (i + 0.5) * in / out - 0.5, not clamped
    for cubic; taps beyond the border read the edge value (their weights add up there).
    """
    source = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    start = np.floor(source)
    weights = _cubic_weights(source - start)
    taps = np.clip(start[:, None].astype(np.int64) + np.arange(-1, 3), 0, in_size - 1)
    matrix = np.zeros((out_size, in_size))
    np.add.at(matrix, (np.arange(out_size)[:, None], taps), weights)
    matrix = matrix.astype(np.float32)
    matrix.setflags(write=False)  # shared by the cache
    return matrix


def resize_bicubic(grid: mx.array, size: tuple[int, int]) -> mx.array:
    """Resize a channels-last grid [H, W, C] or [B, H, W, C] to `size` = (height, width).

    Equals `torch.nn.functional.interpolate(mode="bicubic", align_corners=False, size=size)`
    on the channels-first layout. Bicubic resizing is separable, so it is two matmuls.
    """
    *lead, height, width, channels = grid.shape
    out_height, out_width = size
    rows = mx.array(bicubic_matrix(height, out_height), dtype=grid.dtype)
    cols = mx.array(bicubic_matrix(width, out_width), dtype=grid.dtype)
    x = rows @ grid.reshape(*lead, height, width * channels)
    x = x.reshape(*lead, out_height, width, channels)
    return cols @ x  # [out_width, width] @ [..., out_height, width, C], broadcast over the rest
