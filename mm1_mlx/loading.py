"""Model folders on disk (docs/architecture.md, "The model folder"): load, save, and hub look-up.

A folder holds config.json (`model_type: "mm1"`), model.safetensors (or shards with
model.safetensors.index.json; never both) with `vision.`, `connector.`, `decoder.` weight names,
and the tokenizer files. Folders are written atomically: into a temporary sibling, then renamed.
"""

import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mm1_mlx.config import MM1Config, read_json
from mm1_mlx.config_checks import check_config
from mm1_mlx.errors import UserError
from mm1_mlx.model import MM1Model

MAX_SHARD_BYTES = 5 << 30
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


def resolve_path(path_or_repo: str | Path, allow_patterns: list[str] | None = None) -> Path:
    """A local file or folder as it is; otherwise a hub repo id, downloaded (or from the cache)."""
    if not str(path_or_repo).strip():  # Path("") is the working directory
        raise UserError("the model's name is empty: give a model folder or a hub repo id")
    path = Path(path_or_repo).expanduser()
    if path.exists():
        return path
    text = str(path_or_repo)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise UserError(f"{text}: no such file or folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=allow_patterns or _HUB_PATTERNS))
    except Exception as error:  # the hub raises many types; all mean "not available here"
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(
            f"{text}: no such local file or folder, and the hub download failed: {reason}"
        ) from None


DEMO_MODEL = Path(__file__).parent / "demo_model"


def model_or_default(model: str | Path | None) -> str | Path:
    """The model a command uses: the one given, else the demo model shipped in the package
    (trained by train/recipes/demo on the synthetic world of docs/synthetic-world.md)."""
    if model is not None:
        return model
    if not (DEMO_MODEL / "config.json").is_file():
        raise UserError(f"no --model given and the demo model is missing from {DEMO_MODEL}")
    return DEMO_MODEL


def read_config(folder: Path) -> MM1Config:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder}: not a model folder (no config.json)")
    values = read_json(config_path)
    if values.get("model_type") != "mm1":
        found = values.get("model_type")
        raise UserError(f"{config_path}: model_type is {found!r}, not 'mm1' (convert it first)")
    check_config(values, config_path)
    return MM1Config.from_dict(values)


def _weight_files(folder: Path) -> list[Path]:
    """model.safetensors, or the shards model.safetensors.index.json names. Weight files beside
    them that neither names (a shard of another save, a single file beside shards) make the
    folder ambiguous: it is refused rather than loaded without them."""
    index = folder / "model.safetensors.index.json"
    single = (folder / "model.safetensors").is_file()
    shards = sorted(path.name for path in folder.glob("model-*.safetensors"))
    which = "which are the model's weights? (remove the files that are not)"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(name, str) and name for name in weight_map.values()
        ):
            raise UserError(f"{index}: weight_map must be an object of weight name -> file name")
        names = sorted(set(weight_map.values()))
        found = ["model.safetensors"] * single + shards
        unnamed = [name for name in found if name not in names]
        if unnamed:
            raise UserError(f"{folder}: {index.name} does not name {_listed(unnamed)}: {which}")
        return [folder / name for name in names]
    if single and shards:
        raise UserError(
            f"{folder}: holds model.safetensors and {_listed(shards)}, and no {index.name} "
            f"says which to load: {which}"
        )
    if shards:
        raise UserError(f"{folder}: holds {_listed(shards)} but no {index.name} to list them")
    if not single:
        raise UserError(f"{folder}: no model.safetensors")
    return [folder / "model.safetensors"]


def _listed(names: list[str]) -> str:
    """["a", "b", "c", "d"] -> "a, b, c and 1 more"."""
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def quantize_like(model: nn.Module, quantization: dict[str, Any], weights: dict) -> None:
    """Turn the layers whose saved weights are quantized into quantized layers, with the
    settings config.json gives their path where it does (mlx-lm's per-layer format, e.g. MoE
    routers at 8 bits), else the model's."""

    def settings(path: str, module: nn.Module) -> bool | dict:
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return quantization.get(path, True)

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=settings,
    )


def load_model(path_or_repo: str | Path, lazy: bool = False) -> MM1Model:
    folder = resolve_path(path_or_repo)
    return _load_model(folder, read_config(folder), lazy)


