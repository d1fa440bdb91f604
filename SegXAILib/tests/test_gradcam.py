"""Seg-Grad-CAM and Grad-CAM++ against references computed another way, and layer resolution."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import AttentionUnet, UNet
from torch import nn

from SegXAILib.errors import SegXAIError
from SegXAILib.explain.base import NotApplicable
from SegXAILib.explain.gradcam import SegGradCAM, SegGradCAMPlusPlus
from SegXAILib.explain.layers import LayerCapture, conv_layers, frozen_parameters, layer_names, resolve_layers
from SegXAILib.methods import get_explainer
from SegXAILib.models.loaders import LoadedModel

from .conftest import explain_context


def tiny_unet(seed=0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return UNet(3, 1, 3, channels=(4, 8, 16), strides=(2, 2), **kwargs).eval()


def blob_image(shape=(16, 16, 16), seed=0) -> torch.Tensor:
    """A bright off-centre ball in noise, (1, 1, *shape)."""
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    ball = (grids[0] - 0.2) ** 2 + grids[1] ** 2 + (grids[2] + 0.3) ** 2 < 0.3
    noise = np.random.default_rng(seed).standard_normal(shape)
    return torch.from_numpy((2.0 * ball + 0.3 * noise).astype(np.float32))[None, None]


def make_context(network, image, channels=(1,), patch=None, options=None):
    return explain_context(network, image, channels, patch, options, architecture="unet")


def log_odds_score(logits, channels, region):
    """The target score written out: sum over ``region`` of logsumexp(target logits) - logsumexp(other logits),
    one value per example (SegXAILib.explain.targets)."""
    rest = [c for c in range(logits.shape[1]) if c not in channels]
    t = torch.logsumexp(logits[:, list(channels)], 1) - torch.logsumexp(logits[:, rest], 1)
    return (t * torch.as_tensor(region, dtype=t.dtype)).flatten(1).sum(1)


def brute_force(network, image, layer, channels, region, raw_logit=False):
    """Activation and gradient of the score at ``layer`` by a plain full backward pass on a copy (retain_grad);
    with ``raw_logit``, of the target logits summed over ``region`` instead of the log-odds."""
    network = copy.deepcopy(network)
    store = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        store["a"] = output

    handle = dict(network.named_modules())[layer].register_forward_hook(keep)
    logits = network(image)
    handle.remove()
    if raw_logit:
        (logits[:, list(channels)] * torch.as_tensor(region, dtype=logits.dtype)).sum().backward()
    else:
        log_odds_score(logits, channels, region).sum().backward()
    return store["a"].detach()[0].double().numpy(), store["a"].grad[0].double().numpy(), logits.detach()


def trilinear(cam: np.ndarray, shape) -> np.ndarray:
    """(d, h, w) -> shape, the documented convention (align_corners=False)."""
    return F.interpolate(torch.from_numpy(cam)[None, None], size=tuple(shape), mode="trilinear",
                         align_corners=False)[0, 0].numpy()


def assert_close(actual, expected, tol=1e-5):
    scale = float(np.abs(expected).max())
    assert scale > 0, "reference is all zero: the test would not check anything"
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("res_units, layer, region_options", [
    (0, "last_decoder", {}),  # half-resolution layer, predicted mask of a two-channel target
    (2, "model.2.0", {"box": [2, 11, 4, 16, 0, 9]}),  # full-resolution layer named explicitly, box region
])
def test_gradcam_equals_brute_force(res_units, layer, region_options):
    network = tiny_unet(num_res_units=res_units)
    image = blob_image()
    context = make_context(network, image, channels=(1, 2), options={"gradcam": {"layer": layer, **region_options}})
    if "box" in region_options:
        region = np.zeros(image.shape[2:], bool)
        region[2:11, 4:16, 0:9] = True
    else:
        region = np.isin(context.probabilities.argmax(0), [1, 2])
    name = resolve_layers(network, layer)[0][0]
    activation, gradient, logits = brute_force(network, image, name, [1, 2], region)

    alpha = gradient.mean(axis=(1, 2, 3))
    expected = trilinear(np.maximum(np.tensordot(alpha, activation, axes=1), 0), image.shape[2:])
    explanation = SegGradCAM().explain(context)

    (cam,) = explanation.maps
    assert cam.array.dtype == np.float32 and cam.array.shape == tuple(image.shape[2:])
    assert_close(cam.array, expected)
    assert cam.variant == (None if layer == "last_decoder" else "last-decoder-stage") and cam.layer == name
    assert explanation.metadata["layers"] == {layer: [name]}
    assert explanation.scalars["score"] == pytest.approx(float(log_odds_score(logits, [1, 2], region)[0]), rel=1e-5)
    assert explanation.scalars["region_voxels"] == region.sum()


@pytest.mark.parametrize("layer", ["last_decoder", "bottleneck"])
def test_gradcam_equals_captum_layer_gradcam(layer):
    from captum.attr import LayerAttribution, LayerGradCam

    torch.manual_seed(1)
    network = AttentionUnet(3, 1, 3, channels=(4, 8, 16), strides=(2, 2)).eval()
    image = blob_image(seed=1)
    context = make_context(network, image, options={"gradcam": {"layer": layer}})
    region = torch.from_numpy(context.predicted_mask).float()

    class MaskedScore(nn.Module):
        """Captum needs one scalar per example: the target's log-odds summed over the predicted mask."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return log_odds_score(self.net(x), [1], region)

    _, module = resolve_layers(network, layer)[0]
    attribution = LayerGradCam(MaskedScore(network), module).attribute(image, relu_attributions=True)
    expected = LayerAttribution.interpolate(attribution, tuple(image.shape[2:]), "trilinear")[0, 0].detach().numpy()
    assert attribution.shape[2:] != image.shape[2:] or layer == "last_decoder"

    assert_close(SegGradCAM().explain(context).maps[0].array, expected)


