"""An nnU-Net v2 model of several input channels takes one scan per channel, in the order of its ``channel_names``,
and segments them as ``nnUNetv2_predict`` does.

The model is the committed ``nnunet-lesion-tiny`` (fold 0) widened to two channels, T1 and the T1 inverted (its
intensities negated): the first convolution keeps its trained weights for channel 0 and takes their negation for
channel 1, so that both channels show it the lesion (nnU-Net normalises each channel to zero mean and unit variance,
and the inverted scan becomes the negated T1 exactly). Given in the other order, its first layer sees the negated
image: the labels change, which shows that the scans are taken in the model's order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SegXAILib.errors import SegXAIError
from SegXAILib.inference import segment
from SegXAILib.models import registry
from SegXAILib.models.loaders import LoadedModel
from SegXAILib.models.nnunet import read_checkpoint
from SegXAILib.volume import read_volume

pytest.importorskip("nnunetv2", reason="nnU-Net models need nnunetv2 (pip install 'segxai[nnunet]')")
from .test_nnunet import MODEL, held_out_case, nnunet_predict  # noqa: E402 - after the skip

SEQUENCES = ("T1", "T1 inverted")


def negated_intensities(properties: dict[str, float]) -> dict[str, float]:
    """nnU-Net's foreground intensity statistics of a channel, for the channel's negation."""
    flipped = {"max": "min", "min": "max", "mean": "mean", "median": "median",
               "percentile_00_5": "percentile_99_5", "percentile_99_5": "percentile_00_5"}
    return {**{key: -properties[of] for key, of in flipped.items()}, "std": properties["std"]}


def two_channel_model(folder: Path) -> Path:
    """The committed model's fold 0 widened to take :data:`SEQUENCES`, written to ``folder`` as nnU-Net's
    trained-model folder: ``dataset.json`` and ``plans.json`` of two channels (the same z-score normalisation for
    both, the second channel's intensity statistics those of the negated T1), the checkpoint's first convolution
    (C_out, 1, 3, 3, 3) widened to (C_out, 2, 3, 3, 3) and nothing else in it changed."""
    dataset = json.loads((MODEL / "dataset.json").read_text())
    dataset["channel_names"] = {str(n): name for n, name in enumerate(SEQUENCES)}
    plans = json.loads((MODEL / "plans.json").read_text())
    intensities = plans["foreground_intensity_properties_per_channel"]
    intensities["1"] = negated_intensities(intensities["0"])
    for configuration in plans["configurations"].values():  # one entry per channel
        for key in ("normalization_schemes", "use_mask_for_norm"):
            if key in configuration:
                configuration[key] = configuration[key] * len(SEQUENCES)
    checkpoint = read_checkpoint(MODEL / "fold_0" / "checkpoint_final.pth")
    checkpoint["init_args"].update(plans=plans, dataset_json=dataset)
    weights = checkpoint["network_weights"]
    widened = [name for name, w in weights.items() if w.ndim == 5 and w.shape[1] == 1]
    assert widened and all("stages.0.0.convs.0." in name for name in widened)  # the first convolution's names
    for name in widened:
        weights[name] = torch.cat([weights[name], -weights[name]], dim=1)
    (folder / "fold_0").mkdir(parents=True)
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    # nnUNetv2_predict -f 0 --disable_tta (nnunet_predict leaves this file out), quicker than mirroring
    (folder / "segxai.json").write_text(json.dumps({"configuration": "3d_fullres", "mirroring": False}))
    return folder


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    """The held-out scan (channel 0, ``case_0000.nii.gz``), its inverted copy beside it (channel 1,
    ``case_0001.nii.gz``: nnU-Net's names) and its lesion mask (K, J, I)."""
    first, lesion = held_out_case(tmp_path_factory.mktemp("held_out_channels"))
    second = first.with_name("case_0001.nii.gz")
    sitk.WriteImage(-sitk.ReadImage(str(first)), str(second))
    return first, second, lesion


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return two_channel_model(tmp_path_factory.mktemp("models") / "nnunet-lesion-two-channels")


@pytest.fixture(scope="module")
def model(folder: Path) -> LoadedModel:
    return registry.load_model(folder)


@pytest.fixture(scope="module")
def nnunet_labels(case: tuple[Path, Path, np.ndarray], folder: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """``nnUNetv2_predict``'s labels (K, J, I) for the two scan files (fold 0, no mirroring)."""
    labels, _ = nnunet_predict(case[0].parent, folder, tmp_path_factory.mktemp("nnunet"), "-f", "0", "--disable_tta")
    return labels


def test_card_names_the_channels(model: LoadedModel) -> None:
    assert model.card.input_channels == 2 and list(model.card.sequence_names) == list(SEQUENCES)


@pytest.mark.slow  # nnUNetv2_predict in a child process: about 30 s
def test_two_scans_segment_as_nnunet_predict_in_their_order(case: tuple[Path, Path, np.ndarray],
                                                             model: LoadedModel, nnunet_labels: np.ndarray) -> None:
    t1, inverted = read_volume(case[0]), read_volume(case[1])
    labels = segment([t1, inverted], model, device="cpu").labels.array
    assert np.array_equal(labels, nnunet_labels), f"{int((labels != nnunet_labels).sum())} voxels differ from " \
        "nnUNetv2_predict"
    found, lesion = labels == 1, case[2]
    dice = 2 * (found & lesion).sum() / (found.sum() + lesion.sum())
    assert dice > 0.5, f"the two-channel model's segmentation of the held-out lesion is trivial (Dice {dice:.2f})"
    swapped = segment([inverted, t1], model, device="cpu").labels.array == 1
    assert (swapped != found).sum() > 0.5 * found.sum(), "the scans' order should matter to the model"


def test_one_scan_is_refused_naming_the_sequences(case: tuple[Path, Path, np.ndarray], model: LoadedModel) -> None:
    with pytest.raises(SegXAIError) as refused:
        segment(read_volume(case[0]), model, device="cpu")
    message = str(refused.value)
    assert "in this order: T1, T1 inverted; 1 given" in message and "\n" not in message
