"""Training recipes: a TOML file read into plain dataclasses, with command-line overrides.

A recipe names the model to start from, the data sources and their mixture weights, what is
frozen, the optimizer and schedule, steps, batch, sequence length, checkpointing and the output
folder. See train/recipes/ for examples.

A recipe with a `[dense]` table is the image encoder's dense pre-training (train/dense.py)
instead: it reads scenes, not data sources, and shares the rest (optimizer, steps,
checkpoints, metrics, ranks).

Paths: `model`, `out`, each data source's `path` (a file, a brace pattern or a list) and
`images`, and `dense.scenes` are relative to the recipe file's folder, never to the working
directory (`~` is the home folder), and are kept as absolute paths, so the same recipe read
through another path, or from another working directory, reads the same data and resumes the
same run. A `model` that
is no local folder but has the shape of a hub repo id ("owner/name") stays a repo id. `--out`
on the command line is relative to the working directory, as command-line paths are.

Every value is checked as the recipe is read, before any model is loaded or folder made: its
type (a number is no string, a flag is true or false, a table is a table), its range (finite,
positive where it must be) or its choices, and that the data files exist and hold what each
source's settings name (train/sources.py's check_source: parquet columns, image folders or zips,
settings of another kind of source). A bad value is a one-line UserError naming its key, e.g.
`optimizer.lr` or `data.sources[1].image_column`, and what is allowed.
"""

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm1_mlx.boxes import COORDINATE_MAX
from mm1_mlx.errors import UserError
from mm1_mlx.quantize import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from mm1_mlx.rules import FLAG, TEXT, Rule, choice, integer, number
from mm1_mlx.train.data import LOSS_WEIGHTINGS, RENDERERS, SourceConfig
from mm1_mlx.train.optim import (
    DECAYS,
    MODULES,
    OPTIMIZERS,
    ModuleSettings,
    resolve_weight_decay,
)
from mm1_mlx.train.sources import MAX_SHUFFLE_BUFFER, SourceError, check_source

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class DataSettings:
    sources: list[SourceConfig] = field(default_factory=list)
    validation: list[SourceConfig] = field(default_factory=list)
    seq_len: int = 2048
    batch_size: int = 8  # global: sequences per optimizer step, across all ranks
    max_images_per_sequence: int = 16
    loss_weighting: str = "token"  # "token", "example" or "turn"
    split_images: bool | None = None  # None: as the model's config says
    strict: bool = False
    # Packed examples attend only to themselves, as each does alone at inference; True lets
    # a token see every earlier token of its row (the examples packed before it included).
    attend_across_examples: bool = False


@dataclass
class OptimizerSettings:
    name: str = "adamw"  # "adamw" or "adafactor"
    lr: float | str = 1e-4  # or "mm1": exp(-0.4214 ln N - 0.5535) for N decoder parameters
    weight_decay: float | str = 0.0  # or "mm1": 0.1 * lr
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay: str = "cosine"  # "cosine", "linear" or "constant"


@dataclass
class TrainSettings:
    steps: int = 1000
    grad_accumulation: int = 1
    grad_clip: float | None = 1.0  # 0 or None: no clipping
    z_loss: float = 0.0  # coefficient of the output z-loss, mean logsumexp(logits)^2
    box_smoothing: float = 0.0  # sigma (0..1000 units) of box coordinates' soft targets
    # The chance that an image tile's tokens reach the decoder in a random order: where they
    # sit then tells nothing, and the decoder must locate things by what the tokens hold.
    image_token_shuffle: float = 0.0
    # Weight of the loss that teaches one decoder head, [layer, head], to look at the image
    # tokens inside each box from the positions that ask for it or about it
    # (train/box_attention.py); 0: off.
    box_attention: float = 0.0
    box_attention_head: tuple[int, int] = (0, 0)
    gradient_checkpointing: bool = False


@dataclass
class LoraSettings:
    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.0
    num_layers: int | None = None  # the last N decoder layers; None: all
    quantize_bits: int | None = None  # QLoRA: quantize the decoder to this many bits first
    group_size: int = 64


