"""The training loop behind `mm1-mlx train`, for pre-training, continual pre-training and SFT.

One step: this rank's rows of `grad_accumulation` global batches -> loss and gradients, with
the loss normalised by the weight of the whole global batch (all micro-batches, all ranks), so
summing gradients over ranks gives exactly the single-process gradient -> clip -> update.
Checkpoints hold the trainable weights, the optimizer state, the step and the data position;
resuming reproduces the uninterrupted run step for step.
"""

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mm1_mlx.boxes import COORDINATE_MAX
from mm1_mlx.config_checks import physical_memory
from mm1_mlx.errors import UserError
from mm1_mlx.generate import model_context
from mm1_mlx.loading import (
    check_not_over_inputs,
    copy_tokenizer_files,
    load,
    resolve_path,
    save_weights,
    write_config,
)
from mm1_mlx.model import MM1Model
from mm1_mlx.quantize import quantize_model
from mm1_mlx.train.box_attention import AttentionInputs, BoxFinder, mean_box_attention_loss
from mm1_mlx.train.coordinates import CoordinateSmoothing, token_texts
from mm1_mlx.train.data import Batch, DataLoader
from mm1_mlx.train.lora import apply_lora, fuse_lora
from mm1_mlx.train.moe import RouterLosses
from mm1_mlx.train.optim import (
    compiled_update,
    count_parameters,
    freeze_modules,
    make_optimizer,
    make_schedule,
    mm1_peak_lr,
    trainable_summary,
)
from mm1_mlx.train.ranks import init_group, sum_over_ranks
from mm1_mlx.train.recipe import Recipe, global_batch_size

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"


# -- the model ----------------------------------------------------------------------------------


def prepare_model(recipe: Recipe) -> tuple[MM1Model, Any]:
    """The starting model, with QLoRA quantization, LoRA layers and frozen modules applied."""
    model, processor = load(recipe.model)
    if recipe.lora is not None:
        if recipe.lora.quantize_bits:
            model.config.quantization = quantize_model(
                model, recipe.lora.quantize_bits, recipe.lora.group_size, connector=False
            )
        check_lora_rank(recipe.lora.rank, model)
        mx.random.seed(recipe.seed)  # LoRA's A starts random: the same on every rank and run
        apply_lora(
            model,
            rank=recipe.lora.rank,
            scale=recipe.lora.scale,
            dropout=recipe.lora.dropout,
            num_layers=recipe.lora.num_layers,
        )
    freeze_modules(model, recipe.modules)
    return model, processor


def check_lora_rank(rank: int, model: MM1Model) -> None:
    """A rank past the decoder's width adds parameters (rank x width per layer) and no
    expressiveness: a rank of millions would only exhaust memory."""
    width = model.config.text_config["hidden_size"]
    if rank > width:
        raise UserError(
            f"lora.rank must be at most the decoder's hidden size ({width}), not {rank:,}"
        )


@contextmanager
def gradient_checkpointing(model: MM1Model, enabled: bool) -> Iterator[None]:
    """Recompute activations in the backward pass while training (`MM1Model.
    set_gradient_checkpointing`), and hand the model back as it was."""
    model.set_gradient_checkpointing(enabled)
    try:
        yield
    finally:
        model.set_gradient_checkpointing(False)


def peak_lr(recipe: Recipe, model: MM1Model) -> float:
    if recipe.optimizer.lr == "mm1":
        return mm1_peak_lr(count_parameters(model.decoder))
    if isinstance(recipe.optimizer.lr, str):
        raise UserError(f"optimizer.lr must be a number or 'mm1', not {recipe.optimizer.lr!r}")
    return float(recipe.optimizer.lr)


# -- one step -----------------------------------------------------------------------------------


def image_token_orders(batch: Batch, chance: float, seed: int, tokens: int) -> np.ndarray | None:
    """[tiles, tokens]: the order in which each image tile's tokens reach the decoder, random
    with `chance`, else as they are; None when nothing is shuffled. Drawn from the recipe's
    seed and the batch's own tokens, so that a resumed run draws the same orders."""
    if not chance or batch.pixels is None:
        return None
    rng = np.random.default_rng([seed, zlib.crc32(batch.input_ids.tobytes())])
    orders = np.tile(np.arange(tokens), (len(batch.pixels), 1))
    for tile in np.flatnonzero(rng.random(len(batch.pixels)) < chance):
        orders[tile] = rng.permutation(tokens)
    return orders


