"""Configuration of an MM1 model: plain dataclasses that round-trip through config.json."""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm1_mlx.errors import UserError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# MM1.5 dynamic image splitting (splitting.py): off unless asked for; grids of n_min..n_max
# tiles (MM1.5 trains with 4..9, infers with up to 4..16), only in prompts with fewer than
# max_images images.
SPLITTING_DEFAULTS = {"enabled": False, "n_min": 4, "n_max": 9, "max_images": 3}
RESIZE_MODES = ("squash", "pad", "crop")  # PreprocessConfig.resize_mode


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, or a one-line UserError naming the file."""
    try:
        values = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: cannot read JSON ({error})") from None
    except RecursionError:
        raise UserError(f"{path}: cannot read JSON (nested too deeply)") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a JSON object")
    return values


class _FromDict:
    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class VisionConfig(_FromDict):
    """A ViT image encoder: CLIP-style (class token, ln_pre) or SigLIP-style (neither)."""

    model_type: str = "clip"  # "clip" or "siglip"
    image_size: int = 378  # input size the model runs at (its patch grid: grid_size)
    patch_size: int = 14
    # Side of the stored position-embedding grid (None: grid_size). Other grids get the table
    # bicubic-resized at run time, e.g. DFN5B's 27x27 at 672px (MM1's high-resolution SFT).
    position_grid: int | None = None
    width: int = 1280
    layers: int = 32
    heads: int = 16
    mlp_dim: int = 5120
    act: str = "quick_gelu"  # "quick_gelu", "gelu" (erf) or "gelu_tanh"
    class_token: bool = True
    pre_norm: bool = True  # ln_pre after the patch + position embeddings
    patch_bias: bool = False  # the patch-embedding conv has a bias (SigLIP)
    layer_norm_eps: float = 1e-5
    # Which hidden state feeds the connector, indexed like transformers' `hidden_states`
    # (0 = embeddings, i = output of block i; negative counts from the end). Honeybee: -1.
    # A list takes several, concatenated on the channel axis (LLaVA's vision_feature_layer).
    feature_layer: int | list[int] = -1
    feature_post_norm: bool = False  # apply ln_post to the features (Honeybee: no)
    keep_class_token: bool = False  # CLS's features go to the connector too (LLaVA's "full")
    # Channels of the convolutional embedding added to the patch embedding (vision.ConvEmbedding;
    # 0: none, as in CLIP and SigLIP). Needs patch_size divisible by 4.
    conv_channels: int = 0

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def feature_layers(self) -> list[int]:
        layer = self.feature_layer
        return list(layer) if isinstance(layer, list) else [layer]

    @property
    def feature_dim(self) -> int:
        """Channels of the features the connector gets: width per feature layer."""
        return self.width * len(self.feature_layers)

    @property
    def num_feature_tokens(self) -> int:
        """Feature tokens per image at image_size: the patches, then CLS if kept."""
        return self.num_patches + int(self.class_token and self.keep_class_token)


@dataclass
class ConnectorConfig(_FromDict):
    """The vision-language connector: Honeybee's C-Abstractor, average or attention pooling,
    or LLaVA's MLP."""

    model_type: str = "c-abstractor"  # "c-abstractor", "avg-pool", "attn-pool" or "mlp"
    input_dim: int = 1280  # the vision features' channels (VisionConfig.feature_dim)
    output_dim: int = 4096  # decoder hidden size
    num_input_tokens: int = 729  # feature tokens per image at the encoder's native size
    # Image tokens handed to the decoder: a square number; mlp: num_input_tokens.
    num_tokens: int = 144
    hidden_dim: int = 1024  # C-Abstractor's RegNet width
    depth: int = 3  # RegNet blocks per stage (C-Abstractor)
    mlp_depth: int = 2  # layers of the readout MLP
    pos_emb: bool = True  # learned position embedding added to the features first
    # Learned tokens appended after each image's (Honeybee's `eos_tokens`): an image then takes
    # num_tokens + num_eos_tokens decoder positions.
    num_eos_tokens: int = 0
    heads: int = 8  # attention pooling
    # mlp (LLaVA's projector: Linear, act, Linear on each feature token): the activation
    # (vision.ACTIVATIONS' names) and whether the linears have biases.
    act: str = "gelu"
    bias: bool = True

    @property
    def tokens_per_image(self) -> int:
        """The decoder positions one image takes: the pooled tokens, then the eos tokens."""
        return self.num_tokens + self.num_eos_tokens


@dataclass
class PreprocessConfig(_FromDict):
    """How an image becomes the encoder's input."""

    image_size: int = 378
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    # "squash" (DFN5B), "pad" (keep aspect, pad with the mean) or "crop" (CLIP's: the shortest
    # edge resized to shortest_edge, then the centre image_size square)
    resize_mode: str = "squash"
    shortest_edge: int | None = None  # "crop" only
    interpolation: str = "bicubic"  # PIL's filter: processor.RESAMPLE's names
    rescale_factor: float = 1 / 255  # pixel values 0..255 times this, then mean and std
    splitting: dict[str, Any] = field(default_factory=dict)  # SPLITTING_DEFAULTS' keys

    def __post_init__(self):
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        self.splitting = {**SPLITTING_DEFAULTS, **(self.splitting or {})}


@dataclass
class MM1Config(_FromDict):
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    connector_config: ConnectorConfig = field(default_factory=ConnectorConfig)
    text_config: dict[str, Any] = field(default_factory=dict)  # mlx-lm's args, own model_type
    preprocess_config: PreprocessConfig = field(default_factory=PreprocessConfig)
    image_token: str = "<image>"
    image_token_id: int = 0
    num_image_tokens: int = 144
    quantization: dict[str, Any] | None = None
    model_type: str = "mm1"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MM1Config":
        values = dict(values)
        values["vision_config"] = VisionConfig.from_dict(values.get("vision_config", {}))
        values["connector_config"] = ConnectorConfig.from_dict(values.get("connector_config", {}))
        pre = values.get("preprocess_config", {})
        values["preprocess_config"] = PreprocessConfig.from_dict(pre)
        return super().from_dict.__func__(cls, values)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["quantization"] is None:
            del out["quantization"]
        return out
