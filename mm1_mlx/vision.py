"""The ViT image encoder: CLIP-style (open_clip, HF CLIPVisionModel) or SigLIP-style.

CLIP: class token, patch conv without bias, ln_pre, quick_gelu or gelu. SigLIP: no class token,
patch conv with bias, no ln_pre, gelu-tanh (its attention-pooling head is not needed here).
Both: learned position embeddings, pre-norm blocks, ln_post.
"""

import mlx.core as mx
import mlx.nn as nn

from mm1_mlx.config import VisionConfig
from mm1_mlx.interpolate import resize_bicubic

ACTIVATIONS = {
    "quick_gelu": nn.gelu_fast_approx,  # x * sigmoid(1.702 x), OpenAI CLIP / DFN5B
    "gelu": nn.gelu,  # erf
    "gelu_tanh": nn.gelu_approx,  # SigLIP's gelu_pytorch_tanh
    "relu": nn.relu,  # for small models trained from scratch: ~10x cheaper than GELU on CPU
}


class Attention(nn.Module):
    def __init__(self, dims: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dims // heads) ** -0.5
        self.q_proj = nn.Linear(dims, dims)
        self.k_proj = nn.Linear(dims, dims)
        self.v_proj = nn.Linear(dims, dims)
        self.out_proj = nn.Linear(dims, dims)

    def __call__(self, x: mx.array) -> mx.array:
        batch, length, dims = x.shape

        def split_heads(y):
            return y.reshape(batch, length, self.heads, -1).transpose(0, 2, 1, 3)

        q, k, v = (split_heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, dims))


