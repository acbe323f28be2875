"""Honeybee checkpoints (kakaobrain/honeybee) -> MM1 model folders.

A Honeybee folder is what HoneybeeForConditionalGeneration.save_pretrained writes, plus the
tokenizer: config.json, the weights and the tokenizer files. The weights are
`vision_model.vision_model.*` (an HF CLIPVisionModel), `abstractor.*` (the C-Abstractor:
convert/connector.py) and `language_model.*` (the HF causal LM: Llama 2 or Vicuna).

config.json comes in two generations, both nesting the CLIP vision config (`vision_config`) and
the LLM's config (`text_config`) whole:
- the older one, the released checkpoints': `visual_projector_config` and a top-level
  `num_query_tokens`;
- the newer one (Honeybee's training code): `projector_config`, holding `num_query_tokens`.
Older checkpoints' `pos_emb` has a leading slot for the CLS token, added to it and then dropped
with it; it never reaches the output, so the conversion drops the slot (convert/connector.py).
`eos_tokens` (num_eos_tokens > 0) follow each image's queries, so an image takes
num_query_tokens + num_eos_tokens positions.

Preprocessing is Honeybee's: the picture squashed to vision_config.image_size (bicubic), then
normalized with vision_config's image_mean / image_std (OpenAI CLIP's where absent). The chat
template renders its inference prompt (see CHAT_TEMPLATE). Honeybee marks each image with
negative ids in place of a token; the folder gets an `<image>` token like every MM1 folder.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mm1_mlx.config import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ConnectorConfig,
    MM1Config,
    PreprocessConfig,
    VisionConfig,
    read_json,
)
from mm1_mlx.connectors import is_square
from mm1_mlx.convert.assemble import ConvertedParts, cast_type, write_model_folder
from mm1_mlx.convert.connector import PREFIX as ABSTRACTOR_PREFIX
from mm1_mlx.convert.connector import convert_honeybee_weights
from mm1_mlx.convert.llm import add_image_token, decoder_weights, load_tokenizer, text_config_of
from mm1_mlx.convert.torch_reader import open_checkpoint
from mm1_mlx.convert.vision import encoder_config, hf_vision_fields, take_hf_weights
from mm1_mlx.errors import UserError

VISION_PREFIX = "vision_model.vision_model."
LLM_PREFIX = "language_model."
IMAGE_TOKEN = "<image>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")

SYSTEM_MESSAGE = (
    "The following is a conversation between a curious human and AI assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# Honeybee's inference prompt (its evaluation tasks' and its example notebook's): the system
# line, then each image and each question on a "Human: " line of its own, "AI: " to answer.
# Answers end in EOS, as Honeybee's tokenizer ends every AI turn. A first system message
# replaces the default system line.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] + '\\n' }}{% set messages = messages[1:] %}"
    "{% else %}{{ '" + SYSTEM_MESSAGE.replace("'", "\\'") + "\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% for text in message['content'].split('" + IMAGE_TOKEN + "') %}"
    "{% if not loop.first %}{{ 'Human: " + IMAGE_TOKEN + "\\n' }}{% endif %}"
    "{% if text.strip() %}{{ 'Human: ' + text.strip() + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'AI: ' + message['content'] + eos_token + '\\n' }}"
    "{% else %}"
    "{{ raise_exception('Honeybee takes user and assistant messages after one system message,"
    " not ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'AI: ' }}{% endif %}"
)


@dataclass
class HoneybeeConfig:
    """What conversion reads from a Honeybee config.json of either generation."""

    vision: dict[str, Any]  # the CLIP vision config, with Honeybee's image_mean / image_std
    projector: dict[str, Any]
    num_query_tokens: int
    lm: dict[str, Any]  # lm_config: where the LLM and its tokenizer came from
    text: dict[str, Any]  # the LLM's HF config


def is_honeybee_config(config: Mapping[str, Any]) -> bool:
    """Whether a config.json is a Honeybee model's (either generation)."""
    has_projector = "visual_projector_config" in config or "projector_config" in config
    return has_projector and "lm_config" in config


def convert_honeybee(
    src: str | Path,
    out: Path,
    dtype: str | None = None,
    overwrite: bool = False,
    step: Callable[[str], None] = lambda _: None,
) -> MM1Config:
    """Convert the Honeybee folder `src` into a model folder at `out`; `step(description)`
    reports progress. `dtype` (float32, float16, bfloat16) casts the weights."""
    folder = Path(src)
    cast = cast_type(dtype)
    honeybee = read_honeybee_config(honeybee_config_path(folder))
    tokenizer = honeybee_tokenizer(folder, honeybee)
    weights = open_checkpoint(folder)
    check_weight_names(weights, folder)

    step("vision encoder")
    vision_config, preprocess, vision_weights = convert_encoder(weights, honeybee, folder)
    step("language model")
    text_config = text_config_of(honeybee.text, folder, f"{folder / 'config.json'}: text_config")
    decoder = decoder_weights(without_prefix(weights, LLM_PREFIX), text_config, cast, str(folder))
    image_token_id = add_image_token(tokenizer, IMAGE_TOKEN, text_config, decoder)
    tokenizer.chat_template = CHAT_TEMPLATE
    step("connector")
    neighbours = ConnectorConfig(
        input_dim=vision_config.width,
        output_dim=text_config["hidden_size"],
        num_input_tokens=vision_config.num_patches,
        num_tokens=honeybee.num_query_tokens,
    )
    connector_config, connector_weights = convert_honeybee_weights(weights, neighbours, str(folder))
    parts = ConvertedParts(
        vision_config=vision_config,
        preprocess=preprocess,
        vision_weights=vision_weights,
        connector_config=connector_config,
        connector_weights=connector_weights,
        text_config=text_config,
        decoder_weights=decoder,
        tokenizer=tokenizer,
        tokenizer_source=folder,
        image_token=IMAGE_TOKEN,
        image_token_id=image_token_id,
    )
    step("writing")
    return write_model_folder(out, parts, cast, overwrite)


