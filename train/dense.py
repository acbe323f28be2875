"""Dense pre-training of the image encoder and connector on the synthetic world.

MM1 starts from a CLIP image encoder; the demo model's ViT starts from random weights, and
learning it only through the decoder's answers stalled (train/recipes/demo/README.md). This
stage gives every image token a target of its own before any language training: what lies
under the centre of the token's cell (one of `synth.THING_NAMES`, or nothing) and, under a
thing, that thing's box in the whole image's 0..1 coordinates, the numbers a grounded answer
writes in 0..1000. Two linear heads on the connector's output read the targets; only the
encoder and the connector are kept. With `word_weight`, each thing's tokens also name its words
("red", "circle"; a title; a label) in the decoder's own embeddings of them, so that a
question's word and the image tokens of the thing it names start in one code.

The tiles come from the model's own processor (MM1.5 splitting included), so each token's cell
maps back to the image: tile pixel -> canvas -> image pixel (`mm1_mlx/cells.py`).
"""

import random
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mm1_mlx.boxes import COORDINATE_MAX
from mm1_mlx.cells import cell_centres
from mm1_mlx.errors import UserError
from mm1_mlx.jsonl import parse_object
from mm1_mlx.loading import load, resolve_path
from mm1_mlx.model import MM1Model
from mm1_mlx.processor import Processor, load_image
from mm1_mlx.train import synth
from mm1_mlx.train.optim import compiled_update, freeze_modules
from mm1_mlx.train.ranks import sum_over_ranks
from mm1_mlx.train.recipe import DenseSettings, Recipe
from mm1_mlx.train.tokenizer import number_token_ids
from mm1_mlx.train.trainer import save_final_model

CLASSES = ("nothing", *synth.THING_NAMES)
CLASS_IDS = {name: k for k, name in enumerate(CLASSES)}
# The words the classes are named by, in groups whose words compete: a shape names a colour
# and a kind, a title its title and a button its label.
WORD_GROUPS = (tuple(synth.COLORS), synth.KINDS, synth.TITLES, synth.LABELS)


def class_words(name: str) -> list[str]:
    """A class's words: "red circle" -> red, circle; "title Photos" -> Photos; "button Send"
    -> Send; nothing -> none."""
    words = name.split()
    if words[0] == "nothing":
        return []
    return words[1:] if words[0] in ("title", "button") else words


def word_targets() -> np.ndarray:
    """[groups, classes]: each class's word in each group, -1 where it has none."""
    table = np.full((len(WORD_GROUPS), len(CLASSES)), -1, np.int32)
    for class_id, name in enumerate(CLASSES):
        for word in class_words(name):
            group = next(g for g, words in enumerate(WORD_GROUPS) if word in words)
            table[group, class_id] = WORD_GROUPS[group].index(word)
    return table


WORD_TARGETS = word_targets()


@dataclass
class SceneImage:
    path: Path
    scene: synth.Scene


# -- targets ------------------------------------------------------------------------------------


