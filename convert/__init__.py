"""PyTorch-format checkpoints -> MM1 model folders in MLX, without torch."""

__all__ = ["CheckpointError", "open_checkpoint", "read_torch_checkpoint"]


def __getattr__(name: str):
    # Lazy, so importing one converter module does not import the others.
    if name in __all__:
        from mm1_mlx.convert import torch_reader

        return getattr(torch_reader, name)
    raise AttributeError(name)
