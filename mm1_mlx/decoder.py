"""The decoder is mlx-lm's own model for the LLM's architecture, chosen as mlx-lm chooses it."""

import importlib
from typing import Any

import mlx.nn as nn
from mlx_lm.utils import MODEL_REMAPPING

from mm1_mlx.errors import UserError


def decoder_classes(text_config: dict[str, Any]) -> tuple[type, type]:
    """mlx-lm's (Model, ModelArgs) for a text config, as mlx-lm itself resolves them."""
    model_type = text_config.get("model_type")
    if not model_type:
        raise UserError("text_config has no model_type")
    model_type = MODEL_REMAPPING.get(model_type, model_type)
    try:
        module = importlib.import_module(f"mlx_lm.models.{model_type}")
    except ImportError:
        raise UserError(f"mlx-lm has no decoder of model_type '{model_type}'") from None
    return module.Model, module.ModelArgs


def build_decoder(text_config: dict[str, Any]) -> nn.Module:
    model_class, args_class = decoder_classes(text_config)
    return model_class(args_class.from_dict(text_config))
