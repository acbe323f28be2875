"""mm1-mlx: MM1-style multimodal LLMs in MLX."""

from mm1_mlx._openblas import load_openblas

# Must run before anything imports mlx.core (see _openblas.py).
OPENBLAS = load_openblas()

__version__ = "0.1.0"
