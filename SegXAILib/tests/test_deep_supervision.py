"""MHEX+ CAMs and the collaboration-gradient uncertainty on nnU-Net's deep-supervision heads (METHODS.md section 10).

References: nnU-Net's own network built with ``deep_supervision=True`` (its list of head outputs), and the
brute-force collaboration gradient (one autograd call per voxel and head) on tiny randomly initialised
``dynamic_network_architectures`` U-Nets. The real model is the committed ``nnunet-lesion-tiny``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from SegXAILib.explain.mhex import MHEXCAM, head_cams
from SegXAILib.models import registry
from SegXAILib.models.deep_supervision import head_outputs, is_deep_supervised_unet, last_convolution, trained_heads
from SegXAILib.uncertainty.collaboration import (
    CollaborationUncertainty,
    collaboration_map,
    collaboration_reference,
    pair_stages,
)

pytest.importorskip("nnunetv2", reason="nnU-Net models need nnunetv2 (pip install 'segxai[nnunet]')")
from dynamic_network_architectures.architectures.unet import (  # noqa: E402 - after the skip
    PlainConvUNet,
    ResidualEncoderUNet,
    ResidualUNet,
)

MODEL = registry.BUNDLED_DIR / "nnunet-lesion-tiny"
CROP_VOXELS = 48  # of the 2.5 mm held-out scan around its lesion: nnU-Net's 3 mm grid then fits one window


def tiny_unet(architecture: type = PlainConvUNet, deep_supervision: bool = False) -> nn.Module:
    """Four stages of two channels (three decoder heads, two pairs), PyTorch's random initialisation (every bias
    non-zero: every head counts as trained); eval mode."""
    torch.manual_seed(0)
    depth = "n_conv_per_stage" if architecture is PlainConvUNet else "n_blocks_per_stage"
    return architecture(
        input_channels=1, n_stages=4, features_per_stage=(2, 2, 2, 2), conv_op=nn.Conv3d, kernel_sizes=3,
        strides=(1, 2, 2, 2), num_classes=2, n_conv_per_stage_decoder=1, conv_bias=True, norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
        deep_supervision=deep_supervision, **{depth: 1}).eval()


def nnunet_with_deep_supervision(network: nn.Module) -> nn.Module:
    """The committed model's network as nnU-Net builds it for training (every head returned), same weights."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    architecture = json.loads((MODEL / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"]
    reference = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                       architecture["_kw_requires_import"], 1, 2, allow_init=False,
                                       deep_supervision=True)
    reference.load_state_dict(network.state_dict())
    return reference.eval()


def unchanged(network: nn.Module, parameters: dict[str, nn.Parameter]) -> bool:
    """The same parameter objects, no hook left on any module, the deep-supervision flag as built."""
    hooks = any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in network.modules())
    now = dict(network.named_parameters())
    return (not hooks and not network.decoder.deep_supervision and now.keys() == parameters.keys()
            and all(now[name] is parameter for name, parameter in parameters.items()))


# ----------------------------------------------------------------------------- the heads and their CAMs
def test_stage_cams_are_the_heads_nnunet_trains() -> None:
    network = registry.load_model(MODEL).network
    parameters = dict(network.named_parameters())
    image = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 1, 32, 32, 32)).astype(np.float32))
    with torch.no_grad():
        expected = nnunet_with_deep_supervision(network)(image)[::-1]  # nnU-Net lists them fine to coarse
        heads = head_outputs(network, image)
        cams = head_cams(network, image, [1], [0, 1, 2, 3])
        final = network(image)
    assert is_deep_supervised_unet(network) and len(heads) == len(expected) == 4
    for head, cam, logits in zip(heads, cams, expected):
        torch.testing.assert_close(head.logits, logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cam, logits[:, 1:2], atol=1e-5, rtol=1e-5)
    assert torch.equal(heads[-1].logits, final)
    assert unchanged(network, parameters)
    # nnU-Net's trainer gives the coarsest head loss weight 0: it kept its initial (zero) bias
    assert trained_heads(network) == [1, 2, 3] and pair_stages(network) == [1, 2]


