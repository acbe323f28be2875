"""Faithful PyTorch references for the tests (timm and open_clip do not import here).

Honeybee's CAbstractor built from timm's RegNet pieces (honeybee/projectors.py,
timm/models/regnet.py, timm/layers): its state dict has the key names of real Honeybee
checkpoints.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from mm1_mlx.config import ConnectorConfig


class LayerNormAct2d(nn.LayerNorm):
    """timm's LayerNormAct2d, what ConvNormAct makes of Honeybee's LayerNorm2d (eps 1e-5)."""

    def __init__(self, channels: int, act: bool):
        super().__init__(channels, eps=1e-5)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x):
        x = F.layer_norm(
            x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps
        )
        return self.act(x.permute(0, 3, 1, 2))


class ConvNormAct(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kernel_size=1, groups=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(
            in_chs, out_chs, kernel_size, padding=kernel_size // 2, groups=groups, bias=False
        )
        self.bn = LayerNormAct2d(out_chs, act)

    def forward(self, x):
        return self.bn(self.conv(x))


class SEModule(nn.Module):
    def __init__(self, channels: int, rd_channels: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1)
        self.bn = nn.Identity()
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(rd_channels, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        x_se = self.act(self.bn(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * self.gate(self.fc2(x_se))


class Bottleneck(nn.Module):
    """timm RegNet Bottleneck with bottle_ratio 1, group_size 1, se_ratio 0.25."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv1 = ConvNormAct(in_chs, out_chs)
        self.conv2 = ConvNormAct(out_chs, out_chs, 3, groups=out_chs)
        self.se = SEModule(out_chs, int(round(in_chs * 0.25)))
        self.conv3 = ConvNormAct(out_chs, out_chs, act=False)
        self.act3 = nn.SiLU()
        self.downsample = (
            ConvNormAct(in_chs, out_chs, act=False) if in_chs != out_chs else nn.Identity()
        )

    def forward(self, x):
        shortcut = x
        x = self.conv3(self.se(self.conv2(self.conv1(x))))
        return self.act3(x + self.downsample(shortcut))


class RegStage(nn.Module):
    def __init__(self, depth: int, in_chs: int, out_chs: int):
        super().__init__()
        for i in range(depth):
            self.add_module(f"b{i + 1}", Bottleneck(in_chs if i == 0 else out_chs, out_chs))

    def forward(self, x):
        for block in self.children():
            x = block(x)
        return x


def build_mlp(depth: int, hidden_size: int, output_hidden_size: int) -> nn.Sequential:
    layers = [nn.Linear(hidden_size, output_hidden_size)]
    for _ in range(1, depth):
        layers += [nn.SiLU(), nn.Linear(output_hidden_size, output_hidden_size)]
    return nn.Sequential(*layers)


def resized_pos_emb(pos_emb: torch.Tensor, num_tokens: int) -> torch.Tensor:
    src, dst = math.isqrt(pos_emb.shape[1]), math.isqrt(num_tokens)
    if src == dst:
        return pos_emb
    grid = pos_emb.reshape(1, src, src, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, num_tokens, -1)


class HoneybeeCAbstractor(nn.Module):
    """Honeybee's CAbstractor (depth 0: net is just the pooling), plus bicubic pos_emb resizing."""

    def __init__(self, c: ConnectorConfig):
        super().__init__()
        self.pos_emb = (
            nn.Parameter(torch.randn(1, c.num_input_tokens, c.input_dim)) if c.pos_emb else None
        )
        side = math.isqrt(c.num_tokens)
        sampler = nn.AdaptiveAvgPool2d((side, side))
        if c.depth:
            s1 = RegStage(c.depth, c.input_dim, c.hidden_dim)
            self.net = nn.Sequential(s1, sampler, RegStage(c.depth, c.hidden_dim, c.hidden_dim))
            self.readout = build_mlp(c.mlp_depth, c.hidden_dim, c.output_dim)
        else:
            self.net = sampler
            self.readout = build_mlp(c.mlp_depth, c.input_dim, c.output_dim)
        with torch.no_grad():  # LayerNorm affines away from (1, 0), so that they matter
            for name, param in self.named_parameters():
                if ".bn." in name:
                    param.copy_(torch.randn_like(param) * 0.5 + name.endswith("weight"))

    def forward(self, x):
        if self.pos_emb is not None:
            x = x + resized_pos_emb(self.pos_emb, x.shape[1])
        return self.abstract(x)

    def abstract(self, x):
        """net and readout on the patch tokens (Honeybee's ConvProjector._forward)."""
        batch, num_tokens, channels = x.shape
        side = math.isqrt(num_tokens)
        x = self.net(x.transpose(1, 2).reshape(batch, channels, side, side))
        return self.readout(x.flatten(2).transpose(1, 2))
