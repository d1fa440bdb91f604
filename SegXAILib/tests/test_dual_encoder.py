"""Dual-encoder network (gate formula, variants, CNN-only path) and its fusion maps against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from SegXAILib.errors import SegXAIError
from SegXAILib.explain.attention import AttentionGateMaps, attention_gates
from SegXAILib.explain.base import NotApplicable
from SegXAILib.explain.fusion import FusionMaps, fusion_gates
from SegXAILib.methods import get_explainer
from SegXAILib.models.card import ModelCard
from SegXAILib.models.dual_encoder import DualEncoderUNet, FusionGate
from SegXAILib.models.loaders import load_from_card
from SegXAILib.models.networks import build_network

from .conftest import explain_context, make_card

# widths 2, 4, 8, 16 on grids S .. S/8; two Swin stages: fused levels at S/4 and S/8
TINY_ARGS = {"feature_size": 2, "depths": [1, 1], "blocks": [1, 1, 1], "window_size": 2}


def randomise_batch_norms(network: nn.Module, seed: int = 3) -> nn.Module:
    """Fresh batch norms are nearly the identity in eval mode: give them real statistics."""
    generator = torch.Generator().manual_seed(seed)
    for m in network.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=generator) * 2)
    return network


def tiny_network(fusion: str = "swin_guided", seed: int = 0) -> DualEncoderUNet:
    torch.manual_seed(seed)
    network = build_network({"name": "dual_encoder", "args": {**TINY_ARGS, "fusion": fusion}}, 1, 3)
    return randomise_batch_norms(network).eval()


def batch_norm_eval(bn: nn.BatchNorm3d, y: torch.Tensor) -> torch.Tensor:
    shape = (1, -1, 1, 1, 1)
    return ((y - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
            * bn.weight.view(shape) + bn.bias.view(shape))


def gate_psi(gate: FusionGate, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """psi = sigmoid(Conv(ReLU(BN(Conv g) + BN(Conv x)))) written out with the gate's parameters."""
    def conv_bn(seq, z):
        return batch_norm_eval(seq[1], F.conv3d(z, seq[0].weight, seq[0].bias))
    hidden = torch.relu(conv_bn(gate.w_g, g) + conv_bn(gate.w_x, x))
    return torch.sigmoid(F.conv3d(hidden, gate.coefficient.conv.weight, gate.coefficient.conv.bias))


