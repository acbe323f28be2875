"""LLaVA checkpoints in transformers' format (config.json `model_type: "llava"`, as the llava-hf
uploads and LlavaForConditionalGeneration.save_pretrained write them) -> MM1 model folders.

The parts map one to one, computing what LlavaForConditionalGeneration computes:
- the vision tower, an HF CLIP or SigLIP vision model -> the ViT. Its features are the hidden
  states `vision_feature_layer` names (one, or several concatenated on the channel axis),
  without the CLS token under the "default" `vision_feature_select_strategy`, with it under
  "full";
- `multi_modal_projector` (Linear, `projector_hidden_act`, Linear) -> the "mlp" connector, one
  image token per feature token: an image takes the patches' positions, plus CLS's under "full",
  as many as LlavaProcessor expands `<image>` into;
- the language model -> the mlx-lm decoder of `text_config`.
`image_token_index` is the id of the tokenizer's image token. The weights come in two layouts:
`vision_tower.*`, `multi_modal_projector.*`, `language_model.model.*`,
`language_model.lm_head.*` (older uploads; transformers 5 saves this one too) and
`model.vision_tower.*`, `model.multi_modal_projector.*`, `model.language_model.*`, `lm_head.*`
(transformers 4.52 to 4.x); the vision tower's keys may have a `vision_model.` level inside.
Preprocessing and the chat template come from the folder's processor files.
"""

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mlx.utils import tree_flatten

from mm1_mlx.config import ConnectorConfig, MM1Config, VisionConfig, read_json
from mm1_mlx.connectors import build_connector
from mm1_mlx.convert.assemble import ConvertedParts, cast_type, write_model_folder
from mm1_mlx.convert.hf_processor import read_chat_template, read_image_processor
from mm1_mlx.convert.llm import decoder_weights, load_tokenizer, text_config_of
from mm1_mlx.convert.torch_reader import open_checkpoint
from mm1_mlx.convert.vision import HF_ACTS, convert_hf_encoder, hf_family, take_weights
from mm1_mlx.errors import UserError

STRATEGIES = ("default", "full")  # vision_feature_select_strategy: CLS dropped, kept


@dataclass
class Layout:
    """Where a LLaVA checkpoint keeps each part (key prefixes)."""

    vision: str
    projector: str
    language_model: str  # the decoder's base model: embed_tokens, layers, norm
    lm_head: str

    @property
    def prefixes(self) -> tuple[str, ...]:
        return (self.vision, self.projector, self.language_model, self.lm_head)


LAYOUTS = (
    Layout(  # older uploads; transformers 5 saves this one too
        vision="vision_tower.",
        projector="multi_modal_projector.",
        language_model="language_model.model.",
        lm_head="language_model.lm_head.",
    ),
    Layout(  # transformers 4.52 and later 4.x
        vision="model.vision_tower.",
        projector="model.multi_modal_projector.",
        language_model="model.language_model.",
        lm_head="lm_head.",
    ),
)


@dataclass
class LlavaSettings:
    """What conversion reads from a LLaVA config.json, checked."""

    vision: dict[str, Any]  # the HF vision config
    text: dict[str, Any]  # the HF text config, transformers' defaults filled in
    feature_layer: int | list[int]
    keep_class_token: bool
    projector_act: str  # vision.ACTIVATIONS' name
    projector_bias: bool
    image_token_id: int