def shifted_output_layer(network: nn.Module, shift: float) -> None:
    """Add ``shift`` to every weight of a MONAI U-Net's output layer, the same for every class.

    Every logit gets the same extra term at each voxel, so the probabilities and every log-odds are unchanged,
    but each raw logit now falls with every feature of the last decoder stage (for ``shift`` well below the
    weights): the bundled demo U-Net's state, where Grad-CAM++ of the summed tumour logits was zero.
    """
    with torch.no_grad():
        network.model[2].conv.weight += shift  # ConvTranspose3d (skip + last decoder channels, classes, k, k, k)


def autograd_gradcampp(network, image, layer, region):
    """Grad-CAM++ from the actual derivatives of Y = exp(S), S the class-1 log-odds summed over ``region``.

    The layer's output A is made a leaf in float64; dY/dA comes from one backward pass with a graph, then, for
    each location (k, p) in turn, d2Y/dA_k(p)^2 from a backward pass of dY/dA_k(p) and d3Y/dA_k(p)^3 from a
    backward pass of that. Chattopadhay et al.'s eq. 10 then gives, per location in NumPy loops,
    a = D2 / (2 D2 + sum_q A_k(q) D3) (0 where that denominator is 0), w_k = sum_p a ReLU(dY/dA_k(p)) and the
    CAM ReLU(sum_k w_k A_k).

    Returns:
        the CAM divided by exp(S) (a factor all weights share, which SegXAI leaves out: it would underflow for a
        score of -1e5) on the layer's grid, exp(S), A (C, *grid) and dS/dA (C, *grid).
    """
    network = copy.deepcopy(network).double()
    store = {}

    def leaf(_module, _inputs, output):
        store["A"] = output.detach().requires_grad_()
        return store["A"]

    handle = dict(network.named_modules())[layer].register_forward_hook(leaf)
    logits = network(image.double())
    handle.remove()
    activation = store["A"]
    y = torch.exp(log_odds_score(logits, [1], region).sum())
    exp_score = float(y.detach())
    (dy,) = torch.autograd.grad(y, activation, create_graph=True)
    first = dy.reshape(-1)
    second, third = np.zeros(first.numel()), np.zeros(first.numel())
    for i in range(first.numel()):
        (row,) = torch.autograd.grad(first[i], activation, create_graph=True)
        second[i] = float(row.reshape(-1)[i].detach())
        (row3,) = torch.autograd.grad(row.reshape(-1)[i], activation, retain_graph=True, allow_unused=True)
        third[i] = 0.0 if row3 is None else float(row3.reshape(-1)[i])

    a_values = activation.detach()[0].numpy()
    channels = a_values.shape[0]
    first_np, second, third = (v.reshape(channels, -1) for v in (first.detach().numpy(), second, third))
    weights = np.zeros(channels)
    for k in range(channels):
        total = a_values[k].sum()
        for p in range(first_np.shape[1]):
            denominator = 2 * second[k, p] + total * third[k, p]
            alpha = second[k, p] / denominator if denominator != 0 else 0.0
            weights[k] += alpha * max(first_np[k, p], 0.0)
    cam = np.maximum(np.tensordot(weights, a_values, axes=1), 0) / exp_score
    return cam, exp_score, a_values, first_np.reshape(a_values.shape) / exp_score