@dataclass
class CheckpointSettings:
    every: int = 500
    keep: int = 3


@dataclass
class LogSettings:
    every: int = 10
    eval_every: int = 0  # 0: no validation
    eval_batches: int = 8  # at most: fewer where the validation data runs out first


@dataclass
class DenseSettings:
    """The image encoder's dense pre-training (train/dense.py): a stage of its own, which reads
    `mm1-mlx data synth`'s scenes instead of data.sources and trains the encoder and connector
    (with heads of their own) to tell what lies under each image token."""

    scenes: list[str]  # scenes.jsonl files
    batch_size: int = 32  # images per step, across all ranks; a screen is three tiles
    held_out: int = 200  # the last scenes (a fifth at most): validation, never trained on
    box_weight: float = 2.0  # L1 on 0..1 coordinates is much smaller than the class loss
    # A button cell's class loss counts this many times a shape's or a title's: a label must
    # be read from a few glyphs anywhere in the button, by far the hardest target.
    button_weight: float = 8.0
    # Encoders with a convolutional embedding: its own label head on the patches over text,
    # so that it learns to read glyphs directly, before the ViT learns to pass them on.
    reading_weight: float = 1.0
    # Tokenizers with one token per integer 0..1000: each thing cell also writes its box's
    # four coordinates as the decoder will, logits over the decoder's own number embeddings
    # against Gaussian targets of this width (in 0..1000 units). At weight 1 this loss (about
    # 20, against a floor of 15) dominated the clipped gradient and slowed the class heads.
    coordinate_weight: float = 0.25
    coordinate_sigma: float = 10.0
    # Tokenizers with one token per word after a space: each thing cell also names its words
    # (colour and kind, title, label) by its dot product with the decoder's own embeddings of
    # them, so that image tokens and the question's words start in one code.
    word_weight: float = 0.0


@dataclass
class Recipe:
    model: str
    out: str
    seed: int = 0
    data: DataSettings = field(default_factory=DataSettings)
    dense: DenseSettings | None = None
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    modules: dict[str, ModuleSettings] = field(default_factory=dict)
    lora: LoraSettings | None = None
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    log: LogSettings = field(default_factory=LogSettings)


# -- what each value may be ---------------------------------------------------------------------


def or_mm1(rule: Rule) -> Rule:
    """A number, or "mm1": MM1's rule for it."""
    return Rule(
        f"{rule.allowed} or 'mm1'",
        lambda value: value == "mm1" or rule.test(value),
        lambda value: value if value == "mm1" else rule.convert(value),
    )


UNIT = number(0, 1, open_high=True)
BETAS = Rule(
    f"a list of 2 numbers, each {UNIT.allowed}",
    lambda value: isinstance(value, list) and len(value) == 2 and all(map(UNIT.test, value)),
    lambda value: tuple(map(float, value)),
)
POSITIVE = number(0, open_low=True)
DATA_PATH = Rule(
    "a file, a brace pattern (shards/{000..009}.tar) or a non-empty list of files",
    lambda value: (
        TEXT.test(value) or (isinstance(value, list) and bool(value) and all(map(TEXT.test, value)))
    ),
)
NON_NEGATIVE = number(0)
NATURAL = integer(0)
# Checkpoint folders are named by their step in 7 digits (trainer.checkpoint_folder): past them
# the newest would sort first, and the step count loses float32's exact integers at 2**24.
MAX_STEPS = 9_999_999
# Gradient norms of a training run are of order 1 (a few hundred when it diverges): a clip far
# past them never acts, and 0 is how a recipe says "no clipping".
MAX_GRAD_CLIP = 1000.0
# Learning rates are of order 1e-6..1e-2 (MM1's rule gives under 0.6 for any decoder). AdamW
# moves each weight by about lr a step: past 10, every step moves the weights far past their own
# scale, and the loss only diverges.
MAX_LR = 10.0
# A module's learning rate against optimizer.lr (0: it does not move); the recipes here use 0.1
# and 2. Past 1000 the product is no learning rate either.
MAX_LR_MULTIPLIER = 1000.0
# Past the context of any model made: a model whose config gives no max_position_embeddings is
# checked against this alone (a row is seq_len + 1 tokens, and attention grows as its square).
MAX_SEQ_LEN = 1 << 20