def cell_targets(scene: synth.Scene, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class ids [...] (0: nothing) and boxes [..., 4] (0..1 of the image; zeros for nothing)
    for points [..., 2] of the scene."""
    flat = centres.reshape(-1, 2)
    classes = np.zeros(len(flat), np.int32)
    boxes = np.zeros((len(flat), 4), np.float32)
    width, height = scene.size
    for k, (x, y) in enumerate(flat):
        thing = synth.thing_at(scene, x, y)
        if thing is not None:
            classes[k] = CLASS_IDS[thing[0]]
            boxes[k] = np.array(thing[1]) / (width, height, width, height)
    return classes.reshape(centres.shape[:-1]), boxes.reshape(*centres.shape[:-1], 4)


def text_targets(scene: synth.Scene, centres: np.ndarray) -> np.ndarray:
    """Class ids [...] of the points [..., 2] that lie on a label's glyphs (0 elsewhere)."""
    flat = centres.reshape(-1, 2)
    classes = np.zeros(len(flat), np.int32)
    for name, (left, top, right, bottom) in synth.labels(scene):
        on_text = (flat >= (left, top)).all(-1) & (flat < (right, bottom)).all(-1)
        classes[on_text] = CLASS_IDS[name]
    return classes.reshape(centres.shape[:-1])


def read_scenes(paths: list[Path]) -> list[SceneImage]:
    """Every scene of scenes.jsonl files (`mm1-mlx data synth` writes one per folder)."""
    scenes = []
    for path in paths:
        if not path.is_file():
            raise UserError(f"{path}: no such scenes file")
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            try:
                record = parse_object(line)
                scenes.append(
                    SceneImage(path.parent / record["image"], synth.scene_from_record(record))
                )
            except (ValueError, KeyError, TypeError, UserError) as error:  # BadLine: ValueError
                raise UserError(f"{path}:{number}: not a scene record ({error})") from None
    return scenes


class TileBatch(NamedTuple):
    pixels: mx.array  # [tiles, H, W, 3]
    classes: mx.array  # [tiles, tokens]
    boxes: mx.array  # [tiles, tokens, 4]
    text_classes: mx.array  # [tiles, patches]: the label a patch shows glyphs of, or 0


Targets = tuple[np.ndarray, np.ndarray, np.ndarray]  # a TileBatch's, less the pixels


class TileBatcher:
    """Scenes -> TileBatch."""

    def __init__(self, processor: Processor, num_tokens: int):
        self.processor = processor
        self.side = int(round(num_tokens**0.5))
        config = processor.config
        self.patch_side = config.preprocess_config.image_size // config.vision_config.patch_size

    def targets(self, item: SceneImage) -> Targets:
        """The classes and boxes of the item's tiles' tokens and the text under its patches,
        from the scene alone (the image is not read: the scene has its size)."""
        config = self.processor.config.preprocess_config
        size = item.scene.size
        (grid,) = self.processor.image_grids([size])

        def centres(side: int) -> np.ndarray:
            return cell_centres(size, grid, config, side)

        classes, boxes = cell_targets(item.scene, centres(self.side))
        # A patch is on text if any of a 4x4 grid of points in it is: a label's glyphs are
        # shorter than a patch, so its centre alone misses many labels.
        side, fine = self.patch_side, 4
        text = text_targets(item.scene, centres(side * fine))
        text = text.reshape(-1, side, fine, side, fine).max(axis=(2, 4))
        return classes, boxes, text.reshape(len(text), -1)

    def pixels(self, items: list[SceneImage]) -> mx.array:
        tiles = []
        for item in items:
            image = load_image(str(item.path))
            (grid,) = self.processor.image_grids([image.size])
            tiles += self.processor.image_tiles(image, grid)[0]
        return mx.array(np.stack(tiles))

    def __call__(self, items: list[SceneImage], targets: list[Targets] | None = None) -> TileBatch:
        """The items' batch; `targets` when they are known already."""
        targets = targets or [self.targets(item) for item in items]
        parts = (mx.array(np.concatenate(part)) for part in zip(*targets, strict=True))
        return TileBatch(self.pixels(items), *parts)


# -- the model and its loss ---------------------------------------------------------------------


def group(name: str) -> str:
    """What a class is about: nothing, a shape, a screen's title or a button."""
    first = name.split()[0]
    return first if first in ("nothing", "title", "button") else "shape"


CLASS_GROUPS = np.array([group(name) for name in CLASSES])


class DenseOutputs(NamedTuple):
    classes: mx.array  # [tiles, tokens, classes] logits
    boxes: mx.array  # [tiles, tokens, 4] in 0..1
    coordinates: mx.array | None  # [tiles, tokens, 4, 1001] logits over the number tokens
    reading: mx.array | None  # [tiles, patches, classes] logits of the conv embedding alone
    words: list[mx.array] | None  # per word group: [tiles, tokens, words] logits


class DenseHeads(nn.Module):
    """The model's encoder and connector (shared, not copied) with linear heads on each token:
    its class and its box; the box's coordinates as the decoder writes them (tokenizers with a
    token per integer 0..1000); the thing's words, each token's dot product with the decoder's
    embeddings of them (tokenizers with a token per word after a space); and, for an encoder
    with a convolutional embedding, a class per patch read from that embedding alone."""

    def __init__(self, model: MM1Model, tokenizer: Any):
        super().__init__()
        self.vision = model.vision
        self.connector = model.connector
        width = model.config.connector_config.output_dim
        self.classes = nn.Linear(width, len(CLASSES))
        self.boxes = nn.Linear(width, 4)
        numbers = number_token_ids(tokenizer)
        if numbers is not None:
            # The embeddings a box answer's coordinates are written with (tied to the output
            # layer): the first after "[", the others after a space. Not trained here.
            plain, spaced = (model.token_embedding.weight[mx.array(ids)] for ids in numbers)
            self._numbers = mx.stack([plain, spaced, spaced, spaced])
            self.coordinates = nn.Linear(width, 4 * width, bias=False)
        words = word_token_ids(tokenizer)
        # As a question writes them, after a space. Not trained here, and no head between: the
        # tokens themselves are to hold the words' embeddings.
        table = model.token_embedding.weight
        self._words = None if words is None else [table[mx.array(ids)] for ids in words]
        if self.vision.config.conv_channels:
            self.reading = nn.Linear(self.vision.config.width, len(CLASSES))

    def __call__(self, pixels: mx.array) -> DenseOutputs:
        patches = self.vision.patch_embed(pixels)
        reading = coordinates = None
        if self.vision.config.conv_channels:
            conv = self.vision.conv_embed(pixels)
            patches = patches + conv
            reading = self.reading(conv.reshape(len(pixels), -1, conv.shape[-1]))
        tokens = self.connector(self.vision.encode(patches))
        if "coordinates" in self:
            codes = self.coordinates(tokens).reshape(*tokens.shape[:-1], 4, tokens.shape[-1])
            coordinates = mx.einsum("tckw,knw->tckn", codes, self._numbers)
        words = None if self._words is None else [tokens @ table.T for table in self._words]
        return DenseOutputs(self.classes(tokens), self.boxes(tokens), coordinates, reading, words)


def word_token_ids(tokenizer: Any) -> list[list[int]] | None:
    """Per word group, the token ids of its words after a space; None unless each is one."""
    ids = [
        [tokenizer.encode(" " + word, add_special_tokens=False) for word in words]
        for words in WORD_GROUPS
    ]
    if any(len(word) != 1 for words in ids for word in words):
        return None
    return [[word[0] for word in words] for words in ids]


def class_weights(button_weight: float) -> np.ndarray:
    """Each class's weight in the things' class loss: 0 for nothing (it has its own mean)."""
    weights = np.where(CLASS_GROUPS == "button", button_weight, 1.0).astype(np.float32)
    weights[CLASS_IDS["nothing"]] = 0
    return weights


def loss_totals(targets: list[Targets], settings: DenseSettings) -> tuple[float, ...]:
    """What dense_loss divides by, for the whole global batch: the cells on things, their
    class weights, the background cells and the patches on text."""
    classes = np.concatenate([part[0].ravel() for part in targets])
    text = sum(int((part[2] > 0).sum()) for part in targets)
    things = int((classes > 0).sum())
    weights = float(class_weights(settings.button_weight)[classes].sum())
    return things, weights, classes.size - things, text


def dense_loss(
    net: DenseHeads, batch: TileBatch, settings: DenseSettings, totals: tuple[float, ...]
) -> mx.array:
    """The class and box losses of a batch (and the reading loss where there is one), each a
    mean over its own cells of the global batch (`loss_totals`)."""
    outputs = net(batch.pixels)
    things, weights, background, text = (max(total, 1) for total in totals)
    on_thing = batch.classes > 0
    # Three cells in four are background: averaged over all cells, "nothing" everywhere is a
    # good first answer and the things are learned slowly. Each half gets its own mean.
    cross_entropy = nn.losses.cross_entropy(outputs.classes, batch.classes)
    cell_weights = mx.array(class_weights(settings.button_weight))[batch.classes]
    loss = (cross_entropy * cell_weights).sum() / weights
    loss += (cross_entropy * ~on_thing).sum() / background
    box_error = (mx.abs(outputs.boxes - batch.boxes).sum(-1) * on_thing).sum() / things
    loss += settings.box_weight * box_error
    if outputs.coordinates is not None:
        targets = gaussian_targets(batch.boxes, settings.coordinate_sigma)
        log_probs = outputs.coordinates - mx.logsumexp(outputs.coordinates, -1, keepdims=True)
        coordinate_error = -(targets * log_probs).sum((-2, -1)) * on_thing
        loss += settings.coordinate_weight * coordinate_error.sum() / things
    if outputs.reading is not None:
        on_text = batch.text_classes > 0
        reading_error = nn.losses.cross_entropy(outputs.reading, batch.text_classes) * on_text
        loss += settings.reading_weight * reading_error.sum() / text
    if outputs.words is not None and settings.word_weight:
        loss += settings.word_weight * word_errors(outputs.words, batch.classes).sum() / things
    return loss


def word_errors(words: list[mx.array], classes: mx.array) -> mx.array:
    """[tiles, tokens]: the sum of the cross-entropies of a cell's words, each within its
    group (0 for nothing)."""
    errors = mx.zeros(classes.shape)
    for logits, targets in zip(words, group_targets(classes), strict=True):
        errors += nn.losses.cross_entropy(logits, mx.maximum(targets, 0)) * (targets >= 0)
    return errors


def group_targets(classes: mx.array) -> list[mx.array]:
    """Per word group, each cell's word in it ([tiles, tokens]; -1 where it has none)."""
    return [mx.array(table)[classes] for table in WORD_TARGETS]


def words_right(words: list[mx.array], classes: mx.array) -> mx.array:
    """[tiles, tokens]: whether every word of a cell's class is its group's highest logit."""
    right = mx.ones(classes.shape, mx.bool_)
    for logits, targets in zip(words, group_targets(classes), strict=True):
        right &= (targets < 0) | (logits.argmax(-1) == targets)
    return right


def gaussian_targets(boxes: mx.array, sigma: float) -> mx.array:
    """Boxes [..., 4] in 0..1 -> [..., 4, 1001]: over the coordinates 0..1000, a Gaussian of
    width `sigma` around each, as `train/coordinates.py` makes the decoder's targets."""
    distance = mx.arange(COORDINATE_MAX + 1) - mx.round(COORDINATE_MAX * boxes)[..., None]
    weights = mx.exp(-0.5 * (distance / sigma) ** 2)
    return weights / weights.sum(-1, keepdims=True)


def validate(net: DenseHeads, batches: list[TileBatch]) -> dict[str, float]:
    """Cell accuracy per group of classes, the mean box-coordinate error on things (in the
    answers' 0..1000 units) of the box head and of the written coordinates and, on the patches
    over text, the accuracy of the reading head
    and (where tokens and patches are the same cells) of the class head; on things, how often
    the tokens name every word of their thing."""
    names = ("predicted", "true", "errors", "written", "read", "text", "words")
    parts = {name: [] for name in names}
    for batch in batches:
        outputs = net(batch.pixels)
        parts["predicted"].append(outputs.classes.argmax(-1))
        parts["true"].append(batch.classes)
        parts["errors"].append(COORDINATE_MAX * mx.abs(outputs.boxes - batch.boxes).mean(-1))
        parts["text"].append(batch.text_classes)
        if outputs.coordinates is not None:
            written = outputs.coordinates.argmax(-1) - mx.round(COORDINATE_MAX * batch.boxes)
            parts["written"].append(mx.abs(written).mean(-1))
        if outputs.reading is not None:
            parts["read"].append(outputs.reading.argmax(-1))
        if outputs.words is not None:
            parts["words"].append(words_right(outputs.words, batch.classes))
    predicted, true, errors, written, read, text, words = (
        np.concatenate([np.array(part).ravel() for part in arrays]) if arrays else None
        for arrays in parts.values()
    )
    groups = CLASS_GROUPS[true]
    metrics = {
        f"{name}_accuracy": float((predicted == true)[groups == name].mean())
        for name in ("nothing", "shape", "title", "button")
        if (groups == name).any()
    }
    if (true > 0).any():
        metrics["box_error"] = float(errors[true > 0].mean())
    if (true > 0).any() and written is not None:
        metrics["coordinate_error"] = float(written[true > 0].mean())
    if (true > 0).any() and words is not None:
        metrics["word_accuracy"] = float(words[true > 0].mean())
    on_text = text > 0
    if on_text.any() and len(text) == len(true):
        metrics["text_accuracy"] = float((predicted == text)[on_text].mean())
    if on_text.any() and read is not None:
        metrics["reading_accuracy"] = float((read == text)[on_text].mean())
    return metrics


# -- the stage ----------------------------------------------------------------------------------


@dataclass
class SceneSampler:
    """The training scenes' random order: each step draws its batch from all of them, the same
    on every rank. Saved and restored with each checkpoint."""

    scenes: list[SceneImage]
    rng: random.Random

    def draw(self, count: int) -> list[SceneImage]:
        return self.rng.sample(self.scenes, count)

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss]}  # as JSON keeps it

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))


