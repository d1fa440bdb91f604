"""A 3D LinkNet (Chaurasia and Culurciello 2017, in 3D), written as deepbet's TorchScript networks are built.

deepbet ships its brain-extraction networks as TorchScript only (``fastmri.models.linknet3d.LinkNet3d``, traced).
This eager copy has the same modules under the same names, so the archive's tensors, read without running its
code (:mod:`SegXAILib.models.archive`), load into it strictly, and its output equals the TorchScript's; being
eager, it takes forward hooks, so the layer methods (Grad-CAM, ...) apply.

Layout (``channels`` = (16, 32, 64, 128), every convolution followed by an InstanceNorm without affine
parameters and a ReLU unless said otherwise):

- ``init``: 7^3 convolution of stride 2 (no bias), then a 3^3 max-pool of stride 2;
- ``down0..3``: two residual blocks each (two 3^3 convolutions, the second without ReLU, plus the input; a
  ReLU after the sum); the first block of ``down1..3`` has stride 2 and a strided 1^3 convolution on its skip;
- ``up0..3``: a 1^3 convolution to a quarter of the channels, a 3^3 transposed convolution (stride 2; 1 for
  ``up3``), a 1^3 convolution to the next level's channels; each up block's output is added to the encoder
  output of its resolution;
- ``tp_conv1`` (3^3 transposed, stride 2, 8 channels, bias), ``conv`` (3^3, 8 channels, bias) and ``tp_conv2``
  (2^3 transposed, stride 2, to the classes, bias, no norm) back to the input's resolution; a softmax over the
  classes when ``softmax`` (deepbet's networks end with one: their card says ``"output": "probabilities"``).

Input sizes must be multiples of 32.
"""

from __future__ import annotations

import torch
from torch import nn


def _norm_relu(channels: int, relu: bool = True) -> list[nn.Module]:
    return [nn.InstanceNorm3d(channels), *([nn.ReLU()] if relu else [])]


class Block(nn.Module):
    """Residual block: conv-norm-ReLU-conv-norm plus the (downsampled) input, then a ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, 3, stride, 1, bias=False), *_norm_relu(out_channels),
            nn.Conv3d(out_channels, out_channels, 3, 1, 1, bias=False), *_norm_relu(out_channels, relu=False))
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv3d(in_channels, out_channels, 1, stride, 0, bias=False),
                                            nn.InstanceNorm3d(out_channels))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.downsample(x) if hasattr(self, "downsample") else x
        return self.act(self.double_conv(x) + skip)


class Down(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.block1 = Block(in_channels, out_channels, stride)
        self.block2 = Block(out_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(x))


class Up(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        middle = in_channels // 4
        self.conv1 = nn.Sequential(nn.Conv3d(in_channels, middle, 1, bias=False), *_norm_relu(middle))
        self.tp_conv = nn.Sequential(
            nn.ConvTranspose3d(middle, middle, 3, stride, 1, output_padding=stride - 1, bias=False),
            *_norm_relu(middle))
        self.conv2 = nn.Sequential(nn.Conv3d(middle, out_channels, 1, bias=False), *_norm_relu(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.tp_conv(self.conv1(x)))


class LinkNet3d(nn.Module):
    """See the module docstring; ``forward`` maps (N, in_channels, D, H, W) to (N, out_channels, D, H, W)."""

    def __init__(self, in_channels: int = 1, out_channels: int = 2, channels: tuple[int, ...] = (16, 32, 64, 128),
                 head_channels: int = 8, softmax: bool = True) -> None:
        super().__init__()
        c = list(channels)
        if len(c) != 4:
            raise ValueError(f"channels must be four numbers (one per encoder level), got {channels}")
        self.softmax = softmax
        self.init = nn.Sequential(nn.Conv3d(in_channels, c[0], 7, 2, 3, bias=False), *_norm_relu(c[0]),
                                  nn.MaxPool3d(3, 2, 1))
        self.down0, self.down1 = Down(c[0], c[0], 1), Down(c[0], c[1], 2)
        self.down2, self.down3 = Down(c[1], c[2], 2), Down(c[2], c[3], 2)
        self.up0, self.up1 = Up(c[3], c[2], 2), Up(c[2], c[1], 2)
        self.up2, self.up3 = Up(c[1], c[0], 2), Up(c[0], c[0], 1)
        self.tp_conv1 = nn.Sequential(nn.ConvTranspose3d(c[0], head_channels, 3, 2, 1, output_padding=1),
                                      *_norm_relu(head_channels))
        self.conv = nn.Sequential(nn.Conv3d(head_channels, head_channels, 3, 1, 1), *_norm_relu(head_channels))
        self.tp_conv2 = nn.ConvTranspose3d(head_channels, out_channels, 2, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.init(x)
        x1 = self.down0(x0)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        y = self.up0(self.down3(x3)) + x3
        y = self.up1(y) + x2
        y = self.up2(y) + x1
        y = self.up3(y) + x0
        y = self.tp_conv2(self.conv(self.tp_conv1(y)))
        return torch.softmax(y, 1) if self.softmax else y


def build_linknet3d(in_channels: int, out_channels: int, channels=(16, 32, 64, 128), head_channels: int = 8,
                    softmax: bool = True) -> nn.Module:
    """The ``linknet3d`` architecture of a model card (deepbet's networks: the defaults)."""
    return LinkNet3d(in_channels, out_channels, tuple(channels), head_channels, softmax)