RULES: dict[tuple[type, str], Rule] = {
    (Recipe, "model"): TEXT,
    (Recipe, "out"): TEXT,
    (Recipe, "seed"): integer(0, 2**64 - 1),  # MLX's random seed is 64 bits
    (DataSettings, "seq_len"): integer(2, MAX_SEQ_LEN),  # inputs, targets: the row shifted by one
    (DataSettings, "batch_size"): integer(1),
    (DataSettings, "max_images_per_sequence"): integer(0),
    (DataSettings, "loss_weighting"): choice(LOSS_WEIGHTINGS),
    (DataSettings, "split_images"): FLAG,
    (DataSettings, "strict"): FLAG,
    (DataSettings, "attend_across_examples"): FLAG,
    (SourceConfig, "path"): DATA_PATH,
    (SourceConfig, "format"): choice(tuple(RENDERERS)),
    (SourceConfig, "weight"): POSITIVE,
    # What each kind of source takes, and what its files hold: check_source.
    (SourceConfig, "shuffle_buffer"): integer(0, MAX_SHUFFLE_BUFFER),
    (SourceConfig, "images"): TEXT,
    (SourceConfig, "caption_field"): TEXT,
    (SourceConfig, "image_column"): TEXT,
    (SourceConfig, "text_column"): TEXT,
    (OptimizerSettings, "name"): choice(OPTIMIZERS),
    (OptimizerSettings, "lr"): or_mm1(number(0, MAX_LR, open_low=True)),
    (OptimizerSettings, "weight_decay"): or_mm1(NON_NEGATIVE),
    (OptimizerSettings, "betas"): BETAS,
    (OptimizerSettings, "warmup_steps"): integer(0),  # and at most train.steps: check_recipe
    (OptimizerSettings, "min_lr_ratio"): number(0, 1),
    (OptimizerSettings, "decay"): choice(DECAYS),
    (TrainSettings, "steps"): integer(1, MAX_STEPS),
    (TrainSettings, "grad_accumulation"): integer(1),
    (TrainSettings, "grad_clip"): number(0, MAX_GRAD_CLIP),  # 0: no clipping
    (TrainSettings, "z_loss"): number(0, 1),  # PaLM's 1e-4; far larger drowns the loss
    # 0: off; wider than the 0..1000 grid, the soft targets are flat over it.
    (TrainSettings, "box_smoothing"): number(0, COORDINATE_MAX),
    (TrainSettings, "image_token_shuffle"): number(0, 1),
    # Of the order of the cross-entropy (a few nats) at 1; far larger drowns the answers.
    (TrainSettings, "box_attention"): number(0, 100),
    (TrainSettings, "box_attention_head"): Rule(
        "a list of 2 integers >= 0, [layer, head]",
        lambda value: isinstance(value, list) and len(value) == 2 and all(map(NATURAL.test, value)),
        tuple,
    ),
    (TrainSettings, "gradient_checkpointing"): FLAG,
    (ModuleSettings, "trainable"): FLAG,
    (ModuleSettings, "lr_multiplier"): number(0, MAX_LR_MULTIPLIER),
    (LoraSettings, "rank"): integer(1),
    # B A's weight beside W (mlx-lm's default 20): 0 or less undoes or flips the adapter, and a
    # huge one overflows float32 (inf x B's starting zeros is NaN).
    (LoraSettings, "scale"): number(0, 1000, open_low=True),
    (LoraSettings, "dropout"): UNIT,
    (LoraSettings, "num_layers"): Rule(
        "an integer >= 1 (leave it out for all layers)", integer(1).test
    ),
    (LoraSettings, "quantize_bits"): choice(SUPPORTED_BITS),
    (LoraSettings, "group_size"): choice(SUPPORTED_GROUP_SIZES),
    (DenseSettings, "scenes"): Rule(
        "a non-empty list of scenes.jsonl files",
        lambda value: isinstance(value, list) and bool(value) and all(map(TEXT.test, value)),
    ),
    (DenseSettings, "batch_size"): integer(1),
    (DenseSettings, "held_out"): integer(1),
    # Relative weights of losses of order 1-20: far larger ones only overflow the loss.
    (DenseSettings, "box_weight"): number(0, 1000),
    (DenseSettings, "button_weight"): number(0, 1000),
    (DenseSettings, "reading_weight"): number(0, 1000),
    (DenseSettings, "coordinate_weight"): number(0, 1000),
    (DenseSettings, "coordinate_sigma"): number(0, 1000, open_low=True),
    (DenseSettings, "word_weight"): number(0, 1000),
    (CheckpointSettings, "every"): integer(1),
    (CheckpointSettings, "keep"): integer(1),
    (LogSettings, "every"): integer(1),
    (LogSettings, "eval_every"): integer(0),
    (LogSettings, "eval_batches"): integer(1),
}