class DenseStage:
    """Dense pre-training as a stage of `mm1-mlx train` (a recipe with a `[dense]` table;
    train/trainer.py runs the loop): the encoder and connector with their heads train on the
    scenes' per-token targets; the model folder written at the end is the whole model, the
    decoder as it came."""

    def __init__(self, recipe: Recipe, group: Any):
        settings = recipe.dense
        scenes = read_scenes([Path(path) for path in settings.scenes])
        num_held_out = min(settings.held_out, len(scenes) // 5)
        if num_held_out < 1:
            raise UserError(f"{len(scenes)} scenes are too few to hold some out (5 at least)")
        train_items, held_out_items = scenes[:-num_held_out], scenes[-num_held_out:]
        if settings.batch_size > len(train_items):
            raise UserError(
                f"dense.batch_size {settings.batch_size:,} is more than the "
                f"{len(train_items):,} training scenes"
            )
        self.settings, self.recipe, self.group = settings, recipe, group
        mx.random.seed(recipe.seed)  # the heads start the same on every rank
        self.model, processor = load(recipe.model)
        if settings.word_weight and word_token_ids(processor.tokenizer) is None:
            raise UserError(
                "dense.word_weight needs a tokenizer with one token for each word after a space "
                f"(' red', ' circle', ' Send', ...); {recipe.model}'s has not"
            )
        freeze_modules(self.model, recipe.modules)
        self.trained = DenseHeads(self.model, processor.tokenizer)  # no decoder: no gradients
        self.batcher = TileBatcher(processor, self.model.config.num_image_tokens)
        self.data = SceneSampler(train_items, random.Random(recipe.seed))
        self.throughput = ("images_per_s", settings.batch_size)
        # Decoded once, by rank 0, which scores them.
        chunks = range(0, num_held_out if group.rank() == 0 else 0, 32)
        self.held_out = [self.batcher(held_out_items[k : k + 32]) for k in chunks]
        self.scores: dict[str, float] = {}  # of the last validation

    def make_step(self, optimizer: Any) -> Callable[[Callable[[], None]], tuple[float, float]]:
        net, settings, group = self.trained, self.settings, self.group
        loss_and_grad = nn.value_and_grad(
            net, lambda net, batch, totals: dense_loss(net, batch, settings, totals)
        )
        update = compiled_update(net, optimizer, self.recipe.train.grad_clip)
        share = settings.batch_size // group.size()
        mine = slice(group.rank() * share, (group.rank() + 1) * share)

        def step(between: Callable[[], None]) -> tuple[float, float]:
            # Every rank draws the same scenes; each decodes and runs its own share.
            items = self.data.draw(settings.batch_size)
            targets = [self.batcher.targets(item) for item in items]
            batch = self.batcher(items[mine], targets[mine])
            loss, grads = loss_and_grad(net, batch, loss_totals(targets, settings))
            loss, grads = sum_over_ranks((loss, grads), group)
            norm = update(grads)
            mx.eval(loss, norm, net.parameters(), optimizer.state)
            return loss.item(), norm.item()

        return step

    def running(self) -> AbstractContextManager:
        return nullcontext()

    def validation_due(self, step: int) -> bool:
        every = self.recipe.log.eval_every
        return bool(every) and (step % every == 0 or step == self.recipe.train.steps)

    def validate(self) -> dict[str, float]:
        self.scores = validate(self.trained, self.held_out) if self.held_out else {}
        return self.scores

    def save(self, out: Path) -> str:
        save_final_model(out, self.model, resolve_path(self.recipe.model))
        # The last step's validation, when this run had one (validation_due holds at the end).
        last_validated = self.scores and self.validation_due(self.recipe.train.steps)
        scores = self.scores if last_validated else self.validate()
        return "held-out cells: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
