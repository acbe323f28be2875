"""Whole vision-language checkpoints -> MM1 model folders (`mm1-mlx convert --vlm`).

`convert_vlm` finds what kind of checkpoint a folder (or hub repo) holds from its config.json
and hands it to that kind's converter. Supporting another kind is one entry in CONVERTERS (and,
if its config.json has no model_type of its own, a rule in `checkpoint_kind`).
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mm1_mlx.config import MM1Config, read_json
from mm1_mlx.convert.honeybee import convert_honeybee, is_honeybee_config
from mm1_mlx.convert.llava import convert_llava
from mm1_mlx.errors import UserError
from mm1_mlx.loading import check_writable, resolve_path

# A converter: (folder, out, dtype, overwrite, step) -> the written model's config.
Converter = Callable[..., MM1Config]
CONVERTERS: dict[str, Converter] = {"llava": convert_llava, "honeybee": convert_honeybee}

# Hub downloads: configs, tokenizer and processor files, and the weights.
_HUB_FILES = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


def convert_vlm(
    src: str | Path,
    out: Path,
    dtype: str | None = None,
    overwrite: bool = False,
    step: Callable[[str], None] = lambda _: None,
) -> MM1Config:
    """Convert the checkpoint `src` (a folder or a hub repo id) into a model folder at `out`;
    `step(description)` reports progress. `dtype` (float32, float16, bfloat16) casts the
    weights."""
    check_writable(out, overwrite)
    folder = checkpoint_folder(src)
    config_path = folder / "config.json"
    kind = checkpoint_kind(read_json(config_path))
    converter = CONVERTERS.get(kind)
    if converter is None:
        raise UserError(
            f"{config_path}: --vlm does not convert model_type {kind!r} "
            f"(it converts {', '.join(sorted(CONVERTERS))})"
        )
    return converter(folder, out, dtype=dtype, overwrite=overwrite, step=step)


def checkpoint_kind(config: dict[str, Any]) -> str | None:
    """Which converter a config.json asks for: its model_type, or "honeybee" for Honeybee's
    (whose model_type is "mllm" in one generation and absent in the other)."""
    if is_honeybee_config(config):
        return "honeybee"
    kind = config.get("model_type")
    return kind if isinstance(kind, str) else None


def checkpoint_folder(src: str | Path) -> Path:
    """The local folder of `src`; a hub repo is downloaded with its safetensors weights, or
    its PyTorch .bin ones if it has none (older uploads)."""
    folder = resolve_path(src, [*_HUB_FILES, "*.safetensors"])
    if not any(folder.glob("*.safetensors")):
        folder = resolve_path(src, [*_HUB_FILES, "*.bin"])
    if not folder.is_dir():
        raise UserError(f"{src}: not a folder (a vision-language checkpoint is a folder)")
    return folder