def honeybee_config_path(folder: Path) -> Path:
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder (a Honeybee checkpoint is a folder)")
    if (folder / "adapter_config.json").is_file():
        raise UserError(f"{folder}: a PEFT adapter, not a whole Honeybee model (merge it first)")
    return folder / "config.json"


def read_honeybee_config(path: Path) -> HoneybeeConfig:
    """The parts of a Honeybee config.json conversion uses, checked; anything this converter
    cannot reproduce (another projector, a prenorm, multi-layer features) is refused."""
    config = read_json(path)
    if "visual_projector_config" in config:  # the older generation
        projector = section(config, "visual_projector_config", path)
        num_queries = config.get("num_query_tokens")
    elif "projector_config" in config:
        projector = section(config, "projector_config", path)
        num_queries = projector.get("num_query_tokens")
    else:
        raise UserError(
            f"{path}: not a Honeybee config (no visual_projector_config or projector_config)"
        )
    check_projector(projector, path)
    if not isinstance(num_queries, int) or num_queries < 1 or not is_square(num_queries):
        raise UserError(f"{path}: num_query_tokens must be a square number, not {num_queries!r}")
    vision = section(config, "vision_config", path)
    encoder = vision.get("encoder_type", "openai.clip")
    if encoder != "openai.clip":
        raise UserError(f"{path}: vision encoder_type {encoder!r} is not supported (openai.clip)")
    return HoneybeeConfig(
        vision=vision,
        projector=projector,
        num_query_tokens=num_queries,
        lm=section(config, "lm_config", path),
        text=section(config, "text_config", path),
    )


def section(config: Mapping[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = config.get(key)
    if not isinstance(value, dict):
        raise UserError(f"{path}: {key} is missing or not an object")
    return value


def check_projector(projector: dict[str, Any], path: Path) -> None:
    kind = projector.get("projector_type")
    if kind != "c-abs":
        raise UserError(
            f"{path}: projector_type {kind!r} is not supported (only the C-Abstractor, 'c-abs')"
        )
    if projector.get("prenorm"):
        raise UserError(f"{path}: prenorm (a LayerNorm before the C-Abstractor) is not supported")
    layer = projector.get("feature_layer_index", -1)
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise UserError(
            f"{path}: feature_layer_index {layer!r} is not supported (one layer's index)"
        )


def honeybee_tokenizer(folder: Path, honeybee: HoneybeeConfig) -> Any:
    """The folder's tokenizer; Honeybee loads its own from lm_config, so a released checkpoint
    may need those files copied in."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        source = honeybee.lm.get("pretrained_tokenizer_name_or_path")
        raise UserError(
            f"{folder}: no tokenizer files; copy in those of the tokenizer Honeybee used "
            f"(lm_config names {source!r}: tokenizer.model, tokenizer_config.json, ...)"
        )
    return load_tokenizer(folder)


def check_weight_names(weights: Mapping[str, Any], folder: Path) -> None:
    known = (VISION_PREFIX, ABSTRACTOR_PREFIX, LLM_PREFIX)
    for key in weights:
        if not key.startswith(known):
            raise UserError(
                f"{folder}: unexpected weight {key!r} (a Honeybee model has only "
                f"{', '.join(p + '*' for p in known)})"
            )


def without_prefix(weights: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}


def convert_encoder(
    weights: Mapping[str, Any], honeybee: HoneybeeConfig, folder: Path
) -> tuple[VisionConfig, PreprocessConfig, dict[str, Any]]:
    """The CLIP encoder, its features taken where Honeybee takes them, and its preprocessing."""
    where = f"{folder / 'config.json'}: vision_config"
    vision = hf_vision_fields(honeybee.vision, "clip", where)
    vision["feature_layer"] = honeybee.projector.get("feature_layer_index", -1)
    vision["feature_post_norm"] = False  # Honeybee takes hidden states, before post_layernorm
    preprocess = PreprocessConfig(
        image_size=vision["image_size"],
        mean=color_triple(honeybee.vision.get("image_mean", OPENAI_CLIP_MEAN), where),
        std=color_triple(honeybee.vision.get("image_std", OPENAI_CLIP_STD), where),
        resize_mode="squash",
        interpolation="bicubic",
    )
    config, shapes = encoder_config(vision, preprocess.image_size, where)
    return config, preprocess, take_hf_weights(weights, config, shapes, VISION_PREFIX, folder)


def color_triple(value: Any, where: str) -> tuple[float, float, float]:
    numbers = isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value)
    if not numbers or len(value) != 3:
        raise UserError(f"{where}: image_mean / image_std must be 3 numbers, not {value!r}")
    return tuple(value)
