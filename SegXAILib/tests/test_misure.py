"""MiSuRe on constructed networks whose sufficient regions are known by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import UNet
from scipy import ndimage
from torch import nn

from SegXAILib.errors import SegXAIError
from SegXAILib.explain.base import ExplainContext, NotApplicable
from SegXAILib.explain.misure import (
    CLAMP_BELOW,
    Box,
    CoarseMask,
    CropPredictor,
    DiceTerm,
    MiSuRe,
    MiSuReOptions,
    ball,
    initial_cells,
    optimise_mask,
    soft_dice,
)
from SegXAILib.inference import sliding_window_predict
from SegXAILib.methods import get_explainer
from SegXAILib.metrics import dice
from SegXAILib.models.card import ModelCard, Windows
from SegXAILib.models.loaders import LoadedModel
from SegXAILib.upsampling import upsample_to

SHAPE = (32, 32, 32)


class BoxEvidence(nn.Module):
    """Target where the input's mean over the (2h+1)^3 box around a voxel exceeds ``level``.

    Logits: background 0, target ``scale * (box mean - level)``. The receptive field reaches h voxels,
    and the pooling's zero padding is what a zero baseline puts around a crop.
    """

    def __init__(self, h: int = 1, level: float = 0.5, scale: float = 240.0) -> None:
        super().__init__()
        self.h, self.level, self.scale = h, level, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = F.avg_pool3d(x, 2 * self.h + 1, stride=1, padding=self.h, count_include_pad=True)
        target = self.scale * (mean - self.level)
        return torch.cat([torch.zeros_like(target), target], dim=1)


class RegionEvidence(nn.Module):
    """Target on ``obj`` iff the input's mean over ``evidence`` exceeds ``level``: no other voxel matters."""

    def __init__(self, obj: np.ndarray, evidence: np.ndarray, level: float, scale: float) -> None:
        super().__init__()
        self.obj = torch.from_numpy(obj)
        self.evidence = torch.from_numpy(evidence)
        self.level, self.scale = level, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x[:, 0][:, self.evidence].mean(1).view(-1, 1, 1, 1)
        target = torch.where(self.obj, self.scale * (mean - self.level), torch.tensor(-self.scale))
        return torch.stack([torch.zeros_like(target), target], dim=1)


