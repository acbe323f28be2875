"""Vision encoders -> MLX: open_clip files (DFN5B) and HF CLIP / SigLIP folders.

`convert_vision(src)` returns the VisionConfig, the PreprocessConfig and fp32 numpy weights
named like `mm1_mlx.vision.VisionTransformer`'s parameters. All shapes are checked against
the config before any tensor is read, and weights the MLX model has no place for (layer scale,
an attention pool...) are refused, so a converted encoder computes what the original did.
"""

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from mlx.utils import tree_flatten

from mm1_mlx.config import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PreprocessConfig,
    VisionConfig,
    read_json,
)
from mm1_mlx.config_checks import VISION, check_values
from mm1_mlx.convert.torch_reader import open_checkpoint
from mm1_mlx.errors import UserError
from mm1_mlx.vision import VisionTransformer

VISION_OVERRIDES = {"heads", "act", "layer_norm_eps", "feature_layer", "feature_post_norm"}
PREPROCESS_OVERRIDES = {"image_size", "mean", "std", "resize_mode", "interpolation"}

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
HF_ACTS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}
# model_type -> family; a full CLIPModel / SiglipModel keeps its encoder's in "vision_config".
HF_FAMILIES = {
    "clip": "clip",
    "clip_vision_model": "clip",
    "siglip": "siglip",
    "siglip_vision_model": "siglip",
}
# What transformers assumes for fields an (older) config.json leaves out.
HF_DEFAULTS = {
    "clip": dict(patch=32, act="quick_gelu", eps=1e-5, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD),
    "siglip": dict(patch=16, act="gelu_pytorch_tanh", eps=1e-6, mean=SIGLIP_MEAN, std=SIGLIP_STD),
}
HF_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes
OPEN_CLIP_RESIZE = {"squash": "squash", "longest": "pad"}  # "shortest" (crop) has no equivalent