class ExampleMask:
    """Stands in for a decoder layer's KV cache to give mlx-lm's decoder, which asks its cache
    for the attention mask, one in which each position sees only the earlier positions of its
    own packed example. It caches nothing (the whole row is one forward pass)."""

    offset = 0  # rotary positions count from the row's start: only their differences matter

    def __init__(self, example_ids: np.ndarray):
        self.example_ids = mx.array(example_ids)
        self.asked = False

    def make_mask(self, length: int, return_array: bool = False, window_size: int | None = None):
        """mlx-lm's cache interface; the mask is always an array."""
        self.asked = True
        ids = self.example_ids[:, :length]
        positions = mx.arange(length)
        seen = positions[:, None] >= positions[None, :]
        if window_size is not None:
            seen = seen & (positions[:, None] - positions[None, :] < window_size)
        return (seen & (ids[:, :, None] == ids[:, None, :]))[:, None]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return keys, values


def loss_sums(
    model: MM1Model,
    batch: Batch,
    z_loss: float,
    smoothing: CoordinateSmoothing | None = None,
    token_orders: np.ndarray | None = None,
) -> tuple[mx.array, mx.array]:
    """(sum of weighted training loss, sum of weighted cross-entropy) over a batch. With
    `smoothing`, the training loss takes box coordinates' soft targets; the cross-entropy
    (what is logged) stays exact. `token_orders`: see `image_token_orders`."""
    input_ids = mx.array(batch.input_ids)
    pixels = None if batch.pixels is None else mx.array(batch.pixels)
    cache = None
    if batch.example_ids is not None:
        cache = [ExampleMask(batch.example_ids)] * len(model.decoder.layers)
    if token_orders is None:
        logits = model(input_ids, pixels, cache=cache)
    else:
        order = mx.array(token_orders)[..., None]
        features = mx.take_along_axis(model.encode_images(pixels), order, axis=1)
        logits = model(input_ids, cache=cache, image_features=features)
    if cache and not cache[0].asked:
        raise UserError(
            "this decoder does not take its attention mask from its cache, so packed examples "
            "would see each other: set data.attend_across_examples = true"
        )
    logits = logits.astype(mx.float32)
    log_normaliser = mx.logsumexp(logits, axis=-1)
    targets = mx.array(batch.targets)[..., None]
    cross_entropy = log_normaliser - mx.take_along_axis(logits, targets, axis=-1)[..., 0]
    training = cross_entropy
    if smoothing is not None:
        ids, soft_weights = smoothing(batch.input_ids, batch.targets)
        soft_logits = mx.take_along_axis(logits, mx.array(ids), axis=-1)
        training = log_normaliser - (soft_logits * mx.array(soft_weights)).sum(-1)
    if z_loss:
        training = training + z_loss * log_normaliser**2
    weights = mx.array(batch.weights)
    return (training * weights).sum(), (cross_entropy * weights).sum()


def coordinate_smoothing(recipe: Recipe, model: MM1Model, processor) -> CoordinateSmoothing | None:
    sigma = recipe.train.box_smoothing
    if not sigma:
        return None
    if not 0 < sigma <= COORDINATE_MAX:  # wider, the soft targets are flat over the grid
        raise UserError(
            f"train.box_smoothing must be 0 (off) or a width in (0, {COORDINATE_MAX}] "
            f"coordinate units, not {sigma:g}"
        )
    vocab_size = model.config.text_config["vocab_size"]
    return CoordinateSmoothing(token_texts(processor.tokenizer, vocab_size), sigma)


def make_train_step(
    model: MM1Model, optimizer, recipe: Recipe, group, smoothing: CoordinateSmoothing | None
):
    router = RouterLosses(model.decoder)
    settings = recipe.train

    def objective(model, batch: Batch, total_weight: float, share: float):
        tokens = model.config.num_image_tokens
        orders = image_token_orders(batch, settings.image_token_shuffle, recipe.seed, tokens)
        attention = AttentionInputs(model) if settings.box_attention else nullcontext()
        with router.masking(mx.array(batch.token_mask)), attention:
            training, cross_entropy = loss_sums(model, batch, settings.z_loss, smoothing, orders)
            auxiliary = router.loss()
        if settings.box_attention:
            layer, head = settings.box_attention_head
            auxiliary = auxiliary + settings.box_attention * mean_box_attention_loss(
                attention.seen[layer], head, batch.boxes, batch.example_ids
            )
        # `share` spreads the (already averaged) auxiliary losses over micro-batches and ranks.
        return training / total_weight + share * auxiliary, cross_entropy

    loss_and_grad = nn.value_and_grad(model, objective)
    update = compiled_update(model, optimizer, settings.grad_clip)

    def step(
        batches: list[Batch], between: Callable[[], None] = lambda: None
    ) -> tuple[float, float]:
        """One optimizer step; returns (mean cross-entropy, gradient norm) over the global batch.
        The host waits once, for the update; the ranks exchange one weight and one gradient
        message (per BUCKET_BYTES). `between()` runs between micro-batches, before the update:
        it may raise to abandon the step, which then changed nothing."""
        local_weight = mx.array(sum(float(b.weights.sum()) for b in batches))
        total_weight = mx.distributed.all_sum(local_weight, group=group)
        share = 1.0 / (len(batches) * group.size())
        grads, cross_entropy = None, mx.array(0.0)
        for index, batch in enumerate(batches):
            (_, batch_ce), batch_grads = loss_and_grad(model, batch, total_weight, share)
            grads = batch_grads if grads is None else tree_map(mx.add, grads, batch_grads)
            cross_entropy = cross_entropy + batch_ce
            if index < len(batches) - 1:  # keep one micro-batch's activations at a time
                mx.eval(grads, cross_entropy)
                between()
        grads, cross_entropy = sum_over_ranks((grads, cross_entropy), group)
        norm = update(grads)
        mx.eval(model.parameters(), optimizer.state, norm, cross_entropy, total_weight)
        if total_weight.item() == 0:
            raise UserError("a global batch has no loss tokens (check the data and masks)")
        return cross_entropy.item() / total_weight.item(), norm.item()

    return step


