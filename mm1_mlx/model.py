"""The MM1 model: ViT image encoder -> connector -> any mlx-lm decoder.

Image features replace the embeddings of the image placeholder tokens: `input_ids` arrive with
`image_token_id` repeated once per image token (the processor expands each image), and the
images in `pixels` fill those positions in order, across the whole batch.
"""

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from mm1_mlx.config import MM1Config
from mm1_mlx.connectors import build_connector
from mm1_mlx.decoder import build_decoder
from mm1_mlx.errors import UserError
from mm1_mlx.vision import VisionTransformer
from mm1_mlx.wrappers import checkpoint_layers


class MM1Model(nn.Module):
    def __init__(self, config: MM1Config):
        super().__init__()
        self.config = config
        self.vision = VisionTransformer(config.vision_config)
        self.connector = build_connector(config.connector_config)
        self.decoder = build_decoder(config.text_config)

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def token_embedding(self) -> nn.Module:
        """The decoder's input embedding (mlx-lm models keep it at `model.embed_tokens`)."""
        inner = getattr(self.decoder, "model", self.decoder)
        if not hasattr(inner, "embed_tokens"):
            raise UserError(f"decoder {type(self.decoder).__module__} has no embed_tokens")
        return inner.embed_tokens

    def embed_tokens(self, input_ids: mx.array) -> mx.array:
        return self.token_embedding(input_ids)

    def encode_images(self, pixels: mx.array) -> mx.array:
        """[num_images, H, W, 3] normalized pixels -> [num_images, T, text hidden]."""
        return self.connector(self.vision(pixels))

    def embed(
        self,
        input_ids: mx.array,
        pixels: mx.array | None = None,
        image_features: mx.array | None = None,
    ) -> mx.array:
        """Token embeddings with image features in the image-token positions.

        Pass `pixels`, or `image_features` already encoded by `encode_images`.
        """
        is_image = input_ids == self.image_token_id
        # The placeholder's own embedding is never used; id 0 keeps the lookup in range.
        text = self.embed_tokens(mx.where(is_image, 0, input_ids))
        if image_features is None and pixels is not None:
            image_features = self.encode_images(pixels)
        num_slots = int(is_image.sum().item())
        num_features = (
            0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        )
        if num_slots != num_features:
            raise ValueError(
                f"input_ids hold {num_slots} image tokens but the images give {num_features} "
                f"({self.config.num_image_tokens} per image)"
            )
        if num_slots == 0:
            return text
        # Gather the k-th image feature for the k-th image token: differentiable, no scatter.
        flat = image_features.reshape(-1, image_features.shape[-1]).astype(text.dtype)
        order = mx.maximum(mx.cumsum(is_image.reshape(-1).astype(mx.int32)) - 1, 0)
        gathered = flat[order].reshape(text.shape)
        return mx.where(is_image[..., None], gathered, text)

    def __call__(
        self,
        input_ids: mx.array,
        pixels: mx.array | None = None,
        cache: list[Any] | None = None,
        image_features: mx.array | None = None,
    ) -> mx.array:
        embeddings = self.embed(input_ids, pixels, image_features)
        return self.decoder(input_ids, cache=cache, input_embeddings=embeddings)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each ViT block's and decoder layer's activations in the backward pass
        instead of keeping them: less memory for about one more forward pass of compute.
        Parameter paths stay the same; decoder layers are put in `Checkpointed`."""
        self.vision.checkpoint_blocks = enabled
        checkpoint_layers(self.decoder, self.decoder.layers, enabled)

    def make_cache(self) -> list[Any]:
        return make_prompt_cache(self.decoder)
