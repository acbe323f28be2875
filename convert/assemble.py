"""Assemble a full MM1 model folder from a vision encoder, an LLM and (optionally) a connector."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mm1_mlx.config import ConnectorConfig, MM1Config, PreprocessConfig, VisionConfig, read_json
from mm1_mlx.config_checks import (
    FRESH_BYTES_PER_PARAMETER,
    check_config,
    check_model_bytes,
    parameters_at_least,
)
from mm1_mlx.connectors import build_connector, is_square
from mm1_mlx.convert.connector import convert_connector
from mm1_mlx.convert.llm import (
    add_image_token,
    load_llm_weights,
    load_tokenizer,
    read_text_config,
    save_tokenizer,
)
from mm1_mlx.convert.vision import convert_vision
from mm1_mlx.errors import UserError
from mm1_mlx.loading import atomic_folder, resolve_path, save_weights, write_config
from mm1_mlx.model import MM1Model

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

# Hub look-ups fetch configs and weights, preferring safetensors; open_clip repos ship .bin.
_VISION_PATTERNS = ["*.json", "*.safetensors", "open_clip_pytorch_model.bin"]
_CONNECTOR_PATTERNS = ["*.json", "*.safetensors", "*.bin"]


def cast_type(dtype: str | None) -> mx.Dtype | None:
    """The MLX dtype a --dtype name asks for; None keeps the checkpoint's."""
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (float32, float16 or bfloat16)")
    return DTYPES.get(dtype)


def _prefixed(prefix: str, weights: dict[str, Any], dtype: mx.Dtype | None) -> dict[str, mx.array]:
    out = {}
    for name, value in weights.items():
        array = value if isinstance(value, mx.array) else mx.array(value)
        out[f"{prefix}.{name}"] = array if dtype is None else array.astype(dtype)
    return out


def _check_image_size(size: int, patch: int) -> None:
    """The patch grid covers the whole image: a remainder would be cut off unseen."""
    if size < patch or size % patch:
        raise UserError(
            f"--image-size must be a multiple of the encoder's patch size {patch} "
            f"(e.g. {patch * max(1, round(size / patch))}), not {size}"
        )


def _check_complete(config: MM1Config, weights: dict[str, mx.array]) -> None:
    """Every parameter of the assembled model is present with the right shape."""
    model = MM1Model(config)  # lazy: allocates nothing
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as error:
        raise UserError(f"the parts do not fit together: {' '.join(str(error).split())}") from None


@dataclass
class ConvertedParts:
    """A converted model's parts, as every converter ends with them: configs and weights (the
    decoder's already cast), the tokenizer with its image token, where its files came from."""

    vision_config: VisionConfig
    preprocess: PreprocessConfig
    vision_weights: dict[str, Any]
    connector_config: ConnectorConfig
    connector_weights: dict[str, Any]
    text_config: dict[str, Any]
    decoder_weights: dict[str, mx.array]
    tokenizer: Any
    tokenizer_source: Path
    image_token: str
    image_token_id: int


def write_model_folder(
    out: Path, parts: ConvertedParts, cast: mx.Dtype | None, overwrite: bool
) -> MM1Config:
    """The parts as a model folder at `out`: checked to fill the model its config describes,
    then written atomically (the tokenizer as save_tokenizer does). Returns the config."""
    config = MM1Config(
        vision_config=parts.vision_config,
        connector_config=parts.connector_config,
        text_config=parts.text_config,
        preprocess_config=parts.preprocess,
        image_token=parts.image_token,
        image_token_id=parts.image_token_id,
        num_image_tokens=parts.connector_config.tokens_per_image,
    )
    weights = {
        **_prefixed("vision", parts.vision_weights, cast),
        **_prefixed("connector", parts.connector_weights, cast),
        **_prefixed("decoder", parts.decoder_weights, None),
    }
    _check_complete(config, weights)
    with atomic_folder(Path(out), overwrite) as tmp:
        save_weights(tmp, weights)
        write_config(tmp, config)
        save_tokenizer(parts.tokenizer, tmp, parts.tokenizer_source)
    return config