@pytest.mark.parametrize("layer", ["last_decoder", "bottleneck"])
def test_gradcampp_equals_grad_cam_pp_of_autograd_derivatives(layer):
    """SegXAI's closed form against Grad-CAM++ computed from the second and third derivatives autograd takes.

    A two-class MONAI U-Net with batch norm (eval mode: affine) and PReLU is piecewise linear from the layer to
    the log-odds z_1 - z_0, where Chattopadhay et al.'s closed form is exact, so the two agree to float
    precision. From the bottleneck the derivatives pass through transposed convolutions, batch norm and PReLU.

    The output layer is shifted so that every raw logit falls with every feature of the last decoder stage (the
    demo U-Net's state, :func:`shifted_output_layer`). On the code that reported "score -107312.89, range 0
    to 0" the score was the summed raw target logit: every gradient at that layer was <= 0 (asserted below),
    ReLU(G) left no weight, the map was zero, and it fails the comparison with this reference's non-zero map
    (as does code whose weights, or whose score, differ from Grad-CAM++ of the log-odds).
    """
    torch.manual_seed(2)
    network = UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), norm="BATCH").eval()
    shifted_output_layer(network, -1.0)
    image = blob_image((12, 12, 12), seed=2)
    context = make_context(network, image, options={"gradcampp": {"layer": layer}})
    region = context.predicted_mask
    name = resolve_layers(network, layer)[0][0]

    expected, exp_score, activation, gradient = autograd_gradcampp(network, image, name, region)
    actual = SegGradCAMPlusPlus().explain(context).maps[0].array

    assert 1e-30 < exp_score < 1e300  # exp(S) itself is representable: its derivatives are neither 0 nor inf
    assert_close(actual, trilinear(expected, image.shape[2:]), tol=1e-4)
    plain = np.maximum(np.tensordot(gradient.mean(axis=(1, 2, 3)), activation, axes=1), 0)
    assert np.corrcoef(expected.ravel(), plain.ravel())[0, 1] < 0.999  # the weights differ from Grad-CAM's
    if layer == "last_decoder":  # the raw logit's gradients, which zeroed the map before scores were log-odds
        _, raw_logit_gradient, _ = brute_force(network, image, name, [1], region, raw_logit=True)
        assert raw_logit_gradient.max() <= 0 < -raw_logit_gradient.min()


def test_gradcampp_map_is_zero_and_says_why_when_no_feature_raises_the_score():
    network = PointwiseNet().eval()
    with torch.no_grad():  # class 1's log-odds fall with every (non-negative) feature of the last layer
        network.head.weight.abs_()
        network.head.weight[1] *= -1
    context = make_context(network, blob_image((8, 8, 8), seed=12), options={"gradcampp": {"region": "all"}})
    explanation = SegGradCAMPlusPlus().explain(context)
    (cam,) = explanation.maps
    assert cam.array.max() == 0
    assert "every gradient is zero or negative" in cam.description
    assert "zero everywhere" in explanation.metadata["note"]


