"""The panel's model facts from the logic (no Qt): what a model is for, and whether running it needs the user's
trust (a TorchScript model, or a MONAI bundle whose config holds code: the widget asks, then the logic passes
``--trust-model-code`` to the child)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("slicer")
from SegXAILib.errors import SegXAIError  # noqa: E402
from SegXAILib.tests.test_bundle_trust import edit_config, expression_in_network_def  # noqa: E402
from SegXAILib.tests.test_model_loading import make_bundle  # noqa: E402
from SegXAILib.tests.test_trust_and_deepbet import marked_model  # noqa: E402
from SegXAILib.volume import Volume  # noqa: E402
from SegXAILogic import (  # noqa: E402
    ExplainLogic,
    availableModels,
    modelDescription,
    modelTargets,
    modelTrustQuestion,
    updateNodeFromVolume,
)
from SegXAILogic.standalone import standaloneScene  # noqa: E402


def test_model_description_shows_intended_use_and_limitations():
    text = modelDescription("brain-lesion-unet")
    assert text.startswith("Intended use: Research and teaching") and "Limitations: NOT validated on real" in text


def test_only_a_torchscript_model_asks_for_trust_and_nothing_is_opened(tmp_path):
    card, marker = marked_model(tmp_path)
    assert modelTrustQuestion("brain-lesion-unet") is None
    question = modelTrustQuestion(str(card))
    assert "runs code stored in its file" in question and question.endswith("Run it?")
    assert not marker.exists()


def test_picking_a_bundle_folder_evaluates_nothing_and_the_question_shows_its_code(tmp_path, monkeypatch):
    """What the panel calls when a bundle folder is picked (its targets and description) and before a run (the
    trust question), and the catalogue with the bundle on SEGXAI_MODEL_PATH: the planted expression never runs."""
    folder, _ = make_bundle(tmp_path / "models" / "spleen")
    marker = tmp_path / "MARKER"
    edit_config(folder, lambda config: expression_in_network_def(config, marker))
    monkeypatch.setenv("SEGXAI_MODEL_PATH", str(tmp_path / "models"))
    assert availableModels()["Tiny spleen"] == folder
    assert modelTargets(str(folder)) == (None, ["spleen"]) and modelDescription(str(folder)) == "a test bundle"
    question = modelTrustQuestion(str(folder))
    assert f"network_def.out_channels runs the Python expression __import__('os').system('touch {marker}')" in question
    assert question.endswith("Run it?") and not marker.exists()
    folder, _ = make_bundle(tmp_path / "clean")
    assert modelTrustQuestion(str(folder)) is None


@pytest.mark.slow
def test_the_child_refuses_it_without_trust_and_runs_it_with(tmp_path):
    card, marker = marked_model(tmp_path)
    scene = standaloneScene().scene
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "scan")
    rng = np.random.default_rng(0)
    updateNodeFromVolume(node, Volume(rng.normal(100, 10, (16, 16, 16)).astype(np.float32), spacing=(2, 2, 2)))
    logic = ExplainLogic(scene)
    with pytest.raises(SegXAIError, match="--trust-model-code"):
        logic.run(node, str(card), ["occlusion"], device="cpu")
    assert not marker.exists()
    results = logic.run(node, str(card), ["occlusion"], device="cpu", trustModelCode=True)
    assert marker.exists() and results.segmentation is not None


@pytest.mark.slow
def test_the_logic_runs_deepbet_on_a_real_head_and_its_mask_is_run_bets(tmp_path):
    """deepbet, a model trained by others on real heads, through the panel's logic: no trust needed (its
    networks are rebuilt eagerly), the run's segmentation equals deepbet's own run_bet mask (Dice >= 0.99)."""
    pytest.importorskip("deepbet")
    import slicer.util

    from SegXAILib.data.samples import mni152_t1
    from SegXAILib.tests.test_trust_and_deepbet import run_bet_mask
    from SegXAILib.volume import read_volume, write_volume

    head = mni152_t1()
    scene = standaloneScene().scene
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "MNI152")
    updateNodeFromVolume(node, head)
    assert modelTrustQuestion("deepbet") is None and "brain" in modelDescription("deepbet").lower()
    results = ExplainLogic(scene).run(node, "deepbet", ["gradcam"], device="cpu", outDir=tmp_path / "out")
    labels = read_volume(tmp_path / "out" / "segmentation.nii.gz").array > 0
    truth = run_bet_mask(str(write_volume(head, tmp_path / "head.nii.gz")))
    assert 2 * np.sum(labels & truth) / (labels.sum() + truth.sum()) >= 0.99
    assert slicer.util.arrayFromVolume(results.map("gradcam")).max() > 0