def evaluate(model: MM1Model, loader: DataLoader, batches: int, group) -> float:
    """Mean cross-entropy over the first `batches` validation batches (the same every time),
    or fewer: validation ends with the batch in which a validation source runs out and starts
    again, so it reads its data once at most (every rank lays out the same batches: they end
    together)."""
    model.eval()  # no dropout
    total, weight = mx.array(0.0), mx.array(0.0)
    for _ in range(batches):
        batch = loader.next_batch()
        _, cross_entropy = loss_sums(model, batch, 0.0)
        total, weight = total + cross_entropy, weight + float(batch.weights.sum())
        mx.eval(total)
        if loader.read_through():
            break
    if group.size() > 1:
        total = mx.distributed.all_sum(total, group=group)
        weight = mx.distributed.all_sum(weight, group=group)
    model.train()
    return (total / mx.maximum(weight, 1e-9)).item()


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; a scheduler, or a closing laptop
ABANDONED = "stopped during a step, which is not saved; --resume continues from the last checkpoint"


class StepAbandoned(KeyboardInterrupt):
    """A second stop signal during a step: the run stops at once and saves nothing (the step's
    weights may be half updated); its last checkpoint stands."""


class HeldStops:
    """Ctrl-C and SIGTERM while a run trains are held until the step ends, or until its next
    micro-batch (a step of many is abandoned before its update, and the last whole step is
    saved): the checkpoint then written never holds weights a step ahead of its step count and
    data position, and every rank stops at the same point (they agree on it, whichever ranks
    the signal reached). A second signal stops at once (StepAbandoned), should neither come."""

    def __init__(self, group: Any = None):
        self.group = group
        self.received = 0
        self.previous: dict = {}

    def __enter__(self) -> "HeldStops":
        if threading.current_thread() is threading.main_thread():  # only it receives signals
            self.previous = {stop: signal.signal(stop, self.hold) for stop in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for stop, handler in self.previous.items():
            signal.signal(stop, handler)

    def hold(self, *_) -> None:
        if self.received:
            raise StepAbandoned
        self.received = 1

    def stop_now(self) -> bool:
        """At the end of a step, on every rank: whether the run stops here."""
        received = self.received
        if self.group is not None and self.group.size() > 1:
            received = mx.distributed.all_sum(mx.array(received), group=self.group).item()
        return received > 0


# -- checkpoints --------------------------------------------------------------------------------


def checkpoint_dirs(out: Path) -> list[Path]:
    folder = out / CHECKPOINTS
    found = folder.glob("step-*") if folder.is_dir() else []
    return sorted(p for p in found if p.is_dir() and p.name[5:].isdigit())


def checkpoint_folder(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:07d}"


def save_checkpoint(
    out: Path,
    step: int,
    model: MM1Model,
    optimizer,
    data_state: dict,
    keep: int,
    setup: dict | None = None,
) -> Path:
    """Atomically: written into a temporary folder, then renamed; the last `keep` are kept.
    `setup` (what shapes the trainable state) is kept to check a resumed run against."""
    folder = checkpoint_folder(out, step)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(
        str(tmp / "trainable.safetensors"), dict(tree_flatten(model.trainable_parameters()))
    )
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    state = {"step": step, "data": data_state, **({"setup": setup} if setup else {})}
    (tmp / "state.json").write_text(json.dumps(state))
    if folder.exists():  # saved again after a resume from an older one: this one may be damaged
        remove(folder)
    os.replace(tmp, folder)
    for old in checkpoint_dirs(out)[:-keep]:
        remove(old)
    return folder


def remove(folder: Path) -> None:
    """Renamed away first, so a kill during the deletion leaves no half-deleted checkpoint."""
    trash = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash)


