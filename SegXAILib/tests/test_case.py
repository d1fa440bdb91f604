"""One case from scan to verdict (SegXAILib.case): artefacts computed once, judging without files,
options checked before any work, and the README's notebook example."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import SegXAILib
import SegXAILib.data.brain_mask
from SegXAILib.case import explain_case
from SegXAILib.cli import main
from SegXAILib.models.registry import load_model
from SegXAILib.volume import Volume, write_volume

from .conftest import make_card

README = Path(__file__).resolve().parents[2] / "README.md"

EUNET = {"name": "eunet", "args": {"channels": [4, 8, 16, 32], "strides": [2, 2, 2], "head_channels": 4,
                                   "dropout": 0.3}}


def ball_head(shape=(40, 40, 40), spacing=2.0) -> Volume:
    """A bright ball of brain (radius 30 mm, 113 mL) in a dark, noisy background."""
    rng = np.random.default_rng(0)
    centre = (np.array(shape) - 1) / 2
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    radius = spacing * np.sqrt((k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2)
    array = np.where(radius < 30.0, 100.0, 5.0) + rng.normal(0, 2, shape)
    return Volume(array.astype(np.float32), spacing=(spacing,) * 3)


@pytest.fixture
def brain_card(tmp_path):
    """A brain MRI card whose every step needs the brain: brain-size spacing, postprocessing, and the
    collaboration-gradient uncertainty compared inside the brain."""
    path = make_card(tmp_path, architecture=EUNET)
    data = json.loads(path.read_text())
    data["preprocessing"]["brain_volume_ml"] = 113
    data["postprocessing"] = {"brain_margin_mm": 10, "min_fraction_in_brain": 0.5}
    path.write_text(json.dumps(data))
    return path


def test_the_brain_is_estimated_once_per_explain_run(tmp_path, brain_card, monkeypatch):
    calls = []
    real = SegXAILib.data.brain_mask.estimate_brain_mask
    monkeypatch.setattr(SegXAILib.data.brain_mask, "estimate_brain_mask",
                        lambda volume: calls.append(volume.shape) or real(volume))
    scan = write_volume(ball_head(), tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    assert main(["explain", str(scan), "--model", str(brain_card), "--methods", "mhex-uncertainty,mcdropout",
                 "--option", "mcdropout.samples=3", "--option", "mhex-uncertainty.k=4", "--out", str(out),
                 "--no-report", "--progress", "none"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["agreement"]["region"] == "brain (estimated mask)"  # the third use of the brain
    assert "postprocess" in summary["seconds"]
    assert calls == [(40, 40, 40)]  # once, on the scan's grid; the model grid gets it resampled


def test_judging_returns_the_verdict_the_summary_records(tmp_path, tiny_card):
    scan = ball_head(shape=(24, 24, 24))
    before = sorted(tmp_path.iterdir())
    case = explain_case(scan, load_model(tiny_card), ["protoseg", "tta"], device="cpu",
                        options={"tta": {"transforms": 2}})
    assert sorted(tmp_path.iterdir()) == before  # explaining and judging wrote nothing
    assert set(case.verdict.scores) >= {"object_volume_ml", "protoseg.mean_sa", "tta.entropy_inside"}
    assert case.verdict.review["needed"] in (True, False) and case.verdict.agreement == {}

    path = write_volume(scan, tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    assert main(["explain", str(path), "--model", str(tiny_card), "--methods", "protoseg,tta",
                 "--option", "tta.transforms=2", "--out", str(out), "--no-report", "--progress", "none"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scores"] == pytest.approx(case.verdict.scores)
    assert summary["review"]["needed"] == case.verdict.review["needed"]
    assert summary["review"]["reasons"] == case.verdict.review["reasons"]


def test_a_known_label_gives_the_dice_of_every_class_and_group(tmp_path, tiny_card):
    """The label's Dice lands in the verdict and in summary["truth"]; it changes no score and no verdict."""
    scan = ball_head(shape=(24, 24, 24))
    model = load_model(tiny_card)
    unlabelled = explain_case(scan, model, ["gradcam"], device="cpu")
    predicted = unlabelled.segmentation.labels.array
    truth = predicted.copy()
    truth[:12] = 0  # the label: the segmentation without its lower half, so every class is a subset of it
    label = scan.with_array(truth)

    def subset_dice(values: list[int]) -> float:
        """Dice of a label B inside the prediction A: 2|B| / (|A| + |B|)."""
        a, b = int(np.isin(predicted, values).sum()), int(np.isin(truth, values).sum())
        return 2 * b / (a + b)

    expected = {"core": subset_dice([1]), "rim": subset_dice([4]), "lesion": subset_dice([1, 4])}
    assert all(0.2 < value < 0.9 for value in expected.values())  # the random network segments both classes
    labelled = explain_case(scan, model, ["gradcam"], device="cpu", label=label)
    assert labelled.verdict.dice == pytest.approx(expected, abs=1e-12) and unlabelled.verdict.dice == {}
    assert labelled.verdict.scores == unlabelled.verdict.scores
    assert labelled.verdict.review == unlabelled.verdict.review

    scan_path, label_path = write_volume(scan, tmp_path / "scan.nii.gz"), write_volume(label, tmp_path / "label.nii.gz")
    out = tmp_path / "out"
    assert main(["explain", str(scan_path), "--model", str(tiny_card), "--methods", "gradcam", "--label",
                 str(label_path), "--out", str(out), "--no-report", "--progress", "none"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["truth"]["label"] == str(label_path)
    assert summary["truth"]["dice"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("option, named", [
    ("protoseg.layer=model.1", ["unknown", "protoseg", "layers"]),
    ("gradcam.lyer=bottleneck", ["unknown", "gradcam", "layer", "region"]),
    ("nosuchmethod.k=3", ["unknown method", "nosuchmethod", "gradcam", "misure"]),
    ("tta.transforms=1", ["tta", "transforms"]),
])
def test_a_bad_option_is_one_error_line_before_any_work(tmp_path, tiny_card, capsys, option, named):
    out = tmp_path / "out"
    missing = tmp_path / "not-read.nii.gz"  # the option is checked before the scan is even read
    assert main(["explain", str(missing), "--model", str(tiny_card), "--methods", "protoseg",
                 "--option", option, "--out", str(out), "--progress", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert all(word in err[0] for word in named), err[0]
    assert not out.exists()


def test_the_audit_refuses_a_bad_option_before_any_case(tmp_path, tiny_card, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    write_volume(ball_head(shape=(24, 24, 24)), cases / "a.nii.gz")
    out = tmp_path / "audit"
    assert main(["audit", str(cases), "--model", str(tiny_card), "--methods", "protoseg",
                 "--option", "protoseg.layer=x", "--out", str(out), "--progress", "none"]) == 2
    assert "layers" in capsys.readouterr().err and not out.exists()


def test_the_public_api_names_exist():
    assert SegXAILib.__version__ == "0.1.0"
    assert set(SegXAILib.__all__) == {"__version__", *SegXAILib.EXPORTS}
    for name in SegXAILib.__all__:
        assert getattr(SegXAILib, name) is not None
    with pytest.raises(AttributeError):
        SegXAILib.not_a_name  # noqa: B018


@pytest.mark.slow
def test_the_readme_notebook_example_runs(tmp_path, monkeypatch):
    """The README's Python example, as written, on a small brain scan standing in for its file name."""
    block = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert block, "README.md lost its notebook example"
    code = block.group(1)
    assert len(code.strip().splitlines()) <= 6
    path = re.search(r'read_volume\("([^"]+)"\)', code).group(1)
    (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
    from SegXAILib.data.samples import mni152_t1

    mni = mni152_t1()  # a real brain MRI, at 3 mm so that the example runs in seconds
    small = Volume(mni.array[::3, ::3, ::3].copy(), spacing=mni.spacing * 3, origin=mni.origin,
                   direction=mni.direction)
    write_volume(small, tmp_path / path)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    case = namespace["case"]
    assert case.segmentation.labels.shape == small.shape
    assert case.run.explanations and all(np.isfinite(m.array).all() for e in case.run.explanations for m in e.maps)
