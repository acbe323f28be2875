"""The training loop behind `mm1-mlx train`, for pre-training, continual pre-training and SFT.

One step: this rank's rows of `grad_accumulation` global batches -> loss and gradients, with
the loss normalised by the weight of the whole global batch (all micro-batches, all ranks), so
summing gradients over ranks gives exactly the single-process gradient -> clip -> update.
Checkpoints hold the trainable weights, the optimizer state, the step and the data position;
resuming reproduces the uninterrupted run step for step.
"""

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.tuner.trainer import grad_checkpoint

from mm1_mlx.errors import UserError
from mm1_mlx.loading import copy_tokenizer_files, load, resolve_path, save_weights, write_config
from mm1_mlx.model import MM1Model
from mm1_mlx.quantize import quantize_model
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
)
from mm1_mlx.train.ranks import init_group, sum_over_ranks
from mm1_mlx.train.recipe import Recipe

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
        apply_lora(
            model,
            rank=recipe.lora.rank,
            scale=recipe.lora.scale,
            dropout=recipe.lora.dropout,
            num_layers=recipe.lora.num_layers,
        )
    freeze_modules(model, recipe.modules)
    return model, processor


@contextmanager
def gradient_checkpointing(model: MM1Model, enabled: bool) -> Iterator[None]:
    """Recompute each decoder layer's and ViT block's activations in the backward pass instead
    of keeping them. mlx-lm's grad_checkpoint patches the layer *class*, so the original
    `__call__` is put back afterwards (other models in the process stay as they were)."""
    firsts = [layers[0] for layers in (model.decoder.layers, model.vision.blocks) if layers]
    originals = {type(layer): type(layer).__call__ for layer in firsts} if enabled else {}
    for layer in firsts if enabled else []:
        grad_checkpoint(layer)
    try:
        yield
    finally:
        for cls, call in originals.items():
            cls.__call__ = call


def peak_lr(recipe: Recipe, model: MM1Model) -> float:
    if recipe.optimizer.lr == "mm1":
        return mm1_peak_lr(count_parameters(model.decoder))
    if isinstance(recipe.optimizer.lr, str):
        raise UserError(f"optimizer.lr must be a number or 'mm1', not {recipe.optimizer.lr!r}")
    return float(recipe.optimizer.lr)


# -- one step -----------------------------------------------------------------------------------


def loss_sums(
    model: MM1Model, batch: Batch, z_loss: float, smoothing: CoordinateSmoothing | None = None
) -> tuple[mx.array, mx.array]:
    """(sum of weighted training loss, sum of weighted cross-entropy) over a batch. With
    `smoothing`, the training loss takes box coordinates' soft targets; the cross-entropy
    (what is logged) stays exact."""
    pixels = None if batch.pixels is None else mx.array(batch.pixels)
    logits = model(mx.array(batch.input_ids), pixels).astype(mx.float32)
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
    if sigma < 0:
        raise UserError(f"train.box_smoothing must be 0 (off) or positive, not {sigma}")
    vocab_size = model.config.text_config["vocab_size"]
    return CoordinateSmoothing(token_texts(processor.tokenizer, vocab_size), sigma)


def make_train_step(
    model: MM1Model, optimizer, recipe: Recipe, group, smoothing: CoordinateSmoothing | None
):
    router = RouterLosses(model.decoder)
    settings = recipe.train

    def objective(model, batch: Batch, total_weight: float, share: float):
        with router.masking(mx.array(batch.token_mask)):
            training, cross_entropy = loss_sums(model, batch, settings.z_loss, smoothing)
            auxiliary = router.loss()
        # `share` spreads the (already averaged) router loss over micro-batches and ranks.
        return training / total_weight + share * auxiliary, cross_entropy

    loss_and_grad = nn.value_and_grad(model, objective)
    update = compiled_update(model, optimizer, settings.grad_clip)

    def step(batches: list[Batch]) -> tuple[float, float]:
        """One optimizer step; returns (mean cross-entropy, gradient norm) over the global batch.
        The host waits once, for the update; the ranks exchange one weight and one gradient
        message (per BUCKET_BYTES)."""
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
        grads, cross_entropy = sum_over_ranks((grads, cross_entropy), group)
        norm = update(grads)
        mx.eval(model.parameters(), optimizer.state, norm, cross_entropy, total_weight)
        if total_weight.item() == 0:
            raise UserError("a global batch has no loss tokens (check the data and masks)")
        return cross_entropy.item() / total_weight.item(), norm.item()

    return step


