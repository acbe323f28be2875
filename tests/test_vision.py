"""The ViT encoder and its converter against transformers' CLIP / SigLIP (tiny random models)."""

import dataclasses
import json
import re

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from helpers import relative_error
from mlx.utils import tree_flatten
from safetensors.torch import load_file, save_file

from mm1_mlx.config import VisionConfig
from mm1_mlx.convert.vision import convert_vision
from mm1_mlx.errors import UserError
from mm1_mlx.interpolate import resize_bicubic
from mm1_mlx.vision import VisionTransformer, block_max, window_max

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=28,
    patch_size=7,
)
TEXT = dict(
    vocab_size=49408,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
)
HF_MODELS = {
    "clip-vision": lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY)),
    "clip-vision-gelu": lambda: transformers.CLIPVisionModel(
        transformers.CLIPVisionConfig(**TINY, hidden_act="gelu")
    ),
    "clip-full": lambda: transformers.CLIPModel(
        transformers.CLIPConfig(vision_config=TINY, text_config=TEXT)
    ),
    "siglip-vision": lambda: transformers.SiglipVisionModel(
        transformers.SiglipVisionConfig(**TINY)
    ),
    "siglip-full": lambda: transformers.SiglipModel(
        transformers.SiglipConfig(vision_config=TINY, text_config=TEXT)
    ),
}
# The stored 4x4 grid, and a larger 6x8 one (interpolated; the conv drops 59's remainder).
SIZES = [(28, 28), (42, 59)]


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """HF init leaves norms at 1 / 0 and biases at 0: perturb everything so all of it counts."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (save_pretrained folder, the vision model inside)."""
    out = {}
    for name, build in HF_MODELS.items():
        model = randomized(build())
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = folder, getattr(model, "vision_model", model)
    return out


def hf_features(vision_model, pixels, feature_layer, post_norm=False) -> np.ndarray:
    with torch.no_grad():
        out = vision_model(
            pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=True
        )
        hidden = out.hidden_states[feature_layer]
        if post_norm:
            hidden = vision_model.post_layernorm(hidden)
    if isinstance(vision_model, transformers.CLIPVisionModel):
        hidden = hidden[:, 1:]  # CLS
    return hidden.numpy()


def mlx_features(src, pixels, **overrides) -> np.ndarray:
    config, _, weights = convert_vision(src, **overrides)
    model = VisionTransformer(config)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    return np.array(model(mx.array(pixels.permute(0, 2, 3, 1).numpy())))


def random_pixels(size) -> torch.Tensor:
    return torch.from_numpy(np.random.randn(2, 3, *size).astype(np.float32))


# -- resize_bicubic ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, size",
    [((5, 7), (9, 12)), ((4, 4), (6, 8)), ((16, 12), (5, 3)), ((9, 6), (4, 11)), ((4, 4), (4, 4))],
)
@pytest.mark.parametrize("batched", [False, True])
def test_resize_bicubic_matches_torch(shape, size, batched):
    grid = np.random.randn(2, *shape, 3).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(grid).permute(0, 3, 1, 2), size=size, mode="bicubic", align_corners=False
    )
    expected = expected.permute(0, 2, 3, 1).numpy()
    if not batched:
        grid, expected = grid[0], expected[0]
    assert relative_error(resize_bicubic(mx.array(grid), size), expected) <= 1e-6


# -- VisionTransformer -----------------------------------------------------------------------


def test_weight_names_and_no_state_from_running():
    config = VisionConfig(image_size=28, patch_size=7, width=32, layers=2, heads=4, mlp_dim=64)
    model = VisionTransformer(config)
    names = {name for name, _ in tree_flatten(model.parameters())}
    block = {
        f"blocks.0.{m}.{p}"
        for m in ("ln_1", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "ln_2")
        + ("mlp.fc1", "mlp.fc2")
        for p in ("weight", "bias")
    }
    assert block <= names
    assert {"patch_embed.weight", "class_embedding", "position_embedding", "ln_pre.weight"} <= names
    assert {"ln_post.weight", "ln_post.bias", "blocks.1.mlp.fc2.bias"} <= names
    assert model.position_embedding.shape == (17, 32)
    assert model(mx.zeros((1, 42, 56, 3))).shape == (1, 48, 32)  # an interpolated grid
    assert {name for name, _ in tree_flatten(model.parameters())} == names


