"""Optimisation for training an MM1 model: MM1's learning-rate rule and schedule, the optimizer
(AdamW or AdaFactor) with per-module learning-rate multipliers, freezing, gradient clipping.

Per-module multipliers: `make_optimizer` returns an `mlx.optimizers.MultiOptimizer` holding one
inner optimizer per (module, decayed or not) group, six in all, each on the schedule times its
module's multiplier. Its `learning_rate` is the first group's (vision's), so log
`schedule(step)` rather than `optimizer.learning_rate`.

Weight decay (decoupled, as MLX's and PyTorch's AdamW: every step a decayed parameter shrinks by
`lr_t * weight_decay`) applies to the matrices of layers that transform their input: the
`weight` of Linear, convolution and expert layers, and LoRA's A and B. Norms, biases, embedding
tables (token, position, class token, learned queries) are not decayed: pulling them towards 0
has no regularising use. MM1's "weight decay 0.1 eta" is decoupled weight decay of 0.1 times the
scheduled learning rate per step, i.e. `weight_decay=0.1` here (also spelled "mm1").
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.optimizers import clip_grad_norm
from mlx.utils import tree_flatten

from mm1_mlx.errors import UserError
from mm1_mlx.model import MM1Model
from mm1_mlx.train.lora import LORA_LEAVES, lora_layers

Schedule = Callable[[mx.array | int], mx.array]

MODULES = ("vision", "connector", "decoder")
DECAYS = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adafactor")
MM1_WEIGHT_DECAY = 0.1  # MM1: decay 0.1 * eta, eta the scheduled learning rate
DECAYED_LEAVES = ("weight", *LORA_LEAVES)


def mm1_peak_lr(num_decoder_params: int) -> float:
    """MM1's peak learning rate for a decoder of N parameters: exp(-0.4214 ln N - 0.5535)."""
    if num_decoder_params <= 0:
        raise UserError(f"the decoder must have parameters, not {num_decoder_params}")
    return math.exp(-0.4214 * math.log(num_decoder_params) - 0.5535)


def make_schedule(
    peak_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.1,
    decay: str = "cosine",
) -> Schedule:
    """Linear warm-up from 0 to `peak_lr` over `warmup_steps`, then `decay` ("cosine" or
    "linear") to `min_lr_ratio * peak_lr` at `total_steps` and flat after it, or "constant".

    A function of the step (int or mx.array), as MLX optimizers take for `learning_rate`.
    """
    if decay not in DECAYS:
        raise UserError(f"learning-rate decay must be one of {', '.join(DECAYS)}, not {decay!r}")
    if not (math.isfinite(peak_lr) and peak_lr > 0):
        raise UserError(f"the peak learning rate must be finite and positive, not {peak_lr}")
    if not 0 <= warmup_steps <= total_steps:
        raise UserError(f"warm-up steps ({warmup_steps}) must be within 0..{total_steps}")
    if not 0 <= min_lr_ratio <= 1:
        raise UserError(f"min_lr_ratio must be within 0..1, not {min_lr_ratio}")
    floor = min_lr_ratio * peak_lr
    decay_steps = max(total_steps - warmup_steps, 1)

    def decayed(progress: mx.array) -> mx.array:
        if decay == "cosine":
            return floor + (peak_lr - floor) * 0.5 * (1 + mx.cos(math.pi * progress))
        if decay == "linear":
            return peak_lr - (peak_lr - floor) * progress
        return mx.full(progress.shape, peak_lr)

    def schedule(step: mx.array | int) -> mx.array:
        step = mx.array(step).astype(mx.float32)
        warm = peak_lr * step / max(warmup_steps, 1)
        progress = mx.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        return mx.where(step < warmup_steps, warm, decayed(progress))

    return schedule


@dataclass
class ModuleSettings:
    """How one top-level module ("vision", "connector", "decoder") is trained. `trainable`
    None (not given): the module trains, except that on a model with LoRA layers only the
    modules holding them train (their adapters), as with peft and mlx-lm."""

    trainable: bool | None = None
    lr_multiplier: float = 1.0


def module_settings(modules: dict[str, ModuleSettings] | None) -> dict[str, ModuleSettings]:
    """Settings for all three modules: the given ones, defaults for the rest."""
    modules = modules or {}
    unknown = sorted(set(modules) - set(MODULES))
    if unknown:
        raise UserError(f"unknown module {unknown[0]!r}: modules are {', '.join(MODULES)}")
    return {name: modules.get(name, ModuleSettings()) for name in MODULES}


def freeze_modules(model: MM1Model, modules: dict[str, ModuleSettings]) -> None:
    """Freeze the non-trainable modules and unfreeze the trainable ones. In a module with LoRA
    layers only LoRA's A and B train; quantized layers never do (packed weights have no
    gradient)."""
    lora = bool(lora_layers(model))
    for name, settings in module_settings(modules).items():
        module = getattr(model, name)
        module.freeze()
        if is_trainable(module, settings, lora):
            unfreeze_trainable(module)


def is_trainable(module: nn.Module, settings: ModuleSettings, lora: bool) -> bool:
    """As the settings say. Where they say nothing the module trains, unless the model has LoRA
    layers (`lora`) and the module none: LoRA is to keep the gradients and optimizer state of
    what it does not adapt out of memory."""
    if settings.trainable is not None:
        return settings.trainable
    return not lora or bool(lora_layers(module))


