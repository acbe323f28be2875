# Importing mm1_mlx first loads OpenBLAS for MLX on Linux (it must precede `import mlx.core`).
import mm1_mlx  # noqa: F401  isort: skip
import mlx.core as mx
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    mx.random.seed(0)