@pytest.mark.parametrize("architecture", [PlainConvUNet, ResidualEncoderUNet, ResidualUNet])
def test_heads_of_every_dynamic_architecture(architecture: type) -> None:
    network, reference = tiny_unet(architecture), tiny_unet(architecture, deep_supervision=True)
    reference.load_state_dict(network.state_dict())
    image = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        for head, logits in zip(head_outputs(network, image), reference(image)[::-1]):
            torch.testing.assert_close(head.logits, logits)
    assert trained_heads(network) == [0, 1, 2]


def test_last_convolution_is_the_main_path_not_a_shortcut() -> None:
    assert last_convolution(tiny_unet(), 0)[0] == "convs.0.conv"
    network = tiny_unet(ResidualUNet)
    name, convolution = last_convolution(network, 0)
    assert name == "blocks.0.conv2.conv" and convolution is network.decoder.stages[0].blocks[0].conv2.conv


@pytest.fixture(scope="module")
def lesion_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """``segxai explain`` of a held-out lesion scan (cropped around the lesion) with mhex and mhex-uncertainty on
    the nnU-Net model: the output folder and the scan's true lesion."""
    from SegXAILib.cli import main

    from .test_nnunet import held_out_case

    folder = tmp_path_factory.mktemp("nnunet_mhex")
    scan_path, lesion = held_out_case(folder)
    found = np.argwhere(lesion)
    start = [int(c) - CROP_VOXELS // 2 for c in (found.min(0) + found.max(0)) // 2]  # (K, J, I)
    k, j, i = (slice(s, s + CROP_VOXELS) for s in start)
    scan = sitk.ReadImage(str(scan_path))
    sitk.WriteImage(scan[i, j, k], str(folder / "crop.nii.gz"))
    out = folder / "out"
    assert main(["explain", str(folder / "crop.nii.gz"), "--model", str(MODEL), "--methods", "mhex,mhex-uncertainty",
                 "--option", "mhex-uncertainty.k=2", "--out", str(out), "--no-report", "--progress", "none"]) == 0
    return out, lesion[k, j, i]


@pytest.mark.slow
def test_explain_writes_the_nnunet_head_maps(lesion_run: tuple[Path, np.ndarray]) -> None:
    out, _ = lesion_run
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["not_applicable"] == {}
    written = {p.name for p in (out / "maps").iterdir()}
    assert written == {"mhex_lesion.nii.gz", "mhex-stage2_lesion.nii.gz", "mhex-stage3_lesion.nii.gz",
                       "mhex-stage4_lesion.nii.gz", "mhex-uncertainty_lesion.nii.gz"}
    metadata = {e["method"]: e["metadata"] for e in summary["explanations"]}
    assert metadata["mhex"]["heads"] == ["decoder.seg_layers[1]", "decoder.seg_layers[2]", "decoder.seg_layers[3]"]
    assert metadata["mhex"]["untrained_heads_left_out"] == ["decoder.seg_layers[0]"]
    assert metadata["mhex-uncertainty"]["shared_parameters"] == ["decoder.stages.1.convs.1.conv.weight",
                                                                 "decoder.stages.2.convs.1.conv.weight"]
    uncertainty = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "maps" / "mhex-uncertainty_lesion.nii.gz")))
    assert 0.0 <= uncertainty.min() < uncertainty.max() <= 2.0


@pytest.mark.slow
def test_stage_maps_peak_inside_the_predicted_lesion(lesion_run: tuple[Path, np.ndarray]) -> None:
    out, lesion = lesion_run
    predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "segmentation.nii.gz"))) == 1
    assert 2 * (predicted & lesion).sum() / (predicted.sum() + lesion.sum()) > 0.5  # the model found the lesion
    for name in ("mhex", "mhex-stage2", "mhex-stage3", "mhex-stage4"):
        cam = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "maps" / f"{name}_lesion.nii.gz")))
        assert predicted[np.unravel_index(np.argmax(cam), cam.shape)], f"{name} peaks outside the predicted lesion"
        assert predicted[cam >= np.quantile(cam, 0.99)].mean() > 0.95, name