def convert_llava(
    folder: Path,
    out: Path,
    dtype: str | None = None,
    overwrite: bool = False,
    step: Callable[[str], None] = lambda _: None,
) -> MM1Config:
    """Convert the LLaVA folder `folder` into a model folder at `out`; `step(description)`
    reports progress. `dtype` (float32, float16, bfloat16) casts the weights."""
    cast = cast_type(dtype)
    config_path = folder / "config.json"
    llava = read_llava_config(config_path)
    preprocess = read_image_processor(folder)
    tokenizer = load_tokenizer(folder)
    image_token = image_token_of(tokenizer, folder, llava.image_token_id)
    tokenizer.chat_template = read_chat_template(folder)
    weights = open_checkpoint(folder)
    layout = find_layout(weights, folder)

    step("vision encoder")
    vision_config, vision_weights = convert_hf_encoder(
        weights,
        llava.vision,
        layout.vision,
        f"{config_path}: vision_config",
        feature_layer=llava.feature_layer,
        keep_class_token=llava.keep_class_token,
    )
    if preprocess.image_size != vision_config.image_size:
        raise UserError(
            f"{folder}: the image processor makes {preprocess.image_size}-pixel images, the "
            f"vision tower takes {vision_config.image_size}"
        )
    step("language model")
    text_config = text_config_of(llava.text, folder, f"{config_path}: text_config")
    decoder = decoder_weights(decoder_refs(weights, layout), text_config, cast, str(folder))
    step("connector")
    connector_config = projector_config(llava, vision_config, text_config["hidden_size"])
    connector_weights = projector_weights(weights, connector_config, layout.projector, folder)
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
        image_token=image_token,
        image_token_id=llava.image_token_id,
    )
    step("writing")
    return write_model_folder(out, parts, cast, overwrite)


def read_llava_config(path: Path) -> LlavaSettings:
    """The parts of a LLaVA config.json conversion uses, with LlavaConfig's defaults; what the
    MLX model cannot reproduce is refused."""
    config = read_json(path)
    vision = section(config, "vision_config", path)
    act = config.get("projector_hidden_act", "gelu")
    if act not in HF_ACTS:
        raise UserError(f"{path}: projector_hidden_act {act!r} is not one of {sorted(HF_ACTS)}")
    bias = config.get("multimodal_projector_bias", True)
    if not isinstance(bias, bool):
        raise UserError(f"{path}: multimodal_projector_bias must be true or false, not {bias!r}")
    text = with_text_defaults(section(config, "text_config", path), f"{path}: text_config")
    # LlavaConfig ties the output embeddings if either it or its text config says so.
    text["tie_word_embeddings"] = bool(
        config.get("tie_word_embeddings") or text.get("tie_word_embeddings")
    )
    return LlavaSettings(
        vision=vision,
        text=text,
        feature_layer=feature_layer_of(config.get("vision_feature_layer", -2), path),
        keep_class_token=keeps_class_token(config, vision, path),
        projector_act=HF_ACTS[act],
        projector_bias=bias,
        image_token_id=image_token_index_of(config, path),
    )


def keeps_class_token(config: Mapping[str, Any], vision: dict[str, Any], path: Path) -> bool:
    """Whether the features keep CLS: vision_feature_select_strategy "full" on a CLIP tower
    ("default" drops it; SigLIP has none)."""
    family = hf_family(vision, f"{path}: vision_config")
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy not in STRATEGIES:
        raise UserError(
            f"{path}: vision_feature_select_strategy {strategy!r} is not one of {STRATEGIES}"
        )
    if strategy == "default" and family == "siglip":
        # LLaVA's "default" drops the first token, meant to be CLS: SigLIP's first patch.
        raise UserError(
            f"{path}: vision_feature_select_strategy 'default' with a SigLIP vision tower "
            "(dropping its first patch) is not supported"
        )
    return strategy == "full" and family == "clip"