# (ours, theirs) per block; each has .weight and .bias.
HF_BLOCK = [
    ("ln_1", "layer_norm1"),
    ("attn.q_proj", "self_attn.q_proj"),
    ("attn.k_proj", "self_attn.k_proj"),
    ("attn.v_proj", "self_attn.v_proj"),
    ("attn.out_proj", "self_attn.out_proj"),
    ("ln_2", "layer_norm2"),
    ("mlp.fc1", "mlp.fc1"),
    ("mlp.fc2", "mlp.fc2"),
]
OPEN_CLIP_BLOCK = [
    ("ln_1", "ln_1"),
    ("attn.out_proj", "attn.out_proj"),
    ("ln_2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
]


def convert_vision(
    src: Path, **overrides: Any
) -> tuple[VisionConfig, PreprocessConfig, dict[str, np.ndarray]]:
    """Convert the vision encoder at `src` (a weights file, an index JSON or a folder).

    overrides (None means not given): heads, act, layer_norm_eps, feature_layer,
    feature_post_norm for the encoder; image_size (the size to run at: the position
    embeddings are resized at run time), mean, std, resize_mode, interpolation for preprocessing.
    The encoder's image_size equals the preprocessing one; position_grid keeps the trained grid.
    """
    src = Path(src)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(overrides) - VISION_OVERRIDES - PREPROCESS_OVERRIDES
    if unknown:
        raise TypeError(f"convert_vision() got unknown overrides {sorted(unknown)}")
    weights = open_checkpoint(src)

    open_clip = "visual.conv1.weight" in weights
    if open_clip:
        vision, preprocess = open_clip_config(src, weights)
    else:
        scope = hf_prefix(weights, src)  # a full CLIPModel's text tower lies outside it
        vision, preprocess = hf_config(src)
    vision |= {k: v for k, v in overrides.items() if k in VISION_OVERRIDES}
    preprocess |= {k: v for k, v in overrides.items() if k in PREPROCESS_OVERRIDES}
    config, shapes = encoder_config(vision, preprocess["image_size"], src)
    if open_clip:
        plan = open_clip_plan(config)
        converted = take_weights(weights, plan, shapes, "visual.", ["visual.proj"], src)
    else:
        converted = take_hf_weights(weights, config, shapes, scope, src)
    return config, PreprocessConfig(**preprocess), converted


def encoder_config(
    vision: dict[str, Any], image_size: int, where: Path | str
) -> tuple[VisionConfig, dict[str, tuple[int, ...]]]:
    """The VisionConfig of `vision`'s fields running at `image_size`, and the shapes of its
    parameters. The position table stays at its trained grid (position_grid)."""
    grid = vision["image_size"] // vision["patch_size"]
    config = VisionConfig(**{**vision, "position_grid": grid, "image_size": image_size})
    try:
        model = VisionTransformer(config)  # lazy: allocates nothing, validates the config
    except ValueError as error:
        raise UserError(f"{where}: {error}") from None
    return config, {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}


def take_weights(
    weights: Mapping[str, Any],
    plan: dict[str, list[str]],
    shapes: dict[str, tuple[int, ...]],
    scope: str,
    ignored: list[str],
    where: Path | str,
) -> dict[str, np.ndarray]:
    """Gather the MLX weights: plan maps a source key to the MLX names it fills (several: the
    source is split evenly along axis 0, like open_clip's fused q|k|v). 4-D weights are
    PyTorch convs, OIHW, turned into MLX's OHWI. Keys starting with `scope` (the encoder's)
    that are neither planned nor ignored (by prefix) are refused."""
    for key in weights:
        if key.startswith(scope) and key not in plan and not key.startswith(tuple(ignored)):
            raise UserError(
                f"{where}: unsupported weight {key!r} (the MLX model has no place for it)"
            )
    for key, names in plan.items():
        if key not in weights:
            raise UserError(f"{where}: missing weight {key!r}")
        expected = [shapes[name] for name in names]
        expected = (sum(s[0] for s in expected), *expected[0][1:])
        if len(expected) == 4:
            expected = (expected[0], expected[3], expected[1], expected[2])
        if tuple(weights[key].shape) != expected:
            raise UserError(
                f"{where}: weight {key!r} has shape {tuple(weights[key].shape)}, "
                f"the config expects {expected}"
            )
    out = {}
    for key, names in plan.items():
        value = np.asarray(weights[key]).astype(np.float32, copy=False)
        if value.ndim == 4:
            value = value.transpose(0, 2, 3, 1)
        out |= dict(zip(names, np.split(value, len(names)), strict=True))
    return out


def _weight_and_bias(ours: str, theirs: str) -> dict[str, list[str]]:
    return {f"{theirs}.{p}": [f"{ours}.{p}"] for p in ("weight", "bias")}


# -- open_clip ------------------------------------------------------------------------------


def open_clip_plan(config: VisionConfig) -> dict[str, list[str]]:
    plan = {
        "visual.conv1.weight": ["patch_embed.weight"],
        "visual.class_embedding": ["class_embedding"],
        "visual.positional_embedding": ["position_embedding"],
        **_weight_and_bias("ln_post", "visual.ln_post"),
    }
    if config.pre_norm:
        plan |= _weight_and_bias("ln_pre", "visual.ln_pre")
    for i in range(config.layers):
        block = f"visual.transformer.resblocks.{i}"
        for ours, theirs in OPEN_CLIP_BLOCK:
            plan |= _weight_and_bias(f"blocks.{i}.{ours}", f"{block}.{theirs}")
        for p in ("weight", "bias"):  # q|k|v fused
            plan[f"{block}.attn.in_proj_{p}"] = [f"blocks.{i}.attn.{n}_proj.{p}" for n in "qkv"]
    return plan


def open_clip_config(
    src: Path, weights: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Vision and preprocessing fields from open_clip_config.json, else from the weights
    (heads = width // 64, act gelu: open_clip's defaults; DFN5B needs act="quick_gelu")."""
    path = _beside(src, "open_clip_config.json")
    if path.is_file():
        full = read_json(path)
        model_cfg, preprocess_cfg = full.get("model_cfg", {}), full.get("preprocess_cfg", {})
        cfg = model_cfg.get("vision_cfg", {})
        if cfg.get("timm_model_name") or isinstance(cfg.get("layers"), list):
            raise UserError(f"{path}: only open_clip's own ViT is supported, not timm or ResNet")
        width = cfg.get("width", 768)
        vision = dict(
            width=width,
            layers=cfg.get("layers", 12),
            heads=width // cfg.get("head_width", 64),
            mlp_dim=int(width * cfg.get("mlp_ratio", 4.0)),
            patch_size=_side(cfg.get("patch_size", 16), path),
            image_size=_side(cfg.get("image_size", 224), path),
            act="quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu",
            pre_norm=not cfg.get("no_ln_pre", False),
            layer_norm_eps=(cfg.get("norm_kwargs") or {}).get("eps", 1e-5),
        )
    else:
        preprocess_cfg = {}
        width, _, patch, _ = _shape(weights, "visual.conv1.weight", src)
        positions = _shape(weights, "visual.positional_embedding", src)[0]
        block = re.compile(r"visual\.transformer\.resblocks\.(\d+)\.")
        vision = dict(
            width=width,
            layers=len({m.group(1) for k in weights if (m := block.match(k))}),
            heads=width // 64,
            mlp_dim=_shape(weights, "visual.transformer.resblocks.0.mlp.c_fc.weight", src)[0],
            patch_size=patch,
            image_size=math.isqrt(positions - 1) * patch,
            act="gelu",
        )
    vision |= dict(model_type="clip", class_token=True, patch_bias=False)
    vision.setdefault("pre_norm", True)
    preprocess = dict(
        image_size=_side(preprocess_cfg.get("size", vision["image_size"]), path),
        mean=preprocess_cfg.get("mean", OPENAI_CLIP_MEAN),
        std=preprocess_cfg.get("std", OPENAI_CLIP_STD),
        interpolation=preprocess_cfg.get("interpolation", "bicubic"),
    )
    if preprocess_cfg.get("resize_mode") in OPEN_CLIP_RESIZE:
        preprocess["resize_mode"] = OPEN_CLIP_RESIZE[preprocess_cfg["resize_mode"]]
    return vision, preprocess


# -- HF transformers CLIP / SigLIP ----------------------------------------------------------


def hf_prefix(weights: Mapping[str, Any], src: Path) -> str:
    """The key prefix of HF weights: none for a CLIPVisionModel saved by transformers 5,
    "vision_model." for older files and full CLIPModel / SiglipModel files."""
    for prefix in ("", "vision_model."):
        if prefix + "embeddings.patch_embedding.weight" in weights:
            return prefix
    raise UserError(
        f"{src}: not a vision encoder this converter knows: it has neither "
        "'visual.conv1.weight' (open_clip) nor '[vision_model.]embeddings.patch_embedding.weight'"
        " (HF CLIP / SigLIP)"
    )


def take_hf_weights(
    weights: Mapping[str, Any],
    config: VisionConfig,
    shapes: dict[str, tuple[int, ...]],
    prefix: str,
    where: Path | str,
) -> dict[str, np.ndarray]:
    """take_weights for an HF CLIP / SigLIP vision model whose keys start with `prefix`."""
    # SigLIP's attention-pooling head; position_ids: a buffer older transformers saved.
    ignored = [prefix + "head.", prefix + "embeddings.position_ids"]
    return take_weights(weights, hf_plan(config, prefix), shapes, prefix, ignored, where)


def hf_plan(config: VisionConfig, prefix: str) -> dict[str, list[str]]:
    plan = {
        "embeddings.patch_embedding.weight": ["patch_embed.weight"],
        "embeddings.position_embedding.weight": ["position_embedding"],
        **_weight_and_bias("ln_post", "post_layernorm"),
    }
    if config.patch_bias:
        plan["embeddings.patch_embedding.bias"] = ["patch_embed.bias"]
    if config.class_token:
        plan["embeddings.class_embedding"] = ["class_embedding"]
    if config.pre_norm:
        plan |= _weight_and_bias("ln_pre", "pre_layrnorm")  # sic
    for i in range(config.layers):
        for ours, theirs in HF_BLOCK:
            plan |= _weight_and_bias(f"blocks.{i}.{ours}", f"encoder.layers.{i}.{theirs}")
    return {prefix + key: names for key, names in plan.items()}


def hf_config(src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Vision and preprocessing fields from config.json and preprocessor_config.json; fields a
    config leaves out take transformers' defaults (older versions saved only non-defaults)."""
    path = _beside(src, "config.json")
    if not path.is_file():
        raise UserError(f"{src}: no config.json beside the HF weights")
    full = read_json(path)
    family = hf_family(full, path)
    cfg = full.get("vision_config", {}) if full["model_type"] == family else full
    vision = hf_vision_fields(cfg, family, path)
    defaults = HF_DEFAULTS[family]
    processor_path = _beside(src, "preprocessor_config.json")
    processor = read_json(processor_path) if processor_path.is_file() else {}
    size = processor.get("crop_size") or processor.get("size") or vision["image_size"]
    preprocess = dict(
        image_size=_side(size, processor_path),
        mean=processor.get("image_mean", defaults["mean"]),
        std=processor.get("image_std", defaults["std"]),
        interpolation=HF_RESAMPLE.get(processor.get("resample", 3), "bicubic"),
    )
    return vision, preprocess


def hf_family(cfg: dict[str, Any], where: Path | str) -> str:
    """The family of an HF config's model_type: "clip" or "siglip"."""
    model_type = cfg.get("model_type")
    family = HF_FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise UserError(
            f"{where}: model_type {model_type!r} is not a CLIP or SigLIP vision model "
            f"({', '.join(sorted(HF_FAMILIES))})"
        )
    return family


def convert_hf_encoder(
    weights: Mapping[str, Any],
    cfg: dict[str, Any],
    prefix: str,
    where: Path | str,
    **fields: Any,
) -> tuple[VisionConfig, dict[str, np.ndarray]]:
    """The HF CLIP / SigLIP vision model inside a bigger checkpoint (a VLM's vision tower):
    its config dict `cfg` and its weights, whose keys start with `prefix`. It runs at its own
    image_size; `fields` set other VisionConfig fields (feature_layer, ...)."""
    vision = hf_vision_fields(cfg, hf_family(cfg, where), where) | fields
    config, shapes = encoder_config(vision, vision["image_size"], where)
    return config, take_hf_weights(weights, config, shapes, prefix, where)


# The HF vision config's keys, as the VisionConfig fields they become are checked.
HF_VISION_RULES = {
    "hidden_size": VISION["width"],
    "num_hidden_layers": VISION["layers"],
    "num_attention_heads": VISION["heads"],
    "intermediate_size": VISION["mlp_dim"],
    "patch_size": VISION["patch_size"],
    "image_size": VISION["image_size"],
    "layer_norm_eps": VISION["layer_norm_eps"],
}


def hf_vision_fields(cfg: dict[str, Any], family: str, where: Path | str) -> dict[str, Any]:
    """VisionConfig fields of an HF vision config (`family`: "clip" or "siglip")."""
    defaults = HF_DEFAULTS[family]
    siglip = family == "siglip"
    act = cfg.get("hidden_act", defaults["act"])
    if act not in HF_ACTS:
        raise UserError(f"{where}: hidden_act {act!r} is not one of {sorted(HF_ACTS)}")
    check_values(cfg, HF_VISION_RULES, str(where))
    return dict(
        model_type=family,
        width=cfg.get("hidden_size", 768),
        layers=cfg.get("num_hidden_layers", 12),
        heads=cfg.get("num_attention_heads", 12),
        mlp_dim=cfg.get("intermediate_size", 3072),
        patch_size=cfg.get("patch_size", defaults["patch"]),
        image_size=cfg.get("image_size", 224),
        act=HF_ACTS[act],
        layer_norm_eps=cfg.get("layer_norm_eps", defaults["eps"]),
        class_token=not siglip,
        pre_norm=not siglip,
        patch_bias=siglip,
    )


# -- helpers --------------------------------------------------------------------------------


def _beside(src: Path, name: str) -> Path:
    """The file `name` in the folder `src` or in the folder holding the file `src`."""
    return (src if src.is_dir() else src.parent) / name


def _side(size: Any, where: Path) -> int:
    """A square size: 378, [378, 378], {"height": 378, "width": 378} or {"shortest_edge": 378}."""
    if isinstance(size, dict):
        size = size.get("shortest_edge") or [size.get("height"), size.get("width")]
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1 or size[0] is None:
            raise UserError(f"{where}: only square sizes are supported, not {size}")
        size = size[0]
    return int(size)


def _shape(weights: Mapping[str, Any], key: str, where: Path) -> tuple[int, ...]:
    if key not in weights:
        raise UserError(f"{where}: missing weight {key!r}")
    return tuple(weights[key].shape)