def box_mask(*ranges: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    mask[tuple(slice(a, b) for a, b in ranges)] = True
    return mask


def make_context(network: nn.Module, image: torch.Tensor, options: dict, strides=(2, 2)) -> ExplainContext:
    """One-window card (patch = image) whose U-Net strides make the size divisor 4 (crops align to 4 voxels)."""
    with torch.no_grad():
        probabilities = torch.softmax(network(image), 1)[0].numpy()
    card = ModelCard.from_dict({
        "name": "test", "architecture": {"name": "unet", "args": {"strides": list(strides)}},
        "classes": [{"name": f"class{c}", "label": c} for c in range(probabilities.shape[0])],
        "patch_size": list(image.shape[2:])})
    return ExplainContext(LoadedModel(card, network, "card"), image, "target", [1], probabilities,
                          options={"misure": options})


def test_registered_and_options_checked():
    assert isinstance(get_explainer("misure"), MiSuRe)
    assert MiSuRe.Options is MiSuReOptions
    assert MiSuReOptions.parse({"lambda": "0.5", "margin": None}, "misure").lam == 0.5
    with pytest.raises(SegXAIError, match=r"unknown option misure.radious; .*: radius, "):
        MiSuReOptions.parse({"radious": 2}, "misure")
    with pytest.raises(SegXAIError, match=r"option misure.tau must be a number in \(0, 1\], got 1.5"):
        MiSuReOptions.parse({"tau": 1.5}, "misure")


def test_sr_contains_the_evidence_region_and_the_msr_keeps_only_it():
    obj = box_mask((6, 14), (8, 16), (8, 16))
    evidence = box_mask((20, 24), (8, 12), (12, 16))  # one coarse cell, straight above the object
    rng = np.random.default_rng(0)
    image = np.where(evidence, 1.0, rng.uniform(0.2, 1.0, SHAPE)).astype(np.float32)
    network = RegionEvidence(obj, evidence, level=0.99, scale=100.0)  # needs all of the evidence region
    context = make_context(network, torch.from_numpy(image)[None, None], {"margin": None, "steps": 30})
    assert (context.predicted_mask == obj).all()

    explanation = MiSuRe().explain(context)
    maps = {m.variant: m.array for m in explanation.maps}
    sr, msr = maps["sr"] > 0, maps["msr"]
    assert sr[evidence].all() and sr[obj].all()
    # the evidence's far side (row 23) is 10 voxels beyond the object's face (row 13); a radius-3 ball moves
    # the face 3 voxels per dilation: ceil(10 / 3) = 4 dilations, and 3 leave row 23 out (Dice 0)
    assert explanation.scalars["dilations"] == 4
    assert explanation.curves["dilation_dice"] == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert explanation.scalars["dice_explained"] == 1.0
    # the mask is kept on the evidence and pruned everywhere else (the object's own voxels included)
    near = ndimage.binary_dilation(evidence, np.ones((3, 3, 3)), iterations=6)
    assert msr[evidence].min() > 0.9
    assert msr[near].sum() > 0.95 * msr.sum()
    assert msr[obj].sum() == 0
    assert explanation.scalars["perturbation_ratio"] < 0.5 * sr.sum() / obj.sum()
    assert explanation.scalars["perturbation_ratio"] == pytest.approx((msr > 0).sum() / obj.sum())


def test_dilation_count_equals_the_hand_count():
    h = 2  # the network needs the whole 5^3 box around a voxel to be bright
    cube = box_mask((8, 24), (8, 24), (8, 24))
    network = BoxEvidence(h=h, level=1 - 0.5 / (2 * h + 1) ** 3, scale=1000.0)
    context = make_context(network, torch.from_numpy(cube.astype(np.float32))[None, None],
                           {"radius": 1, "tau": 1.0, "steps": 0})
    m0 = context.predicted_mask
    assert (m0 == box_mask((10, 22), (10, 22), (10, 22))).all()
    explanation = MiSuRe().explain(context)

    # radius-1 dilations d times = all voxels within L1 distance d of M0; a voxel is found again when its
    # whole box is bright and inside that region. M0's corner voxel needs offset (h, h, h): 3h dilations
    offsets = [np.maximum(0, np.maximum(10 - g, g - 21)) for g in np.indices(SHAPE)]
    distance = sum(offsets)
    expected = [dice(ndimage.minimum_filter(cube & (distance <= d), size=2 * h + 1, mode="constant"), m0)
                for d in range(3 * h + 1)]
    assert expected[-1] == 1.0 and expected[-2] < 1.0
    assert explanation.scalars["dilations"] == 3 * h
    assert explanation.curves["dilation_dice"] == pytest.approx(expected, abs=1e-12)
    assert (explanation.maps[0].array > 0).sum() == (distance <= 3 * h).sum()


def test_soft_dice_has_a_gradient_with_respect_to_the_mask():
    torch.manual_seed(0)
    network = UNet(3, 1, 2, channels=(4, 8), strides=(2,)).eval()
    image = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        reference = torch.softmax(network(image), 1)[0, 1]
    cells = torch.full((1, 1, 4, 4, 4), 0.7, requires_grad=True)
    probabilities = torch.softmax(network(image * upsample_to(cells, (16, 16, 16))), 1)
    score = soft_dice(probabilities[0, 1], reference)
    (gradient,) = torch.autograd.grad(score, cells)
    assert torch.isfinite(gradient).all() and (gradient != 0).float().mean() > 0.5
    # the bug this guards against: a Dice of argmax masks is cut from the graph
    assert not (probabilities.argmax(1) == 1).float().requires_grad


def test_clamp_rule_holds_after_every_step():
    torch.manual_seed(0)
    network = UNet(3, 1, 2, channels=(4, 8), strides=(2,)).eval()
    image = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        reference = torch.softmax(network(image), 1)[0]
    sr = np.zeros((16, 16, 16), bool)
    sr[3:13, 3:13, 3:13] = True
    window = Box((0, 0, 0), (16, 16, 16))
    mask = CoarseMask(initial_cells(sr, 4), 4, window)
    x_sr = torch.where(torch.from_numpy(sr), image, torch.tensor(0.0))
    terms = [DiceTerm([0], 1.0, reference[0], (0.0, 0.0, 0.0)), DiceTerm([1], 2.0, reference[1], (0.0, 0.0, 0.0))]
    seen = []
    optimise_mask(CropPredictor(network, Windows((16, 16, 16)), (2, 2, 2), 0.0, torch.device("cpu")), x_sr, mask, terms,
                  MiSuReOptions(steps=12, lam=1.0), lambda step, cells, loss: seen.append(cells.clone()))
    assert len(seen) == 12
    for cells in seen:
        assert ((cells == 0) | ((cells >= CLAMP_BELOW) & (cells <= 1))).all()
    changed = torch.stack(seen)
    assert ((changed > CLAMP_BELOW) & (changed < 1)).any()  # steps moved the mask between the clamps
    assert (seen[-1][mask.initial() == 1] == 0).any()  # and pruned cells to exactly 0


def test_crop_gives_the_whole_grid_result_when_the_margin_covers_the_receptive_field():
    rng = np.random.default_rng(1)
    image = np.zeros(SHAPE, np.float32)
    image[12:20, 12:21, 11:19] = rng.uniform(0.6, 1.0, (8, 9, 8))
    network = BoxEvidence(h=1)
    x = torch.from_numpy(image)[None, None]
    options = {"radius": 1, "tau": 0.99, "steps": 20, "lambda": 3.0}  # a strong L1 weight: the mask moves
    cropped = MiSuRe().explain(make_context(network, x, {**options, "margin": 2}))
    whole = MiSuRe().explain(make_context(network, x, {**options, "margin": None}))
    assert cropped.metadata["crop"] != [[0, 0, 0], list(SHAPE)]  # the crop really was smaller
    assert whole.metadata["crop"] == [[0, 0, 0], list(SHAPE)]
    for a, b in zip(cropped.maps, whole.maps):
        np.testing.assert_allclose(a.array, b.array, atol=1e-5)
    assert cropped.curves["dilation_dice"] == whole.curves["dilation_dice"]
    assert cropped.curves["loss"] == pytest.approx(whole.curves["loss"], abs=1e-5)
    assert cropped.scalars == pytest.approx(whole.scalars)
    assert cropped.metadata["sufficient"] and cropped.curves["loss"][-1] < cropped.curves["loss"][0] - 1e-3


def whole_grid_target(network: nn.Module, x: np.ndarray) -> np.ndarray:
    """The network's target mask of a whole (*S) volume, one pass: the reference the tests compute by hand."""
    with torch.no_grad():
        return (network(torch.from_numpy(x.astype(np.float32))[None, None]).argmax(1) == 1)[0].numpy()


def test_a_crop_over_max_voxels_optimises_a_patch_window_and_removes_the_scan_beyond_it():
    image = np.zeros(SHAPE, np.float32)
    image[4:28, 8:24, 8:24] = 1.0
    network = BoxEvidence(h=1)
    context = make_context(network, torch.from_numpy(image)[None, None],
                           {"radius": 1, "steps": 5, "margin": None, "max_voxels": 1})
    context.model.card.patch_size = (16, 16, 16)
    explanation = MiSuRe().explain(context)
    assert explanation.metadata["stage2"] == "window"
    (start, stop) = explanation.metadata["window"]
    assert [b - a for a, b in zip(start, stop)] == [16, 16, 16]
    window = np.zeros(SHAPE, bool)
    window[tuple(slice(a, b) for a, b in zip(start, stop))] = True
    sr, msr = (m.array for m in explanation.maps)
    assert (sr[~window] > 0).any()  # the SR reaches beyond the window ...
    assert (msr[~window] == 0).all()  # ... the MSR does not: no box of untouched SR around the window
    # Dice explained is the network's own prediction of X_MSR (b = 0 beyond the window), taken as background
    # beyond the window, as everywhere beyond the region f runs on
    # M_0 is f(X_0) as the pipeline runs f on a scan larger than the patch: in sliding windows
    m0 = (sliding_window_predict(network, torch.from_numpy(image)[None, None], Windows((16, 16, 16)),
                                 torch.device("cpu")).argmax(1) == 1)[0].numpy()
    assert explanation.metadata["object_voxels"] == m0.sum()
    by_hand = dice(whole_grid_target(network, image * msr) & window, m0)
    assert explanation.scalars["dice_explained"] == pytest.approx(by_hand) and by_hand < 1


def test_a_sufficient_region_is_sufficient_on_the_whole_grid():
    """Stage 1 says 'sufficient': the network, on the whole grid with b outside the SR, finds M_0 with Dice >= tau."""
    rng = np.random.default_rng(3)
    image = np.full(SHAPE, -1.5, np.float32)  # a z-scored scan: air is its minimum, -1.5
    image[6:26, 6:26, 6:26] = rng.uniform(0.0, 1.0, (20, 20, 20))
    image[12:20, 12:20, 12:20] += 1.0
    network = BoxEvidence(h=2, level=0.9)
    context = make_context(network, torch.from_numpy(image)[None, None], {"radius": 1, "tau": 0.95, "steps": 0})
    explanation = MiSuRe().explain(context)
    b = explanation.metadata["baseline"]
    assert b == -1.5  # the default baseline is the scan's no-signal level, not 0 (mid-grey tissue here)
    sr = explanation.maps[0].array > 0
    assert explanation.metadata["sufficient"] and explanation.scalars["dilations"] >= 1
    m0 = whole_grid_target(network, image)
    by_hand = dice(whole_grid_target(network, np.where(sr, image, b)), m0)
    assert by_hand == pytest.approx(explanation.scalars["dice_sufficient"]) and by_hand >= 0.95
    # one dilation fewer is not sufficient
    smaller = ndimage.binary_erosion(sr, ball(1)) | m0
    assert dice(whole_grid_target(network, np.where(smaller, image, b)), m0) < 0.95
    assert explanation.maps[0].description.startswith("sufficient region")
    capped = MiSuRe().explain(make_context(network, torch.from_numpy(image)[None, None],
                                           {"radius": 1, "tau": 0.95, "steps": 0, "max_dilations": 0}))
    assert not capped.metadata["sufficient"]
    assert "it needs more of the scan than this" in capped.maps[0].description


def test_the_reference_is_the_networks_own_postprocessed_prediction():
    """M_0 and the Dice reference are f(X_0) as f runs on perturbed scans (+ the card's postprocessing), not the
    segmentation's probabilities (which average mirrored passes): against those, no region could be sufficient."""
    image = np.zeros(SHAPE, np.float32)
    image[8:16, 8:16, 8:16] = 1.0  # the object
    image[24:30, 24:30, 24:30] = 1.0  # a second bright blob, removed by the 'postprocessing'
    network = BoxEvidence(h=1)
    context = make_context(network, torch.from_numpy(image)[None, None], {"radius": 1, "tau": 1.0, "steps": 0})
    context.probabilities[:, 4:8, 20:24, 20:24] = [[[[0.0]]], [[[1.0]]]]  # the segmentation holds more

    def drop_far_corner(probabilities: np.ndarray) -> np.ndarray:
        probabilities[:, 20:, 20:, 20:] = np.array([1.0, 0.0])[:, None, None, None]
        return probabilities
    context.postprocess = drop_far_corner
    explanation = MiSuRe().explain(context)
    m0 = whole_grid_target(network, image)
    m0[20:, 20:, 20:] = False
    assert explanation.metadata["object_voxels"] == m0.sum() > 0
    assert explanation.metadata["sufficient"] and explanation.scalars["dice_sufficient"] == 1.0
    assert explanation.metadata["dice_with_segmentation"] == pytest.approx(dice(m0, context.predicted_mask))
    assert explanation.metadata["dice_with_segmentation"] < 0.9


def test_the_msr_has_no_step_at_the_coarse_cells_borders():
    """Trilinear upsampling: neighbouring voxels across a coarse cell's border differ as much as inside a cell
    (nearest-neighbour upsampling, or a threshold after it, would put every step on the borders)."""
    rng = np.random.default_rng(4)
    image = np.zeros(SHAPE, np.float32)
    image[4:28, 4:28, 4:28] = rng.uniform(0.55, 1.0, (24, 24, 24))
    context = make_context(BoxEvidence(h=1), torch.from_numpy(image)[None, None],
                           {"radius": 2, "steps": 15, "lambda": 3.0, "margin": None})
    explanation = MiSuRe().explain(context)
    sr, msr = (m.array for m in explanation.maps)
    inner = ndimage.binary_erosion(sr > 0, np.ones((3, 3, 3)), iterations=4)  # away from the SR's own edge
    for axis in range(3):
        steps = np.abs(np.diff(msr, axis=axis))
        both = np.take(inner, range(SHAPE[axis] - 1), axis=axis) & np.take(inner, range(1, SHAPE[axis]), axis=axis)
        border = np.zeros(SHAPE[axis] - 1, bool)
        border[3::4] = True  # voxel 4j+3 -> 4j+4 crosses a cell border (cells start at voxel 0)
        on_border = both & np.expand_dims(border, [a for a in range(3) if a != axis])
        inside = both & ~on_border
        assert steps[inside].mean() > 0.01  # the cells differ: there is something to compare
        assert 0.5 < steps[on_border].mean() / steps[inside].mean() < 2.0


def test_an_empty_prediction_is_not_applicable():
    context = make_context(BoxEvidence(), torch.zeros(1, 1, 16, 16, 16), {})
    with pytest.raises(NotApplicable, match="predicts no voxel"):
        MiSuRe().explain(context)


def test_ball_is_the_digital_sphere():
    assert ball(1).sum() == 7 and ball(3).shape == (7, 7, 7) and ball(3).sum() == 123