def convert_model(
    vision: str | Path,
    llm: str | Path,
    out: Path,
    connector: str | Path | None = None,
    connector_type: str = "c-abstractor",
    connector_options: dict[str, Any] | None = None,
    num_image_tokens: int = 144,
    dtype: str | None = None,
    vision_overrides: dict[str, Any] | None = None,
    image_token: str = "<image>",
    overwrite: bool = False,
    step: Callable[[str], None] = lambda _: None,
) -> MM1Config:
    """Convert and write a model folder at `out`; `step(description)` reports progress.

    `connector_options` set a fresh connector's ConnectorConfig fields (hidden_dim, depth, ...).
    """
    cast = cast_type(dtype)
    if num_image_tokens < 1 or not is_square(num_image_tokens):
        raise UserError(f"--num-image-tokens must be a square number >= 1, not {num_image_tokens}")

    step("vision encoder")
    vision_config, preprocess, vision_weights = convert_vision(
        resolve_path(vision, _VISION_PATTERNS), **(vision_overrides or {})
    )
    if (vision_overrides or {}).get("image_size") is not None:
        _check_image_size(vision_config.image_size, vision_config.patch_size)
    step("language model")
    llm_path = resolve_path(llm)
    text_config = read_text_config(llm_path)
    decoder_weights = load_llm_weights(llm_path, text_config, cast)
    tokenizer = load_tokenizer(llm_path)
    image_token_id = add_image_token(tokenizer, image_token, text_config, decoder_weights)

    step("connector")
    connector_config = ConnectorConfig(
        model_type=connector_type,
        input_dim=vision_config.width,
        output_dim=text_config["hidden_size"],
        num_input_tokens=vision_config.num_patches,
        num_tokens=num_image_tokens,
        **(connector_options or {}),
    )
    if connector is None:
        if num_image_tokens > vision_config.num_patches:
            raise UserError(
                f"--num-image-tokens {num_image_tokens} is more than the encoder's "
                f"{vision_config.num_patches} patches (a connector pools them into fewer)"
            )
        connector_weights = dict(tree_flatten(build_connector(connector_config).parameters()))
    else:
        connector_path = resolve_path(connector, _CONNECTOR_PATTERNS)
        connector_config, connector_weights = convert_connector(connector_path, connector_config)

    parts = ConvertedParts(
        vision_config=vision_config,
        preprocess=preprocess,
        vision_weights=vision_weights,
        connector_config=connector_config,
        connector_weights=connector_weights,
        text_config=text_config,
        decoder_weights=decoder_weights,
        tokenizer=tokenizer,
        tokenizer_source=llm_path,
        image_token=image_token,
        image_token_id=image_token_id,
    )
    step("writing")
    return write_model_folder(out, parts, cast, overwrite)


def init_model(
    config_path: Path,
    tokenizer: str | Path,
    out: Path,
    seed: int = 0,
    overwrite: bool = False,
    smooth_numbers: bool = False,
    lookup_head: bool = False,
) -> MM1Config:
    """A randomly initialised model folder, for training from scratch.

    `config_path` is an MM1 config.json without weights (vision_config, connector_config,
    text_config, preprocess_config); the tokenizer comes from `tokenizer` (a folder or hub id)
    and gets the image token; the decoder's vocabulary is sized to fit the tokenizer.
    `smooth_numbers`: see `smooth_number_embeddings`; `lookup_head`: see `make_lookup_head`.
    """
    values = read_json(config_path)
    check_config(values, config_path, complete=False)
    config = MM1Config.from_dict(values)
    tokenizer_path = resolve_path(tokenizer)
    loaded_tokenizer = load_tokenizer(tokenizer_path)
    # Room for every token and the image token, which may still have to be added.
    vocab_size = max(config.text_config.get("vocab_size", 0), len(loaded_tokenizer) + 1)
    config.text_config = {**config.text_config, "vocab_size": vocab_size}
    config.image_token_id = add_image_token(
        loaded_tokenizer, config.image_token, config.text_config, {}
    )
    connector = config.connector_config
    connector.num_tokens = config.num_image_tokens - connector.num_eos_tokens
    config.vision_config.image_size = config.preprocess_config.image_size
    mx.random.seed(seed)
    model = fresh_model(config, config_path, out)
    if smooth_numbers:
        smooth_number_embeddings(model, loaded_tokenizer)
    if lookup_head:
        make_lookup_head(model, seed)
    with atomic_folder(Path(out), overwrite) as tmp:
        save_weights(tmp, dict(tree_flatten(model.parameters())))
        write_config(tmp, config)
        save_tokenizer(loaded_tokenizer, tmp, tokenizer_path)
    return config