def section(config: Mapping[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = config.get(key)
    if not isinstance(value, dict):
        raise UserError(f"{path}: {key} is missing or not an object")
    return value


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def feature_layer_of(value: Any, path: Path) -> int | list[int]:
    """vision_feature_layer: an int or a non-empty list of ints (range checked by the encoder)."""
    layers = value if isinstance(value, list) else [value]
    if not layers or not all(is_int(layer) for layer in layers):
        raise UserError(
            f"{path}: vision_feature_layer must be an int or a list of ints, not {value!r}"
        )
    return value


def image_token_index_of(config: Mapping[str, Any], path: Path) -> int:
    # LlavaConfig's attribute image_token_id is saved as image_token_index.
    index = config.get("image_token_index", config.get("image_token_id", 32000))
    if not is_int(index) or index < 0:
        raise UserError(f"{path}: image_token_index must be a token id, not {index!r}")
    return index


def with_text_defaults(text: dict[str, Any], where: str) -> dict[str, Any]:
    """The text config with transformers' defaults for the keys it leaves out (older uploads
    saved only those that differ from them), read as LlavaConfig reads it."""
    from transformers import AutoConfig

    values = dict(text)
    model_type = values.pop("model_type", "llama")  # LlavaConfig's default text model
    try:
        return AutoConfig.for_model(model_type, **values).to_dict()
    except Exception as error:  # transformers raises many kinds for a config it cannot take
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{where}: transformers cannot read it ({reason})") from None


def image_token_of(tokenizer: Any, folder: Path, token_id: int) -> str:
    """The image token's text, found as LlavaProcessor finds it (the tokenizer's image_token,
    else processor_config.json's, else "<image>"); it must be the one token `token_id`."""
    processor_path = folder / "processor_config.json"
    processor = read_json(processor_path) if processor_path.is_file() else {}
    token = getattr(tokenizer, "image_token", None) or processor.get("image_token", "<image>")
    ids = tokenizer.encode(token, add_special_tokens=False) if isinstance(token, str) else None
    if ids != [token_id]:
        raise UserError(
            f"{folder}: the tokenizer makes the image token {token!r} into {ids}, not the "
            f"one token image_token_index {token_id} of config.json"
        )
    return token


def find_layout(weights: Mapping[str, Any], folder: Path) -> Layout:
    """The checkpoint's layout, its vision prefix down to the vision model's own keys; every
    key must lie under one of its prefixes."""
    for layout in LAYOUTS:
        if layout.projector + "linear_1.weight" in weights:
            break
    else:
        raise UserError(
            f"{folder}: not a LLaVA checkpoint (no '[model.]multi_modal_projector.linear_1.weight')"
        )
    # transformers 4's CLIPVisionModel and SiglipVisionModel keep their keys under
    # `vision_model.`, transformers 5's do not.
    inner = layout.vision + "vision_model."
    if inner + "embeddings.patch_embedding.weight" in weights:
        layout = dataclasses.replace(layout, vision=inner)
    for key in weights:
        if not key.startswith(layout.prefixes):
            raise UserError(
                f"{folder}: unexpected weight {key!r} (a LLaVA model has only "
                f"{', '.join(p + '*' for p in layout.prefixes)})"
            )
    return layout


def decoder_refs(weights: Mapping[str, Any], layout: Layout) -> dict[str, Any]:
    """The language model's weights named as its causal LM names them (`model.*`, `lm_head.*`)."""
    refs = {}
    for key, ref in weights.items():
        if key.startswith(layout.language_model):
            refs["model." + key.removeprefix(layout.language_model)] = ref
        elif key.startswith(layout.lm_head):
            refs["lm_head." + key.removeprefix(layout.lm_head)] = ref
    return refs


def projector_config(
    llava: LlavaSettings, vision: VisionConfig, hidden_size: int
) -> ConnectorConfig:
    """The mlp connector: one image token per feature token, into the decoder's width."""
    return ConnectorConfig(
        model_type="mlp",
        input_dim=vision.feature_dim,
        output_dim=hidden_size,
        num_input_tokens=vision.num_feature_tokens,
        num_tokens=vision.num_feature_tokens,
        pos_emb=False,
        act=llava.projector_act,
        bias=llava.projector_bias,
    )


def projector_weights(
    weights: Mapping[str, Any], config: ConnectorConfig, prefix: str, folder: Path
) -> dict[str, np.ndarray]:
    """The projector's weights, checked against the mlp connector `config` describes."""
    shapes = {name: p.shape for name, p in tree_flatten(build_connector(config).parameters())}
    plan = {prefix + name: [name] for name in shapes}
    return take_weights(weights, plan, shapes, prefix, [], folder)
