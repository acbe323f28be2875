"""HF processor files -> the model folder's preprocessing and chat template.

A folder saved by a transformers processor (llava-hf's, for one) declares its image
preprocessing in processor_config.json's "image_processor" (transformers 5) or in
preprocessor_config.json, read in that order as transformers does. Settings the file leaves out
take the processor class's defaults. The classes read, computed as their PIL-based versions do:
- CLIPImageProcessor (and LlavaImageProcessor, without its do_pad): the shortest edge resized to
  size.shortest_edge, then the centre crop_size square (resize_mode "crop"); or a size.height x
  size.width resize (resize_mode "squash");
- SiglipImageProcessor: a size.height x size.width resize ("squash"), no crop;
then pixels times rescale_factor (do_rescale), less image_mean, over image_std (do_normalize).
The encoder takes one square size, so settings that give other shapes (no resize, a non-square
size, no crop after a shortest-edge resize) are refused, as is anything else not reproduced
exactly: a one-line UserError naming the setting.

The chat template is found where transformers' processors look for it, in their order:
processor_config.json's "chat_template", chat_template.json, chat_template.jinja; then the
tokenizer's (tokenizer_config.json's "chat_template"), which the processor itself would not
use.
"""

import math
from pathlib import Path
from typing import Any

from mm1_mlx.config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PreprocessConfig, read_json
from mm1_mlx.errors import UserError

# transformers' class defaults for the settings a file may leave out.
CLIP_DEFAULTS = {
    "resample": 3,
    "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD,
    "do_resize": True,
    "do_center_crop": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "do_convert_rgb": True,
}
SIGLIP_DEFAULTS = {
    **CLIP_DEFAULTS,
    "image_mean": (0.5, 0.5, 0.5),
    "image_std": (0.5, 0.5, 0.5),
    "do_center_crop": False,
}
PROCESSOR_DEFAULTS = {
    "CLIPImageProcessor": CLIP_DEFAULTS,
    "LlavaImageProcessor": {**CLIP_DEFAULTS, "do_pad": False},
    "SiglipImageProcessor": SIGLIP_DEFAULTS,
}
# Options that change the pixels in ways PreprocessConfig has no setting for.
UNSUPPORTED_OPTIONS = ("do_pad", "use_square_size")
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
FLAGS = ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb")


def read_image_processor(folder: Path) -> PreprocessConfig:
    """The image preprocessing an HF model folder declares (processor_config.json's
    "image_processor", or preprocessor_config.json), as the module docstring describes."""
    declared, where = image_processor_settings(folder)
    name = processor_class(declared, where)
    given = {key: value for key, value in declared.items() if value is not None}
    settings = {**PROCESSOR_DEFAULTS[name], **given}
    check_options(settings, where)
    size = square_size(settings, where)
    crop = center_crop(settings, size, where)
    mean, std = normalization(settings, where)
    return PreprocessConfig(
        image_size=crop or size["height"],
        mean=mean,
        std=std,
        resize_mode="crop" if "shortest_edge" in size else "squash",
        shortest_edge=size.get("shortest_edge"),
        interpolation=resample_name(settings["resample"], where),
        rescale_factor=rescale_factor(settings, where),
    )


def image_processor_settings(folder: Path) -> tuple[dict[str, Any], str]:
    """The image processor's settings and where they are (for error messages)."""
    nested = folder / "processor_config.json"
    processor = read_json(nested) if nested.is_file() else {}
    if "image_processor" in processor:
        settings, where = processor["image_processor"], f"{nested}: image_processor"
    elif (folder / "preprocessor_config.json").is_file():
        where = str(folder / "preprocessor_config.json")
        settings = read_json(folder / "preprocessor_config.json")
    else:
        raise UserError(
            f"{folder}: no image processor (preprocessor_config.json, or processor_config.json "
            "with an image_processor)"
        )
    if not isinstance(settings, dict):
        raise UserError(f"{where} is not an object")
    return settings, where


def processor_class(settings: dict[str, Any], where: str) -> str:
    """The image processor's class, without the Fast or Pil of transformers' backends (older
    files name a feature extractor instead)."""
    name = settings.get("image_processor_type")
    if name is None and isinstance(settings.get("feature_extractor_type"), str):
        name = settings["feature_extractor_type"].replace("FeatureExtractor", "ImageProcessor")
    base = name.removesuffix("Fast").removesuffix("Pil") if isinstance(name, str) else name
    if base not in PROCESSOR_DEFAULTS:
        raise UserError(
            f"{where}: image_processor_type {name!r:.80} is not supported "
            f"({', '.join(PROCESSOR_DEFAULTS)})"
        )
    return base


def check_options(settings: dict[str, Any], where: str) -> None:
    for flag in FLAGS:
        if not isinstance(settings[flag], bool):
            raise UserError(f"{where}: {flag} must be true or false, not {settings[flag]!r:.80}")
    for option in UNSUPPORTED_OPTIONS:
        if settings.get(option):
            raise UserError(f"{where}: {option} {settings[option]!r:.80} is not supported")
    if not settings["do_resize"]:
        raise UserError(f"{where}: do_resize false (images at their own size) is not supported")
    # do_convert_rgb false is honoured: it differs only on non-RGB pictures, which transformers
    # then cannot normalize (their channels are not the mean's three); these load as RGB here.


