"""Checks of an MM1 config.json as read, before any model is built or weights loaded: every
value's type and domain (a bool is no integer, "48" is no 48, sizes are >= 1, numbers finite,
names from the code's own choices), then what ties values together (an image takes as many
decoder positions as the connector makes; the image token is in the decoder's vocabulary).
A bad value is a one-line UserError naming the file and the key, e.g.
`model/config.json: vision_config.patch_size must be an integer >= 1, not 0`."""

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mm1_mlx.config import RESIZE_MODES, SPLITTING_DEFAULTS, MM1Config
from mm1_mlx.connectors import CONNECTOR_TYPES
from mm1_mlx.errors import UserError
from mm1_mlx.processor import RESAMPLE
from mm1_mlx.rules import FLAG, TEXT, Rule, choice, integer, is_integer, list_of, number, optional
from mm1_mlx.vision import ACTIVATIONS

SIZE = integer(1)
# Past any model made (the deepest have a few hundred layers): each layer is a module built
# before any weight is read, so a million of them exhaust memory with no weight allocated.
MAX_LAYERS = 1000
LAYERS = integer(1, MAX_LAYERS)
POSITIVE = number(0, open_low=True)
ACTIVATION = choice(tuple(ACTIVATIONS))
FEATURE_LAYER = Rule(
    "an integer or a non-empty list of integers",
    lambda value: (
        is_integer(value)
        or (isinstance(value, list) and bool(value) and all(map(is_integer, value)))
    ),
)

VISION = {
    "model_type": TEXT,
    "image_size": SIZE,
    "patch_size": SIZE,
    "position_grid": optional(SIZE),
    "width": SIZE,
    "layers": LAYERS,
    "heads": SIZE,
    "mlp_dim": SIZE,
    "act": ACTIVATION,
    "class_token": FLAG,
    "pre_norm": FLAG,
    "patch_bias": FLAG,
    "layer_norm_eps": POSITIVE,
    "feature_layer": FEATURE_LAYER,
    "feature_post_norm": FLAG,
    "keep_class_token": FLAG,
    "conv_channels": integer(0, 4096),
}
CONNECTOR = {
    "model_type": choice(CONNECTOR_TYPES),
    "input_dim": SIZE,
    "output_dim": SIZE,
    "num_input_tokens": SIZE,
    "num_tokens": SIZE,
    "hidden_dim": SIZE,
    "depth": integer(0, MAX_LAYERS),
    "mlp_depth": LAYERS,
    "pos_emb": FLAG,
    "num_eos_tokens": integer(0),
    "heads": SIZE,
    "act": ACTIVATION,
    "bias": FLAG,
}
PREPROCESS = {
    "image_size": SIZE,
    "mean": list_of(3, number()),
    "std": list_of(3, POSITIVE),
    "resize_mode": choice(RESIZE_MODES),
    "shortest_edge": optional(SIZE),
    "interpolation": choice(tuple(RESAMPLE)),
    "rescale_factor": POSITIVE,
}
SPLITTING = {"enabled": FLAG, "n_min": SIZE, "n_max": SIZE, "max_images": integer(0)}
# text_config holds mlx-lm's arguments, which differ between decoders: the common ones are
# checked where given.
TEXT_CONFIG = {
    "model_type": TEXT,
    "vocab_size": SIZE,
    "hidden_size": SIZE,
    "num_hidden_layers": LAYERS,
    "intermediate_size": SIZE,
    "num_attention_heads": SIZE,
    "num_key_value_heads": SIZE,
    "max_position_embeddings": SIZE,
    "rms_norm_eps": POSITIVE,
    "rope_theta": POSITIVE,
    "tie_word_embeddings": FLAG,
}
QUANTIZATION = {"bits": Rule("an integer in 1..8", lambda v: is_integer(v) and 1 <= v <= 8)}
QUANTIZATION |= {"group_size": SIZE, "mode": TEXT}
TOP = {"image_token": TEXT, "image_token_id": integer(0), "num_image_tokens": SIZE}


def refuse(where: str, key: str, allowed: str, value: Any) -> None:
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    raise UserError(f"{where}: {key} must be {allowed}, not {shown}")


