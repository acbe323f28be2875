"""LoRA on the decoder with mlx-lm's LoRA layers; on a quantized decoder that is QLoRA.

Keys name layers inside each decoder layer, relative to it, as mlx-lm's do ("self_attn.q_proj",
"mlp.down_proj"); a key also selects every linear layer below it ("self_attn", "mlp"; on an MoE
decoder "mlp" includes the router and the experts). The default is every linear layer of the
attention block (the layer's sub-modules whose names contain "attn" or "attention").
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from mm1_mlx.errors import UserError
from mm1_mlx.model import MM1Model

LORA_LAYERS = (LoRALinear, LoRASwitchLinear, LoRAEmbedding)
LORA_LEAVES = ("lora_a", "lora_b")
# What mlx-lm turns into LoRA layers (its embeddings too, but decoder layers hold none).
LINEAR_LAYERS = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)


def apply_lora(
    model: MM1Model,
    rank: int = 8,
    scale: float = 20.0,
    dropout: float = 0.0,
    num_layers: int | None = None,
    keys: list[str] | None = None,
) -> None:
    """Put LoRA layers on the `keys` of the decoder's last `num_layers` layers (None: all).

    Only LoRA's A and B are trainable (B starts at 0, so the model's output is unchanged): the
    whole model is frozen first, vision encoder and connector included, as peft and mlx-lm do.
    `freeze_modules` unfreezes what is to train in full beside the adapters.
    """
    decoder = model.decoder
    if lora_parameters(decoder):
        raise UserError("the decoder already has LoRA layers (fuse them first)")
    layers = decoder.layers
    num_layers = len(layers) if num_layers is None else num_layers
    if not 1 <= num_layers <= len(layers):
        raise UserError(f"LoRA num_layers must be within 1..{len(layers)}, not {num_layers}")
    targets = lora_targets(layers[-num_layers:], keys)
    model.freeze()
    config = {"rank": rank, "scale": scale, "dropout": dropout, "keys": targets}
    linear_to_lora_layers(decoder, num_layers, config)
    decoder.train(decoder.training)  # new layers start in training mode; match the decoder


def lora_targets(layers: list[nn.Module], keys: list[str] | None) -> list[str]:
    """The paths, relative to a decoder layer, of the linear layers that `keys` select."""
    found = set()
    for layer in layers:
        found.update(path for path, m in layer.named_modules() if isinstance(m, LINEAR_LAYERS))
    linear = sorted(found)
    if keys is None:
        keys = sorted({path.split(".")[0] for path in linear if is_attention(path)})
    if not keys:
        raise UserError(f"no LoRA keys (nor an attention block); choose from: {', '.join(linear)}")
    targets = set()
    for key in keys:
        selected = [path for path in linear if path == key or path.startswith(f"{key}.")]
        if not selected:
            raise UserError(
                f"LoRA key {key!r} selects no linear layer; the decoder's layers have: "
                f"{', '.join(linear)}"
            )
        targets.update(selected)
    return sorted(targets)


def is_attention(path: str) -> bool:
    block = path.split(".")[0]
    return "attn" in block or "attention" in block


def fuse_lora(model: nn.Module) -> None:
    """Merge every LoRA layer into a plain layer of its base's kind: W + scale * B A, quantized
    again with the base's bits and group size where the base was quantized (QLoRA). Nothing
    happens to a model without LoRA layers."""
    fused = [(path, m.fuse()) for path, m in model.named_modules() if isinstance(m, LORA_LAYERS)]
    for _, layer in fused:
        layer.freeze()  # as their bases were
        layer.train(model.training)
    if fused:
        model.update_modules(tree_unflatten(fused))


def lora_layers(module: nn.Module) -> list[nn.Module]:
    return [layer for _, layer in module.named_modules() if isinstance(layer, LORA_LAYERS)]


def lora_parameters(model: nn.Module) -> dict[str, mx.array]:
    """LoRA's A and B matrices by path: what an adapter-only checkpoint holds; load them with
    `model.load_weights(list(weights.items()), strict=False)` after the same `apply_lora`."""
    return {
        path: value
        for path, value in tree_flatten(model.parameters())
        if path.rsplit(".", 1)[-1] in LORA_LEAVES
    }
