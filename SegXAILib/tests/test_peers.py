"""The peer adapters of benchmarks/peers.py compute the peers' maps: each peer's map of SegXAI's target score
against SegXAI's map at equal settings, on a small U-Net (a broken adapter would explain another score, layer
or region, and disagree)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from SegXAILib.explain.gradcam import SegGradCAM, SegGradCAMPlusPlus
from SegXAILib.explain.integrated_gradients import IntegratedGradients
from SegXAILib.explain.layers import resolve_layers
from SegXAILib.explain.occlusion import OcclusionSensitivity

from .test_gradcam import blob_image, make_context, tiny_unet

_spec = importlib.util.spec_from_file_location("peer_adapters",
                                               Path(__file__).parents[2] / "benchmarks" / "peer_adapters.py")
peers = sys.modules["peer_adapters"] = importlib.util.module_from_spec(_spec)  # benchmarks/ is not a package
_spec.loader.exec_module(peers)

CHANNELS = [1, 2]
SHAPE = (24, 24, 24)


def needs(tool: str) -> None:
    """Skip when the peer cannot be imported: pytorch-grad-cam needs a torchvision that imports beside the installed
    torch (PyPI's does not beside the CPU torch 2.13, so it is not in the ``bench`` extra; docs/peers.md runs these
    tests in a second environment with torch 2.14.1 and torchvision 0.29.1); the others come with ``pip install -e
    ".[bench]"``."""
    failure = peers.import_failure(tool)
    if failure is not None:
        fix = ("install torch and a torchvision that import together, then grad-cam (docs/peers.md)"
               if tool == "pytorch-grad-cam" else "pip install -e '.[bench]'")
        pytest.skip(f"{tool} cannot be imported ({failure}); {fix}")


@pytest.fixture
def problem():
    network = tiny_unet(seed=3)
    image = blob_image(SHAPE, seed=1)
    region = make_context(network, image, CHANNELS).predicted_mask  # R of every SegXAI method here
    assert 0 < region.sum() < region.size
    layer = resolve_layers(network, "last_decoder", image)[0][0]
    return peers.Problem(network, image, CHANNELS, region, layer, baseline=float(image.min()))


def segxai_map(explainer, problem, **options) -> np.ndarray:
    context = make_context(problem.network, problem.image, CHANNELS, options=options)
    return explainer.explain(context).maps[0].array


def minmax(a: np.ndarray) -> np.ndarray:
    return (a - a.min()) / (a.max() - a.min())


def test_brute_force_reference_is_segxai_gradcam(problem):
    for explainer, plusplus in ((SegGradCAM(), False), (SegGradCAMPlusPlus(), True)):
        ours = segxai_map(explainer, problem)
        reference = peers.brute_force_gradcam(problem, plusplus=plusplus)
        assert reference.max() > 0
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * reference.max())


@pytest.mark.parametrize("tool", sorted(peers.GRADCAM_PEERS))
def test_gradcam_peers_equal_segxai(problem, tool):
    needs(tool)
    ours = segxai_map(SegGradCAM(), problem)
    theirs = peers.GRADCAM_PEERS[tool](problem)
    assert theirs.shape == SHAPE
    if tool == "pytorch-grad-cam":
        np.testing.assert_allclose(theirs, resized_as_pytorch_grad_cam(problem, plusplus=False), atol=1e-4)
    else:  # the same map up to scale (MONAI and medcam min-max normalise)
        np.testing.assert_allclose(minmax(theirs), minmax(ours), atol=1e-4)


def resized_as_pytorch_grad_cam(problem, plusplus: bool) -> np.ndarray:
    """The definition's CAM on the layer's grid, scaled and resized as pytorch-grad-cam does it: min-max scaled,
    resized by ``scipy.ndimage.zoom`` (a cubic spline on corner-aligned grids, not trilinear), then the spline's
    undershoot cut by a ReLU and min-max scaled again (``compute_cam_per_layer``, ``aggregate_multi_layers``)."""
    from scipy.ndimage import zoom

    def scaled(cam: np.ndarray) -> np.ndarray:
        cam = cam - cam.min()
        return cam / (cam.max() + 1e-7)

    alpha, a = peers.gradcam_weights(problem, plusplus)
    cam = scaled(peers.layer_cam(alpha, a)[0, 0].numpy())
    return scaled(np.maximum(zoom(cam, [t / s for s, t in zip(cam.shape, SHAPE)]), 0))


def test_monai_gradcampp_is_its_own_formula(problem):
    """MONAI's Grad-CAM++ sums A G^3 over the grid inside a_k (not A's sum times G(p)^3) and multiplies the
    gradients by exp(S), a factor common to every channel: R is a small box here so that exp(S) stays finite."""
    box = np.zeros(SHAPE, bool)
    box[10:13, 10:13, 10:13] = True
    problem.region = box
    a, g = peers.activation_and_gradient(problem)
    alpha = g**2 / (2 * g**2 + (a * g**3).sum(dim=(2, 3, 4), keepdim=True) + 1e-7)
    expected = peers.cam_on_grid((alpha * torch.relu(g)).sum(dim=(2, 3, 4), keepdim=True), a, SHAPE)
    theirs = peers.monai_gradcam(problem, plusplus=True)
    np.testing.assert_allclose(minmax(theirs), minmax(expected), atol=1e-4)


def test_pytorch_grad_cam_gradcampp_explains_the_same_score(problem):
    """Equal to 1e-3: pytorch-grad-cam adds 1e-6 to Grad-CAM++'s denominator in float32 (the definition: float64,
    no epsilon); the whole grid as the region moves the map by 0.08, the bottleneck as the layer by 0.86."""
    needs("pytorch-grad-cam")
    np.testing.assert_allclose(peers.GRADCAMPP_PEERS["pytorch-grad-cam"](problem),
                               resized_as_pytorch_grad_cam(problem, plusplus=True), atol=1e-3)


def test_medcam_gradcampp_needs_as_many_classes_as_channels(problem):
    """medcam's Grad-CAM++ weighs the layer's gradients by its output's classes: the benchmark's 'fails' reason."""
    needs("medcam")
    with pytest.raises(RuntimeError, match="must match the size"):
        peers.GRADCAMPP_PEERS["medcam"](problem)


def test_monai_occlusion_equals_segxai(problem):
    """Cubes of 4 every 2 over the whole 24^3 grid: both place them at 0, 2, ..., 20 per axis."""
    ours = segxai_map(OcclusionSensitivity(), problem, occlusion={
        "cube": 4, "stride": 2, "reach": 24, "max_cubes": 2000, "margin": None, "baseline": problem.baseline})
    theirs = peers.monai_occlusion(problem, cube=4, stride=2, box=((0, 0, 0), SHAPE), batch=16)
    assert np.abs(ours).max() > 0
    np.testing.assert_allclose(theirs, ours, rtol=1e-3, atol=1e-3 * np.abs(ours).max())


def test_captum_integrated_gradients_equal_segxai(problem):
    """captum's trapezoid weighs its m steps 1/m, SegXAI's 1/(m-1) (explain/integrated_gradients.py)."""
    steps = 8
    maps = IntegratedGradients().explain(make_context(problem.network, problem.image, CHANNELS, options={
        "integrated-gradients": {"steps": steps, "method": "trapezoid", "margin": None, "baseline": problem.baseline}}))
    ours = next(m.array for m in maps.maps if m.variant == "signed")
    theirs = peers.captum_integrated_gradients(problem, steps) * steps / (steps - 1)
    np.testing.assert_allclose(theirs, ours, rtol=1e-3, atol=1e-3 * np.abs(ours).max())