class MaskedBlock(nn.Module):
    """Conv + ReLU whose channels 0-1 are zeroed outside a box; channels 2-3 are left everywhere."""

    def __init__(self, box: tuple[slice, ...], shape: tuple[int, ...]):
        super().__init__()
        self.conv = nn.Conv3d(4, 4, 3, padding=1)
        self.register_buffer("mask", torch.ones(1, 4, *shape))
        self.mask[:, :2] = 0
        self.mask[(slice(None), slice(0, 2), *box)] = 1

    def forward(self, x):
        return F.relu(self.conv(x)) * self.mask


class BoxOnlyNet(nn.Module):
    """Class 1's logits depend on the input only through channels 0-1 of ``middle`` inside one box.

    Channels 2-3 are active everywhere (and strongly on a bright distractor) but feed no class, so a map that
    ignored the gradients, or put the layer's grid in the wrong place, would fail the test. (The score is class
    1's log-odds, z_1 - z_0: a channel that fed class 0 would count too.)
    """

    def __init__(self, box: tuple[slice, ...]):
        super().__init__()
        torch.manual_seed(3)
        self.encoder = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AvgPool3d(2)
        self.middle = MaskedBlock(box, (8, 10, 12))
        self.head = nn.Conv3d(4, 2, 1)
        with torch.no_grad():
            self.head.weight[1].abs_()  # class 1 rises with channels 0-1 ...
            self.head.weight[:, 2:] = 0  # ... and no class reads channels 2-3

    def forward(self, x):
        return self.head(F.interpolate(self.middle(self.pool(self.encoder(x))), scale_factor=2.0, mode="nearest"))


def test_gradcam_maximum_lies_in_the_only_region_that_matters():
    box = (slice(1, 4), slice(5, 9), slice(2, 5))  # on the 8x10x12 grid -> k 2:8, j 10:18, i 4:10 on the input
    network = BoxOnlyNet(box).eval()
    image = blob_image((16, 20, 24), seed=3)
    image[0, 0, 12:15, 2:6, 15:20] += 5.0  # a brighter object outside the box must not attract the map
    context = make_context(network, image, options={"gradcam": {"region": "all"}, "gradcampp": {"region": "all"}})

    for explainer in (SegGradCAM(), SegGradCAMPlusPlus()):
        explanation = explainer.explain(context)
        cam = explanation.maps[0].array
        assert explanation.metadata["layers"] == {"last_decoder": ["middle"]}  # generic heuristics
        inside = np.zeros(cam.shape, bool)
        inside[2:8, 10:18, 4:10] = True
        assert inside[np.unravel_index(cam.argmax(), cam.shape)]
        near = np.zeros(cam.shape, bool)  # trilinear upsampling of the half-resolution map blurs by one voxel
        near[1:9, 9:19, 3:11] = True
        assert cam[~near].max() == 0 and cam[inside].max() > 0


class PointwiseNet(nn.Module):
    """1x1x1 convolutions only: every window sees exactly what the whole volume sees, so stitching is exact."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)  # a seed whose CAMs are not all zero after the ReLU
        self.encoder = nn.Sequential(nn.Conv3d(1, 6, 1), nn.ReLU())
        self.middle = nn.Sequential(nn.Conv3d(6, 6, 1), nn.ReLU())
        self.head = nn.Conv3d(6, 3, 1)

    def forward(self, x):
        return self.head(self.middle(self.encoder(x)))


@pytest.mark.parametrize("explainer", [SegGradCAM(), SegGradCAMPlusPlus()], ids=["gradcam", "gradcampp"])
def test_sliding_window_equals_whole_volume_when_stitching_is_exact(explainer):
    network = PointwiseNet().eval()
    image = blob_image((24, 12, 28), seed=4)  # larger than the patch in k and i, smaller (padded) in j
    options = {explainer.name: {}}
    whole = explainer.explain(make_context(network, image, options=options))
    windows = explainer.explain(make_context(network, image, patch=(16, 16, 16), options=options))

    assert not whole.metadata["sliding_window"] and windows.metadata["sliding_window"]
    assert_close(windows.maps[0].array, whole.maps[0].array)
    assert windows.scalars["score"] == pytest.approx(whole.scalars["score"], rel=1e-5)


class CoarsePointwiseNet(nn.Module):
    """A half-resolution layer ("middle") between 2x2x2 pooling and nearest upsampling, all else pointwise:
    windows starting on even voxels see exactly the whole volume's coarse features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(11)  # a seed whose CAM is not all zero after the ReLU
        self.encoder = nn.Sequential(nn.Conv3d(1, 6, 1), nn.ReLU(), nn.AvgPool3d(2))
        self.middle = nn.Sequential(nn.Conv3d(6, 6, 1), nn.ReLU())
        self.head = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv3d(6, 3, 1))

    def forward(self, x):
        return self.head(self.middle(self.encoder(x)))