# Which fields hold nested tables: (dataclass, field) -> how to build the value.
_NESTED = {
    (Recipe, "data"): DataSettings,
    (Recipe, "dense"): DenseSettings,
    (Recipe, "optimizer"): OptimizerSettings,
    (Recipe, "train"): TrainSettings,
    (Recipe, "lora"): LoraSettings,
    (Recipe, "checkpoint"): CheckpointSettings,
    (Recipe, "log"): LogSettings,
}
_LISTS = {(DataSettings, "sources"): SourceConfig, (DataSettings, "validation"): SourceConfig}


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _build(cls, values: Any, where: str):
    """A dataclass from a TOML table, refusing unknown keys (a typo must not pass silently),
    missing required ones and values outside their RULES."""
    if not isinstance(values, dict):
        raise UserError(f"{where} must be a table ([{where}]), not {values!r}")
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    unknown = sorted(set(values) - set(names))
    if unknown:
        at = f"{where}: " if where else ""
        raise UserError(f"{at}unknown key '{unknown[0]}' (known: {', '.join(names)})")
    for f in fields:
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in values:
            raise UserError(f"{_key(where, f.name)}: missing (the recipe needs '{f.name}')")
    kwargs = {name: _value(cls, name, value, _key(where, name)) for name, value in values.items()}
    return cls(**kwargs)


def _value(cls, name: str, value: Any, where: str) -> Any:
    if (cls, name) in _NESTED:
        return _build(_NESTED[cls, name], value, where)
    if (cls, name) in _LISTS:
        if not isinstance(value, list):
            raise UserError(f"{where} must be a list of tables ([[{where}]]), not {value!r}")
        return [_build(_LISTS[cls, name], item, f"{where}[{i}]") for i, item in enumerate(value)]
    if (cls, name) == (Recipe, "modules"):
        return _modules(value, where)
    rule = RULES[cls, name]
    if not rule.test(value):
        raise UserError(f"{where} must be {rule.allowed}, not {value!r}")
    return rule.convert(value)


def _modules(value: Any, where: str) -> dict[str, ModuleSettings]:
    if not isinstance(value, dict):
        raise UserError(f"{where} must be a table ([{where}.vision] etc.), not {value!r}")
    unknown = sorted(set(value) - set(MODULES))
    if unknown:
        raise UserError(f"{where}.{unknown[0]}: unknown module (modules are {', '.join(MODULES)})")
    return {key: _build(ModuleSettings, table, f"{where}.{key}") for key, table in value.items()}


def check_decay_fits(lr: float, weight_decay: float | str, modules: dict) -> None:
    """Decoupled weight decay multiplies a weight by 1 - lr x weight_decay each step: at 1 or
    more it zeroes or flips every decayed weight."""
    peak = lr * max([1.0, *(module.lr_multiplier for module in modules.values())])
    shrink = peak * resolve_weight_decay(weight_decay)
    if shrink >= 1:
        raise UserError(
            f"optimizer.weight_decay times the peak learning rate ({peak:g}) must be below 1 "
            f"(each step multiplies decayed weights by 1 - lr x weight_decay), not {shrink:g}"
        )


