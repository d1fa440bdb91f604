"""The black-box explainers (occlusion, saliency, SmoothGrad, integrated gradients) against captum and constructed
networks; the one target score (log-odds from logits or from probabilities) shared with Grad-CAM; TorchScript."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet
from scipy import ndimage
from torch import nn

from SegXAILib.errors import SegXAIError
from SegXAILib.explain.base import ExplainContext, NotApplicable
from SegXAILib.explain.blackbox import region_crop, riemann_rule
from SegXAILib.explain.integrated_gradients import IntegratedGradients
from SegXAILib.explain.occlusion import OcclusionSensitivity, cube_starts
from SegXAILib.explain.saliency import Saliency
from SegXAILib.explain.smoothgrad import SmoothGrad
from SegXAILib.explain.targets import log_odds, target_scores
from SegXAILib.inference import predict_probabilities
from SegXAILib.methods import get_explainer
from SegXAILib.models import registry
from SegXAILib.models.card import ModelCard
from SegXAILib.models.loaders import LoadedModel
from SegXAILib.preprocessing import no_signal_level

from .conftest import explain_context

BLACK_BOX = ("occlusion", "saliency", "smoothgrad", "integrated-gradients")


def tiny_unet(seed=0, norm="BATCH") -> nn.Module:
    """Batch norm (eval mode) by default: instance norm makes the gradient at a constant input huge (see
    integrated_gradients.py), which would test float rounding, not the method."""
    torch.manual_seed(seed)
    return UNet(3, 1, 3, channels=(4, 8, 16), strides=(2, 2), norm=norm).eval()


def blob_image(shape=(16, 16, 16), seed=0) -> torch.Tensor:
    """A bright off-centre ball in noise, (1, 1, *shape)."""
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    ball = (grids[0] - 0.2) ** 2 + grids[1] ** 2 + (grids[2] + 0.3) ** 2 < 0.3
    noise = np.random.default_rng(seed).standard_normal(shape)
    return torch.from_numpy((2.0 * ball + 0.3 * noise).astype(np.float32))[None, None]


def score_of(network, channels, region):
    """S written out, one value per example: sum over ``region`` of logsumexp(target logits) - logsumexp(rest)."""
    region = torch.as_tensor(region, dtype=torch.float32)

    def forward(x):
        logits = network(x)
        rest = [c for c in range(logits.shape[1]) if c not in channels]
        t = torch.logsumexp(logits[:, list(channels)], 1) - torch.logsumexp(logits[:, rest], 1)
        return (t * region).flatten(1).sum(1)
    return forward


def maps_of(explanation):
    return {m.variant: m.array for m in explanation.maps}


def assert_close(actual, expected, tol=1e-5):
    expected = np.asarray(expected, dtype=np.float64)
    scale = float(np.abs(expected).max())
    assert scale > 0, "reference is all zero: the test would not check anything"
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


def whole_grid(name, **options):
    """Options of ``name`` that run on the whole grid (no crop)."""
    return {name: {"margin": None, **options}}


# ------------------------------------------------------------------ the target score
def test_log_odds_from_logits_and_from_probabilities_agree_and_ignore_a_shift_per_voxel():
    logits = torch.randn(2, 4, 3, 5, 6, generator=torch.Generator().manual_seed(0)) * 4
    shifted = logits + 7 * torch.randn(2, 1, 3, 5, 6)  # softmax(z + a) = softmax(z)
    for channels in ([1], [1, 3]):
        t = log_odds(logits, channels)
        np.testing.assert_allclose(log_odds(shifted, channels), t, atol=1e-4)
        np.testing.assert_allclose(log_odds(torch.softmax(logits, 1), channels, "probabilities"), t, atol=1e-4)
    two = logits[:, :2]
    assert torch.allclose(log_odds(two, [1]), two[:, 1] - two[:, 0])  # two classes: the logit difference
    assert torch.equal(log_odds(logits, [0, 1, 2, 3]), torch.zeros(2, 3, 5, 6))  # no rest: no score
    saturated = torch.zeros(1, 2, 1, 1, 1)
    saturated[0, 1] = 1.0  # the background's probability underflowed to 0
    assert torch.isfinite(log_odds(saturated, [1], "probabilities")).all()
    weight = torch.zeros(3, 5, 6)
    weight[1, 2:4] = 1
    assert torch.allclose(target_scores(logits, [1], weight), (log_odds(logits, [1]) * weight).sum((1, 2, 3)))


def test_card_output_is_logits_or_probabilities():
    data = {"name": "t", "architecture": {"name": "unet"}, "patch_size": [16, 16, 16],
            "classes": [{"name": "background", "label": 0}, {"name": "a", "label": 1}]}
    assert ModelCard.from_dict(data).output == "logits"
    card = ModelCard.from_dict({**data, "output": "probabilities"})
    assert card.output == "probabilities" and ModelCard.from_dict(card.to_dict()).output == "probabilities"
    with pytest.raises(SegXAIError, match="output must be"):
        ModelCard.from_dict({**data, "output": "softmax"})
    with pytest.raises(SegXAIError, match="output must be"):
        dataclasses.replace(card, output="softmax")


# ------------------------------------------------------------------ against captum
@pytest.mark.parametrize("method", ["middle", "left", "right", "trapezoid"])
def test_integrated_gradients_equals_captum(method):
    from captum.attr import IntegratedGradients as CaptumIG

    network = tiny_unet(seed=1)
    image = blob_image(seed=1)
    steps = 6
    context = explain_context(network, image, (1, 2), options=whole_grid("integrated-gradients", steps=steps,
                                                                             method=method))
    forward = score_of(network, [1, 2], context.predicted_mask)
    b = no_signal_level(image.numpy())
    assert b == float(image.min()) < 0  # the scan's minimum (a z-scored scan: air)
    expected = CaptumIG(forward).attribute(image, baselines=b, n_steps=steps, method=f"riemann_{method}")
    if method == "trapezoid":  # captum weighs the m trapezoid steps 1/m, not 1/(m - 1) (integrated_gradients.py)
        expected = expected * steps / (steps - 1)
    explanation = IntegratedGradients().explain(context)

    maps = maps_of(explanation)
    assert_close(maps["signed"], expected[0, 0].detach().numpy())
    assert maps["signed"].dtype == np.float32 and maps["signed"].shape == tuple(image.shape[2:])
    with torch.no_grad():
        at_image, at_baseline = forward(image), forward(torch.full_like(image, b))
    scalars = explanation.scalars
    assert scalars["score"] == pytest.approx(float(at_image), rel=1e-5)
    assert scalars["baseline_score"] == pytest.approx(float(at_baseline), rel=1e-5)
    assert scalars["attribution_sum"] == pytest.approx(float(expected.sum()), rel=1e-4)
    assert scalars["completeness_gap"] == pytest.approx(
        scalars["attribution_sum"] - (scalars["score"] - scalars["baseline_score"]), rel=1e-9)


def test_integrated_gradients_quadratic_rule_is_the_trapezoid_rule_in_the_square_root():
    alphas, weights = riemann_rule(5, "quadratic")
    assert alphas == pytest.approx([0, 1 / 16, 1 / 4, 9 / 16, 1]) and weights == pytest.approx([0, 1 / 8, 1 / 4, 3 / 8,
                                                                                                  1 / 4])
    assert sum(riemann_rule(7, "trapezoid")[1]) == pytest.approx(1) and sum(weights) == pytest.approx(1)

    network = tiny_unet(seed=2)
    image = blob_image(seed=2)
    context = explain_context(network, image, (1,), options=whole_grid("integrated-gradients", steps=5))
    forward = score_of(network, [1], context.predicted_mask)
    b = float(image.min())
    total = torch.zeros_like(image)
    for a, w in zip(alphas, weights):  # plain autograd, one step at a time
        x = (b + a * (image - b)).requires_grad_(True)
        total += w * torch.autograd.grad(forward(x).sum(), x)[0]
    assert_close(maps_of(IntegratedGradients().explain(context))["signed"], ((image - b) * total)[0, 0].numpy())

    # completeness: with enough steps the attributions add up to S(X) - S(X')
    fine = IntegratedGradients().explain(explain_context(network, image, (1,), options=whole_grid(
        "integrated-gradients", steps=48)))
    assert fine.scalars["relative_gap"] < 0.01


def test_saliency_equals_captum_saliency():
    from captum.attr import Saliency as CaptumSaliency

    network = tiny_unet(seed=3)
    image = blob_image(seed=3)
    context = explain_context(network, image, (1, 2), options=whole_grid("saliency"))
    expected = CaptumSaliency(score_of(network, [1, 2], context.predicted_mask)).attribute(image, abs=False)
    expected = expected[0, 0].detach().numpy()
    maps = maps_of(Saliency().explain(context))
    assert_close(maps["signed"], expected)
    assert_close(maps[None], ndimage.gaussian_filter(np.abs(expected), 1.0))  # the map shown


def test_smoothgrad_equals_captum_noise_tunnel_given_the_same_noise(monkeypatch):
    from captum.attr import NoiseTunnel
    from captum.attr import Saliency as CaptumSaliency

    network = tiny_unet(seed=4)
    image = blob_image(seed=4)
    samples = 5
    context = explain_context(network, image, (1,), options=whole_grid("smoothgrad", samples=samples, batch=2))
    sigma = 0.1 * float(image.max() - image.min())  # noise 0.1 of the intensity range (the default)
    torch.manual_seed(11)
    expected = NoiseTunnel(CaptumSaliency(score_of(network, [1], context.predicted_mask))).attribute(
        image, nt_type="smoothgrad", nt_samples=samples, stdevs=sigma, abs=False)
    torch.manual_seed(11)  # the noise captum drew: one normal draw of (samples, *image) (NoiseTunnel source)
    noise = torch.normal(0, torch.tensor(sigma).repeat((samples, *image.shape[1:])))
    asked = {}

    def captum_noise(shape, count, scale, seed):
        asked.update(shape=shape, count=count, scale=scale)
        return noise
    monkeypatch.setattr(SmoothGrad, "draw_noise", staticmethod(captum_noise))
    explanation = SmoothGrad().explain(context)

    assert asked == {"shape": tuple(image.shape[1:]), "count": samples, "scale": pytest.approx(sigma)}
    assert_close(maps_of(explanation)["signed"], expected[0, 0].detach().numpy())
    assert explanation.metadata["forward_passes"] == explanation.metadata["backward_passes"] == samples


def test_smoothgrad_noise_comes_from_the_seed_not_the_batch():
    network = tiny_unet(seed=5)
    image = blob_image(seed=5)
    run = {(seed, batch): maps_of(SmoothGrad().explain(explain_context(network, image, (1,), options={
        "smoothgrad": {"samples": 3, "seed": seed, "batch": batch}})))["signed"]
        for seed, batch in ((0, 1), (0, 3), (1, 3))}
    np.testing.assert_allclose(run[0, 1], run[0, 3], atol=1e-6 * np.abs(run[0, 3]).max())
    assert not np.allclose(run[0, 3], run[1, 3])


def test_occlusion_equals_captum_occlusion():
    from captum.attr import Occlusion

    network = tiny_unet(seed=6)
    image = blob_image(seed=6)
    # cubes of 6 every 5 voxels: starts 0, 5, 10 on each axis (captum's grid), overlapping by one voxel
    options = whole_grid("occlusion", cube=6, stride=5, reach=16, max_cubes=1000, batch=4)
    context = explain_context(network, image, (1, 2), options=options)
    b = no_signal_level(image.numpy())
    expected = Occlusion(score_of(network, [1, 2], context.predicted_mask)).attribute(
        image, sliding_window_shapes=(1, 6, 6, 6), strides=(1, 5, 5, 5), baselines=b)
    explanation = OcclusionSensitivity().explain(context)

    assert explanation.metadata["cubes"] == 27 and explanation.metadata["forward_passes"] == 28
    assert_close(explanation.maps[0].array, expected[0, 0].detach().numpy(), tol=1e-4)
    assert explanation.maps[0].normalise is False  # log-odds units


class BoxOnlyNet(nn.Module):
    """Class 1's logit is 1 + a 3x3x3 average of the input inside one box (0 outside it); class 0's logit is 0.

    The whole grid is predicted as class 1 (its logit is at least 1 - ... > 0 for a positive scan), so the score
    sums over every voxel, yet only the input inside the box can change it.
    """

    def __init__(self, box: tuple[slice, ...], shape: tuple[int, ...]):
        super().__init__()
        self.conv = nn.Conv3d(1, 1, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 27)
            self.conv.bias.fill_(1.0)
        self.register_buffer("mask", torch.zeros(1, 1, *shape))
        self.mask[(0, 0, *box)] = 1

    def forward(self, x):
        z = self.conv(x * self.mask)
        return torch.cat([torch.zeros_like(z), z], 1)


def test_occlusion_peaks_in_the_only_region_that_matters():
    shape = (24, 20, 28)
    box = (slice(4, 10), slice(12, 18), slice(6, 12))
    network = BoxOnlyNet(box, shape).eval()
    image = 1.0 + 0.2 * torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(7))
    image[0, 0, 16:22, 2:8, 18:26] += 5.0  # a bright object outside the box must not attract the map
    context = explain_context(network, image, (1,), options={"occlusion": {"cube": 4, "stride": 4,
                                                                           "max_cubes": 1000}})
    assert context.predicted_mask.all()
    explanation = OcclusionSensitivity().explain(context)
    occlusion = explanation.maps[0].array

    inside = np.zeros(shape, bool)
    inside[box] = True
    assert inside[np.unravel_index(occlusion.argmax(), shape)]
    assert occlusion[inside].min() > 0  # blanking any part of the box lowers the score (baseline 0 < the scan)
    touching = np.zeros(shape, bool)  # cubes of 4 every 4 from 0: a voxel's only cube touches the box or not
    touching[4:12, 12:20, 4:12] = True
    assert np.all(occlusion[~touching] == 0) and explanation.metadata["cubes"] == 6 * 5 * 7


def test_cubes_keep_a_regular_stride_where_the_region_meets_the_grids_edge():
    """Cubes of 16 every 8: centred on the interval inside the axis, moved as a whole at its edges (before, the first
    start was clipped from -1 to 0 and the others stayed at 7, 15, ...: not MONAI's regular cubes)."""
    assert cube_starts(0, 101, 128, 16, 8) == list(range(0, 89, 8))  # 12 cubes, the last ending at 104 >= 101
    assert cube_starts(30, 50, 128, 16, 8) == [28, 36]  # 2 cubes spanning 24 around 20 voxels: 2 before
    assert cube_starts(120, 128, 128, 16, 8) == [112]  # moved back inside the axis
    assert cube_starts(0, 40, 24, 16, 8) == [0, 8]  # more than the axis: clipped to it


# ------------------------------------------------------------------ crop and windows
def test_crop_holds_the_region_and_its_margin_in_a_window_the_network_accepts():
    region = np.zeros((40, 12, 6), bool)
    region[10:15, 3:5, 2:4] = True
    crop = region_crop(region, 3, multiple=(4, 4, 4), patch=(16, 16, 16))
    (k, j, i) = crop.slices
    assert (k.start, k.stop) == (7, 19) and crop.window[0] == 12  # 5 + 2 * 3 = 11 voxels -> 12, centred
    assert (j.start, j.stop) == (0, 8) and crop.window[1] == 8  # 2 + 6 - 1 clipped at the grid's edge -> 8
    assert (i.start, i.stop) == (0, 6) and crop.window[2] == 8 and crop.pad == (0, 0, 8 - 6)  # a grid of 6: padded
    whole = region_crop(region, None, (4, 4, 4), (16, 16, 16))
    assert whole.slices[0] == slice(0, 40) and whole.window[0] == 16  # larger than the patch: sliding windows


def test_window_scan_runs_a_crop_larger_than_the_patch_in_one_pass_as_captum():
    """``window: scan`` on a 32^3 grid with a 16^3 patch: one window of the whole grid, and the attribution equals
    captum's integrated gradients of the network's score on the whole scan in one pass (a U-Net with spatial
    context: the model's overlapping windows give another map)."""
    from captum.attr import IntegratedGradients as CaptumIG

    region = np.zeros((40, 12, 6), bool)
    region[10:15, 3:5, 2:4] = True
    one = region_crop(region, 3, multiple=(4, 4, 4), patch=None)
    assert one.slices[0] == slice(7, 19) and one.window == (12, 8, 8) and one.pad == (0, 0, 2)
    assert region_crop(region, None, (4, 4, 4), None).window == (40, 12, 8)  # larger than any patch: one window

    network = tiny_unet(seed=1)
    image = blob_image((32, 32, 32), seed=1)
    steps = 4
    options = whole_grid("integrated-gradients", steps=steps, method="trapezoid", window="scan")
    context = explain_context(network, image, (1, 2), patch=(16, 16, 16), options=options)
    explanation = IntegratedGradients().explain(context)
    assert explanation.metadata["crop"]["window"] == [32, 32, 32]
    assert explanation.metadata["crop"]["windows_per_pass"] == 1
    forward = score_of(network, [1, 2], context.predicted_mask)
    expected = CaptumIG(forward).attribute(image, baselines=float(image.min()), n_steps=steps,
                                           method="riemann_trapezoid") * steps / (steps - 1)
    assert_close(maps_of(explanation)["signed"], expected[0, 0].detach().numpy())

    options["integrated-gradients"]["window"] = "model"
    windowed = IntegratedGradients().explain(explain_context(network, image, (1, 2), patch=(16, 16, 16),
                                                             options=options))
    assert windowed.metadata["crop"]["windows_per_pass"] > 1
    assert np.abs(maps_of(windowed)["signed"] - expected[0, 0].detach().numpy()).max() > 1e-3 * expected.abs().max()


class PointwiseNet(nn.Module):
    """1x1x1 convolutions only: every window sees what the whole volume sees, so windowed gradients are exact.

    Class 1's logit is 4 tanh(x - 1) (the bright ball), class 0's is 0, class 2's a random pointwise function."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(8)
        self.body = nn.Sequential(nn.Conv3d(1, 6, 1), nn.Tanh(), nn.Conv3d(6, 3, 1))
        with torch.no_grad():
            self.body[0].weight[0] = 1
            self.body[0].bias[0] = -1
            self.body[2].weight[:2] = 0
            self.body[2].bias[:2] = 0
            self.body[2].weight[1, 0] = 4

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("name", ["saliency", "integrated-gradients"])
def test_windowed_and_cropped_gradients_equal_the_whole_volume_when_stitching_is_exact(name):
    network = PointwiseNet().eval()
    image = blob_image((24, 12, 28), seed=8)
    whole = maps_of(get_explainer(name).explain(explain_context(network, image, (1,), options=whole_grid(name))))
    windows = get_explainer(name).explain(explain_context(network, image, (1,), patch=(16, 16, 16),
                                                          options=whole_grid(name)))
    assert windows.metadata["crop"]["windows_per_pass"] > 1
    assert_close(maps_of(windows)["signed"], whole["signed"])

    cropped = get_explainer(name).explain(explain_context(network, image, (1,), options={name: {"margin": 1}}))
    box = tuple(slice(*edges) for edges in cropped.metadata["crop"]["box"])
    signed = maps_of(cropped)["signed"]
    assert_close(signed[box], whole["signed"][box])
    outside = np.ones(signed.shape, bool)
    outside[box] = False
    assert outside.any() and np.all(signed[outside] == 0)


def test_nothing_predicted_is_not_applicable():
    network = tiny_unet(seed=9)
    context = explain_context(network, blob_image(seed=9), (1,))
    context.probabilities = np.zeros_like(context.probabilities)
    context.probabilities[0] = 1
    for name in BLACK_BOX:
        with pytest.raises(NotApplicable, match="predicts no voxel"):
            get_explainer(name).explain(context)


# ------------------------------------------------------------------ a network that returns probabilities
class Softmaxed(nn.Module):
    """A network followed by a softmax: it returns probabilities (as deepbet does)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x):
        return torch.softmax(self.network(x), dim=1)


