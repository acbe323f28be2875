"""Gradient checkpointing of the ViT blocks and decoder layers: the same losses and gradients,
the same parameter paths, and the plain layers back when it is switched off."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mm1_mlx
from mm1_mlx.train.lora import apply_lora
from mm1_mlx.train.trainer import ExampleMask
from mm1_mlx.wrappers import Checkpointed


def loss_and_grads(model, input_ids, pixels, cache=None):
    def loss_fn(model):
        return model(input_ids, pixels, cache=cache).astype(mx.float32).square().mean()

    return nn.value_and_grad(model, loss_fn)(model)


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed-examples"])
def test_checkpointing_gives_the_same_gradients_and_paths(tiny_model_dir, packed):
    model, _ = mm1_mlx.load(tiny_model_dir)
    tokens = model.config.num_image_tokens
    input_ids = mx.array([[1, *[model.image_token_id] * tokens, 5, 9, 2, 1, 7, 2]])
    pixels = mx.random.normal((1, 48, 48, 3))
    cache = None
    if packed:  # two examples in the row, each attending only to itself
        example_ids = np.array([[0] * (tokens + 4) + [1] * 3])
        cache = [ExampleMask(example_ids)] * len(model.decoder.layers)
    layers = list(model.decoder.layers)
    paths = [path for path, _ in tree_flatten(model.parameters())]
    loss, grads = loss_and_grads(model, input_ids, pixels, cache)

    model.set_gradient_checkpointing(True)
    assert all(isinstance(layer, Checkpointed) for layer in model.decoder.layers)
    assert model.vision.checkpoint_blocks
    assert [path for path, _ in tree_flatten(model.parameters())] == paths
    checkpointed_loss, checkpointed = loss_and_grads(model, input_ids, pixels, cache)
    assert checkpointed_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    for (path, g), (_, c) in zip(tree_flatten(grads), tree_flatten(checkpointed), strict=True):
        np.testing.assert_allclose(np.array(c), np.array(g), rtol=1e-4, atol=1e-7, err_msg=path)

    model.set_gradient_checkpointing(False)
    assert all(a is b for a, b in zip(model.decoder.layers, layers, strict=True))
    assert not model.vision.checkpoint_blocks


def test_lora_added_after_checkpointing_reaches_the_layers(tiny_model_dir):
    """LoRA replaces modules inside the wrapped layers; the wrapped layers run with them."""
    input_ids = mx.array([[1, 5, 9, 2]])
    results = []
    for checkpointing in (False, True):
        model, _ = mm1_mlx.load(tiny_model_dir)
        model.set_gradient_checkpointing(checkpointing)
        mx.random.seed(1)
        apply_lora(model, rank=2, num_layers=2)
        model.decoder.layers[0].self_attn.q_proj.lora_b = mx.ones((2, 64))  # B starts at 0
        results.append(loss_and_grads(model, input_ids, None))
    (loss, grads), (checkpointed_loss, checkpointed) = results
    assert checkpointed_loss.item() == loss.item()
    for (path, g), (_, c) in zip(tree_flatten(grads), tree_flatten(checkpointed), strict=True):
        assert np.array_equal(np.array(c), np.array(g)), path