def run_hooked(network: DualEncoderUNet, image: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Logits and, per gate (module order), its inputs g and x, its psi and its output."""
    records: list[dict[str, torch.Tensor]] = [{} for _ in network.gates]
    handles = []
    for record, gate in zip(records, network.gates):
        handles.append(gate.register_forward_hook(
            lambda m, args, kwargs, out, r=record: r.update(g=kwargs["g"], x=kwargs["x"], fused=out), with_kwargs=True))
        handles.append(gate.coefficient.register_forward_hook(lambda m, args, out, r=record: r.update(psi=out)))
    try:
        with torch.no_grad():
            logits = network(image)
    finally:
        for handle in handles:
            handle.remove()
    return logits, records


@pytest.mark.parametrize("fusion", ["swin_guided", "cnn_guided"])
def test_gates_mix_the_two_paths_by_psi(fusion):
    network = tiny_network(fusion)
    image = torch.randn(1, 1, 32, 32, 32)
    logits, records = run_hooked(network, image)
    assert logits.shape == (1, 3, 32, 32, 32)
    with torch.no_grad():
        _, cnn, swin = network.encode(image)
    assert [tuple(r["psi"].shape) for r in records] == [(1, 1, 8, 8, 8), (1, 1, 4, 4, 4)]  # finest first
    for level, r in enumerate(records):
        psi = r["psi"]
        assert psi.min() >= 0 and psi.max() <= 1 and psi.std() > 0.01
        assert torch.allclose(psi, gate_psi(network.gates[level], r["g"], r["x"]), atol=1e-6)
        assert torch.allclose(r["fused"], psi * r["x"] + (1 - psi) * r["g"], atol=1e-6)
        # the wiring: which projected encoder output is the gating signal and which is mixed by psi
        gating, mixed = (swin, cnn) if fusion == "swin_guided" else (cnn, swin)
        assert torch.equal(r["g"], gating[level]) and torch.equal(r["x"], mixed[level])
        assert network.gates[level].x_path == ("cnn" if fusion == "swin_guided" else "swin")


def test_psi_forced_to_one_gives_the_cnn_only_path():
    network = tiny_network("swin_guided")
    image = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        learned = network(image)
        cnn_only = network.single_path_forward(image, "cnn")
        network.force_psi = 1.0
        forced = network(image)
        _, records = run_hooked(network, image)
        # the CNN-only path must not see the transformer at all
        for p in network.swin.parameters():
            p.add_(torch.randn_like(p))
        network.force_psi = None
        assert torch.allclose(network.single_path_forward(image, "cnn"), cnn_only, atol=1e-6)
        assert not torch.allclose(network(image), learned, atol=1e-3)
    assert all(torch.equal(r["psi"], torch.ones_like(r["psi"])) for r in records)  # hooks see the psi used
    assert torch.allclose(forced, cnn_only, atol=1e-6)
    assert not torch.allclose(learned, cnn_only, atol=1e-3)  # the learned gates do mix in the Swin path


def test_cnn_guided_psi_weighs_the_swin_path():
    network = tiny_network("cnn_guided")
    image = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        network.force_psi = 1.0
        assert torch.allclose(network(image), network.single_path_forward(image, "swin"), atol=1e-6)
        network.force_psi = 0.0
        assert torch.allclose(network(image), network.single_path_forward(image, "cnn"), atol=1e-6)
    assert network.force_psi == 0.0


def test_variants_differ_exactly_by_the_gates():
    nets = {fusion: tiny_network(fusion) for fusion in ("swin_guided", "cnn_guided", "none")}
    keys = {fusion: set(net.state_dict()) for fusion, net in nets.items()}
    assert keys["swin_guided"] == keys["cnn_guided"]
    assert keys["none"] < keys["swin_guided"]
    assert all(k.startswith("gates.") for k in keys["swin_guided"] - keys["none"])
    counts = {fusion: sum(p.numel() for p in net.parameters()) for fusion, net in nets.items()}
    gate_parameters = sum(p.numel() for _, gate in fusion_gates(nets["swin_guided"]) for p in gate.parameters())
    assert counts["swin_guided"] == counts["cnn_guided"] == counts["none"] + gate_parameters > counts["none"]

    plain = nets["none"]
    assert fusion_gates(plain) == [] and len(plain.gates) == 0
    with pytest.raises(SegXAIError, match="no psi"):
        plain.force_psi = 1.0
    image = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        skips, cnn, swin = plain.encode(image)
        assert torch.allclose(plain(image), plain.decode(skips + [(c + s) / 2 for c, s in zip(cnn, swin)]), atol=1e-6)


def test_fusion_gates_are_not_attention_gates(tmp_path):
    network = tiny_network()
    assert len(fusion_gates(network)) == 2
    assert attention_gates(network) == []  # the gates mix two paths; their maps are the fusion method's
    context = explain_context(network, torch.randn(1, 1, 16, 16, 16), architecture="dual_encoder")
    with pytest.raises(NotApplicable, match="no attention gates"):
        AttentionGateMaps().check_applicable(context.model)


@pytest.mark.parametrize("fusion", ["swin_guided", "cnn_guided"])
def test_fusion_maps_equal_the_hooked_psi_in_one_window(fusion):
    network = tiny_network(fusion)
    image = torch.randn(1, 1, 32, 32, 32)  # one window: the card's patch is the image
    _, records = run_hooked(network, image)
    upsampled = [F.interpolate(r["psi"], size=(32, 32, 32), mode="trilinear", align_corners=False)[0, 0].numpy()
                 for r in records]

    result = get_explainer("fusion").explain(explain_context(network, image, architecture="dual_encoder"))
    maps = {m.variant: m for m in result.maps}
    assert set(maps) == {f"{path}-share{level}" for path in ("cnn", "swin") for level in ("", "-level1", "-level2")}
    psi_path, other = ("cnn", "swin") if fusion == "swin_guided" else ("swin", "cnn")
    for n, expected in enumerate(upsampled, start=1):
        assert np.allclose(maps[f"{psi_path}-share-level{n}"].array, expected, atol=1e-5)
        assert np.allclose(maps[f"{other}-share-level{n}"].array, 1 - expected, atol=1e-5)
    assert np.allclose(maps[f"{psi_path}-share"].array, (upsampled[0] + upsampled[1]) / 2, atol=1e-5)
    assert "local CNN path" in maps["cnn-share-level1"].description
    assert "global Swin transformer path" in maps["swin-share"].description
    assert not any(m.normalise for m in result.maps)
    assert result.metadata["native_shapes"] == [[8, 8, 8], [4, 4, 4]]
    assert result.metadata["psi_is_share_of"] == psi_path
    assert not any(m._forward_hooks for m in network.modules())  # hooks removed


def test_fusion_maps_are_stitched_over_windows_for_a_large_image(tmp_path):
    card = make_card(tmp_path, architecture={"name": "dual_encoder", "args": TINY_ARGS})  # patch 16^3
    model = load_from_card(ModelCard.load(card))  # the safetensors round trip of every weight and buffer
    randomise_batch_norms(model.network)
    shape = (24, 40, 32)  # several 16^3 windows in every direction
    image = torch.randn(1, 1, *shape)
    context = explain_context(model.network, image, patch=[16, 16, 16], architecture="dual_encoder")
    maps = {m.variant: m.array for m in FusionMaps().explain(context).maps}
    assert len(maps) == 6
    for variant, array in maps.items():
        assert array.shape == shape and array.dtype == np.float32 and np.isfinite(array).all()
        assert array.min() >= 0 and array.max() <= 1 and array.std() > 0.005, variant
    for level in ("", "-level1", "-level2"):
        assert np.allclose(maps[f"cnn-share{level}"] + maps[f"swin-share{level}"], 1, atol=1e-6)
    # away from window borders a window sees much of what the whole volume does: compare the finest level
    _, records = run_hooked(model.network, image)
    whole = F.interpolate(records[0]["psi"], size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()
    assert np.corrcoef(whole.ravel(), maps["cnn-share-level1"].ravel())[0, 1] > 0.9


def test_not_applicable_without_fusion_gates(tmp_path):
    model = load_from_card(ModelCard.load(make_card(tmp_path)))  # plain MONAI UNet
    with pytest.raises(NotApplicable, match="architecture 'dual_encoder'"):
        FusionMaps().check_applicable(model)
    with pytest.raises(NotApplicable, match="no fusion gates"):
        FusionMaps().check_applicable(explain_context(tiny_network("none"), torch.randn(1, 1, 16, 16, 16)).model)


def test_default_network_from_the_architecture_table():
    network = build_network({"name": "dual_encoder", "args": {}}, 1, 4).eval()
    assert isinstance(network, DualEncoderUNet) and network.fusion == "swin_guided"
    assert sum(p.numel() for p in network.parameters()) < 3_000_000
    assert network.downsampling == 16
    with torch.no_grad():
        assert network(torch.randn(1, 1, 48, 48, 48)).shape == (1, 4, 48, 48, 48)
        with pytest.raises(SegXAIError, match="multiple of 16"):
            network(torch.randn(1, 1, 48, 40, 48))


@pytest.mark.parametrize("args, message", [
    ({"fusion": "concat"}, "unknown dual-encoder fusion"),
    ({"depths": [1, 1, 1, 1, 1], "blocks": [1] * 6}, "1 to 4"),
    ({"blocks": [1, 1, 1]}, "blocks must give"),
    ({"blocks": [1, 0, 1, 1]}, "blocks must give"),
    ({"num_heads": [3, 3, 3]}, "num_heads"),
    ({"num_heads": [1, 2]}, "num_heads"),
    ({"channels": [4, 8]}, "invalid arguments"),
])
def test_bad_arguments_are_user_errors(args, message):
    with pytest.raises(SegXAIError, match=message):
        build_network({"name": "dual_encoder", "args": args}, 1, 4)
