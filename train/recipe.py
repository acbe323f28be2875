"""Training recipes: a TOML file read into plain dataclasses, with command-line overrides.

A recipe names the model to start from, the data sources and their mixture weights, what is
frozen, the optimizer and schedule, steps, batch, sequence length, checkpointing and the output
folder. Relative paths are relative to the recipe file. See train/recipes/ for examples.
"""

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm1_mlx.errors import UserError
from mm1_mlx.train.data import SourceConfig
from mm1_mlx.train.optim import ModuleSettings

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
    grad_clip: float | None = 1.0
    z_loss: float = 0.0  # coefficient of the output z-loss, mean logsumexp(logits)^2
    box_smoothing: float = 0.0  # sigma (0..1000 units) of box coordinates' soft targets
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
    eval_batches: int = 8


@dataclass
class Recipe:
    model: str
    out: str
    seed: int = 0
    data: DataSettings = field(default_factory=DataSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    modules: dict[str, ModuleSettings] = field(default_factory=dict)
    lora: LoraSettings | None = None
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    log: LogSettings = field(default_factory=LogSettings)


# Which fields hold nested tables: (dataclass, field) -> how to build the value.
_NESTED = {
    (Recipe, "data"): DataSettings,
    (Recipe, "optimizer"): OptimizerSettings,
    (Recipe, "train"): TrainSettings,
    (Recipe, "lora"): LoraSettings,
    (Recipe, "checkpoint"): CheckpointSettings,
    (Recipe, "log"): LogSettings,
}
_LISTS = {(DataSettings, "sources"): SourceConfig, (DataSettings, "validation"): SourceConfig}


def _build(cls, values: Any, where: str):
    """A dataclass from a TOML table, refusing unknown keys (a typo must not pass silently)."""
    if not isinstance(values, dict):
        raise UserError(f"{where}: expected a table")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(names)})")
    kwargs = {name: _value(cls, name, value, f"{where}.{name}") for name, value in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise UserError(f"{where}: {error}") from None


def _value(cls, name: str, value: Any, where: str) -> Any:
    if (cls, name) in _NESTED:
        return _build(_NESTED[cls, name], value, where)
    if (cls, name) in _LISTS:
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list of tables ([[{where}]])")
        return [_build(_LISTS[cls, name], item, f"{where}[{i}]") for i, item in enumerate(value)]
    if (cls, name) == (Recipe, "modules"):
        return {
            key: _build(ModuleSettings, table, f"{where}.{key}") for key, table in value.items()
        }
    if name == "betas":
        return tuple(value)
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.steps=100` -> (["train", "steps"], 100); the value is read as TOML, else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text!r}: expected KEY=VALUE, e.g. train.steps=100")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def load_recipe(path: Path, overrides: list[str] = (), out: Path | None = None) -> Recipe:
    path = Path(path)
    try:
        values = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such recipe") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise UserError(f"{path}: not a valid TOML recipe ({error})") from None
    for override in overrides:
        keys, value = parse_override(override)
        table = values
        for key in keys[:-1]:
            table = table.setdefault(key, {})
        table[keys[-1]] = value
    if out is not None:
        values["out"] = str(Path(out).resolve())
    for required in ("model", "out"):
        if required not in values:
            raise UserError(f"{path}: the recipe needs '{required}'")
    recipe = _build(Recipe, values, path.name)
    return _resolve_paths(recipe, path.parent)


def _resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    def resolve(value: str) -> str:
        candidate = base / value
        # A hub repo id stays as it is; a path is taken relative to the recipe.
        return str(candidate) if candidate.exists() or value.startswith(".") else value

    recipe.model = resolve(recipe.model)
    recipe.out = str(base / recipe.out)
    for source in [*recipe.data.sources, *recipe.data.validation]:
        source.path = str(base / source.path)
    return recipe