def check_recipe(recipe: Recipe) -> None:
    """What no single value says: the warm-up fits in the steps; there is data to train on and,
    when validation is asked for, data to validate on."""
    steps, warmup = recipe.train.steps, recipe.optimizer.warmup_steps
    if warmup > steps:
        raise UserError(
            f"optimizer.warmup_steps must be within 0..{steps} (train.steps), not {warmup}"
        )
    optimizer = recipe.optimizer
    if optimizer.lr != "mm1":
        check_decay_fits(optimizer.lr, optimizer.weight_decay, recipe.modules)
    if recipe.dense is not None:
        check_dense_stage(recipe)
        return
    if not recipe.data.sources:
        raise UserError("data.sources: the recipe has no data sources ([[data.sources]])")
    check_data_limits(recipe.data)
    if recipe.log.eval_every and not recipe.data.validation:
        raise UserError(
            f"log.eval_every is {recipe.log.eval_every} but the recipe has no validation data "
            "([[data.validation]]); 0 turns validation off"
        )


def check_data_limits(data: DataSettings) -> None:
    """An image takes at least one of a sequence's positions, so a sequence holds at most
    seq_len of them; a mixture's weights are shares of their sum, which must be a number."""
    if data.max_images_per_sequence > data.seq_len:
        raise UserError(
            f"data.max_images_per_sequence must be within 0..{data.seq_len} (data.seq_len: each "
            f"image takes at least one position), not {data.max_images_per_sequence:,}"
        )
    for key in ("sources", "validation"):
        total = sum(source.weight for source in getattr(data, key))
        if not math.isfinite(total):
            raise UserError(
                f"data.{key}: the weights add up to {total} (they are shares of their sum; "
                "scale them down)"
            )


def check_dense_stage(recipe: Recipe) -> None:
    """A dense stage trains the encoder and connector on scenes, nothing else."""
    if recipe.data.sources or recipe.data.validation:
        raise UserError("data.sources: a dense stage ([dense]) reads dense.scenes, no data sources")
    if recipe.lora is not None:
        raise UserError("lora: a dense stage ([dense]) trains the encoder and connector in full")
    if recipe.optimizer.lr == "mm1":
        raise UserError("optimizer.lr: 'mm1' is a rule for decoders; a dense stage needs a number")
    if recipe.modules.get("decoder", ModuleSettings()).trainable:
        raise UserError("modules.decoder: a dense stage ([dense]) does not train the decoder")
    if recipe.train.box_attention:
        raise UserError("train.box_attention: a dense stage ([dense]) has no answers to look from")


def global_batch_size(recipe: Recipe) -> int:
    """What a step takes over all ranks: images in a dense stage, else sequences."""
    return recipe.dense.batch_size if recipe.dense is not None else recipe.data.batch_size


# -- reading ------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.steps=100` -> (["train", "steps"], 100); the value is read as TOML, else a string."""
    key, sep, raw = text.partition("=")
    keys = [part.strip() for part in key.split(".")]
    if not sep or not all(keys):
        raise UserError(f"--set {text!r}: expected KEY=VALUE, e.g. train.steps=100")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return keys, value


def apply_override(values: dict, text: str) -> None:
    """Set one value of the recipe's tables; `name[i]` is the i-th table of a list, which the
    recipe must hold already (`data.sources[0].weight=2`)."""
    keys, value = parse_override(text)
    steps = [step for key in keys for step in _steps(key, text)]
    container: Any = values
    for depth, step in enumerate(steps):
        above = _joined(steps[:depth])
        if isinstance(step, int):
            entries = container if isinstance(container, list) else []
            if step >= len(entries):
                raise UserError(
                    f"--set {text!r}: {above} has no entry [{step}] ({len(entries)} in the "
                    "recipe; entries are added in the recipe file)"
                )
        elif not isinstance(container, dict):
            raise UserError(f"--set {text!r}: {above} is not a table")
        if depth == len(steps) - 1:
            container[step] = value
        elif isinstance(step, int):
            container = container[step]
        else:
            container = container.setdefault(step, {})


