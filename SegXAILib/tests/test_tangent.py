"""The written-out derivatives of models/tangent.py against torch.func.jvp, layer by layer and for a
whole MONAI decoder block."""

from __future__ import annotations

import pytest
import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn
from torch.func import jvp

from SegXAILib.models.tangent import linearize, linearize_from_channel


def _reference(module: nn.Module, x: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    return torch.stack([jvp(module, (x,), (d,))[1] for d in directions])


def _batch_norm() -> nn.Module:
    norm = nn.BatchNorm3d(4, affine=True)
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.weight.uniform_(0.5, 2)
    return norm


LAYERS = {
    "conv": lambda: nn.Conv3d(4, 3, 3, padding=1),
    "strided conv": lambda: nn.Conv3d(4, 3, 3, stride=2, padding=1),
    "transposed conv": lambda: nn.ConvTranspose3d(4, 3, 3, stride=2, padding=1, output_padding=1),
    "instance norm": lambda: nn.InstanceNorm3d(4),
    "affine instance norm": lambda: nn.InstanceNorm3d(4, affine=True),
    "batch norm (eval)": _batch_norm,
    "dropout (eval)": lambda: nn.Dropout(0.5),
    "relu": nn.ReLU,
    "prelu": nn.PReLU,
    "prelu per channel": lambda: nn.PReLU(4, init=0.1),
    "other (jvp fallback)": nn.Sigmoid,
    "monai convolution": lambda: Convolution(3, 4, 3, strides=2, is_transposed=True, act="PRELU", norm="INSTANCE",
                                             dropout=0.1),
    "monai residual unit": lambda: ResidualUnit(3, 4, 5, subunits=2, act="PRELU", norm="INSTANCE"),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_linear_map_equals_jvp(name: str) -> None:
    torch.manual_seed(0)
    module = LAYERS[name]().eval()
    x = torch.randn(2, 4, 6, 7, 5)
    directions = torch.randn(3, *x.shape)
    with torch.no_grad():
        value, derivative = linearize(module, x)
        torch.testing.assert_close(value, module(x))
        torch.testing.assert_close(derivative(directions), _reference(module, x, directions), rtol=1e-4, atol=1e-5)


def test_a_unet_decoder_block_and_its_linearity() -> None:
    torch.manual_seed(1)
    block = nn.Sequential(
        Convolution(3, 8, 4, strides=2, is_transposed=True, act="PRELU", norm="INSTANCE", dropout=0.1),
        ResidualUnit(3, 4, 4, subunits=1, act="PRELU", norm="INSTANCE", dropout=0.1)).eval()
    x = torch.randn(1, 8, 5, 5, 5)
    directions = torch.randn(4, *x.shape)
    with torch.no_grad():
        _, derivative = linearize(block, x)
        expected = _reference(block, x, directions)
        torch.testing.assert_close(derivative(directions), expected, rtol=1e-4, atol=1e-5)
        # a linear map: the derivative along a combination is the combination of derivatives
        combined = derivative((2 * directions[0] - directions[1])[None])[0]
        torch.testing.assert_close(combined, 2 * expected[0] - expected[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("first", ["transposed conv", "conv", "other (jvp fallback)"])
def test_tangents_in_the_last_channels_only(first: str) -> None:
    # a decoder block reads cat(skip, stream) and only the stream moves: the map takes the stream's
    # channels and must equal the full map on tangents that are zero in the skip's
    torch.manual_seed(2)
    lead = {"transposed conv": nn.ConvTranspose3d(6, 4, 3, stride=2, padding=1, output_padding=1),
            "conv": nn.Conv3d(6, 4, 3, padding=1), "other (jvp fallback)": nn.Sigmoid()}[first]
    block = nn.Sequential(nn.Sequential(lead, nn.InstanceNorm3d(4 if first != "other (jvp fallback)" else 6)),
                          nn.PReLU()).eval()
    x = torch.randn(1, 6, 5, 6, 4)
    stream = torch.randn(3, 1, 4, 5, 6, 4)  # tangents of channels 2..5
    with torch.no_grad():
        value, derivative = linearize_from_channel(block, x, 2)
        full = torch.cat([torch.zeros(3, 1, 2, 5, 6, 4), stream], dim=2)
        torch.testing.assert_close(value, block(x))
        torch.testing.assert_close(derivative(stream), _reference(block, x, full), rtol=1e-4, atol=1e-5)
