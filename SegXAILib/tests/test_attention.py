"""Attention-gate maps against the gate's formula recomputed from its hooked inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from SegXAILib.explain.attention import AttentionGateMaps, attention_gates
from SegXAILib.explain.base import ExplainContext, NotApplicable
from SegXAILib.models.card import ModelCard
from SegXAILib.models.loaders import load_from_card

from .conftest import make_card

ATTENTION_ARCH = {"name": "attention_unet", "args": {"channels": [4, 8, 16], "strides": [2, 2]}}


@pytest.fixture
def attention_model(tmp_path):
    model = load_from_card(ModelCard.load(make_card(tmp_path, architecture=ATTENTION_ARCH)))
    # fresh batch norms have running mean 0 / var 1 (nearly the identity): give them real statistics
    generator = torch.Generator().manual_seed(3)
    for m in model.network.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=generator) * 2)
    return model


def context_for(model, image):
    return ExplainContext(model=model, image=image, target="lesion", channels=[1, 2],
                          probabilities=np.full((3, *image.shape[2:]), 1 / 3, np.float32))


def batch_norm_eval(bn, y):
    shape = (1, -1, 1, 1, 1)
    return ((y - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
            * bn.weight.view(shape) + bn.bias.view(shape))


def gate_psi(gate, g, x):
    """psi = sigmoid(BN(conv(ReLU(BN(W_g g) + BN(W_x x))))) written out with the gate's parameters."""
    def conv_bn(seq, z):
        return batch_norm_eval(seq[1], F.conv3d(z, seq[0].conv.weight, seq[0].conv.bias))
    hidden = torch.relu(conv_bn(gate.W_g, g) + conv_bn(gate.W_x, x))
    return torch.sigmoid(conv_bn(gate.psi, hidden))


def test_gate_maps_equal_the_gate_formula_on_hooked_inputs(attention_model):
    network = attention_model.network
    image = torch.randn(1, 1, 16, 16, 16)  # one window (the card's patch)
    gates = [gate for _, gate in attention_gates(network)]
    assert len(gates) == 2
    inputs = {}
    hooks = [gate.register_forward_pre_hook(lambda m, args, kwargs: inputs.__setitem__(m, kwargs), with_kwargs=True)
             for gate in gates]
    with torch.no_grad():
        network(image)
        reference = [gate_psi(gate, inputs[gate]["g"], inputs[gate]["x"]) for gate in gates]
    for h in hooks:
        h.remove()
    assert [tuple(r.shape[2:]) for r in reference] == [(16, 16, 16), (8, 8, 8)]  # finest gate first
    upsampled = [F.interpolate(r, size=(16, 16, 16), mode="trilinear", align_corners=False)[0, 0].numpy()
                 for r in reference]

    result = AttentionGateMaps().explain(context_for(attention_model, image))
    maps = {m.variant: m.array for m in result.maps}
    assert set(maps) == {None, "level1", "level2"}
    for n, expected in enumerate(upsampled, start=1):
        level = maps[f"level{n}"]
        assert level.shape == (16, 16, 16) and level.dtype == np.float32
        assert level.min() >= 0 and level.max() <= 1
        assert np.allclose(level, expected, atol=1e-5)
        assert level.std() > 0.01  # a real map, not a constant 0.5
    assert np.allclose(maps[None], (upsampled[0] + upsampled[1]) / 2, atol=1e-5)
    assert result.metadata["native_shapes"] == [[16, 16, 16], [8, 8, 8]]
    assert not any(m._forward_hooks for m in network.modules())  # hooks removed


def test_gate_maps_are_stitched_over_windows_for_a_large_image(attention_model):
    shape = (24, 32, 20)
    image = torch.randn(1, 1, *shape)
    maps = {m.variant: m.array for m in AttentionGateMaps().explain(context_for(attention_model, image)).maps}
    assert all(m.shape == shape and np.isfinite(m).all() and m.min() >= 0 and m.max() <= 1 for m in maps.values())
    # away from window borders a window sees the same as the whole volume: compare with one whole forward
    captured = []
    hook = attention_model.network.model[1].attention.psi[-1].register_forward_hook(
        lambda m, i, out: captured.append(out))
    with torch.no_grad():
        attention_model.network(image)
    hook.remove()
    whole = captured[0][0, 0].numpy()
    assert np.corrcoef(whole.ravel(), maps["level1"].ravel())[0, 1] > 0.9


def test_not_applicable_without_attention_gates(tmp_path):
    model = load_from_card(ModelCard.load(make_card(tmp_path)))  # plain MONAI UNet
    with pytest.raises(NotApplicable, match="no attention gates"):
        AttentionGateMaps().check_applicable(model)