@pytest.mark.parametrize("name", ["gradcam", "gradcampp", *BLACK_BOX])
def test_log_probability_targets_give_the_same_maps_as_logits(name):
    network = tiny_unet(seed=10)
    image = blob_image(seed=10)
    options = {name: {"samples": 2} if name == "smoothgrad" else {"steps": 4} if name == "integrated-gradients"
               else {}}
    logits = explain_context(network, image, (1, 2), options=options)
    card = dataclasses.replace(logits.model.card, output="probabilities")
    probabilities = dataclasses.replace(logits, model=LoadedModel(card, Softmaxed(network).eval(), "card"))

    from_logits, from_probabilities = (get_explainer(name).explain(c) for c in (logits, probabilities))
    for a, b in zip(from_logits.maps, from_probabilities.maps, strict=True):
        assert_close(b.array, a.array, tol=1e-4)
    assert from_probabilities.scalars == pytest.approx(from_logits.scalars, rel=1e-4, abs=1e-3)


def test_probabilities_are_not_softmaxed_again():
    network = tiny_unet(seed=11)
    image = blob_image(seed=11)
    card = explain_context(network, image).model.card
    plain = predict_probabilities(LoadedModel(card, network, "card"), image[0].numpy(), torch.device("cpu"))
    wrapped = predict_probabilities(LoadedModel(dataclasses.replace(card, output="probabilities"),
                                                Softmaxed(network), "card"), image[0].numpy(), torch.device("cpu"))
    np.testing.assert_allclose(wrapped, plain, atol=1e-6)
    again = torch.softmax(torch.from_numpy(plain), 0).numpy()
    assert np.abs(again - plain).max() > 0.05  # a second softmax would be seen