def _load_model(folder: Path, config: MM1Config, lazy: bool) -> MM1Model:
    model = MM1Model(config)
    weights: dict[str, mx.array] = {}
    for file in _weight_files(folder):
        try:
            weights.update(mx.load(str(file)))
        except (RuntimeError, ValueError) as error:
            raise UserError(f"{file}: cannot read weights ({error})") from None
    if config.quantization:
        quantize_like(model, config.quantization, weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as error:
        message = " ".join(str(error).split())
        raise UserError(f"{folder}: weights do not match config.json: {message}") from None
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model


def load(path_or_repo: str | Path, lazy: bool = False):
    """`model, processor = load(folder_or_hub_id)`. The tokenizer is read first: a folder
    without one fails before its weights are read."""
    folder = resolve_path(path_or_repo)
    config = read_config(folder)
    processor = load_processor(folder, config)
    return _load_model(folder, config, lazy), processor


def load_processor(folder: Path, config: MM1Config):
    """The folder's tokenizer as a Processor, or a one-line UserError."""
    from mm1_mlx.processor import Processor, check_chat_template

    if not any((folder / name).is_file() for name in TOKENIZER_MODELS):
        names = ", ".join(TOKENIZER_MODELS)
        raise UserError(f"{folder}: no tokenizer files (one of {names})")
    try:
        processor = Processor.from_folder(folder, config)
    except Exception as error:  # transformers raises many kinds for a bad tokenizer folder
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{folder}: cannot load the tokenizer ({reason})") from None
    try:
        check_chat_template(getattr(processor.tokenizer, "chat_template", None))
    except UserError as error:
        raise UserError(f"{folder}: {error}") from None
    image_ids = processor.tokenizer.encode(config.image_token, add_special_tokens=False)
    if image_ids != [config.image_token_id]:
        raise UserError(
            f"{folder}: the tokenizer makes {config.image_token!r} the tokens {image_ids}, not "
            f"the image token {config.image_token_id} that config.json names"
        )
    return processor


def check_writable(out: Path, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse an output folder that exists (an empty folder aside) unless it may be replaced,
    or that cannot be created, or that is or holds one of the command's `inputs` (replacing it
    would delete them): checked again by `atomic_folder`, and first by long jobs, before their
    work."""
    out = Path(out)
    check_not_over_inputs(out, inputs)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists (pass --force to replace it)")
    _check_creatable(out)


def check_not_over_inputs(out: Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an output that is, or is a folder holding, one of the local `inputs`."""
    where = Path(out).resolve()
    for source in inputs:
        path = Path(source).resolve()
        if Path(source).exists() and (path == where or where in path.parents):
            raise UserError(f"{out}: holds the input {source}; write the output elsewhere")


def check_file_writable(path: Path) -> None:
    """Refuse an output file whose folder is missing or read-only, or that is a folder."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a file name")
    if not path.parent.is_dir():
        raise UserError(f"{path}: cannot be written, no such folder {path.parent}")
    _check_creatable(path)


def _check_creatable(path: Path) -> None:
    """`path` can be made: the nearest existing folder above it is a writable folder."""
    above = next(folder for folder in path.absolute().parents if folder.exists())
    if not above.is_dir():
        raise UserError(f"{path}: cannot be written, {above} is a file, not a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot be written, {above} is not writable")


@contextmanager
def atomic_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces `out` only once everything in it was written;
    on failure nothing is left, not even the parent folders it made."""
    out = Path(out)
    check_writable(out, overwrite)
    made = [folder for folder in out.absolute().parents if not folder.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Not mkdtemp: its mode 0700 would stay on the renamed folder; mkdir follows the umask.
        tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:12]}")
        tmp.mkdir()
    except OSError as error:
        raise UserError(f"{out}: cannot be written ({error.strerror})") from None
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
            for folder in made:  # innermost first; a folder someone else filled meanwhile stays
                with suppress(OSError):
                    folder.rmdir()


def import_parquet():
    """pyarrow.parquet, from the `data` extra (parquet sources and benchmark files)."""
    try:
        import pyarrow.parquet
    except ImportError:
        raise UserError("parquet files need pyarrow: pip install 'mm1-mlx[data]'") from None
    return pyarrow.parquet


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file through a temporary sibling, so it appears whole or not at all."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as error:
        raise UserError(f"{path}: cannot be written ({error.strerror})") from None
    finally:
        tmp.unlink(missing_ok=True)


def save_weights(
    folder: Path, weights: dict[str, mx.array], max_shard_bytes: int = MAX_SHARD_BYTES
):
    """model.safetensors, or shards plus model.safetensors.index.json past max_shard_bytes."""
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name in sorted(weights):
        nbytes = weights[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = weights[name]
        size += nbytes
    if len(shards) == 1:
        mx.save_safetensors(
            str(folder / "model.safetensors"), shards[0], metadata={"format": "mlx"}
        )
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(folder / file), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(w.nbytes for w in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_config(folder: Path, config: MM1Config) -> None:
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def save_model(model: MM1Model, out: Path, tokenizer_folder: Path, overwrite: bool = False) -> None:
    """Write `model` as a model folder, with the tokenizer files copied from tokenizer_folder."""
    with atomic_folder(out, overwrite) as tmp:
        save_weights(tmp, dict(tree_flatten(model.parameters())))
        write_config(tmp, model.config)
        copy_tokenizer_files(tokenizer_folder, tmp)


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
# The files that hold a vocabulary: a folder needs one of them to have a tokenizer.
TOKENIZER_MODELS = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken")


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
