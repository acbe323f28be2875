"""Connectors against PyTorch references, in fp32 with tiny random weights.

The C-Abstractor reference below is Honeybee's CAbstractor with timm's RegStage module tree
(honeybee/projectors.py, timm/models/regnet.py, timm/layers), so its state dict has the key
names of real Honeybee checkpoints; it is saved with torch.save and converted from the file.
"""

import re

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import relative_error
from mlx.utils import tree_flatten
from torch import nn
from torch_refs import HoneybeeCAbstractor, build_mlp

from mm1_mlx.config import ConnectorConfig
from mm1_mlx.connectors import adaptive_avg_pool, build_connector
from mm1_mlx.convert.connector import convert_connector
from mm1_mlx.errors import UserError

# --- helpers ----------------------------------------------------------------------------------


def save_honeybee(
    path, reference: nn.Module, legacy_cls_slot=False, drop=(), replace=None, bare=False
):
    """torch.save a Honeybee state dict: a whole model's (abstractor.* among other parts) or,
    if `bare`, the abstractor's own."""
    prefix = "" if bare else "abstractor."
    state = {f"{prefix}{k}": v for k, v in reference.state_dict().items()}
    if legacy_cls_slot:
        pos_emb = state[f"{prefix}pos_emb"]
        state[f"{prefix}pos_emb"] = torch.cat([torch.randn_like(pos_emb[:, :1]), pos_emb], 1)
    for key in drop:
        del state[key]
    state.update(replace or {})
    if not bare:
        state["vision_model.embeddings.patch_embedding.weight"] = torch.randn(4, 3, 2, 2)
        state["language_model.lm_head.weight"] = torch.randn(8, 4)
    torch.save(state, path)
    return path


def load_connector(config: ConnectorConfig, weights: dict[str, np.ndarray]):
    connector = build_connector(config)
    connector.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    return connector


def compare(connector, reference, num_patches: int, input_dim: int) -> float:
    """Relative error of connector vs reference (a torch module or function) on random features."""
    features = np.random.randn(2, num_patches, input_dim).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(features)).numpy()
    actual = connector(mx.array(features))
    return relative_error(np.array(actual), expected)


def honeybee_config(**fields) -> ConnectorConfig:
    # Odd widths: SE's reduced width round(26 * 0.25) = 6 (Python rounds half to even).
    values = dict(input_dim=26, hidden_dim=48, output_dim=40, depth=2, mlp_depth=3)
    return ConnectorConfig(**{**values, **fields})


def neighbours(config: ConnectorConfig) -> ConnectorConfig:
    """What the caller knows: input/output dims and num_tokens; the rest left at defaults."""
    return ConnectorConfig(
        input_dim=config.input_dim, output_dim=config.output_dim, num_tokens=config.num_tokens
    )


# --- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "grid, pos_grid, num_tokens, legacy_cls_slot",
    [
        (27, 27, 144, False),  # MM1: 378px / 14, overlapping pooling windows
        (24, 24, 64, True),  # an old checkpoint with a CLS slot in pos_emb
        (24, 16, 64, False),  # features on a larger grid: pos_emb resized bicubically
    ],
)
def test_c_abstractor_matches_honeybee(tmp_path, grid, pos_grid, num_tokens, legacy_cls_slot):
    torch.manual_seed(0)
    config = honeybee_config(num_input_tokens=pos_grid**2, num_tokens=num_tokens)
    reference = HoneybeeCAbstractor(config).eval()
    path = save_honeybee(tmp_path / "pytorch_model.bin", reference, legacy_cls_slot)

    converted, weights = convert_connector(path, neighbours(config))

    assert converted == config
    error = compare(load_connector(converted, weights), reference, grid**2, config.input_dim)
    assert error <= 1e-4, error


def test_depth_0_honeybee_is_avg_pool(tmp_path):
    torch.manual_seed(0)
    config = honeybee_config(depth=0, mlp_depth=2, num_input_tokens=13**2, num_tokens=25)
    reference = HoneybeeCAbstractor(config).eval()
    path = save_honeybee(tmp_path / "abstractor.bin", reference, bare=True)

    converted, weights = convert_connector(path, neighbours(config))

    assert converted.model_type == "avg-pool"
    error = compare(load_connector(converted, weights), reference, 13**2, config.input_dim)
    assert error <= 1e-4, error


@pytest.mark.parametrize(
    "height, width, size",
    [(27, 27, 12), (24, 24, 8), (48, 48, 12), (7, 7, 5), (5, 5, 7), (9, 13, 4)],
)
def test_adaptive_avg_pool_matches_torch(height, width, size):
    x = np.random.randn(2, height, width, 3).astype(np.float32)
    expected = F.adaptive_avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), size)
    actual = adaptive_avg_pool(mx.array(x), size)
    assert relative_error(np.array(actual), expected.permute(0, 2, 3, 1).numpy()) <= 1e-6