class DamagedCheckpoint(UserError):
    """A checkpoint that cannot be read back (an older one may still be)."""


@dataclass
class Checkpoint:
    folder: Path
    trainable: dict[str, mx.array]
    optimizer: dict[str, mx.array]
    state: dict  # {"step": int, "data": dict, "setup": dict (optional)}


def read_checkpoint(folder: Path) -> Checkpoint:
    """The checkpoint's files, read and checked; DamagedCheckpoint if they are not whole."""
    trainable = read_part(folder / "trainable.safetensors", lambda path: mx.load(str(path)))
    optimizer_state = read_part(folder / "optimizer.safetensors", lambda path: mx.load(str(path)))
    state = read_part(folder / "state.json", lambda path: json.loads(path.read_text()))
    step = int(folder.name[5:])
    fields = state if isinstance(state, dict) else {}
    if not (
        type(fields.get("step")) is int
        and fields["step"] == step
        and isinstance(fields.get("data"), dict)
        and isinstance(fields.get("setup", {}), dict)
    ):
        raise DamagedCheckpoint(f"{folder}: state.json does not hold step {step} and its data")
    return Checkpoint(folder, trainable, optimizer_state, state)


def read_part(path: Path, read: Callable[[Path], Any]) -> Any:
    try:
        return read(path)
    except (OSError, ValueError, RuntimeError) as error:
        reason = " ".join(str(error).split())  # one line
        raise DamagedCheckpoint(f"{path.parent}: unreadable {path.name} ({reason})") from None


def check_setup(checkpoint: Checkpoint, setup: dict) -> None:
    """Refuse a resume whose optimizer or LoRA settings differ from the checkpoint's."""
    saved = checkpoint.state.get("setup", {})
    for key in sorted(setup.keys() & saved.keys()):
        was, now = saved[key], setup[key]
        if was != now:
            raise UserError(
                f"{checkpoint.folder}: the run was trained with {differing(key, was, now)}, the "
                f"recipe has {differing(key, now, was)}; resuming needs the run's optimizer and "
                "LoRA settings"
            )


def differing(key: str, value: Any, other: Any) -> str:
    """`value` as `key.entry=...` for the entries that differ from `other`'s."""
    if value is None:
        return f"no {key}"
    if not isinstance(value, dict):
        return f"{key} {value!r}"
    if isinstance(other, dict):
        return ", ".join(f"{key}.{k}={v!r}" for k, v in value.items() if other.get(k) != v)
    return f"{key} (" + ", ".join(f"{k}={v!r}" for k, v in value.items()) + ")"


def check_fits(checkpoint: Checkpoint, model: nn.Module, optimizer) -> None:
    """Every tensor the checkpoint holds is one the model and optimizer have, of its shape, and
    none is missing: loading would otherwise drop tensors or fail half-way."""
    optimizer.init(model.trainable_parameters())  # lazy zeros: only their names and shapes count
    expected = {
        "trainable weights": (checkpoint.trainable, model.trainable_parameters()),
        "optimizer state": (checkpoint.optimizer, optimizer.state),
    }
    for what, (saved, current) in expected.items():
        mismatch = tensor_mismatch(saved, dict(tree_flatten(current)))
        if mismatch:
            raise UserError(
                f"{checkpoint.folder}: its {what} do not fit this run ({mismatch}); resuming "
                "needs the run's model, modules, optimizer and LoRA settings"
            )


def tensor_mismatch(saved: dict[str, mx.array], current: dict[str, mx.array]) -> str | None:
    only = sorted(saved.keys() ^ current.keys())
    if only:
        return f"{only[0]} only {'in the checkpoint' if only[0] in saved else 'here'}"
    for name in sorted(saved):
        if saved[name].shape != current[name].shape:
            shapes = f"{tuple(saved[name].shape)} there, {tuple(current[name].shape)} here"
            return f"{name} is {shapes}"
    return None


def load_checkpoint(checkpoint: Checkpoint, model: nn.Module, optimizer) -> None:
    model.load_weights(list(checkpoint.trainable.items()), strict=False)
    optimizer.state = tree_unflatten(list(checkpoint.optimizer.items()))
    mx.eval(model.parameters(), optimizer.state)


