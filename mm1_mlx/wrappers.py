"""Modules that run another module's code with something around it, for layers whose classes
belong to mlx-lm: `Checkpointed` (gradient checkpointing of a decoder layer) and, in training,
the router that records its logits (`mm1_mlx.train.moe`).

A wrapper holds the wrapped module's parameters and sub-modules under their own names and keeps
the module itself outside the parameter tree, so parameter paths are the same with and without
it: saved weights, checkpoints, LoRA keys and frozen parameters do not see it.
"""

import mlx.core as mx
import mlx.nn as nn


class ModuleWrapper(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        dict.update(self, module)
        self._no_grad = module._no_grad  # one set: freezing either freezes both
        self._training = module.training
        object.__setattr__(self, "wrapped", module)  # not an item: no path of its own

    def __getattr__(self, key: str):
        # The model around reads the wrapped layer's plain attributes (a decoder's `use_sliding`).
        if key in self:
            return self[key]
        if key == "wrapped":
            raise AttributeError(key)
        return getattr(self.wrapped, key)

    def call_wrapped(self, *args, **kwargs):
        """The wrapped module's output with this wrapper's current parameters and sub-modules
        (value_and_grad, the optimizer, LoRA and quantization change the wrapper's)."""
        self.sync()
        return self.wrapped(*args, **kwargs)

    def unwrap(self) -> nn.Module:
        """The wrapped module, holding this wrapper's current parameters and sub-modules."""
        self.sync()
        return self.wrapped

    def sync(self) -> None:
        dict.update(self.wrapped, self)
        self.wrapped._training = self._training


class Checkpointed(ModuleWrapper):
    """A layer whose activations are recomputed in the backward pass instead of kept
    (mx.checkpoint over its trainable parameters and inputs, as mlx-lm's grad_checkpoint)."""

    def __call__(self, *args, **kwargs):
        return mx.checkpoint(self.run)(self.trainable_parameters(), *args, **kwargs)

    def run(self, params, *args, **kwargs):
        self.update(params)
        return self.call_wrapped(*args, **kwargs)


def checkpoint_layers(model: nn.Module, layers: list[nn.Module], enabled: bool) -> None:
    """Puts each of `layers` in `Checkpointed` (or takes it out, `enabled` False) wherever
    `model`'s module tree holds it (a decoder's `layers` may be a copy of its stored list)."""
    replacements = {}
    for layer in layers:
        if enabled and not isinstance(layer, Checkpointed):
            replacements[id(layer)] = Checkpointed(layer)
        elif not enabled and isinstance(layer, Checkpointed):
            replacements[id(layer)] = layer.unwrap()
    for _, module in model.named_modules():
        for stored in module.values():
            if isinstance(stored, list):
                stored[:] = [replacements.get(id(item), item) for item in stored]