def fresh_model(config: MM1Config, config_path: Path, out: Path) -> MM1Model:
    """The model of `config`, its weights not yet allocated (MLX is lazy): refused first when a
    lower bound of its size, then its size, is more than this machine can hold or `out` take."""
    check_model_bytes(parameters_at_least(config) * FRESH_BYTES_PER_PARAMETER, config_path, out)
    try:
        model = MM1Model(config)
    except (OverflowError, ValueError) as error:  # e.g. a size past MLX's 32-bit dimensions
        raise UserError(f"{config_path}: cannot build a model of this config ({error})") from None
    nbytes = sum(weight.nbytes for _, weight in tree_flatten(model.parameters()))
    check_model_bytes(nbytes, config_path, out)
    return model


def smooth_number_embeddings(model: MM1Model, tokenizer: Any) -> None:
    """Start the tokens of the integers 0..1000 (MM1.5's box coordinates, alone and after a
    space) from sinusoids of their value plus some of their random start, so that with tied
    embeddings near coordinates get near logits from the first step and a box answer that is
    a few units off is learned as almost right. Each token must be one token of its own."""
    from mm1_mlx.train.tokenizer import number_token_ids

    numbers = number_token_ids(tokenizer)
    if numbers is None:
        raise UserError("--smooth-numbers needs a tokenizer where each of 0..1000 is one token")
    embedding = model.token_embedding
    table = np.array(embedding.weight)
    dims = table.shape[1]
    # Periods from 2000 down to ~4 coordinate units, a sine and a cosine each.
    frequencies = np.geomspace(1 / 2000, 1 / 4, dims // 2)
    angles = 2 * np.pi * np.arange(len(numbers[0]))[:, None] * frequencies[None, :]
    waves = np.zeros((len(numbers[0]), dims), np.float32)
    waves[:, : dims // 2], waves[:, dims // 2 : 2 * (dims // 2)] = np.sin(angles), np.cos(angles)
    waves *= table.std() * np.sqrt(2)  # the random rows' size (a sinusoid's RMS is 1/sqrt 2)
    for rows in numbers:
        # Keep some of each token's random start: "7" and " 7" must stay distinguishable.
        table[rows] = 0.8 * waves + 0.6 * table[rows]
    embedding.weight = mx.array(table)


# The lookup head's query and key size: a token matched with itself scores about
# LOOKUP_GAIN**2 x (the share of the hidden size the head keeps) x hidden / sqrt(head size).
LOOKUP_GAIN = 2.0


def make_lookup_head(model: MM1Model, seed: int) -> None:
    """Start the first head of the decoder's first layer as a lookup by content: its query and
    key are one random projection of the token, on the quarter of its rotary pairs with the
    lowest frequencies (with the usual base of 10,000 they turn by at most a radian over 1,000
    positions), and zero on the others. Its score is then the similarity of two tokens whatever
    their distance, so a question's word ("circle", "Send") looks, from the first step, at the
    image tokens that name it (the dense stage writes each thing's words in the decoder's own
    embeddings of them: train/dense.py) rather than waiting for SFT to form such a head."""
    layers = getattr(model.decoder, "layers", None) or [None]
    attention = getattr(layers[0], "self_attn", None)
    rope = getattr(attention, "rope", None)
    heads = getattr(attention, "n_heads", None)
    if not isinstance(rope, nn.RoPE) or not hasattr(attention, "k_proj") or not heads:
        raise UserError("--lookup-head needs a decoder attention of q_proj, k_proj and plain RoPE")
    hidden = attention.q_proj.weight.shape[1]
    head_size = attention.q_proj.weight.shape[0] // heads
    pairs = np.arange(rope.dims // 2)
    low = pairs[pairs >= 0.75 * len(pairs)]
    # Traditional RoPE rotates neighbours (2i, 2i+1); the other form halves (i, i + dims/2).
    dims = np.concatenate([2 * low, 2 * low + 1] if rope.traditional else [low, low + len(pairs)])
    projection = np.linalg.qr(np.random.default_rng(seed).standard_normal((hidden, len(dims))))
    rows = LOOKUP_GAIN * projection[0].T
    for linear in (attention.q_proj, attention.k_proj):
        weight = np.array(linear.weight)
        weight[:head_size] = 0
        weight[dims] = rows
        linear.weight = mx.array(weight.astype(np.float32))
