"""Honeybee C-Abstractor checkpoints -> MLX connector weights.

Honeybee saves its projector under `abstractor.` next to `vision_model.*` and
`language_model.*` (ignored here); a bare abstractor state dict works too. The weights fix the
connector's inner shape (depth, hidden_dim, mlp_depth, pos_emb and its token count, the eos
tokens appended after each image's); the given config fixes what its neighbours decide
(input_dim: the vision width, output_dim: the decoder's hidden size) and num_tokens, which
pooling makes independent of the weights. Every weight is checked against the MLX module that
config builds, so a converted connector computes what the original did, or conversion fails
naming the key.
"""

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from mlx.utils import tree_flatten

from mm1_mlx.config import ConnectorConfig
from mm1_mlx.connectors import build_connector, is_square
from mm1_mlx.convert.torch_reader import open_checkpoint
from mm1_mlx.errors import UserError

PREFIX = "abstractor."


def convert_connector(
    src: Path, config: ConnectorConfig
) -> tuple[ConnectorConfig, dict[str, np.ndarray]]:
    """Convert the Honeybee abstractor at `src` (a weights file, an index JSON or a folder)."""
    return convert_honeybee_weights(open_checkpoint(src), config, str(src))


def convert_honeybee_weights(
    weights: Mapping[str, Any], config: ConnectorConfig, source: str
) -> tuple[ConnectorConfig, dict[str, np.ndarray]]:
    """The mapping itself; `weights` values need `.shape` and `np.asarray` (TensorRef, ndarray).

    Returns the config the weights describe and fp32 weights named like build_connector's.
    """
    prefix, state = abstractor_state(weights, source)
    config = infer_config(state, config)
    expected = dict(tree_flatten(build_connector(config).parameters()))  # lazy: no compute
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise UserError(
            f"{source}: unexpected key '{prefix}{unexpected[0]}' for {describe(config)}"
        )
    converted = {}
    for name, parameter in expected.items():
        if name not in state:
            raise UserError(f"{source}: missing key '{prefix}{name}' for {describe(config)}")
        want = torch_layout(parameter.shape)
        if tuple(state[name].shape) != want:
            raise UserError(
                f"{source}: '{prefix}{name}' has shape {tuple(state[name].shape)}, expected "
                f"{want} for {describe(config)}"
            )
        converted[name] = mlx_layout(np.asarray(state[name], dtype=np.float32))
    return config, converted


def abstractor_state(weights: Mapping[str, Any], source: str) -> tuple[str, dict[str, Any]]:
    """(prefix, the abstractor's weights without it), from a whole Honeybee model or a bare one."""
    if any(key.startswith(PREFIX) for key in weights):
        prefix = PREFIX
        state = {k.removeprefix(PREFIX): v for k, v in weights.items() if k.startswith(PREFIX)}
    else:
        prefix, state = "", dict(weights)
    if "readout.0.weight" not in state:  # every C-Abstractor ends in the readout MLP
        raise UserError(
            f"{source}: not a Honeybee C-Abstractor checkpoint "
            f"(no '{PREFIX}readout.0.weight' or 'readout.0.weight')"
        )
    if "pos_emb" in state:
        state["pos_emb"] = without_cls_slot(state["pos_emb"], prefix, source)
    return prefix, state


def without_cls_slot(pos_emb: Any, prefix: str, source: str) -> np.ndarray:
    """Old Honeybee checkpoints have one extra leading slot, once meant for CLS: drop it."""
    pos_emb = np.asarray(pos_emb)
    if pos_emb.ndim == 3 and not is_square(pos_emb.shape[1]) and is_square(pos_emb.shape[1] - 1):
        pos_emb = pos_emb[:, 1:]
    if pos_emb.ndim != 3 or not is_square(pos_emb.shape[1]):
        raise UserError(
            f"{source}: '{prefix}pos_emb' has shape {pos_emb.shape}, not (1, h * w, channels)"
        )
    return pos_emb


def infer_config(state: dict[str, Any], config: ConnectorConfig) -> ConnectorConfig:
    depth = count_indexed(state, "net.0.b{}.", start=1)
    mlp_depth = count_indexed(state, "readout.{}.", start=0, step=2)
    pos_emb = state.get("pos_emb")
    eos_shape = tuple(state["eos_tokens"].shape) if "eos_tokens" in state else ()
    return dataclasses.replace(
        config,
        # Honeybee's depth-0 C-Abstractor is pos_emb + pooling + readout: our avg-pool.
        model_type="c-abstractor" if depth else "avg-pool",
        hidden_dim=state["readout.0.weight"].shape[1] if depth else config.hidden_dim,
        depth=depth,
        mlp_depth=mlp_depth,
        pos_emb=pos_emb is not None,
        num_input_tokens=pos_emb.shape[1] if pos_emb is not None else config.num_input_tokens,
        # (1, n, output_dim); any other shape is then refused as an unexpected key
        num_eos_tokens=eos_shape[1] if len(eos_shape) == 3 else 0,
    )


def count_indexed(state: Mapping[str, Any], pattern: str, start: int, step: int = 1) -> int:
    """How many of the prefixes pattern.format(start), pattern.format(start + step), ... have
    keys in state: blocks (`net.0.b1.`, ...) or readout layers (`readout.0.`, `readout.2.`, ...)."""
    count = 0
    while any(key.startswith(pattern.format(start + count * step)) for key in state):
        count += 1
    return count


def describe(config: ConnectorConfig) -> str:
    return (
        f"{config.model_type}(input_dim={config.input_dim}, hidden_dim={config.hidden_dim}, "
        f"output_dim={config.output_dim}, depth={config.depth}, mlp_depth={config.mlp_depth})"
    )


def torch_layout(shape: tuple[int, ...]) -> tuple[int, ...]:
    """An MLX conv weight's shape (O, H, W, I) as PyTorch stores it (O, I, H, W)."""
    return (shape[0], shape[3], shape[1], shape[2]) if len(shape) == 4 else tuple(shape)


def mlx_layout(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array.transpose(0, 2, 3, 1)) if array.ndim == 4 else array
