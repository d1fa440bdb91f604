"""The CUDA path gives the CPU's results: segmentation (windows in float16 autocast, as SegXAI runs on a GPU),
Grad-CAM, and a MONAI bundle against MONAI's own evaluator. Skipped without an NVIDIA GPU; run on one with
``pytest -m cuda`` (``benchmarks/gpu_check.sh``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SegXAILib.explain.pipeline import explain_segmentation
from SegXAILib.inference import segment
from SegXAILib.methods import get_explainer
from SegXAILib.models import registry
from SegXAILib.tests.test_bundle_pipeline import SPLEEN, monai_labels, phantom_ct, zoo_bundle
from SegXAILib.volume import read_volume, write_volume

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA)")]


@pytest.fixture(scope="module")
def demo_case(tmp_path_factory):
    from SegXAILib.data.lesion import synthesize_lesion
    from SegXAILib.data.samples import load_host

    case = synthesize_lesion(load_host("mni152"), seed=5)
    return case.image


def test_segmentation_on_cuda_equals_the_cpu_in_mixed_precision(demo_case):
    model = registry.load_model("brain-lesion-unet")
    cpu = segment(demo_case, model, device="cpu")
    gpu = segment(demo_case, model, device="cuda")
    assert gpu.device.startswith("cuda")
    assert float((gpu.labels.array == cpu.labels.array).mean()) >= 0.999
    assert np.abs(gpu.probabilities - cpu.probabilities).max() < 2e-2  # float16 windows


def test_gradcam_on_cuda_equals_the_cpu(demo_case):
    model = registry.load_model("brain-lesion-unet")
    maps = {}
    for device in ("cpu", "cuda"):
        segmentation = segment(demo_case, model, device=device)
        run = explain_segmentation(segmentation, model, [get_explainer("gradcam")], None, torch.device(device))
        maps[device] = run.explanations[0].maps[0].array
    assert np.corrcoef(maps["cpu"].ravel(), maps["cuda"].ravel())[0, 1] > 0.99


def test_a_bundle_on_cuda_equals_monai_on_the_cpu(tmp_path):
    scan_file = write_volume(phantom_ct(), tmp_path / "case.nii.gz")
    folder = zoo_bundle(tmp_path / "spleen", SPLEEN, scan_file)
    labels = segment(read_volume(scan_file), registry.load_model(folder), device="cuda").labels.array
    assert float((labels == monai_labels(folder, scan_file, tmp_path / "monai")).mean()) >= 0.999