class DataPosition(Protocol):
    """Where a run is in its data (a DataLoader; dense pre-training's scene order)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def resume_from(
    out: Path, model: nn.Module, optimizer, loader: DataPosition, setup: dict, loud: bool = True
) -> int:
    """Load the newest readable checkpoint and return its step (0 when there is none); each
    damaged one passed over is a warning line (when `loud`). A checkpoint of another setup is
    refused, as is a folder whose checkpoints are all damaged."""
    damaged, fresh_data_state = [], loader.state_dict()
    for folder in reversed(checkpoint_dirs(out)):
        try:
            checkpoint = read_checkpoint(folder)
            check_setup(checkpoint, setup)
            check_fits(checkpoint, model, optimizer)
            load_data_state(checkpoint, loader, fresh_data_state)
        except DamagedCheckpoint as damage:
            damaged.append(damage)
            continue
        for damage in damaged if loud else []:
            print(f"warning: {damage}; resuming from {folder.name}", file=sys.stderr)
        load_checkpoint(checkpoint, model, optimizer)
        return checkpoint.state["step"]
    if damaged:
        raise UserError(f"{out}: no readable checkpoint to resume from (newest: {damaged[0]})")
    if loud:  # not an error: build scripts pass --resume to every stage, finished or not
        print(f"{out}: no checkpoint to resume from; starting at step 0", file=sys.stderr)
    return 0


def load_data_state(checkpoint: Checkpoint, loader: DataPosition, fresh: dict) -> None:
    """The data position, checked against a fresh loader's (same fields, same kinds). Loading
    may change the loader before it fails; the next checkpoint's state then replaces it all."""
    saved = checkpoint.state["data"]
    damaged = DamagedCheckpoint(f"{checkpoint.folder}: state.json holds a damaged data position")
    if not same_kinds(fresh, saved):
        raise damaged
    try:
        loader.load_state_dict(saved)
    except (KeyError, TypeError, ValueError, IndexError):
        raise damaged from None


def same_kinds(template: Any, value: Any) -> bool:
    """Whether `value` has the JSON kinds of `template` (dict keys, list items, leaves)."""
    if isinstance(template, dict):
        return isinstance(value, dict) and all(
            key in value and same_kinds(item, value[key]) for key, item in template.items()
        )
    if isinstance(template, list):
        return isinstance(value, list) and all(map(same_kinds, template, value))
    if template is None:
        return True  # absent now (e.g. no example carried over): anything may have been saved
    return type(value) is type(template)


# -- output -------------------------------------------------------------------------------------


def save_final_model(out: Path, model: MM1Model, source: Path) -> None:
    """The output folder becomes a normal model folder (each file replaced atomically)."""
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(tmp, dict(tree_flatten(model.parameters())))
    write_config(tmp, model.config)
    copy_tokenizer_files(source, tmp)
    for file in tmp.iterdir():
        os.replace(file, out / file.name)
    tmp.rmdir()


class MetricsLog:
    """metrics.jsonl, one JSON object per logged step. On resume, entries past the checkpoint
    are dropped, as is a line torn by a killed process."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            lines = path.read_text(errors="replace").splitlines()
            kept = [line for line in lines if 0 <= logged_step(line) <= resume_step]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)

    def write(self, **values: Any) -> None:
        if self.enabled:
            with self.path.open("a") as file:
                file.write(json.dumps(values) + "\n")


def logged_step(line: str) -> int:
    """The step a metrics line is for; -1 for a line that is not a whole entry."""
    try:
        entry = json.loads(line)
    except ValueError:
        return -1
    step = entry.get("step") if isinstance(entry, dict) else None
    return step if type(step) is int else -1


# -- the stages ---------------------------------------------------------------------------------


class Stage(Protocol):
    """What the training loop needs of a stage: the module its optimizer updates and its
    checkpoints hold, its position in its data, and one optimizer step. `LanguageStage` trains
    on data.sources; train/dense.py's `DenseStage` pre-trains the image encoder on scenes."""

    trained: nn.Module
    data: DataPosition
    throughput: tuple[str, int]  # ("tokens_per_s", tokens per step), or images per step

    def make_step(self, optimizer: Any) -> Callable[[Callable[[], None]], tuple[float, float]]:
        """`step(between) -> (loss, gradient norm)`; `between()` may abandon the step."""
        ...

    def running(self) -> AbstractContextManager: ...

    def validation_due(self, step: int) -> bool: ...

    def validate(self) -> dict[str, float]: ...

    def save(self, out: Path) -> str:
        """Write the finished model into `out`; return the stage's last word (for the CLI)."""
        ...


