"""LoRA and QLoRA on the tiny model's decoder: what trains, fusing, saving and reloading."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import relative_error
from mlx.utils import tree_flatten
from test_optim import image_batch, train_steps

import mm1_mlx
from mm1_mlx.errors import UserError
from mm1_mlx.loading import save_model
from mm1_mlx.quantize import quantize_model
from mm1_mlx.train.lora import apply_lora, fuse_lora, lora_parameters
from mm1_mlx.train.optim import ModuleSettings, freeze_modules, make_optimizer, make_schedule

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def trainable(module: nn.Module) -> set[str]:
    return {path for path, _ in tree_flatten(module.trainable_parameters())}


def train_lora(model, processor) -> list[float]:
    """Five AdamW steps on one image-text batch, training what is trainable."""
    optimizer = make_optimizer(model, "adamw", make_schedule(1e-2, 5))
    return train_steps(model, optimizer, *image_batch(processor), steps=5)


def logits(model, processor) -> mx.array:
    return model(*image_batch(processor))


def test_only_lora_weights_train_and_start_as_a_no_op(tiny_model_dir):
    model, processor = mm1_mlx.load(tiny_model_dir)
    base = logits(model, processor)
    apply_lora(model, rank=4)
    expected = {
        f"model.layers.{i}.self_attn.{proj}.{leaf}"
        for i in range(2)
        for proj in ATTENTION
        for leaf in ("lora_a", "lora_b")
    }
    adapters = {f"decoder.{path}" for path in expected}
    assert trainable(model) == adapters == set(lora_parameters(model))
    assert model.decoder.model.layers[0].self_attn.q_proj.lora_a.shape == (64, 4)
    assert mx.array_equal(logits(model, processor), base)  # B starts at 0
    freeze_modules(model, {})  # modules not asked to train stay frozen beside the adapters
    assert trainable(model) == adapters
    freeze_modules(model, {"connector": ModuleSettings(trainable=True)})
    connector = {f"connector.{path}" for path, _ in tree_flatten(model.connector.parameters())}
    assert trainable(model) == adapters | connector
    freeze_modules(model, {"decoder": ModuleSettings(trainable=True)})  # its base stays frozen
    assert trainable(model) == adapters


def test_num_layers_and_keys_choose_the_layers(tiny_model_dir):
    model, _ = mm1_mlx.load(tiny_model_dir)
    apply_lora(model, num_layers=1, keys=["mlp", "self_attn.v_proj"])
    lora = {path.rsplit(".", 1)[0] for path in lora_parameters(model.decoder)}
    assert lora == {
        f"model.layers.1.{name}"
        for name in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.v_proj")
    }


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(num_layers=3), "num_layers must be within 1..2, not 3"),
        (dict(num_layers=0), "num_layers must be within 1..2, not 0"),
        (dict(keys=["self_attn.qkv"]), "LoRA key 'self_attn.qkv' selects no linear layer"),
    ],
)
def test_bad_lora_settings_are_refused(tiny_model, arguments, message):
    model, _ = tiny_model
    with pytest.raises(UserError, match=message) as error:
        apply_lora(model, **arguments)
    assert "\n" not in str(error.value)
    assert not lora_parameters(model)


def test_lora_trains_fuses_saves_and_reloads(tiny_model_dir, tmp_path):
    model, processor = mm1_mlx.load(tiny_model_dir)
    base = logits(model, processor)
    apply_lora(model, rank=4)
    losses = train_lora(model, processor)
    assert losses[-1] < losses[0]
    trained = logits(model, processor)
    assert relative_error(trained, base) > 1e-3
    with pytest.raises(UserError, match="already has LoRA layers"):
        apply_lora(model)

    fuse_lora(model)
    assert not lora_parameters(model)
    assert type(model.decoder.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not trainable(model.decoder)  # frozen, as the base weights were
    assert relative_error(logits(model, processor), trained) <= 1e-4

    save_model(model, tmp_path / "fused", tiny_model_dir)
    reloaded, _ = mm1_mlx.load(tmp_path / "fused")
    assert mx.array_equal(logits(reloaded, processor), logits(model, processor))


def test_adapter_weights_reload_into_a_fresh_lora_model(tiny_model_dir):
    model, processor = mm1_mlx.load(tiny_model_dir)
    apply_lora(model, rank=4)
    train_lora(model, processor)
    fresh, _ = mm1_mlx.load(tiny_model_dir)
    apply_lora(fresh, rank=4)
    fresh.load_weights(list(lora_parameters(model).items()), strict=False)
    assert mx.array_equal(logits(fresh, processor), logits(model, processor))


def test_qlora_trains_the_adapters_and_fuses_into_quantized_layers(tiny_model_dir, tmp_path):
    model, processor = mm1_mlx.load(tiny_model_dir)
    base = logits(model, processor)
    model.config.quantization = quantize_model(model, 4, 32)
    quantization_error = relative_error(logits(model, processor), base)
    quantized_base = np.array(model.decoder.model.layers[1].self_attn.q_proj.weight)
    apply_lora(model, rank=4)
    freeze_modules(model, {})
    losses = train_lora(model, processor)
    assert losses[-1] < losses[0]
    q_proj = model.decoder.model.layers[1].self_attn.q_proj
    assert np.array_equal(np.array(q_proj.linear.weight), quantized_base)
    unfused = logits(model, processor)

    fuse_lora(model)
    q_proj = model.decoder.model.layers[1].self_attn.q_proj
    assert isinstance(q_proj, nn.QuantizedLinear) and (q_proj.bits, q_proj.group_size) == (4, 32)
    assert not np.array_equal(np.array(q_proj.weight), quantized_base)
    # Quantizing W + BA again rounds only the weights BA pushed across a grid step, so it moves
    # the logits less than quantizing W did (measured 0.08x-0.31x of it, with the training's
    # BLAS-threading noise deciding how many weights cross).
    assert relative_error(logits(model, processor), unfused) < 0.5 * quantization_error

    save_model(model, tmp_path / "fused", tiny_model_dir)
    reloaded, _ = mm1_mlx.load(tmp_path / "fused")
    assert mx.array_equal(logits(reloaded, processor), logits(model, processor))