def unfreeze_trainable(module: nn.Module) -> None:
    adapted = lora_layers(module)
    for layer in adapted:
        layer.unfreeze(keys=list(LORA_LEAVES), recurse=False)
    if adapted:
        return
    module.unfreeze()
    for _, layer in module.named_modules():
        if is_quantized(layer):
            layer.freeze()


def is_quantized(layer: nn.Module) -> bool:
    return hasattr(layer, "bits") and "scales" in layer


def embedding_tables(model: nn.Module) -> set[str]:
    """Paths of the token-embedding tables (matrices, but not decayed)."""
    kinds = (nn.Embedding, nn.QuantizedEmbedding)
    return {f"{path}.weight" for path, m in model.named_modules() if isinstance(m, kinds)}


def make_optimizer(
    model: nn.Module,
    name: str,
    schedule: Schedule,
    weight_decay: float | str = 0.0,
    modules: dict[str, ModuleSettings] | None = None,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> optim.Optimizer:
    """One optimizer for the whole model, with per-module learning-rate multipliers. Each
    top-level module is a group: "vision", "connector" and "decoder" take `modules`' settings,
    any other (a training stage's own heads) the full learning rate.

    `name`: "adamw" (with bias correction, as PyTorch's; `betas` and `eps` apply to it) or
    "adafactor" (factored second moments, no first moment, the scheduled learning rate used as
    it is: no relative steps, no scaling by the parameter's size). `weight_decay`: a number,
    or "mm1" (0.1).
    """
    if name not in OPTIMIZERS:
        raise UserError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {name!r}")
    weight_decay = resolve_weight_decay(weight_decay)
    tables = embedding_tables(model)

    def decays(path: str, gradient: mx.array) -> bool:
        leaf = path.rsplit(".", 1)[-1]
        return gradient.ndim >= 2 and leaf in DECAYED_LEAVES and path not in tables

    optimizers, filters = [], []
    settings_of = module_settings(modules)
    for module in model.children():
        settings = settings_of.get(module, ModuleSettings())
        lr = scaled(schedule, settings.lr_multiplier)
        for decayed in (True, False):
            decay = weight_decay if decayed else 0.0
            optimizers.append(inner_optimizer(name, lr, decay, betas, eps))
            filters.append(group_filter(module, decayed, decays))
    # MultiOptimizer sends what no filter takes to the last optimizer: the last group's filter.
    return optim.MultiOptimizer(optimizers, filters[:-1])


def resolve_weight_decay(weight_decay: float | str) -> float:
    if weight_decay == "mm1":
        return MM1_WEIGHT_DECAY
    if isinstance(weight_decay, str | bool) or not 0 <= weight_decay < math.inf:
        raise UserError(
            f"weight decay must be a number >= 0 or 'mm1' (finite), not {weight_decay!r}"
        )
    return float(weight_decay)


def scaled(schedule: Schedule, multiplier: float) -> Schedule:
    return lambda step: multiplier * schedule(step)


def group_filter(
    module: str, decayed: bool, decays: Callable[[str, mx.array], bool]
) -> Callable[[str, mx.array], bool]:
    def in_group(path: str, gradient: mx.array) -> bool:
        return path.startswith(f"{module}.") and decays(path, gradient) == decayed

    return in_group


def inner_optimizer(
    name: str, lr: Schedule, weight_decay: float, betas: tuple[float, float], eps: float
) -> optim.Optimizer:
    if name == "adamw":
        return optim.AdamW(lr, list(betas), eps, weight_decay, bias_correction=True)
    return optim.Adafactor(
        lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False
    )


def count_parameters(module: nn.Module) -> int:
    """How many numbers the module holds; a quantized layer counts its weight's unpacked
    values (not its packed words, scales and offsets), so quantizing keeps the count."""
    total = 0
    for _, layer in module.named_modules():
        own = {key: value for key, value in layer.items() if isinstance(value, mx.array)}
        if is_quantized(layer):
            own.pop("scales")
            own.pop("biases", None)
            total += own.pop("weight").size * 32 // layer.bits
        total += sum(value.size for value in own.values())
    return total


def count_trainable(module: nn.Module) -> int:
    return sum(value.size for _, value in tree_flatten(module.trainable_parameters()))


def trainable_summary(model: MM1Model) -> str:
    """What trains, e.g. 'training 4,096 of 1,000,000 parameters (0.41%): vision 0, connector
    0, decoder 4,096'."""
    counts = {name: count_trainable(getattr(model, name)) for name in MODULES}
    trained, total = sum(counts.values()), count_parameters(model)
    modules = ", ".join(f"{name} {count:,}" for name, count in counts.items())
    return f"training {trained:,} of {total:,} parameters ({trained / total:.2%}): {modules}"


def compiled_update(
    model: nn.Module, optimizer: optim.Optimizer, grad_clip: float | None
) -> Callable[[dict], mx.array]:
    """`update(grads) -> gradient norm`: clip the gradients to `grad_clip` (None: no clipping)
    and apply the optimizer, as one compiled function. The update is a dozen elementwise passes
    over every parameter; compiled, MLX fuses them (on CPU it builds the fused kernels with the
    system's C++ compiler, and runs them unfused without one). The optimizer's state is made
    first (kept if restored), so the function sees all of it."""
    optimizer.init(model.trainable_parameters())
    state = [model.state, optimizer.state]

    def update(grads: dict) -> mx.array:
        grads, norm = clip_grad_norm(grads, grad_clip or float("inf"))
        optimizer.update(model, grads)
        return norm

    return mx.compile(update, inputs=state, outputs=state)
