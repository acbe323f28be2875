"""mm1-mlx: MM1-style multimodal LLMs in MLX."""

from mm1_mlx._openblas import load_openblas

# Must run before anything imports mlx.core (see _openblas.py).
OPENBLAS = load_openblas()

__version__ = "0.1.0"


def load(path_or_repo, lazy: bool = False):
    """`model, processor = mm1_mlx.load(folder_or_hub_id)`."""
    from mm1_mlx.loading import load as _load

    return _load(path_or_repo, lazy=lazy)
