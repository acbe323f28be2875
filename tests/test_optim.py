"""Learning rate, schedule, optimizer groups (frozen modules, LR multipliers, weight decay),
AdaFactor, gradient clipping and parameter counts on the tiny model."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import shapes_picture
from mlx.utils import tree_flatten, tree_map

import mm1_mlx
from mm1_mlx.errors import UserError
from mm1_mlx.quantize import quantize_model
from mm1_mlx.train.optim import (
    ModuleSettings,
    clip_grad_norm,
    count_parameters,
    freeze_modules,
    make_optimizer,
    make_schedule,
    mm1_peak_lr,
)


def image_batch(processor) -> tuple[mx.array, mx.array]:
    inputs = processor("<image>\nwhat color is the circle? red", [shapes_picture()])
    return inputs["input_ids"], inputs["pixels"]


def next_token_loss(model, input_ids: mx.array, pixels: mx.array | None = None) -> mx.array:
    logits = model(input_ids, pixels)[:, :-1]
    return nn.losses.cross_entropy(logits, input_ids[:, 1:]).mean()


def train_steps(model, optimizer, input_ids, pixels=None, steps: int = 3) -> list[float]:
    """`steps` optimizer steps on one batch; the loss before each."""
    loss_and_grad = nn.value_and_grad(model, next_token_loss)
    losses = []
    for _ in range(steps):
        loss, grads = loss_and_grad(model, input_ids, pixels)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        losses.append(loss.item())
    return losses


def flat(module: nn.Module) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(module.parameters())}


@pytest.mark.parametrize("n", [1e6, 3e9, 7e9, 30e9])
def test_mm1_peak_lr_follows_the_formula(n):
    assert mm1_peak_lr(int(n)) == pytest.approx(math.exp(-0.4214 * math.log(n) - 0.5535))


def test_mm1_peak_lr_is_of_the_papers_order_and_falls_with_size():
    assert 3e-5 < mm1_peak_lr(3_000_000_000) < 1e-4
    assert mm1_peak_lr(30_000_000_000) < mm1_peak_lr(3_000_000_000)
    with pytest.raises(UserError, match="must have parameters"):
        mm1_peak_lr(0)


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    schedule = make_schedule(1e-3, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    values = np.array([schedule(step).item() for step in range(121)])
    assert values[0] == 0.0
    assert values[5] == pytest.approx(0.5e-3)
    assert values[10] == pytest.approx(1e-3)
    assert values[55] == pytest.approx(0.55e-3, rel=1e-5)  # half-way down: mean of peak and floor
    assert values[100] == pytest.approx(1e-4)
    assert np.allclose(values[100:], 1e-4)  # flat at the floor past the end
    assert np.all(np.diff(values[:11]) > 0) and np.all(np.diff(values[10:101]) < 0)
    assert schedule(mx.array(5, mx.uint64)).item() == pytest.approx(0.5e-3)  # an optimizer's step


def test_linear_and_constant_schedules():
    linear = make_schedule(2.0, total_steps=10, warmup_steps=2, min_lr_ratio=0.5, decay="linear")
    assert [round(linear(s).item(), 6) for s in range(0, 11, 2)] == [0, 2, 1.75, 1.5, 1.25, 1]
    constant = make_schedule(2.0, total_steps=10, warmup_steps=4, decay="constant")
    assert [constant(s).item() for s in (0, 2, 4, 10, 20)] == [0, 1, 2, 2, 2]
    assert make_schedule(2.0, total_steps=10)(0).item() == pytest.approx(2.0)  # no warm-up


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(decay="step"), "decay must be one of cosine, linear, constant"),
        (dict(warmup_steps=20), r"warm-up steps \(20\) must be within 0..10"),
        (dict(min_lr_ratio=2.0), "min_lr_ratio must be within 0..1"),
    ],
)
def test_bad_schedules_are_refused(arguments, message):
    with pytest.raises(UserError, match=message):
        make_schedule(1e-3, total_steps=10, **arguments)


def test_a_frozen_module_stays_bit_identical(tiny_model_dir):
    model, processor = mm1_mlx.load(tiny_model_dir)
    modules = {"vision": ModuleSettings(trainable=False)}
    freeze_modules(model, modules)
    optimizer = make_optimizer(model, "adamw", make_schedule(1e-2, 10), 0.1, modules)
    before = flat(model)
    train_steps(model, optimizer, *image_batch(processor))
    after = flat(model)
    assert all(np.array_equal(before[k], after[k]) for k in before if k.startswith("vision."))
    for part in ("connector.", "decoder."):
        assert all(not np.array_equal(before[k], after[k]) for k in before if k.startswith(part))


def test_freezing_can_be_undone_except_for_quantized_layers(tiny_model_dir):
    model, _ = mm1_mlx.load(tiny_model_dir)
    quantize_model(model, 4, 32)
    freeze_modules(model, {"decoder": ModuleSettings(trainable=False)})
    assert not tree_flatten(model.decoder.trainable_parameters())
    freeze_modules(model, {})
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert "decoder.model.norm.weight" in trainable and "vision.ln_post.bias" in trainable
    assert all(v.dtype == mx.float32 for v in trainable.values())  # no packed weights, scales
    assert "decoder.model.layers.0.self_attn.q_proj.weight" not in trainable
    with pytest.raises(UserError, match="unknown module 'llm'"):
        freeze_modules(model, {"llm": ModuleSettings()})


def first_step_update(model_dir, modules, name="adamw") -> dict[str, np.ndarray]:
    model, processor = mm1_mlx.load(model_dir)
    optimizer = make_optimizer(model, name, make_schedule(1e-2, 10), modules=modules)
    before = flat(model)
    train_steps(model, optimizer, *image_batch(processor), steps=1)
    return {k: v - before[k] for k, v in flat(model).items()}


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_an_lr_multiplier_of_a_half_halves_the_update(tiny_model_dir, name):
    full = first_step_update(tiny_model_dir, None, name)
    half = first_step_update(tiny_model_dir, {"connector": ModuleSettings(lr_multiplier=0.5)}, name)
    for key in full:
        expected = 0.5 * full[key] if key.startswith("connector.") else full[key]
        np.testing.assert_allclose(half[key], expected, rtol=1e-4, atol=1e-8, err_msg=key)
    # AdamW's first step with bias correction moves each weight by the learning rate.
    if name == "adamw":
        assert np.median(np.abs(full["decoder.lm_head.weight"])) == pytest.approx(1e-2, rel=1e-3)


def test_weight_decay_shrinks_the_matrices_of_layers_only(tiny_model_dir):
    model, _ = mm1_mlx.load(tiny_model_dir)
    optimizer = make_optimizer(model, "adamw", make_schedule(1e-2, 10), weight_decay="mm1")
    before = flat(model)
    zero_grads = tree_map(mx.zeros_like, model.trainable_parameters())  # only decay moves them
    optimizer.update(model, zero_grads)
    after = flat(model)
    decayed = {k for k in before if not np.array_equal(before[k], after[k])}
    for key in decayed:  # MM1's decay: 0.1 times the learning rate
        np.testing.assert_allclose(after[key], (1 - 0.1 * 1e-2) * before[key], rtol=1e-6)
    assert {
        "decoder.model.layers.0.self_attn.q_proj.weight",
        "decoder.model.layers.1.mlp.down_proj.weight",
        "decoder.lm_head.weight",
        "vision.patch_embed.weight",
        "vision.blocks.0.attn.q_proj.weight",
        "connector.net.0.b1.conv2.conv.weight",  # depthwise
        "connector.readout.0.weight",
    } <= decayed
    assert (
        not {
            "decoder.model.embed_tokens.weight",
            "decoder.model.norm.weight",
            "vision.position_embedding",
            "vision.class_embedding",
            "vision.blocks.0.attn.q_proj.bias",
            "vision.ln_post.weight",
            "connector.pos_emb",
            "connector.readout.0.bias",
        }
        & decayed
    )
    assert all(k.endswith(".weight") and before[k].ndim >= 2 for k in decayed)


def test_adafactor_trains(tiny_model_dir):
    model, processor = mm1_mlx.load(tiny_model_dir)
    optimizer = make_optimizer(model, "adafactor", make_schedule(1e-2, 10), weight_decay=0.01)
    losses = train_steps(model, optimizer, *image_batch(processor), steps=5)
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(np.isfinite(v).all() for v in flat(model).values())


def test_unknown_optimizer_and_bad_weight_decay_are_refused(tiny_model):
    model, _ = tiny_model
    schedule = make_schedule(1e-3, 10)
    with pytest.raises(UserError, match="optimizer must be one of adamw, adafactor, not 'sgd'"):
        make_optimizer(model, "sgd", schedule)
    with pytest.raises(UserError, match="weight decay must be a number >= 0 or 'mm1'"):
        make_optimizer(model, "adamw", schedule, weight_decay="lots")


def test_clip_grad_norm_caps_the_global_norm():
    grads = {"a": mx.array([3.0, 0.0]), "b": [mx.array([[4.0]])]}  # norm 5
    clipped, norm = clip_grad_norm(grads, 1.0)
    assert norm.item() == pytest.approx(5.0)
    assert np.array(clipped["a"]) == pytest.approx([0.6, 0.0], rel=1e-5)
    assert clipped["b"][0].item() == pytest.approx(0.8, rel=1e-5)
    unchanged, _ = clip_grad_norm(grads, 10.0)
    assert np.array_equal(np.array(unchanged["a"]), [3.0, 0.0])


def test_count_parameters_counts_quantized_weights_unpacked(tiny_model_dir):
    model, _ = mm1_mlx.load(tiny_model_dir)
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert count_parameters(model) == total
    decoder = count_parameters(model.decoder)
    quantize_model(model, 4, 32)
    assert count_parameters(model.decoder) == decoder