# -- converter parity with transformers --------------------------------------------------------


@pytest.mark.parametrize("name", list(HF_MODELS))
@pytest.mark.parametrize("feature_layer", [-1, -2])
@pytest.mark.parametrize("size", SIZES)
def test_features_match_transformers(hf_models, name, feature_layer, size):
    folder, vision_model = hf_models[name]
    pixels = random_pixels(size)
    ours = mlx_features(folder, pixels, feature_layer=feature_layer)
    assert relative_error(ours, hf_features(vision_model, pixels, feature_layer)) <= 1e-4


@pytest.mark.parametrize("name", ["clip-vision", "siglip-vision"])
def test_post_norm_and_embedding_layer(hf_models, name):
    folder, vision_model = hf_models[name]
    pixels = random_pixels(SIZES[1])
    ours = mlx_features(folder, pixels, feature_layer=-1, feature_post_norm=True)
    assert relative_error(ours, hf_features(vision_model, pixels, -1, post_norm=True)) <= 1e-4
    ours = mlx_features(folder, pixels, feature_layer=0)
    assert relative_error(ours, hf_features(vision_model, pixels, 0)) <= 1e-4


def test_configs_from_hf_folder(hf_models):
    config, preprocess, weights = convert_vision(hf_models["siglip-full"][0], image_size=56)
    assert (config.model_type, config.class_token, config.pre_norm, config.patch_bias) == (
        "siglip",
        False,
        False,
        True,
    )
    assert (config.act, config.layer_norm_eps, config.heads, config.mlp_dim) == (
        "gelu_tanh",
        1e-6,
        4,
        64,
    )
    # Runs at 56 (an 8x8 grid), keeps the trained 4x4 position table.
    assert (config.image_size, config.position_grid, preprocess.image_size) == (56, 4, 56)
    assert weights["position_embedding"].shape == (16, 32)
    assert preprocess.mean == (0.5, 0.5, 0.5)
    assert weights["patch_embed.weight"].shape == (32, 7, 7, 3)  # OHWI
    assert all(w.dtype == np.float32 for w in weights.values())


# -- open_clip layout ---------------------------------------------------------------------------


def open_clip_state_dict(hf_vision) -> dict[str, torch.Tensor]:
    """The same weights as open_clip names them, with a projection and a text tower to ignore."""
    hf = hf_vision.state_dict()
    out = {
        "visual.class_embedding": hf["embeddings.class_embedding"],
        "visual.positional_embedding": hf["embeddings.position_embedding.weight"],
        "visual.conv1.weight": hf["embeddings.patch_embedding.weight"],
        "visual.proj": torch.randn(32, 16),
        "token_embedding.weight": torch.randn(10, 16),
        "transformer.resblocks.0.attn.in_proj_weight": torch.randn(48, 16),
        "logit_scale": torch.tensor(1.0),
    }
    renames = {"ln_pre": "pre_layrnorm", "ln_post": "post_layernorm"}
    for i in range(TINY["num_hidden_layers"]):
        renames |= {
            f"transformer.resblocks.{i}.{ours}": f"encoder.layers.{i}.{theirs}"
            for ours, theirs in [
                ("ln_1", "layer_norm1"),
                ("attn.out_proj", "self_attn.out_proj"),
                ("ln_2", "layer_norm2"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ]
        }
        for p in ("weight", "bias"):
            qkv = [hf[f"encoder.layers.{i}.self_attn.{n}_proj.{p}"] for n in "qkv"]
            out[f"visual.transformer.resblocks.{i}.attn.in_proj_{p}"] = torch.cat(qkv)
    for ours, theirs in renames.items():
        for p in ("weight", "bias"):
            out[f"visual.{ours}.{p}"] = hf[f"{theirs}.{p}"]
    return out


OPEN_CLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 16,
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": 28,
            "layers": 3,
            "width": 32,
            "head_width": 8,
            "patch_size": 7,
            "mlp_ratio": 2.0,
        },
        "text_cfg": {"context_length": 77, "vocab_size": 10, "width": 16, "heads": 2, "layers": 1},
    },
    "preprocess_cfg": {
        "mean": [0.4, 0.5, 0.6],
        "std": [0.2, 0.3, 0.4],
        "interpolation": "bicubic",
        "resize_mode": "squash",
    },
}