def _steps(key: str, text: str) -> list[str | int]:
    """One dotted part of a --set key: `sources[1]` -> ["sources", 1], `steps` -> ["steps"]."""
    name, bracket, rest = key.partition("[")
    if not bracket:
        return [key]
    index = rest.removesuffix("]")
    if not (name and rest.endswith("]") and index.isascii() and index.isdigit()):
        raise UserError(
            f"--set {text!r}: {key!r}: a list's entry is named as name[index], "
            "e.g. data.sources[0].weight=2"
        )
    return [name, int(index)]


def _joined(steps: list[str | int]) -> str:
    """["data", "sources", 0] -> "data.sources[0]"."""
    return "".join(
        f"[{step}]" if isinstance(step, int) else f".{step}" if index else step
        for index, step in enumerate(steps)
    )


def load_recipe(path: Path, overrides: list[str] = (), out: Path | None = None) -> Recipe:
    """The recipe at `path` with `--set` overrides and `--out`, checked, paths made absolute."""
    path = Path(path)
    try:
        values = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such recipe") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise UserError(f"{path}: not a valid TOML recipe ({error})") from None
    except RecursionError:
        raise UserError(f"{path}: not a valid TOML recipe (nested too deeply)") from None
    for override in overrides:
        apply_override(values, override)
    if out is not None:
        values["out"] = str(Path(out).expanduser().resolve())
    try:
        recipe = _build(Recipe, values, "")
        check_recipe(recipe)
        return _resolve_paths(recipe, path.resolve().parent)
    except UserError as error:
        raise UserError(f"{path.name}: {error}") from None


def _resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    def local(value: str) -> Path:
        return (base / Path(value).expanduser()).resolve()

    model = local(recipe.model)
    if model.exists() or not _is_repo_id(recipe.model):
        if not model.exists():
            raise UserError(f"model: {model}: no such model folder")
        recipe.model = str(model)
    recipe.out = str(_writable_folder(local(recipe.out)))
    if recipe.dense is not None:
        recipe.dense.scenes = [str(_scenes_file(local(path))) for path in recipe.dense.scenes]
    for key in ("sources", "validation"):
        for index, source in enumerate(getattr(recipe.data, key)):
            _resolve_source(source, local)
            try:
                check_source(source)
            except SourceError as error:
                raise UserError(f"data.{key}[{index}].{error.key}: {error.detail}") from None
    return recipe


def _resolve_source(source: SourceConfig, local) -> None:
    """A source's paths made absolute. A brace pattern is joined to the recipe's folder, not
    resolved: resolving would read a brace group with a "/" in it as folders."""
    if isinstance(source.path, list):
        source.path = [str(local(path)) for path in source.path]
    elif "{" in source.path:
        source.path = str(local(".") / Path(source.path).expanduser())
    else:
        source.path = str(local(source.path))
    if source.images is not None:
        source.images = str(local(source.images))


def _scenes_file(path: Path) -> Path:
    if not path.is_file():
        raise UserError(f"dense.scenes: {path}: no such file (`mm1-mlx data synth` writes one)")
    return path


def _is_repo_id(value: str) -> bool:
    """ "owner/name", as the hub spells repo ids (mm1_mlx.loading.resolve_path)."""
    return value.count("/") == 1 and not value.startswith((".", "/", "~"))


def _writable_folder(out: Path) -> Path:
    """`out`, if it is a folder or one can be made there."""
    if out.exists() and not out.is_dir():
        raise UserError(f"out: {out} is a file, not a folder")
    existing = next(parent for parent in (out, *out.parents) if parent.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"out: cannot make {out} ({existing} is no writable folder)")
    return out