def evaluate(model: MM1Model, loader: DataLoader, batches: int, group) -> float:
    """Mean cross-entropy over the first `batches` validation batches (the same every time)."""
    model.eval()  # no dropout
    total, weight = mx.array(0.0), mx.array(0.0)
    for _ in range(batches):
        batch = loader.next_batch()
        _, cross_entropy = loss_sums(model, batch, 0.0)
        total, weight = total + cross_entropy, weight + float(batch.weights.sum())
        mx.eval(total)
    if group.size() > 1:
        total = mx.distributed.all_sum(total, group=group)
        weight = mx.distributed.all_sum(weight, group=group)
    model.train()
    return (total / mx.maximum(weight, 1e-9)).item()


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; a scheduler, or a closing laptop


@contextmanager
def stops_save() -> Iterator[None]:
    """SIGTERM stops a run as Ctrl-C does (a KeyboardInterrupt), so the run saves its checkpoint
    either way."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread receives signals
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def whole_step() -> Iterator[None]:
    """A stop signal inside the block takes effect when it ends: the checkpoint written on an
    interrupt never holds weights a step ahead of its step count and data position."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {s: signal.signal(s, lambda *_: received.append(True)) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)
    if received:
        raise KeyboardInterrupt


# -- checkpoints --------------------------------------------------------------------------------


def checkpoint_dirs(out: Path) -> list[Path]:
    folder = out / CHECKPOINTS
    found = folder.glob("step-*") if folder.is_dir() else []
    return sorted(p for p in found if p.is_dir() and p.name[5:].isdigit())


def save_checkpoint(out: Path, step: int, model: MM1Model, optimizer, data_state: dict, keep: int):
    """Atomically: written into a temporary folder, then renamed; the last `keep` are kept."""
    folder = out / CHECKPOINTS / f"step-{step:07d}"
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(
        str(tmp / "trainable.safetensors"), dict(tree_flatten(model.trainable_parameters()))
    )
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    (tmp / "state.json").write_text(json.dumps({"step": step, "data": data_state}))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    for old in checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old)
    return folder