@pytest.mark.parametrize("explainer", [SegGradCAM(), SegGradCAMPlusPlus()], ids=["gradcam", "gradcampp"])
def test_sliding_window_equals_whole_volume_at_a_coarse_layer(explainer):
    # window starts 0, 8 / 0, 12 and a padding of 2: all on the coarse grid, so stitching on the layer's
    # own grid is exact, and the CAM is upsampled after the ReLU in both cases
    network = CoarsePointwiseNet().eval()
    image = blob_image((24, 12, 28), seed=6)
    options = {explainer.name: {"layer": "middle"}}
    whole = explainer.explain(make_context(network, image, options=options))
    windows = explainer.explain(make_context(network, image, patch=(16, 16, 16), options=options))

    assert windows.metadata["sliding_window"] and windows.metadata["upsampling"] == whole.metadata["upsampling"]
    assert_close(windows.maps[0].array, whole.maps[0].array)


def test_sliding_window_close_to_whole_volume_on_a_unet():
    # batch norm in eval mode: windows are not renormalised (instance norm would change the network per window)
    network = tiny_unet(seed=5, num_res_units=2, norm="BATCH")
    image = blob_image((32, 32, 32), seed=5)
    whole = SegGradCAM().explain(make_context(network, image))
    windows = SegGradCAM().explain(make_context(network, image, patch=(16, 16, 16)))

    assert windows.metadata["sliding_window"] and windows.metadata["layers"] == {"last_decoder": ["model.2.0"]}
    assert np.corrcoef(whole.maps[0].array.ravel(), windows.maps[0].array.ravel())[0, 1] > 0.95


def test_no_parameter_gradients_no_graph_before_the_layer_and_network_unchanged():
    network = tiny_unet(seed=6)
    image = blob_image(seed=6)
    with torch.no_grad():
        before = network(image)
    flags = [p.requires_grad for p in network.parameters()]
    encoder_needs_grad = []
    probe = network.model[0].register_forward_hook(lambda m, i, o: encoder_needs_grad.append(o.requires_grad))
    options = {"gradcam": {"layer": "decoder_all,bottleneck"}}
    SegGradCAM().explain(make_context(network, image, options=options))
    SegGradCAMPlusPlus().explain(make_context(network, blob_image((24, 16, 16)), patch=(16, 16, 16)))
    probe.remove()

    assert encoder_needs_grad and not any(encoder_needs_grad)  # the graph starts at the hooked layer
    assert all(p.grad is None for p in network.parameters())
    assert [p.requires_grad for p in network.parameters()] == flags
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in network.modules())
    with torch.no_grad():
        assert torch.equal(network(image), before)


def test_decoder_all_is_the_mean_of_normalised_stage_maps():
    network = tiny_unet(seed=7, num_res_units=2)
    context = make_context(network, blob_image(seed=7),
                           options={"gradcam": {"layer": "decoder_all,model.1.submodule.2,model.2.0,last_decoder"}})
    context.spacing = (1.5, 1.5, 1.5)
    explanation = SegGradCAM().explain(context)
    maps = {m.variant: m for m in explanation.maps}

    assert list(maps) == ["all-decoder-stages", "decoder-stage", "last-decoder-stage"]  # last_decoder: a duplicate
    stages = [maps["decoder-stage"].array, maps["last-decoder-stage"].array]
    expected = np.mean([(s - s.min()) / (s.max() - s.min()) for s in stages], axis=0)
    assert explanation.metadata["layers"]["decoder_all"] == ["model.1.submodule.2", "model.2.0"]
    np.testing.assert_allclose(maps["all-decoder-stages"].array, expected, atol=1e-6)
    assert maps["all-decoder-stages"].layer == "model.1.submodule.2, model.2.0"
    assert maps["all-decoder-stages"].description.startswith(
        "Grad-CAM averaged over the 2 decoder stages (3 mm and 1.5 mm grids): ")
    assert maps["decoder-stage"].description.startswith("Grad-CAM at the decoder stage (3 mm grid): ")
    assert not any("model." in m.description for m in maps.values())


