"""HF causal-LM folders -> an mlx-lm decoder's config and weights, plus the tokenizer.

The decoder is mlx-lm's own model class; we read the weights ourselves (safetensors or PyTorch
.bin, sharded or not, without torch), let mlx-lm's `sanitize` rename them, and fix the config
keys mlx-lm misreads.
"""

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from mm1_mlx.config import read_json
from mm1_mlx.config_checks import TEXT_CONFIG, check_values
from mm1_mlx.convert.torch_reader import open_checkpoint
from mm1_mlx.decoder import decoder_classes
from mm1_mlx.errors import UserError
from mm1_mlx.processor import foreign_model_type_quiet

_NOISE_KEYS = ("_name_or_path", "id2label", "label2id", "transformers_version")


def read_text_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: not an HF model folder (no config.json)")
    return text_config_of(read_json(path), folder, str(path))


def text_config_of(config: dict[str, Any], folder: Path, where: str) -> dict[str, Any]:
    """The mlx-lm config of an HF text config (the whole config.json, or the part of a
    multimodal one `where` names), with the eos tokens of the folder's generation_config.json."""
    if "model_type" not in config:
        raise UserError(f"{where}: no model_type")
    check_values(config, TEXT_CONFIG, where)
    generation = folder / "generation_config.json"
    if generation.is_file():
        eos = read_json(generation).get("eos_token_id")
        if eos is not None:
            config["eos_token_id"] = eos
    config = {k: v for k, v in config.items() if k not in _NOISE_KEYS}
    if "num_local_experts" in config:  # transformers 5 renamed qwen3_moe's num_experts
        config.setdefault("num_experts", config["num_local_experts"])
    return fix_rope_parameters(config)


def fix_rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 moves rope_theta/rope_scaling into `rope_parameters`; most mlx-lm models
    still read the old keys (and would silently fall back to their default theta)."""
    params = config.get("rope_parameters")
    if not isinstance(params, dict) or "rope_theta" in config:
        return config
    config = dict(config)
    if "full_attention" in params:  # per layer type (Gemma 3): global and local bases
        config["rope_theta"] = params["full_attention"]["rope_theta"]
        if "sliding_attention" in params:
            config["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
        params = params["full_attention"]
    elif "rope_theta" in params:
        config["rope_theta"] = params["rope_theta"]
    if params.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
        config["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    return config


def load_llm_weights(
    folder: Path, text_config: dict[str, Any], dtype: mx.Dtype | None = None
) -> dict[str, mx.array]:
    """Read, sanitize and check the decoder's weights against mlx-lm's model for the config."""
    return decoder_weights(open_checkpoint(folder), text_config, dtype, str(folder))


def decoder_weights(
    refs: Mapping[str, Any], text_config: dict[str, Any], dtype: mx.Dtype | None, where: str
) -> dict[str, mx.array]:
    """load_llm_weights on tensors already opened (TensorRefs named as the HF model names
    them), e.g. the language model's part of a multimodal checkpoint."""
    model_class, args_class = decoder_classes(text_config)
    # Parameters are lazy in MLX: building the model allocates nothing until evaluated.
    decoder = model_class(args_class.from_dict(text_config))
    weights = {name: ref.mlx(dtype) for name, ref in refs.items()}
    if hasattr(decoder, "sanitize"):
        weights = decoder.sanitize(weights)
    expected = {name: p.shape for name, p in tree_flatten(decoder.parameters())}
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise UserError(f"{where}: weight '{missing[0]}' is missing ({len(missing)} missing)")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != tuple(shape):
            got = tuple(weights[name].shape)
            raise UserError(f"{where}: weight '{name}' has shape {got}, config says {tuple(shape)}")
    return {name: weights[name] for name in expected}


def add_image_token(
    tokenizer, image_token: str, text_config: dict[str, Any], weights: dict[str, mx.array]
) -> int:
    """Make sure the tokenizer knows `image_token`; grow the embeddings if its id does not fit.

    Returns the token's id. New embedding rows are the mean of the old ones (the placeholder's
    own embedding is never used: image features replace it).
    """
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([image_token], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        table = weights.get(name)
        if table is not None and token_id >= table.shape[0]:
            extra = mx.broadcast_to(
                table.mean(axis=0), (token_id + 1 - table.shape[0], table.shape[1])
            )
            weights[name] = mx.concatenate([table, extra.astype(table.dtype)])
    if token_id >= text_config["vocab_size"]:
        if "model.embed_tokens.weight" not in weights:
            raise UserError(f"cannot add {image_token}: the decoder has no model.embed_tokens")
        text_config["vocab_size"] = token_id + 1
    return token_id


def save_tokenizer(tokenizer, folder: Path, source: Path) -> None:
    """Save the tokenizer with its chat template inside tokenizer_config.json (the model folder
    format: docs/architecture.md), wherever the source kept it (tokenizer_config.json or
    chat_template.jinja)."""
    template = tokenizer.chat_template
    if template is None and (source / "chat_template.jinja").is_file():
        template = (source / "chat_template.jinja").read_text()
    tokenizer.save_pretrained(str(folder))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if template is not None:
        config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not Path(folder).is_dir():
        raise UserError(f"{folder}: not a folder (a tokenizer is a folder of its files)")
    try:
        with foreign_model_type_quiet():
            return AutoTokenizer.from_pretrained(str(folder))
    except Exception as error:  # transformers raises many kinds for a bad tokenizer folder
        raise UserError(
            f"{folder}: cannot load the tokenizer ({str(error).splitlines()[0]})"
        ) from None