@pytest.fixture(scope="module")
def open_clip_file(hf_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("open_clip")
    path = folder / "open_clip_pytorch_model.bin"
    torch.save(open_clip_state_dict(hf_models["clip-vision"][1]), path)
    (folder / "open_clip_config.json").write_text(json.dumps(OPEN_CLIP_CONFIG))
    return path


@pytest.mark.parametrize("size", SIZES)
def test_open_clip_file_matches_transformers(hf_models, open_clip_file, size):
    pixels = random_pixels(size)
    expected = hf_features(hf_models["clip-vision"][1], pixels, -2)
    assert relative_error(mlx_features(open_clip_file, pixels, feature_layer=-2), expected) <= 1e-4


def test_open_clip_configs(open_clip_file):
    config, preprocess, _ = convert_vision(open_clip_file.parent)
    assert (config.heads, config.act, config.mlp_dim, config.layers) == (4, "quick_gelu", 64, 3)
    assert (preprocess.mean, preprocess.std) == ((0.4, 0.5, 0.6), (0.2, 0.3, 0.4))
    assert (preprocess.resize_mode, preprocess.image_size) == ("squash", 28)


def test_open_clip_without_config_takes_overrides(hf_models, open_clip_file, tmp_path):
    bare = tmp_path / "weights.bin"
    bare.write_bytes(open_clip_file.read_bytes())
    pixels = random_pixels(SIZES[0])
    expected = hf_features(hf_models["clip-vision"][1], pixels, -1)
    ours = mlx_features(bare, pixels, heads=4, act="quick_gelu")
    assert relative_error(ours, expected) <= 1e-4


# -- bad input ----------------------------------------------------------------------------------


def one_line_error(src, *fragments, **overrides):
    with pytest.raises(UserError) as caught:
        convert_vision(src, **overrides)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_unknown_layout(tmp_path):
    save_file({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    one_line_error(tmp_path, str(tmp_path), "visual.conv1.weight", "embeddings.patch_embedding")


def copy_hf_folder(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    weights = load_file(src / "model.safetensors")
    edit(weights)
    save_file(weights, dst / "model.safetensors")
    return dst


def test_missing_key(hf_models, tmp_path):
    folder = copy_hf_folder(
        hf_models["clip-full"][0],
        tmp_path / "clip",
        lambda w: w.pop("vision_model.encoder.layers.1.mlp.fc2.bias"),
    )
    one_line_error(folder, str(folder), "'vision_model.encoder.layers.1.mlp.fc2.bias'")


def test_wrong_shape(hf_models, tmp_path):
    def widen(weights):
        weights["embeddings.position_embedding.weight"] = torch.zeros(25, 32)

    folder = copy_hf_folder(hf_models["siglip-vision"][0], tmp_path / "siglip", widen)
    one_line_error(folder, "'embeddings.position_embedding.weight'", "(25, 32)", "(16, 32)")


def test_unsupported_weight(hf_models, open_clip_file, tmp_path):
    weights = open_clip_state_dict(hf_models["clip-vision"][1])
    weights["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(32)  # layer scale
    torch.save(weights, tmp_path / "open_clip_pytorch_model.bin")
    (tmp_path / "open_clip_config.json").write_text(json.dumps(OPEN_CLIP_CONFIG))
    one_line_error(tmp_path, "'visual.transformer.resblocks.0.ls_1.gamma'")


def test_bad_overrides(open_clip_file):
    one_line_error(open_clip_file, "feature_layer 5", feature_layer=5)
    one_line_error(open_clip_file, "act 'swish'", act="swish")
    one_line_error(open_clip_file, "width 32 is not a multiple of heads 5", heads=5)


def test_concatenated_feature_layers_keep_the_class_token(hf_models):
    """LLaVA's features: several hidden states side by side on the channel axis, CLS first."""
    folder, vision_model = hf_models["clip-vision"]
    pixels = random_pixels(SIZES[0])
    config, _, weights = convert_vision(folder, feature_layer=[-1, 0])
    config = dataclasses.replace(config, keep_class_token=True)
    model = VisionTransformer(config)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    ours = np.array(model(mx.array(pixels.permute(0, 2, 3, 1).numpy())))
    with torch.no_grad():
        states = vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
    expected = torch.cat([states[-1], states[0]], dim=-1).numpy()
    assert ours.shape == (2, config.num_feature_tokens, config.feature_dim) == (2, 17, 64)
    assert relative_error(ours, expected) <= 1e-4


@pytest.mark.parametrize(
    "fields, expected",
    [
        (dict(feature_layer=[]), "feature_layer is an empty list"),
        (dict(feature_layer=[-1, 4]), "feature_layer 4 is outside [-4, 3]"),
        (dict(class_token=False, keep_class_token=True), "keep_class_token needs class_token"),
    ],
)
def test_feature_settings_are_checked(fields, expected):
    config = VisionConfig(image_size=28, patch_size=7, width=32, layers=3, heads=4, mlp_dim=64)
    with pytest.raises(ValueError, match=re.escape(expected)):
        VisionTransformer(dataclasses.replace(config, **fields))


# -- the convolutional embedding ------------------------------------------------------------


class TorchConvEmbedding(torch.nn.Module):
    """The reference: torch's Conv2d and MaxPool2d (NCHW), as ConvEmbedding's docstring says."""

    def __init__(self, channels: int, patch_size: int, width: int):
        super().__init__()
        quarter = patch_size // 4
        nn = torch.nn
        self.features = nn.Sequential(
            nn.Conv2d(3, channels // 2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels // 2, channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(3 * quarter, stride=quarter, padding=quarter),
        )
        self.proj = nn.Linear(channels, width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, h, w, width]
        return self.proj(self.features(pixels).permute(0, 2, 3, 1))


def load_torch_conv_embedding(ours, reference: TorchConvEmbedding) -> None:
    convs = [layer for layer in reference.features if isinstance(layer, torch.nn.Conv2d)]
    for conv, mine in zip(convs, (ours.conv1, ours.conv2, ours.conv3), strict=True):
        mine.weight = mx.array(conv.weight.detach().permute(0, 2, 3, 1).numpy())
        mine.bias = mx.array(conv.bias.detach().numpy())
    ours.proj.weight = mx.array(reference.proj.weight.detach().numpy())
    ours.proj.bias = mx.array(reference.proj.bias.detach().numpy())


@pytest.mark.parametrize("size", [(32, 32), (40, 52), (35, 47)])
def test_conv_embedding_matches_torch(size):
    config = VisionConfig(
        image_size=32, patch_size=8, width=16, layers=1, heads=2, mlp_dim=32, conv_channels=6
    )
    model = VisionTransformer(config)
    torch.manual_seed(0)
    reference = TorchConvEmbedding(6, 8, 16)
    load_torch_conv_embedding(model.conv_embed, reference)
    pixels = random_pixels(size)
    expected = reference(pixels).detach().numpy()
    pixels = mx.array(pixels.permute(0, 2, 3, 1).numpy())
    ours = np.array(model.conv_embed(pixels))
    assert ours.shape == expected.shape == (2, size[0] // 8, size[1] // 8, 16)
    assert relative_error(ours, expected) <= 1e-5
    # The encoder adds it to the patch embedding: the embeddings (before any block or norm)
    # differ from those of the same encoder without it by exactly its output.
    embeddings = dataclasses.replace(config, feature_layer=0, pre_norm=False)
    model = VisionTransformer(embeddings)
    load_torch_conv_embedding(model.conv_embed, reference)
    plain = VisionTransformer(dataclasses.replace(embeddings, conv_channels=0))
    plain.update(model.parameters(), strict=False)
    difference = np.array(model(pixels) - plain(pixels))
    assert relative_error(difference, expected.reshape(2, -1, 16)) <= 1e-5


@pytest.mark.parametrize("stride", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [(16, 16), (17, 23), (9, 14)])
def test_poolings_are_torch_max_pooling(stride, size):
    """block_max and window_max compute torch's MaxPool2d exactly, partial blocks included
    (the last window still reaches the rows of a partial block; block_max drops them)."""
    pixels = random_pixels(size)
    ours = mx.array(pixels.permute(0, 2, 3, 1).numpy())
    for pooled, reference in [
        (block_max(ours, stride), torch.nn.MaxPool2d(stride)),
        (window_max(ours, stride), torch.nn.MaxPool2d(3 * stride, stride, padding=stride)),
    ]:
        expected = reference(pixels).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(np.array(pooled), expected)