@dataclass
class LanguageStage:
    """Pre-training, continual pre-training or SFT of the model on data.sources."""

    recipe: Recipe
    model: MM1Model
    processor: Any
    data: DataLoader
    group: Any

    @property
    def trained(self) -> MM1Model:
        return self.model

    @property
    def throughput(self) -> tuple[str, int]:
        data, accumulation = self.recipe.data, self.recipe.train.grad_accumulation
        return "tokens_per_s", data.batch_size * data.seq_len * accumulation

    def make_step(self, optimizer: Any) -> Callable[[Callable[[], None]], tuple[float, float]]:
        smoothing = coordinate_smoothing(self.recipe, self.model, self.processor)
        train_step = make_train_step(self.model, optimizer, self.recipe, self.group, smoothing)
        count = self.recipe.train.grad_accumulation

        def step(between: Callable[[], None]) -> tuple[float, float]:
            return train_step(micro_batches(self.data, count, between), between)

        return step

    @contextmanager
    def running(self) -> Iterator[None]:
        self.model.train()  # LoRA dropout on
        with gradient_checkpointing(self.model, self.recipe.train.gradient_checkpointing):
            yield

    def validation_due(self, step: int) -> bool:
        every = self.recipe.log.eval_every
        return bool(every and self.recipe.data.validation and step % every == 0)

    def validate(self) -> dict[str, float]:
        recipe = self.recipe
        validation = make_loader(recipe, self.processor, recipe.data.validation, self.group)
        return {"val_loss": evaluate(self.model, validation, recipe.log.eval_batches, self.group)}

    def save(self, out: Path) -> str:
        self.model.eval()
        if self.recipe.lora is not None:
            fuse_lora(self.model)
        save_final_model(out, self.model, resolve_path(self.recipe.model))
        return self.data.skipped_summary()


def language_stage(recipe: Recipe, group: Any) -> LanguageStage:
    if not recipe.data.sources:
        raise UserError("the recipe has no data sources ([[data.sources]])")
    model, processor = prepare_model(recipe)
    if not tree_flatten(model.trainable_parameters()):
        raise UserError("nothing to train: every module is frozen ([modules.*] trainable = false)")
    check_memory(recipe, model, group.size())
    context = model_context(model)
    if context is not None and recipe.data.seq_len > context:
        raise UserError(
            f"data.seq_len {recipe.data.seq_len} is over the model's context of {context} tokens"
        )
    if group.rank() == 0:
        print(trainable_summary(model))
    finder = box_finder(recipe, model, processor)
    loader = make_loader(recipe, processor, recipe.data.sources, group, finder)
    return LanguageStage(recipe, model, processor, loader, group)


def box_finder(recipe: Recipe, model: MM1Model, processor) -> BoxFinder | None:
    """With `train.box_attention`, what finds the boxes, once the head is known to be one of
    the decoder's and its queries and keys can be recorded."""
    settings = recipe.train
    if not settings.box_attention:
        return None
    if settings.gradient_checkpointing:  # the recomputed layers keep no queries and keys
        raise UserError("train.box_attention does not work with train.gradient_checkpointing")
    if not hasattr(AttentionInputs(model).module, "scaled_dot_product_attention"):
        raise UserError(
            f"train.box_attention: decoder {type(model.decoder).__module__} does not attend "
            "through mlx-lm's scaled_dot_product_attention"
        )
    layer, head = settings.box_attention_head
    layers = len(model.decoder.layers)
    heads = model.config.text_config.get("num_attention_heads", 0)
    if not (layer < layers and head < heads):
        raise UserError(
            f"train.box_attention_head must be [layer, head] within the decoder's {layers} "
            f"layers and {heads} heads, not [{layer}, {head}]"
        )
    return BoxFinder.for_tokenizer(processor, model.config.text_config["vocab_size"])


def make_stage(recipe: Recipe, group: Any) -> Stage:
    if recipe.dense is None:
        return language_stage(recipe, group)
    from mm1_mlx.train.dense import DenseStage  # it builds on this module

    return DenseStage(recipe, group)


def make_loader(
    recipe: Recipe, processor, sources, group, finder: BoxFinder | None = None
) -> DataLoader:
    data = recipe.data
    return DataLoader(
        sources,
        processor,
        seq_len=data.seq_len,
        batch_size=data.batch_size,
        max_images_per_sequence=data.max_images_per_sequence,
        seed=recipe.seed,
        rank=group.rank(),
        world_size=group.size(),
        strict=data.strict,
        loss_weighting=data.loss_weighting,
        split_images=data.split_images,
        attend_across_examples=data.attend_across_examples,
        box_finder=finder,
    )


# -- the run ------------------------------------------------------------------------------------