def is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def size_dict(settings: dict[str, Any], key: str, where: str) -> dict[str, int]:
    """A size setting: {"shortest_edge": n} or {"height": h, "width": w}, positive ints."""
    value = settings.get(key)
    if isinstance(value, dict):
        value = {name: side for name, side in value.items() if side is not None}
        if sorted(value) in (["shortest_edge"], ["height", "width"]):
            if all(is_size(side) for side in value.values()):
                return value
    raise UserError(
        f"{where}: {key} must be an object with shortest_edge, or height and width "
        f"(positive integers), not {value!r:.80}"
    )


def square_size(settings: dict[str, Any], where: str) -> dict[str, int]:
    """`size`: a shortest edge, or a square height x width (the encoder's input is square)."""
    size = size_dict(settings, "size", where)
    if size.get("height", 0) != size.get("width", 0):
        raise UserError(f"{where}: size {size['height']}x{size['width']} is not square")
    return size


def center_crop(settings: dict[str, Any], size: dict[str, int], where: str) -> int | None:
    """The side of the centre crop after the resize; None without one."""
    if not settings["do_center_crop"]:
        if "shortest_edge" in size:
            raise UserError(
                f"{where}: size.shortest_edge without do_center_crop (images of varying shape) "
                "is not supported"
            )
        return None
    crop = size_dict(settings, "crop_size", where)
    if "shortest_edge" in crop or crop["height"] != crop["width"]:
        raise UserError(f"{where}: crop_size {crop} is not a square height x width")
    side = crop["height"]
    resized = size.get("shortest_edge") or size["height"]
    if side > resized:
        raise UserError(f"{where}: crop_size {side} is larger than the resized image ({size})")
    if "height" in size and side < resized:
        raise UserError(
            f"{where}: crop_size {side} smaller than a {resized}x{resized} size is not supported"
        )
    return side


def resample_name(code: Any, where: str) -> str:
    """PIL's resampling code -> PreprocessConfig.interpolation's name."""
    if isinstance(code, bool) or code not in PIL_RESAMPLE:
        raise UserError(
            f"{where}: unknown resample {code!r:.80} (PIL's codes: "
            f"{', '.join(f'{number} {name}' for number, name in PIL_RESAMPLE.items())})"
        )
    return PIL_RESAMPLE[code]


def rescale_factor(settings: dict[str, Any], where: str) -> float:
    if not settings["do_rescale"]:
        return 1.0
    factor = settings["rescale_factor"]
    if not is_positive_number(factor):
        raise UserError(f"{where}: rescale_factor must be a positive number, not {factor!r:.80}")
    return float(factor)


def normalization(
    settings: dict[str, Any], where: str
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) per channel; without do_normalize, ones that change nothing."""
    if not settings["do_normalize"]:
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    mean = per_channel(settings["image_mean"], "image_mean", where)
    std = per_channel(settings["image_std"], "image_std", where)
    if not all(is_positive_number(value) for value in std):
        raise UserError(f"{where}: image_std must be positive, not {list(std)}")
    return mean, std


def per_channel(value: Any, key: str, where: str) -> tuple[float, float, float]:
    """A number for each of R, G, B; one number stands for all three, as in transformers."""
    values = [value] * 3 if is_number(value) else value
    if not isinstance(values, (list, tuple)) or len(values) != 3:
        raise UserError(f"{where}: {key} must be 3 numbers (R, G, B), not {value!r:.80}")
    if not all(is_number(v) and math.isfinite(v) for v in values):
        raise UserError(f"{where}: {key} must be 3 finite numbers, not {value!r:.80}")
    return tuple(float(v) for v in values)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_positive_number(value: Any) -> bool:
    return is_number(value) and math.isfinite(value) and value > 0


def read_chat_template(folder: Path) -> str | None:
    """The chat template of an HF model folder, from the first place the module docstring
    lists that has one; None when there is none."""
    processor_config = folder / "processor_config.json"
    processor = read_json(processor_config) if processor_config.is_file() else {}
    if processor.get("chat_template") is not None:
        return template_text(processor["chat_template"], processor_config)
    if (folder / "chat_template.json").is_file():
        path = folder / "chat_template.json"
        return template_text(read_json(path).get("chat_template"), path)
    if (folder / "chat_template.jinja").is_file():
        return read_text(folder / "chat_template.jinja")
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        template = read_json(tokenizer_config).get("chat_template")
        return None if template is None else template_text(template, tokenizer_config)
    return None


def template_text(template: Any, path: Path) -> str:
    """A "chat_template" value: the template, or a list of named ones (transformers' several
    templates) whose "default" the processor uses."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str):
        raise UserError(f"{path}: chat_template must be a string (or name a default one)")
    return template


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot read the chat template ({error})") from None