def test_attention_pool_matches_torch_multihead_attention():
    config = ConnectorConfig(
        model_type="attn-pool",
        input_dim=32,
        output_dim=24,
        num_input_tokens=64,
        num_tokens=16,
        heads=4,
    )
    connector = build_connector(config)
    connector.queries = mx.random.normal(connector.queries.shape)  # away from the 0.02 init
    connector.pos_emb = mx.random.normal(connector.pos_emb.shape)
    weights = {k: torch.from_numpy(np.array(v)) for k, v in tree_flatten(connector.parameters())}

    attention = nn.MultiheadAttention(32, 4, batch_first=True)
    projections = ["attn.query_proj", "attn.key_proj", "attn.value_proj"]
    attention.load_state_dict(
        {
            "in_proj_weight": torch.cat([weights[f"{p}.weight"] for p in projections]),
            "in_proj_bias": torch.cat([weights[f"{p}.bias"] for p in projections]),
            "out_proj.weight": weights["attn.out_proj.weight"],
            "out_proj.bias": weights["attn.out_proj.bias"],
        }
    )
    readout = build_mlp(config.mlp_depth, config.input_dim, config.output_dim)
    readout.load_state_dict(
        {k.removeprefix("readout."): v for k, v in weights.items() if k.startswith("readout.")}
    )

    def reference(features):
        x = features + weights["pos_emb"]
        queries = weights["queries"].expand(x.shape[0], -1, -1)
        return readout(attention(queries, x, x, need_weights=False)[0])

    error = compare(connector, reference, 64, config.input_dim)
    assert error <= 1e-4, error


def error_message(path, config=None) -> str:
    with pytest.raises(UserError) as caught:
        convert_connector(path, config or neighbours(honeybee_config()))
    message = str(caught.value)
    assert "\n" not in message and str(path) in message, message
    return message


def test_missing_key(tmp_path):
    reference = HoneybeeCAbstractor(honeybee_config())
    key = "abstractor.net.2.b2.conv2.bn.bias"
    path = save_honeybee(tmp_path / "model.bin", reference, drop=[key])
    assert f"missing key '{key}'" in error_message(path)


def test_wrong_shape(tmp_path):
    reference = HoneybeeCAbstractor(honeybee_config())
    key = "abstractor.net.0.b1.se.fc1.weight"
    path = save_honeybee(tmp_path / "model.bin", reference, replace={key: torch.zeros(7, 48, 1, 1)})
    message = error_message(path)
    assert f"'{key}' has shape (7, 48, 1, 1), expected (6, 48, 1, 1)" in message


def test_vision_width_mismatch(tmp_path):
    reference = HoneybeeCAbstractor(honeybee_config())
    path = save_honeybee(tmp_path / "model.bin", reference)
    message = error_message(path, neighbours(honeybee_config(input_dim=32)))
    assert "'abstractor.pos_emb' has shape (1, 729, 26), expected (1, 729, 32)" in message


@pytest.mark.parametrize(
    "state",
    [
        {"vision_model.post_layernorm.weight": torch.ones(4)},  # no abstractor at all
        {"abstractor.net.0.weight": torch.ones(4, 4)},  # Honeybee's MLP projector
    ],
)
def test_not_a_c_abstractor(tmp_path, state):
    path = tmp_path / "model.bin"
    torch.save(state, path)
    assert "not a Honeybee C-Abstractor checkpoint" in error_message(path)


def test_mlp_is_llavas_projector():
    """Linear, GELU, Linear on each feature token, named as LlavaMultiModalProjector."""
    config = ConnectorConfig(
        model_type="mlp", input_dim=24, output_dim=40, num_input_tokens=17, num_tokens=17
    )
    connector = build_connector(config)
    reference = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 40))
    weights = {
        f"linear_{i}.{p}": getattr(reference[layer], p).detach().numpy()
        for i, layer in ((1, 0), (2, 2))
        for p in ("weight", "bias")
    }
    connector.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    assert compare(connector, reference, 17, 24) <= 1e-5


@pytest.mark.parametrize(
    "fields, expected",
    [
        (dict(num_tokens=16), "num_tokens (16) must equal num_input_tokens (17)"),
        (dict(act="swish"), "act 'swish' is not one of"),
        (dict(num_eos_tokens=1), "num_eos_tokens needs a c-abstractor or avg-pool"),
    ],
)
def test_mlp_settings_are_checked(fields, expected):
    values = dict(model_type="mlp", input_dim=8, output_dim=8, num_input_tokens=17, num_tokens=17)
    with pytest.raises(UserError, match=re.escape(expected)):
        build_connector(ConnectorConfig(**{**values, **fields}))