# ----------------------------------------------------------------------------- the collaboration gradient
@pytest.fixture(scope="module")
def collaboration_case() -> tuple[nn.Module, torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """A tiny PlainConvUNet on 16^3 noise, its pseudo-label, 60 voxels and the brute-force map there."""
    network = tiny_unet()
    image = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 1, 16, 16, 16)).astype(np.float32))
    with torch.no_grad():
        label = network(image).argmax(1)
    voxels = np.stack(np.unravel_index(np.random.default_rng(0).choice(16 ** 3, 60, replace=False), (16,) * 3), 1)
    reference, _ = collaboration_reference(network, image, label, voxels)
    return network, image, label, voxels, reference


def test_exact_route_equals_brute_force(collaboration_case) -> None:
    network, image, label, voxels, reference = collaboration_case
    parameters = dict(network.named_parameters())
    assert 0 < label.float().mean() < 1 and reference.std() > 0.1  # both classes, a map with contrast
    uncertainty, zero = collaboration_map(network, image, label, route="exact", chunk=72)
    np.testing.assert_allclose(uncertainty[0, 0].numpy()[tuple(voxels.T)], reference, atol=1e-4)
    assert not zero.any()
    assert unchanged(network, parameters)  # the swapped-in weight of every pass was put back


def test_exact_route_through_residual_decoder_blocks() -> None:
    network = tiny_unet(ResidualUNet)
    image = torch.from_numpy(np.random.default_rng(2).standard_normal((1, 1, 16, 16, 16)).astype(np.float32))
    label = torch.from_numpy((np.indices((16, 16, 16)).sum(0) % 2)[None])  # both classes, whatever the network says
    voxels = np.stack(np.unravel_index(np.random.default_rng(0).choice(16 ** 3, 12, replace=False), (16,) * 3), 1)
    reference, _ = collaboration_reference(network, image, label, voxels)
    uncertainty, _ = collaboration_map(network, image, label, route="exact", chunk=72)
    np.testing.assert_allclose(uncertainty[0, 0].numpy()[tuple(voxels.T)], reference, atol=1e-4)


def test_sketch_correlates_with_brute_force(collaboration_case) -> None:
    network, image, label, voxels, reference = collaboration_case
    uncertainty, _ = collaboration_map(network, image, label, k=256, chunk=64)
    sketch = uncertainty[0, 0].numpy()[tuple(voxels.T)]
    assert np.corrcoef(sketch, reference)[0, 1] > 0.9
    assert np.abs(sketch - reference).mean() < 0.1


def test_zero_gradient_voxels_are_counted_and_maximal(collaboration_case) -> None:
    _, image, label, voxels, _ = collaboration_case
    saturated = tiny_unet()
    with torch.no_grad():  # the finest head says lesion so loudly that float32's softmax there is exactly (0, 1)
        saturated.decoder.seg_layers[2].bias.copy_(torch.tensor([0.0, 1e3]))
    reference, zero = collaboration_reference(saturated, image, label, voxels)
    uncertainty, zero_map = collaboration_map(saturated, image, label, route="exact", chunk=72)
    # its loss has no gradient where the pseudo-label agrees with it, and a full one where it does not
    np.testing.assert_array_equal(zero, label[(0, *voxels.T)].numpy() == 1)
    assert 0 < zero.sum() < len(zero)
    np.testing.assert_array_equal(zero_map[0, 0].numpy()[tuple(voxels.T)], zero)
    np.testing.assert_allclose(uncertainty[0, 0].numpy()[tuple(voxels.T)], reference, atol=1e-4)
    assert (reference[zero] == 2.0).all()


def test_methods_apply_to_the_nnunet_model() -> None:
    model = registry.load_model(MODEL)
    MHEXCAM().check_applicable(model)
    CollaborationUncertainty().check_applicable(model)
