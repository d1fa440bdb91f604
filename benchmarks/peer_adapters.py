"""Other tools' explanation maps of SegXAI's target score, for ``peers.py`` and its test.

Every adapter takes one problem (:class:`Problem`: a network, its input, the target's output channels, the
region R and the layer) and returns the tool's map on the input grid, (D, H, W) float32. The score is SegXAI's
(``SegXAILib/explain/targets.py``): the target's log-odds summed over R. Each tool is given that score the way
it allows:

- MONAI ``GradCAM``/``GradCAMpp``/``OcclusionSensitivity`` and captum explain output channel 0 of a network:
  they get :class:`RegionScore`, the network followed by the score, shape (N, 1);
- pytorch-grad-cam takes a target callable on each example's output: the score of that output;
- medcam back-propagates a gradient mask given by its ``label`` callable: dS/dz, the score's gradient with
  respect to the network's output, which by the chain rule gives the layer the gradient dS/dA.

nnunetv2-cam explains an nnU-Net predictor in its own windows with its own target (:func:`nnunetv2_cam_gradcam`,
for ``peers_nnunet.py``).

The tools keep their own conventions (MONAI's and medcam's Grad-CAM maps are min-max normalised, MONAI's
occlusion map is the score of the occluded scan, which :func:`monai_occlusion` turns into SegXAI's drop); the
benchmark compares maps by Pearson correlation, which ignores scale and offset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from SegXAILib.explain.targets import target_scores


@dataclass
class Problem:
    """One explanation problem, as every tool receives it.

    Attributes:
        network: maps (N, C, D, H, W) to (N, n_classes, D, H, W), eval mode.
        image: (1, C, D, H, W).
        channels: the target's output channels.
        region: R, bool (D, H, W).
        layer: the explained layer's name in ``network.named_modules()``.
        output: what the network returns (the model card's ``output``).
        baseline: the value occlusion and integrated gradients put in place of the scan.
    """

    network: nn.Module
    image: torch.Tensor
    channels: list[int]
    region: np.ndarray
    layer: str
    output: str = "logits"
    baseline: float = 0.0

    def score(self, output: torch.Tensor) -> torch.Tensor:
        """S of each example: (N, n_classes, D, H, W) -> (N,)."""
        return target_scores(output, self.channels, torch.from_numpy(self.region), self.output)

    @property
    def module(self) -> nn.Module:
        return dict(self.network.named_modules())[self.layer]


class RegionScore(nn.Module):
    """The network followed by the score: (N, C, D, H, W) -> (N, 1), a one-class 'classifier' whose class 0 is S."""

    def __init__(self, problem: Problem) -> None:
        super().__init__()
        self.network = problem.network
        self.problem = problem

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.problem.score(self.network(x))[:, None]


def _grid(cam: torch.Tensor) -> np.ndarray:
    """(1, 1, D, H, W) or (D, H, W) map -> (D, H, W) float32 array."""
    return cam.detach().reshape(cam.shape[-3:]).float().cpu().numpy()


def monai_gradcam(problem: Problem, plusplus: bool = False) -> np.ndarray:
    """MONAI ``GradCAM`` (``GradCAMpp``) of S at the layer, upsampled by MONAI (trilinear); without MONAI's default
    post-processing, which maps (min, max) to (1, 0) for display. MONAI's Grad-CAM++ multiplies the gradients by
    exp(S), which overflows (a NaN map) for a score summed over thousands of voxels. The hooks MONAI registers stay
    on the network."""
    from monai.visualize import GradCAM, GradCAMpp

    cam = (GradCAMpp if plusplus else GradCAM)(nn_module=RegionScore(problem), target_layers=f"network.{problem.layer}",
                                                postprocessing=lambda x: x)
    return _grid(cam(problem.image, class_idx=0))


def captum_gradcam(problem: Problem) -> np.ndarray:
    """captum ``LayerGradCam`` of S (ReLU of the channel sum, as Grad-CAM), brought to the input grid by captum's
    ``LayerAttribution.interpolate`` (trilinear, as SegXAI). captum has no Grad-CAM++."""
    from captum.attr import LayerAttribution, LayerGradCam

    attribution = LayerGradCam(RegionScore(problem), problem.module).attribute(problem.image, target=0,
                                                                                relu_attributions=True)
    return _grid(LayerAttribution.interpolate(attribution, tuple(problem.image.shape[2:]), "trilinear"))


def pytorch_grad_cam(problem: Problem, plusplus: bool = False) -> np.ndarray:
    """pytorch-grad-cam's ``GradCAM`` (``GradCAMPlusPlus``) with S as the target; its own resizing and scaling."""
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus

    def target(output: torch.Tensor) -> torch.Tensor:  # one example's output, (n_classes, D, H, W)
        return problem.score(output[None])[0]

    with (GradCAMPlusPlus if plusplus else GradCAM)(model=problem.network, target_layers=[problem.module]) as cam:
        return cam(input_tensor=problem.image, targets=[target])[0].astype(np.float32)


def medcam_gradcam(problem: Problem, plusplus: bool = False) -> np.ndarray:
    """medcam's ``gcam`` (``gcampp``) backend at the layer; its ``label`` callable returns dS/dz as the gradient
    mask it back-propagates, so the layer gets dS/dA. medcam normalises and upsamples (its ``interpolate``). Its
    Grad-CAM++ multiplies the layer's gradients by exp of the masked network output, so it raises a RuntimeError
    unless the network has as many output classes as the layer has channels."""
    from medcam import medcam

    def gradient_of_score(output: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            z = output.detach().requires_grad_()
            return torch.autograd.grad(problem.score(z).sum(), z)[0]

    injected = medcam.inject(problem.network, backend="gcampp" if plusplus else "gcam", layer=problem.layer,
                             label=gradient_of_score, replace=True)
    return _grid(torch.as_tensor(injected(problem.image)))


def nnunetv2_cam_gradcam(predictor, image: torch.Tensor, layer: str, target_class: int = 1) -> np.ndarray:
    """nnunetv2-cam's Grad-CAM (``compute_cam_with_sliding_window``, ``cam_type="3d"``) of an nnU-Net predictor's
    network on its preprocessed (C, D, H, W) ``image``, in its own windows over the predictor's folds with the
    predictor's tile step and mirroring; (D, H, W) float32 on the same grid.

    Its target is its own, not SegXAI's score, and its API takes no region: in each window it segments (mirrored
    when the predictor mirrors), takes the mask of ``target_class`` there and back-propagates the network's output
    summed over that mask (its ``SemanticSegmentationTarget`` sums every output channel there, not only the
    class's); each window's CAM is min-max normalised by pytorch-grad-cam, resized by ``scipy.ndimage.zoom``, and the
    windows averaged with equal weights in float16 and multiplied by 1.3. Its target puts the mask on the GPU
    whenever CUDA is available, so there the predictor's device must be CUDA."""
    from nnunetv2_cam.cam_core import compute_cam_with_sliding_window

    cam = compute_cam_with_sliding_window(
        model=predictor.network, data=image, target_layer_name=layer, target_class=target_class, method="gradcam",
        device=predictor.device, configuration_manager=predictor.configuration_manager,
        label_manager=predictor.label_manager, list_of_parameters=predictor.list_of_parameters,
        tile_step_size=predictor.tile_step_size, use_mirroring=predictor.use_mirroring,
        allowed_mirroring_axes=predictor.allowed_mirroring_axes, cam_type="3d")
    return _grid(cam)


def monai_occlusion(problem: Problem, cube: int, stride: int, box: tuple[tuple[int, ...], tuple[int, ...]],
                    batch: int = 4) -> np.ndarray:
    """MONAI ``OcclusionSensitivity`` of S over ``box`` ((start, stop) per axis, half-open: MONAI's ``b_box``),
    as the mean drop S(X) - S(X occluded) over the cubes covering each voxel (SegXAI's occlusion map; MONAI's map
    is the mean occluded score). MONAI places cubes of ``cube`` voxels at ``baseline`` every ``stride`` voxels from
    (cube - 1) // 2 voxels before the box to as many after it. NaN outside the box (not computed there)."""
    from monai.visualize import OcclusionSensitivity

    occlusion = OcclusionSensitivity(RegionScore(problem), mask_size=cube, n_batch=batch, mode=float(problem.baseline),
                                     overlap=1 - stride / cube, activate=False)
    b_box = [v for low, high in zip(*box) for v in (low, high)]  # documented inclusive, cropped as exclusive
    with torch.no_grad():
        occluded, _ = occlusion(problem.image, b_box=b_box)
        score = float(problem.score(problem.network(problem.image))[0])
    drop = np.full(problem.region.shape, np.nan, np.float32)
    drop[tuple(slice(low, high) for low, high in zip(*box))] = score - _grid(occluded)
    return drop


def captum_integrated_gradients(problem: Problem, steps: int, batch: int = 4) -> np.ndarray:
    """captum ``IntegratedGradients`` of S from the constant baseline, trapezoid rule, summed over input channels."""
    from captum.attr import IntegratedGradients

    attribution = IntegratedGradients(RegionScore(problem)).attribute(
        problem.image, baselines=float(problem.baseline), target=0, n_steps=steps, method="riemann_trapezoid",
        internal_batch_size=batch)
    return attribution[0].sum(0).detach().float().cpu().numpy()


def activation_and_gradient(problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output A and dS/dA, (1, C_l, d, h, w) float64, by plain autograd: the whole scan in one pass,
    A kept with ``retain_grad``."""
    kept: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        kept["A"] = output

    image = problem.image.clone().requires_grad_()  # a graph even when the parameters are frozen
    handle = problem.module.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            problem.score(problem.network(image)).sum().backward()
    finally:
        handle.remove()
    return kept["A"].detach().double(), kept["A"].grad.double()


def layer_cam(alpha: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """ReLU(sum_k alpha_k A_k) on the layer's grid: (1, 1, d, h, w) float32."""
    return F.relu((alpha * activation).sum(1, keepdim=True)).float()


def cam_on_grid(alpha: torch.Tensor, activation: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """:func:`layer_cam` upsampled trilinearly (align_corners=False) to ``shape``: (D, H, W) float32."""
    return _grid(F.interpolate(layer_cam(alpha, activation), size=shape, mode="trilinear", align_corners=False))


def gradcam_weights(problem: Problem, plusplus: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM's (Grad-CAM++'s) channel weights alpha, (1, C_l, 1, 1, 1), and the layer's output A, written out
    from their definition (METHODS.md section 1) on :func:`activation_and_gradient`:

        alpha_k = mean_p G_k(p)                                   (Grad-CAM)
        alpha_k = sum_p ReLU(G_k(p)) G^2 / (2 G^2 + sum_q A_k(q) G^3)   (Grad-CAM++, 0 where the denominator is)
    """
    a, g = activation_and_gradient(problem)
    if plusplus:
        denominator = 2 * g**2 + a.sum(dim=(2, 3, 4), keepdim=True) * g**3
        ratio = torch.where(denominator != 0, g**2 / torch.where(denominator != 0, denominator, 1), 0)
        return (ratio * F.relu(g)).sum(dim=(2, 3, 4), keepdim=True), a
    return g.mean(dim=(2, 3, 4), keepdim=True), a


def brute_force_gradcam(problem: Problem, plusplus: bool = False) -> np.ndarray:
    """Grad-CAM (Grad-CAM++) from :func:`gradcam_weights`, on the scan's grid (:func:`cam_on_grid`)."""
    return cam_on_grid(*gradcam_weights(problem, plusplus), tuple(problem.image.shape[2:]))


GRADCAM_PEERS: dict[str, Callable[[Problem], np.ndarray]] = {
    "monai": monai_gradcam, "captum": captum_gradcam, "pytorch-grad-cam": pytorch_grad_cam, "medcam": medcam_gradcam}
GRADCAMPP_PEERS: dict[str, Callable[[Problem], np.ndarray]] = {
    "monai": lambda p: monai_gradcam(p, plusplus=True), "pytorch-grad-cam": lambda p: pytorch_grad_cam(p, True),
    "medcam": lambda p: medcam_gradcam(p, plusplus=True)}
"""Each tool's Grad-CAM (Grad-CAM++) adapter by tool name (captum has no Grad-CAM++)."""

IMPORTS = {"monai": "monai", "captum": "captum", "pytorch-grad-cam": "pytorch_grad_cam", "medcam": "medcam",
           "nnunetv2-cam": "nnunetv2_cam.cam_core"}
"""The module each tool is imported as."""


def import_failure(tool: str) -> str | None:
    """Why the tool cannot be imported here (``pip install -e ".[bench]"``), or ``None`` when it can."""
    import importlib

    try:
        importlib.import_module(IMPORTS[tool])
    except Exception as error:  # noqa: BLE001 - any import failure (a missing package, a mismatched torchvision)
        return f"{type(error).__name__}: {str(error).splitlines()[0][:120]}" if str(error) else type(error).__name__
    return None


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps over the voxels where both are finite (NaN when fewer than two are, or
    when one map is constant there)."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    both = np.isfinite(a) & np.isfinite(b)
    a, b = a[both], b[both]
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])