class MLP(nn.Module):
    def __init__(self, dims: int, hidden_dims: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dims, hidden_dims)
        self.fc2 = nn.Linear(hidden_dims, dims)
        self.act = ACTIVATIONS[act]

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.attn = Attention(config.width, config.heads)
        self.ln_2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = MLP(config.width, config.mlp_dim, config.act)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ConvEmbedding(nn.Module):
    """A small convolutional network whose features are added to the patch embedding.

    Three 3x3 convolutions with ReLU (the first two followed by 2x2 max pooling) map the picture
    at a quarter of its resolution; each patch takes the maximum of that map over the 3x3
    patches centred on it, projected to the ViT's width. A linear patch projection has to learn
    a glyph separately at every offset from the patch grid, and small models trained from
    scratch never do (a label 5 px off the grid reads as noise); convolutions and max pooling
    recognise it wherever it falls, and the 3-patch window sees a short word whole.
    """

    def __init__(self, channels: int, patch_size: int, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels // 2, 3, padding=1)
        self.conv2 = nn.Conv2d(channels // 2, channels, 3, padding=1)
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1)
        self.quarter = patch_size // 4  # a patch's side in the quarter-resolution map
        self.proj = nn.Linear(channels, width)

    def __call__(self, pixels: mx.array) -> mx.array:
        """pixels [B, H, W, 3] -> [B, H // patch, W // patch, width]"""
        x = block_max(nn.relu(self.conv1(pixels)), 2)
        x = block_max(nn.relu(self.conv2(x)), 2)
        return self.proj(window_max(nn.relu(self.conv3(x)), self.quarter))


# The poolings are what torch's MaxPool2d computes (the reference test compares them), written
# as reshapes and maxima: on MLX's CPU backend its strided pooling's backward pass made this
# module 1.44x slower (benchmarks/conv_pooling.py).
def block_max(x: mx.array, size: int) -> mx.array:
    """MaxPool2d(size) on [B, H, W, C]: max over non-overlapping blocks, a partial one dropped."""
    b, h, w, c = x.shape
    h, w = h // size, w // size
    x = x[:, : h * size, : w * size]
    return x.reshape(b, h, size, w, size, c).max(axis=(2, 4))


def window_max(x: mx.array, stride: int) -> mx.array:
    """MaxPool2d(3 * stride, stride, padding=stride) on [B, H, W, C]: each output cell takes the
    maximum over its own stride x stride block and the eight around it."""
    h, w = x.shape[1] // stride, x.shape[2] // stride
    # -inf padding: one block of border before, the partial block (whose rows the last window
    # still reaches) completed after.
    after_h, after_w = -x.shape[1] % stride + stride, -x.shape[2] % stride + stride
    x = mx.pad(x, [(0, 0), (stride, after_h), (stride, after_w), (0, 0)], constant_values=-mx.inf)
    x = block_max(x, stride)
    rows = mx.maximum(mx.maximum(x[:, :h], x[:, 1 : h + 1]), x[:, 2 : h + 2])
    return mx.maximum(mx.maximum(rows[:, :, :w], rows[:, :, 1 : w + 1]), rows[:, :, 2 : w + 2])


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.act not in ACTIVATIONS:
            raise ValueError(f"vision act {config.act!r} is not one of {sorted(ACTIVATIONS)}")
        if config.heads < 1 or config.width % config.heads:
            raise ValueError(
                f"vision width {config.width} is not a multiple of heads {config.heads}"
            )
        if config.conv_channels % 2 or (config.conv_channels and config.patch_size % 4):
            raise ValueError("vision conv_channels must be even, and patch_size divisible by 4")
        if config.keep_class_token and not config.class_token:
            raise ValueError("vision keep_class_token needs class_token")
        self.config = config
        # hidden_states[i] is the output of block i (0: the embeddings).
        self.num_blocks_run = max(feature_states(config))

        self.position_grid = config.position_grid or config.grid_size

        width, patch = config.width, config.patch_size
        self.patch_embed = nn.Conv2d(3, width, patch, stride=patch, bias=config.patch_bias)
        if config.conv_channels:
            self.conv_embed = ConvEmbedding(config.conv_channels, patch, width)
        if config.class_token:
            self.class_embedding = mx.zeros((width,))
        num_positions = self.position_grid**2 + int(config.class_token)
        self.position_embedding = mx.zeros((num_positions, width))
        if config.pre_norm:
            self.ln_pre = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.blocks = [Block(config) for _ in range(config.layers)]
        # Recompute each block's activations in the backward pass instead of keeping them.
        self.checkpoint_blocks = False
        self.ln_post = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def position_embeddings(self, grid_height: int, grid_width: int) -> mx.array:
        """[tokens, width] position embeddings for a patch grid, bicubic-resized if it is not
        the stored one (like transformers' `interpolate_pos_encoding=True`; CLS kept as is).

        Recomputed on every call: two small matmuls, and it stays right while training.
        """
        table = self.position_embedding
        if self.config.class_token:
            class_position, table = table[:1], table[1:]
        grid = self.position_grid
        if (grid_height, grid_width) != (grid, grid):
            table = resize_bicubic(table.reshape(grid, grid, -1), (grid_height, grid_width))
            table = table.reshape(grid_height * grid_width, -1)
        if self.config.class_token:
            table = mx.concatenate([class_position, table])
        return table

    def __call__(self, pixels: mx.array) -> mx.array:
        """pixels [B, H, W, 3], normalized -> patch features [B, (H // patch) * (W // patch),
        width] at `feature_layer`, CLS dropped unless kept (then first: one more token);
        several feature layers concatenate their features (width each). Like PyTorch's conv,
        the patch embedding drops a remainder (SigLIP so400m-patch14-384 runs at 384 on a
        27x27 grid)."""
        x = self.patch_embed(pixels)
        if self.config.conv_channels:
            x = x + self.conv_embed(pixels)
        return self.encode(x)

    def encode(self, x: mx.array) -> mx.array:
        """Patch embeddings [B, grid height, grid width, width] -> features, as `__call__`."""
        batch, grid_height, grid_width, width = x.shape
        x = x.reshape(batch, grid_height * grid_width, width)
        if self.config.class_token:
            cls = mx.broadcast_to(self.class_embedding.astype(x.dtype), (batch, 1, width))
            x = mx.concatenate([cls, x], axis=1)
        x = x + self.position_embeddings(grid_height, grid_width)
        if self.config.pre_norm:
            x = self.ln_pre(x)
        hidden_states = [x]
        for block in self.blocks[: self.num_blocks_run]:
            run = nn.utils.checkpoint(block) if self.checkpoint_blocks else block
            hidden_states.append(run(hidden_states[-1]))
        features = [self.features(hidden_states[i]) for i in feature_states(self.config)]
        return features[0] if len(features) == 1 else mx.concatenate(features, axis=-1)

    def features(self, hidden: mx.array) -> mx.array:
        """One hidden state's features for the connector."""
        if self.config.class_token and not self.config.keep_class_token:
            hidden = hidden[:, 1:]
        return self.ln_post(hidden) if self.config.feature_post_norm else hidden


def feature_states(config: VisionConfig) -> list[int]:
    """The indices into the hidden states (0: the embeddings) of config's feature layers."""
    layers = config.feature_layers
    if not layers:
        raise ValueError("vision feature_layer is an empty list")
    for layer in layers:
        if not -config.layers - 1 <= layer <= config.layers:
            raise ValueError(
                f"vision feature_layer {layer} is outside "
                f"[{-config.layers - 1}, {config.layers}] for {config.layers} layers"
            )
    return [layer % (config.layers + 1) for layer in layers]