def test_layers_named_for_a_reader():
    network = UNet(3, 1, 3, (4, 8, 16, 32), (2, 2, 2)).eval()
    names = layer_names(network, ["model.1.submodule.2.conv"], spacing=(1.5, 1.5, 3.0))
    words = {name: (layer.words, layer.slug) for name, layer in names.items()}
    assert words == {  # this U-Net's last decoder stage runs at half resolution (the output conv is transposed)
        "model.0": ("encoder stage, 3 x 3 x 6 mm grid", "encoder-stage-3x3x6mm"),
        "model.1.submodule.0": ("encoder stage, 6 x 6 x 12 mm grid", "encoder-stage-6x6x12mm"),
        "model.1.submodule.1.submodule.0": ("encoder stage, 12 x 12 x 24 mm grid", "encoder-stage-12x12x24mm"),
        "model.1.submodule.1.submodule.1.submodule": ("bottleneck, 12 x 12 x 24 mm grid", "bottleneck"),
        "model.1.submodule.1.submodule.2": ("decoder stage, 6 x 6 x 12 mm grid", "decoder-stage"),
        "model.1.submodule.2": ("last decoder stage, 3 x 3 x 6 mm grid", "last-decoder-stage"),
        "model.1.submodule.2.conv": ("part of the last decoder stage, 3 x 3 x 6 mm grid",
                                     "part-of-the-last-decoder-stage")}
    assert layer_names(network, [])["model.0"].grid == "2x coarser grid"  # no spacing: the downsampling


@pytest.mark.parametrize("network, expected", [
    (UNet(3, 1, 3, (4, 8, 16, 32), (2, 2, 2)),
     {"last_decoder": ["model.1.submodule.2"], "bottleneck": ["model.1.submodule.1.submodule.1.submodule"],
      "decoder_all": ["model.1.submodule.1.submodule.2", "model.1.submodule.2"]}),
    (UNet(3, 1, 3, (4, 8, 16), (2, 2), num_res_units=2),
     {"last_decoder": ["model.2.0"], "bottleneck": ["model.1.submodule.1.submodule"],
      "decoder_all": ["model.1.submodule.2", "model.2.0"]}),
    (AttentionUnet(3, 1, 3, (4, 8, 16), (2, 2)),
     {"last_decoder": ["model.1.merge"], "bottleneck": ["model.1.submodule.1.submodule"],
      "decoder_all": ["model.1.submodule.1.merge", "model.1.merge"]}),
], ids=["unet", "residual_unet", "attention_unet"])
def test_layer_roles_on_monai_networks(network, expected):
    found = {role: [name for name, _ in resolve_layers(network, role)] for role in expected}
    assert found == expected
    assert all(not m._forward_hooks for m in network.modules())  # the probe's hooks are gone


def test_conv_layers_in_forward_order():
    names = [name for name, _ in conv_layers(AttentionUnet(3, 1, 3, (4, 8, 16), (2, 2)))]
    # AttentionLayer registers attention, upconv, merge, submodule but runs the submodule first
    assert names[:3] == ["model.0", "model.1.submodule.0", "model.1.submodule.1.submodule"]
    assert names.index("model.1.submodule.1.merge") < names.index("model.1.upconv") < names.index("model.1.merge")
    assert names[-1] == "model.1.merge" and "model.2" not in names  # the output layer is not a feature block


def test_layer_capture_substitutes_a_leaf_and_removes_its_hooks():
    network = tiny_unet(seed=8)
    module = dict(network.named_modules())["model.1.submodule.2"]
    with frozen_parameters(network), LayerCapture([module], leaf=True) as capture:
        assert not any(p.requires_grad for p in network.parameters())
        network(blob_image())
    (activation,) = capture.outputs
    assert activation.is_leaf and activation.requires_grad and not module._forward_hooks
    assert all(p.requires_grad for p in network.parameters())


