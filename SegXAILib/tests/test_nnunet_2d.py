"""A 2D nnU-Net model (configuration ``2d``) segments as ``nnUNetv2_predict -c 2d`` does and is explained slice by
slice through its lifted network (SegXAILib/models/lift2d.py).

The model is the committed ``SegXAILib/models/weights/nnunet-lesion-tiny-2d`` (nnU-Net's own trainer, one epoch of
fold 0 on the synthetic lesion cases of the 3D test model: docs/nnunet.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from SegXAILib.errors import SegXAIError
from SegXAILib.models import registry
from SegXAILib.models.lift2d import lift_2d_network
from SegXAILib.models.loaders import LoadedModel
from SegXAILib.models.nnunet import card_from_nnunet

pytest.importorskip("nnunetv2", reason="nnU-Net models need nnunetv2 (pip install 'segxai[nnunet]')")
from .test_nnunet import held_out_case, nnunet_model, nnunet_predict  # noqa: E402 - after the skip

MODEL = registry.BUNDLED_DIR / "nnunet-lesion-tiny-2d"
SLAB_SLICES = 24  # of the 2.5 mm held-out scan around its lesion, whole slices: the 2D model needs the slice's
# context (cropped within the slice, a 40-voxel cube around the lesion, it finds no lesion at all)


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return registry.load_model(MODEL)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    return held_out_case(tmp_path_factory.mktemp("held_out_2d"))


def test_card_is_one_slice_thick() -> None:
    card = card_from_nnunet(MODEL)
    assert card.extra["nnunet_configuration"] == "2d"
    assert card.patch_size[0] == 1 and len(card.patch_size) == 3


def test_lifted_network_computes_the_2d_networks_numbers(model: LoadedModel) -> None:
    flat = nnunet_model(model).network  # nnU-Net's predictor keeps the 2D network
    assert any(isinstance(m, nn.Conv2d) for m in flat.modules())
    assert not any(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.InstanceNorm2d)) for m in model.network.modules())
    image = torch.randn(2, 1, *model.card.patch_size[1:], generator=torch.Generator().manual_seed(0))
    activations: list[torch.Tensor] = []
    hook = model.network.get_submodule("decoder.stages.1").register_forward_hook(
        lambda _m, _i, output: activations.append(output))
    with torch.inference_mode():
        ours, theirs = model.network(image[:, :, None]), flat.eval()(image)
    hook.remove()
    assert ours.shape == (2, 2, 1, *image.shape[2:])
    scale = float(theirs.abs().max())
    assert scale > 1.0  # trained weights, not a network returning zeros
    assert torch.allclose(ours[:, :, 0], theirs, rtol=0, atol=1e-5 * scale)  # float32 sums in another order
    assert activations[0].ndim == 5 and activations[0].shape[2] == 1
    # each fold (an ensemble member) is lifted too
    with torch.inference_mode():
        assert torch.allclose(model.member(0)(image[:, :, None]), ours, atol=1e-6)
    # nnU-Net mirrors a 2D network along its two axes: H and W of the model grid (not the slice axis)
    assert model.card.inference["mirror_axes"] == [1, 2]


def test_every_lifted_layer_hooked_by_its_name_is_the_one_forward_runs(model: LoadedModel) -> None:
    """nnU-Net's blocks reach a layer under two names (``conv`` and ``all_modules.0``); both must be the one twin,
    or a hook or a parameter swapped by its name (Grad-CAM's layers, the collaboration gradient's theta) would miss
    the layer forward runs."""
    called: set[str] = set()
    # the deep-supervision heads but the last do not run in forward (deep_supervision=False): left out here
    layers = [(name, m) for name, m in model.network.named_modules() if isinstance(m, (nn.Conv3d, nn.InstanceNorm3d))
              and not name.startswith("decoder.seg_layers.")]
    hooks = [m.register_forward_hook(lambda _m, _i, _o, name=name: called.add(name)) for name, m in layers]
    with torch.inference_mode():
        model.network(torch.zeros(1, 1, 1, *model.card.patch_size[1:]))
    for hook in hooks:
        hook.remove()
    assert len(layers) > 20 and called == {name for name, _ in layers}


def test_an_unknown_layer_is_refused_by_name() -> None:
    network = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Upsample(scale_factor=2))
    with pytest.raises(SegXAIError, match=r"network\.1 is a torch\.nn\.modules\.upsampling\.Upsample"):
        lift_2d_network(network)


def test_labels_equal_nnunet_predict_2d(model: LoadedModel, held_out: tuple[Path, np.ndarray],
                                        tmp_path: Path) -> None:
    from SegXAILib.inference import segment
    from SegXAILib.volume import read_volume

    labels, _ = nnunet_predict(held_out[0].parent, MODEL, tmp_path, "-f", "0", configuration="2d")
    found, lesion = labels == 1, held_out[1]
    assert 2 * (found & lesion).sum() / (found.sum() + lesion.sum()) > 0.3, "nnU-Net's 2D model finds no lesion"
    result = segment(read_volume(held_out[0]), model, device="cpu")
    assert np.array_equal(result.labels.array, labels), \
        f"{int((result.labels.array != labels).sum())} voxels differ from nnUNetv2_predict -c 2d"


@pytest.fixture(scope="module")
def explained(held_out: tuple[Path, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """``segxai explain`` of a slab of the held-out scan's slices around its lesion with gradcam, tta and occlusion
    on the 2D model: the output folder and the slab's true lesion."""
    from SegXAILib.cli import main

    scan_path, lesion = held_out
    folder = tmp_path_factory.mktemp("explain_2d")
    found = np.argwhere(lesion)[:, 0]  # slices (K) holding lesion
    start = int(found.min() + found.max()) // 2 - SLAB_SLICES // 2
    k = slice(start, start + SLAB_SLICES)
    sitk.WriteImage(sitk.ReadImage(str(scan_path))[:, :, k], str(folder / "crop.nii.gz"))
    out = folder / "out"
    assert main(["explain", str(folder / "crop.nii.gz"), "--model", str(MODEL), "--methods", "gradcam,tta,occlusion",
                 "--out", str(out), "--no-report", "--progress", "none"]) == 0
    return out, lesion[k]


def test_explanations_of_the_2d_model_lie_on_the_scan(explained: tuple[Path, np.ndarray]) -> None:
    out, lesion = explained
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["not_applicable"] == {}
    predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "segmentation.nii.gz"))) == 1
    assert predicted.shape == lesion.shape
    assert 2 * (predicted & lesion).sum() / (predicted.sum() + lesion.sum()) > 0.7, "the 2D model misses the lesion"
    maps = {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in (out / "maps").iterdir()}
    assert {name.split("_")[0].split("-")[0] for name in maps} == {"gradcam", "tta", "occlusion"}
    assert all(m.shape == lesion.shape and np.isfinite(m).all() and m.max() > m.min() for m in maps.values())
    cam = maps["gradcam_lesion.nii.gz"]
    assert predicted[np.unravel_index(np.argmax(cam), cam.shape)], "Grad-CAM peaks outside the predicted lesion"
    assert predicted[cam >= np.quantile(cam, 0.99)].mean() > 0.9
    # each slice is its own window: a slice with no predicted lesion within one slice of it (on the scan's grid;
    # the model's is coarser) has no lesion score to explain
    empty = np.convolve(predicted.any((1, 2)), np.ones(3), "same") == 0
    assert empty.any() and cam[empty].max() == 0
    occlusion = maps["occlusion_lesion.nii.gz"]
    assert occlusion[predicted].mean() > 3 * occlusion[~predicted].mean()  # hiding the lesion lowers its score most