def check_values(
    values: dict[str, Any], rules: dict[str, Rule], where: str, prefix: str = ""
) -> None:
    """Refuse a value of `values` outside its rule's domain; the error names `where` (a file)
    and the key, after `prefix` (the section's keys, e.g. "vision_config.")."""
    for name, rule in rules.items():
        if name in values and not rule.test(values[name]):
            refuse(where, prefix + name, rule.allowed, values[name])


def check_config(values: dict[str, Any], path: str | Path, complete: bool = True) -> None:
    """Refuse a config.json (`values`, read from `path`) with a value outside its domain.
    `complete`: a model folder's; False for `mm1-mlx init`'s input, whose image_token_id,
    vocab_size and connector num_tokens init works out itself."""

    def fail(key: str, allowed: str, value: Any) -> None:
        refuse(str(path), key, allowed, value)

    def table(key: str, rules: dict[str, Rule], required: tuple[str, ...] = ()) -> dict:
        """values[key] (nested keys joined by dots), an object whose given keys follow `rules`."""
        found: Any = values
        for part in key.split("."):
            found = found.get(part) or {}  # missing or null: the defaults
        if not isinstance(found, dict):
            fail(key, "an object", found)
        for name in required:
            if name not in found:
                raise UserError(f"{path}: {key}.{name} is missing")
        check_values(found, rules, str(path), f"{key}.")
        return found

    vision = table("vision_config", VISION)
    connector = table("connector_config", CONNECTOR)
    preprocess = table("preprocess_config", PREPROCESS)
    splitting = table("preprocess_config.splitting", SPLITTING)
    text = table("text_config", TEXT_CONFIG, ("model_type", "vocab_size") if complete else ())
    check_values(values, TOP, str(path))
    if values.get("quantization") is not None:
        table("quantization", QUANTIZATION, ("bits", "group_size"))

    unknown = sorted(set(splitting) - set(SPLITTING_DEFAULTS))
    if unknown:
        raise UserError(
            f"{path}: preprocess_config.splitting has an unknown key '{unknown[0]}' "
            f"(known: {', '.join(SPLITTING_DEFAULTS)})"
        )
    n_min = splitting.get("n_min", SPLITTING_DEFAULTS["n_min"])
    n_max = splitting.get("n_max", SPLITTING_DEFAULTS["n_max"])
    if n_min > n_max:
        fail("preprocess_config.splitting.n_max", f"an integer >= n_min ({n_min})", n_max)

    image_size = vision.get("image_size", 378)
    patch_size = vision.get("patch_size", 14)
    if patch_size > image_size:
        fail("vision_config.patch_size", f"at most image_size ({image_size})", patch_size)
    conv_channels = vision.get("conv_channels", 0)
    if conv_channels % 2 or (conv_channels and patch_size % 4):
        allowed = "an even integer (0 unless patch_size is divisible by 4)"
        fail("vision_config.conv_channels", allowed, conv_channels)
    width, heads = vision.get("width", 1280), vision.get("heads", 16)
    if width % heads:
        fail("vision_config.heads", f"a divisor of width ({width})", heads)
    check_text_heads(text, fail)
    layers = vision.get("layers", 32)
    feature_layer = vision.get("feature_layer", -1)
    for layer in feature_layer if isinstance(feature_layer, list) else [feature_layer]:
        if not -(layers + 1) <= layer <= layers:
            allowed = f"within -{layers + 1}..{layers} (hidden states of {layers} layers)"
            fail("vision_config.feature_layer", allowed, feature_layer)
    if preprocess.get("resize_mode") == "crop":
        edge = preprocess.get("shortest_edge")
        size = preprocess.get("image_size", 378)
        if edge is None or edge < size:
            allowed = f"an integer >= preprocess_config.image_size ({size}) for resize_mode 'crop'"
            fail("preprocess_config.shortest_edge", allowed, edge)

    if not complete:
        check_fresh_image_tokens(values, (vision, connector, preprocess, text), fail)
        return
    per_image = connector.get("num_tokens", 144) + connector.get("num_eos_tokens", 0)
    num_image_tokens = values.get("num_image_tokens", 144)
    if num_image_tokens != per_image:
        allowed = f"the connector's tokens per image ({per_image}: num_tokens + num_eos_tokens)"
        fail("num_image_tokens", allowed, num_image_tokens)
    vocab_size = text["vocab_size"]
    image_token_id = values.get("image_token_id", 0)
    if image_token_id >= vocab_size:
        allowed = f"an integer in 0..{vocab_size - 1} (text_config.vocab_size is {vocab_size})"
        fail("image_token_id", allowed, image_token_id)