def test_user_errors_and_torchscript():
    network = tiny_unet(seed=9)
    image = blob_image(seed=9)
    with pytest.raises(SegXAIError, match="no layer 'model.1.submodul.2'.*model.1.submodule.2"):
        SegGradCAM().explain(make_context(network, image, options={"gradcam": {"layer": "model.1.submodul.2"}}))
    with pytest.raises(SegXAIError, match="box"):
        SegGradCAM().explain(make_context(network, image, options={"gradcam": {"box": [0, 20, 0, 4, 0, 4]}}))
    assert all(not m._forward_hooks for m in network.modules())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated, but models still arrive as TorchScript
        scripted = torch.jit.trace(PointwiseNet(), image)
    model = LoadedModel(make_context(network, image).model.card, scripted, "torchscript")
    for name in ("gradcam", "gradcampp"):
        with pytest.raises(NotApplicable, match="TorchScript"):
            get_explainer(name).check_applicable(model)
    SegGradCAM().check_applicable(make_context(network, image).model)


def test_empty_predicted_mask_falls_back_to_the_whole_volume():
    network = tiny_unet(seed=10)
    context = make_context(network, blob_image(seed=10))
    context.probabilities = np.zeros_like(context.probabilities)
    context.probabilities[0] = 1  # background everywhere
    explanation = SegGradCAM().explain(context)
    assert explanation.metadata["region"] == "all" and "empty" in explanation.metadata["note"]
    assert explanation.scalars["region_voxels"] == 16**3


def test_layers_found_on_a_small_probe_unless_the_network_needs_its_window():
    """The probe is zeros of two input multiples (a 48^3 window: multiples of 16, a 32^3 probe) when the network
    runs on them; UNETR's position embedding fixes its input size, so its probe is the card's window (the scan's
    corner), and Grad-CAM runs."""
    from monai.networks.nets import UNETR

    from SegXAILib.explain.gradcam import probe_input

    image = blob_image((48, 48, 48), seed=4)
    unet = UNet(3, 1, 3, (4, 8, 16, 32), (2, 2, 2)).eval()
    probe = probe_input(make_context(unet, image))
    assert tuple(probe.shape) == (1, 1, 32, 32, 32) and not probe.any()

    torch.manual_seed(4)
    unetr = UNETR(1, 3, (48, 48, 48), feature_size=4, hidden_size=48, mlp_dim=96, num_heads=4).eval()
    with pytest.raises(RuntimeError):
        unetr(torch.zeros(1, 1, 32, 32, 32))
    context = explain_context(unetr, image, (1,), architecture="unetr")
    probe = probe_input(context)
    assert torch.equal(probe, image)
    assert SegGradCAM().explain(context).maps[0].array.max() > 0


def test_whole_scan_option_is_one_pass_over_a_scan_larger_than_the_patch():
    """``window: scan`` on a 20 x 24 x 16 scan with a 12^3 patch: one pass over the scan equals the brute-force
    map; the default runs sliding windows and differs."""
    network = tiny_unet(seed=5)
    image = blob_image((20, 24, 16), seed=5)
    region = np.zeros(image.shape[2:], bool)
    region[6:14, 8:16, 4:12] = True
    activation, gradient, _ = brute_force(network, image, "model.1.submodule.2", [1], region)
    alpha = gradient.mean(axis=(1, 2, 3))
    expected = trilinear(np.maximum(np.tensordot(alpha, activation, axes=1), 0), image.shape[2:])

    def cam(**options):
        context = make_context(network, image, patch=(12, 12, 12), options={"gradcam": {"mask": region, **options}})
        explanation = SegGradCAM().explain(context)
        return explanation.maps[0].array, explanation.metadata["sliding_window"]

    whole, sliding = cam(window="scan")
    assert not sliding
    assert_close(whole, expected)
    windowed, sliding = cam()
    assert sliding and not np.allclose(windowed, whole, rtol=1e-3, atol=1e-3 * whole.max())