# ------------------------------------------------------------------ TorchScript
def test_black_box_methods_run_on_torchscript_and_layer_methods_say_why_not(tmp_path):
    network = tiny_unet(seed=12)
    image = blob_image(seed=12)
    torch.jit.script(network).save(str(tmp_path / "model.ts"))
    (tmp_path / "scripted.json").write_text(json.dumps({
        "name": "scripted", "architecture": {"name": "torchscript"}, "patch_size": [16, 16, 16],
        "classes": [{"name": "background", "label": 0}, {"name": "core", "label": 1}, {"name": "rim", "label": 2}],
        "weights": "model.ts"}))
    model = registry.load_model(tmp_path / "scripted.json", trust_model_code=True)  # jit.load runs its code
    assert model.route == "torchscript" and not model.supports_hooks
    eager = explain_context(network, image, (1, 2), options={"integrated-gradients": {"steps": 4},
                                                             "smoothgrad": {"samples": 2}})
    scripted = dataclasses.replace(eager, model=model)
    assert isinstance(scripted, ExplainContext)

    for name in BLACK_BOX:
        explainer = get_explainer(name)
        explainer.check_applicable(model)
        for a, b in zip(explainer.explain(eager).maps, explainer.explain(scripted).maps, strict=True):
            assert_close(b.array, a.array, tol=1e-4)
    for name in ("gradcam", "gradcampp", "protoseg"):
        with pytest.raises(NotApplicable, match="TorchScript model only gives its output"):
            get_explainer(name).check_applicable(model)