def check_out(out: Path, resume: bool) -> None:
    """OUT is a folder, or one can be made there, and holds no other run (unless resuming)."""
    existing = next(path for path in [out, *out.parents] if path.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{out}: cannot be the output folder ({existing} is not a writable folder)")
    if not resume and (checkpoint_dirs(out) or (out / METRICS).exists()):
        raise UserError(f"{out}: holds a training run already (--resume continues it)")
    if (out / CHECKPOINTS).exists() and not (out / CHECKPOINTS).is_dir():
        raise UserError(f"{out / CHECKPOINTS}: not a folder; a run keeps its checkpoints there")
    if (out / METRICS).is_dir():
        raise UserError(f"{out / METRICS}: a folder; a run appends its metrics to this file")


def run_setup(recipe: Recipe) -> dict:
    """What shapes the trainable state besides the model, kept in checkpoints to check a resumed
    run against (LoRA's dropout only regularises: it may change)."""
    lora = recipe.lora and {k: v for k, v in asdict(recipe.lora).items() if k != "dropout"}
    return {"optimizer": recipe.optimizer.name, "lora": lora}


def discard(out: Path, created: Path | None, had_metrics: bool) -> None:
    """A run stopped before its first checkpoint has nothing to resume: what it wrote goes (the
    folders it made, else its metrics unless they were there before), so that the same command
    can simply run again."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    if not had_metrics:
        (out / METRICS).unlink(missing_ok=True)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)


@dataclass
class TrainResult:
    out: Path  # a model folder
    steps: int
    summary: str  # the stage's last word: skipped examples, or held-out scores


@dataclass
class Run:
    """What the training loop works with."""

    recipe: Recipe
    out: Path
    stage: Stage
    optimizer: Any
    schedule: Any
    group: Any

    @property
    def is_main(self) -> bool:
        return self.group.rank() == 0

    def save(self, step: int, data_state: dict) -> Path:
        trained, optimizer = self.stage.trained, self.optimizer
        keep, setup = self.recipe.checkpoint.keep, run_setup(self.recipe)
        return save_checkpoint(self.out, step, trained, optimizer, data_state, keep, setup)

    def record(self, step: int, loss: float, grad_norm: float, seconds: float) -> dict:
        name, count = self.stage.throughput
        lr = float(self.schedule(step - 1))
        return {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, name: count / seconds}


def train_steps(run: Run, start: int, reporter: Callable[[int, dict], None] | None) -> int:
    """Steps from `start` to the recipe's last; returns the last. On Ctrl-C or SIGTERM the
    current step ends with its metrics line and checkpoint (or, with micro-batches still to
    come, is abandoned before its update), so the metrics file and the checkpoints agree, and
    a checkpoint of the last whole step is saved."""
    recipe, stage = run.recipe, run.stage
    metrics = MetricsLog(run.out / METRICS, start, run.is_main)
    train_step = stage.make_step(run.optimizer)
    data_state = stage.data.state_dict()  # of the last whole step: an abandoned one moved it
    step = saved = start
    try:
        with HeldStops(run.group) as stops, stage.running():
            between = stop_between_micro_batches(stops)
            while step < recipe.train.steps:
                mx.random.seed(recipe.seed * 1_000_003 + step)  # dropout etc.: same on resume
                began = time.perf_counter()
                loss, grad_norm = train_step(between)
                check_finite(loss, step + 1)
                step += 1
                data_state = stage.data.state_dict()
                values = run.record(step, loss, grad_norm, time.perf_counter() - began)
                validated = stage.validation_due(step)
                if validated:
                    values.update(stage.validate())
                if validated or step % recipe.log.every == 0 or step == recipe.train.steps:
                    metrics.write(**values)
                if run.is_main and step % recipe.checkpoint.every == 0:
                    run.save(step, data_state)
                    saved = step
                if stops.stop_now():
                    raise KeyboardInterrupt
                if reporter and run.is_main:
                    reporter(step, values)
    except StepAbandoned:
        raise KeyboardInterrupt(ABANDONED) from None
    except KeyboardInterrupt:
        if run.is_main and step > start:
            saving = step > saved  # else the step's checkpoint is on disk already
            folder = run.save(step, data_state) if saving else checkpoint_folder(run.out, step)
            raise KeyboardInterrupt(f"interrupted at step {step}; saved {folder}") from None
        raise
    return step


def stop_between_micro_batches(stops: HeldStops) -> Callable[[], None]:
    """Raises KeyboardInterrupt when a stop was received: the weights are still those of the
    last whole step, which the interrupted run saves."""

    def between() -> None:
        if stops.stop_now():
            raise KeyboardInterrupt

    return between


def micro_batches(loader: DataLoader, count: int, between: Callable[[], None]) -> list[Batch]:
    """The step's `count` micro-batches, `between()` before each but the first."""
    batches: list[Batch] = []
    for index in range(count):
        if index:
            between()
        batches.append(loader.next_batch())
    return batches


def check_finite(loss: float, step: int) -> None:
    """A loss that is not finite ends the run: every later step would be NaN too."""
    if not math.isfinite(loss):
        raise UserError(
            f"step {step}: the loss is {loss}; the run stops (its last checkpoint stands): "
            "lower optimizer.lr, or look at the data and the checkpoint it started from"
        )


# A step holds all its micro-batches (pixels included) at once: the loss is normalised by the
# weight of the whole global batch before the first backward pass.
MAX_GRAD_ACCUMULATION = 1024


def check_grad_accumulation(recipe: Recipe) -> None:
    count = recipe.train.grad_accumulation
    if count > MAX_GRAD_ACCUMULATION:
        raise UserError(
            f"train.grad_accumulation must be at most {MAX_GRAD_ACCUMULATION:,}, not {count:,}: "
            "a step holds all its micro-batches in memory (raise data.batch_size instead)"
        )


def check_memory(recipe: Recipe, model: MM1Model, ranks: int) -> None:
    """Refuse a batch whose forward pass cannot fit this machine: its logits and their gradient
    alone (float32, rows x seq_len x vocabulary, twice) are a lower bound of what it takes."""
    rows, seq_len = recipe.data.batch_size // ranks, recipe.data.seq_len
    vocab = model.token_embedding.weight.shape[0]
    needed = 2 * rows * seq_len * vocab * 4
    memory = physical_memory()
    if needed > memory:
        raise UserError(
            f"data.batch_size {recipe.data.batch_size} x seq_len {seq_len}: a forward pass's "
            f"logits alone take {needed / 1e9:,.0f} GB ({vocab:,} tokens' vocabulary), more than "
            f"this machine's {memory / 1e9:,.0f} GB; lower batch_size (train.grad_accumulation "
            "keeps the tokens per step)"
        )


def make_run(recipe: Recipe, out: Path, group: Any) -> Run:
    stage = make_stage(recipe, group)
    train = recipe.train
    optimizer_settings = recipe.optimizer
    schedule = make_schedule(
        peak_lr(recipe, stage.trained),
        train.steps,
        optimizer_settings.warmup_steps,
        optimizer_settings.min_lr_ratio,
        optimizer_settings.decay,
    )
    optimizer = make_optimizer(
        stage.trained,
        optimizer_settings.name,
        schedule,
        weight_decay=optimizer_settings.weight_decay,
        modules=recipe.modules,
        betas=optimizer_settings.betas,
    )
    return Run(recipe, out, stage, optimizer, schedule, group)


def train(recipe: Recipe, resume: bool = False, reporter=None) -> TrainResult:
    """Run the recipe's stage. `reporter(step, metrics)` is called on rank 0 after every step
    (the CLI's progress bar). OUT appears once the run starts (see `discard` for a run that
    stops before its first checkpoint)."""
    group = init_group()
    is_main = group.rank() == 0
    out = Path(recipe.out)
    check_out(out, resume)
    check_not_over_inputs(out, [recipe.model, *recipe_inputs(recipe)])
    batch_size = global_batch_size(recipe)
    if batch_size % group.size():
        raise UserError(f"a batch of {batch_size} is not divisible by {group.size()} ranks")
    check_grad_accumulation(recipe)

    run = make_run(recipe, out, group)
    stage = run.stage
    setup = run_setup(recipe)
    start = 0
    if resume:
        start = resume_from(out, stage.trained, run.optimizer, stage.data, setup, is_main)
    if start > recipe.train.steps:
        raise UserError(
            f"{out}: its checkpoint is at step {start}, past train.steps {recipe.train.steps}; "
            "raise train.steps to continue the run"
        )

    created = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)
    had_metrics = (out / METRICS).exists()
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    try:
        step = train_steps(run, start, reporter)
    except BaseException:
        if is_main and not checkpoint_dirs(out):
            discard(out, created, had_metrics)
        raise

    summary = ""
    if is_main:
        summary = stage.save(out)
        (out / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2, default=str))
    return TrainResult(out, step, summary)


def recipe_inputs(recipe: Recipe) -> list[str]:
    """The files a recipe reads besides its model."""
    if recipe.dense is not None:
        return list(recipe.dense.scenes)
    sources = [*recipe.data.sources, *recipe.data.validation]
    paths = [source.path for source in sources]
    return [path for entry in paths for path in (entry if isinstance(entry, list) else [entry])]