def restore_checkpoint(folder: Path, model: MM1Model, optimizer) -> dict:
    try:
        trainable = mx.load(str(folder / "trainable.safetensors"))
        optimizer_state = mx.load(str(folder / "optimizer.safetensors"))
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError, RuntimeError) as error:
        raise UserError(f"{folder}: unreadable checkpoint ({error})") from None
    model.load_weights(list(trainable.items()), strict=False)
    optimizer.state = tree_unflatten(list(optimizer_state.items()))
    mx.eval(model.parameters(), optimizer.state)
    return state


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
    """metrics.jsonl, one JSON object per logged step; on resume, entries past it are dropped."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            lines = path.read_text().splitlines()
            kept = [line for line in lines if json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, **values: Any) -> None:
        if self.enabled:
            with self.path.open("a") as file:
                file.write(json.dumps(values) + "\n")


# -- the loop -----------------------------------------------------------------------------------


def make_loader(recipe: Recipe, processor, sources, group) -> DataLoader:
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
    )


def validation_due(recipe: Recipe, step: int) -> bool:
    every = recipe.log.eval_every
    return bool(every and recipe.data.validation and step % every == 0)


def check_out(out: Path, resume: bool) -> None:
    if resume or not out.exists():
        return
    if checkpoint_dirs(out) or (out / METRICS).exists():
        raise UserError(f"{out}: holds a training run already (--resume continues it)")


@dataclass
class TrainResult:
    out: Path  # a model folder
    steps: int
    skipped: str  # the data loader's summary of skipped examples


def train(recipe: Recipe, resume: bool = False, reporter=None) -> TrainResult:
    """Run the recipe. `reporter(step, metrics)` is called on rank 0 after every step (the
    CLI's progress bar)."""
    group = init_group()
    is_main = group.rank() == 0
    out = Path(recipe.out)
    check_out(out, resume)
    if recipe.data.batch_size % group.size():
        raise UserError(
            f"data.batch_size {recipe.data.batch_size} is not divisible by {group.size()} ranks"
        )
    if not recipe.data.sources:
        raise UserError("the recipe has no data sources ([[data.sources]])")
    if is_main:
        out.mkdir(parents=True, exist_ok=True)

    model, processor = prepare_model(recipe)
    loader = make_loader(recipe, processor, recipe.data.sources, group)
    schedule = make_schedule(
        peak_lr(recipe, model),
        recipe.train.steps,
        recipe.optimizer.warmup_steps,
        recipe.optimizer.min_lr_ratio,
        recipe.optimizer.decay,
    )
    optimizer = make_optimizer(
        model,
        recipe.optimizer.name,
        schedule,
        weight_decay=recipe.optimizer.weight_decay,
        modules=recipe.modules,
        betas=recipe.optimizer.betas,
    )

    start = 0
    checkpoints = checkpoint_dirs(out) if resume else []
    if checkpoints:
        state = restore_checkpoint(checkpoints[-1], model, optimizer)
        loader.load_state_dict(state["data"])
        start = state["step"]
    metrics = MetricsLog(out / METRICS, start, is_main)
    model.train()  # LoRA dropout on
    train_step = make_train_step(
        model, optimizer, recipe, group, coordinate_smoothing(recipe, model, processor)
    )
    data_state = loader.state_dict()
    tokens_per_step = recipe.data.batch_size * recipe.data.seq_len * recipe.train.grad_accumulation

    step = start
    try:
        with stops_save(), gradient_checkpointing(model, recipe.train.gradient_checkpointing):
            while step < recipe.train.steps:
                mx.random.seed(recipe.seed * 1_000_003 + step)  # dropout etc.: same on resume
                began = time.perf_counter()
                with whole_step():
                    batches = [loader.next_batch() for _ in range(recipe.train.grad_accumulation)]
                    loss, grad_norm = train_step(batches)
                    step += 1
                    data_state = loader.state_dict()
                values = {
                    "step": step,
                    "loss": loss,
                    "lr": float(schedule(step - 1)),
                    "grad_norm": grad_norm,
                    "tokens_per_s": tokens_per_step / (time.perf_counter() - began),
                }
                if validation_due(recipe, step):
                    validation = make_loader(recipe, processor, recipe.data.validation, group)
                    values["val_loss"] = evaluate(model, validation, recipe.log.eval_batches, group)
                if (
                    step % recipe.log.every == 0
                    or "val_loss" in values
                    or step == recipe.train.steps
                ):
                    metrics.write(**values)
                if is_main and step % recipe.checkpoint.every == 0:
                    save_checkpoint(out, step, model, optimizer, data_state, recipe.checkpoint.keep)
                if reporter and is_main:
                    reporter(step, values)
    except KeyboardInterrupt:
        if is_main and step > start:
            folder = save_checkpoint(
                out, step, model, optimizer, data_state, recipe.checkpoint.keep
            )
            raise KeyboardInterrupt(f"interrupted at step {step}; saved {folder}") from None
        raise

    model.eval()
    if is_main:
        if recipe.lora is not None:
            fuse_lora(model)
        save_final_model(out, model, resolve_path(recipe.model))
        (out / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2, default=str))
    return TrainResult(out, step, loader.skipped_summary())