def check_text_heads(text: dict[str, Any], fail: Callable[[str, str, Any], None]) -> None:
    """Attention heads split the hidden size (unless the decoder gives its head_dim), and query
    heads are shared by key/value heads evenly."""
    heads, hidden = text.get("num_attention_heads"), text.get("hidden_size")
    if heads is not None and hidden is not None and text.get("head_dim") is None and hidden % heads:
        fail("text_config.num_attention_heads", f"a divisor of hidden_size ({hidden})", heads)
    kv_heads = text.get("num_key_value_heads")
    if heads is not None and kv_heads is not None and heads % kv_heads:
        allowed = f"a divisor of num_attention_heads ({heads})"
        fail("text_config.num_key_value_heads", allowed, kv_heads)


POOLING_CONNECTORS = ("c-abstractor", "avg-pool")


def check_fresh_image_tokens(
    values: dict[str, Any], sections: tuple[dict, ...], fail: Callable[[str, str, Any], None]
) -> None:
    """`mm1-mlx init`'s image tokens: a pooling connector makes at most one per patch, and an
    image must leave the decoder's context room for text."""
    vision, connector, preprocess, text = sections
    tokens = values.get("num_image_tokens", 144)
    pooled = tokens - connector.get("num_eos_tokens", 0)
    patches = (preprocess.get("image_size", 378) // vision.get("patch_size", 14)) ** 2
    kind = connector.get("model_type", "c-abstractor")
    if kind in POOLING_CONNECTORS and pooled > patches:
        allowed = f"at most the encoder's {patches} patches (a {kind} pools them into fewer)"
        fail("num_image_tokens", allowed, tokens)
    context = text.get("max_position_embeddings")
    if context is not None and tokens >= context:
        allowed = f"fewer than text_config.max_position_embeddings ({context})"
        fail("num_image_tokens", allowed, tokens)


# -- a fresh model's size -------------------------------------------------------------------

FRESH_BYTES_PER_PARAMETER = 4  # a fresh model starts in float32


def physical_memory() -> int:
    """This machine's memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parameters_at_least(config: MM1Config) -> int:
    """A lower bound of the parameters a model of `config` holds, from its sizes alone: the
    embedding table, each decoder layer's MLP and query/output projections, the encoder's
    position embeddings and blocks, the connector's RegNet stages and readout MLP. Python
    integers: absurd sizes cannot overflow."""
    text, vision = config.text_config, config.vision_config
    hidden = text.get("hidden_size", 0)
    per_layer = 2 * hidden * hidden + 2 * hidden * text.get("intermediate_size", 0)
    decoder = text.get("vocab_size", 0) * hidden + text.get("num_hidden_layers", 0) * per_layer
    width = vision.width
    patches = (config.preprocess_config.image_size // vision.patch_size) ** 2
    blocks = vision.layers * (4 * width * width + 2 * width * vision.mlp_dim)
    return decoder + patches * width + blocks + connector_parameters_at_least(config)


def connector_parameters_at_least(config: MM1Config) -> int:
    """Two RegNet stages of `depth` blocks (a C-Abstractor), each with a hidden x hidden
    convolution at least; the readout MLP's output x output layers after its first."""
    connector = config.connector_config
    readout = max(connector.mlp_depth - 1, 0) * connector.output_dim**2
    if connector.model_type != "c-abstractor":
        return readout
    return readout + 2 * connector.depth * connector.hidden_dim**2


def check_model_bytes(nbytes: int, config_path: str | Path, out: Path) -> None:
    """Refuse a fresh model whose weights (`nbytes`, or a lower bound of them) cannot be held in
    this machine's memory or written under `out`, before any is allocated."""
    memory = physical_memory()
    size = f"{config_path}: a model of this config holds at least {nbytes / 1e9:,.1f} GB of weights"
    if nbytes > memory:
        raise UserError(f"{size}, more than this machine's {memory / 1e9:,.1f} GB of memory")
    existing = next(
        folder for folder in [Path(out), *Path(out).absolute().parents] if folder.exists()
    )
    free = shutil.disk_usage(existing).free
    if nbytes > free:
        raise UserError(f"{size}, and {existing} has {free / 1e9:,.1f} GB free")
