"""Cohort audit: finding cases, failures recorded, review order, resuming, a 2-worker Dask cluster, score vs Dice."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import SegXAILib.case
from SegXAILib.audit import (
    AuditSettings,
    CaseRow,
    classifier_note,
    find_cases,
    flag_image_outliers,
    review_order,
    score_vs_dice,
    write_audit,
)
from SegXAILib.cli import main
from SegXAILib.errors import SegXAIError
from SegXAILib.volume import read_volume, write_volume

from .conftest import oblique_scan


def blob_label(scan_path: Path, threshold: float = 60.0):
    image = read_volume(scan_path)
    return image.with_array((image.array > threshold).astype(np.uint8))


@pytest.fixture
def cohort(tmp_path):
    """Two case folders with labels (tiny scans) and one corrupt scan file."""
    cases = tmp_path / "cases"
    for n in range(2):
        scan = write_volume(oblique_scan(shape=(12, 14, 16), seed=n), cases / f"case{n}" / "image.nii.gz")
        write_volume(blob_label(scan), cases / f"case{n}" / "label.nii.gz")
    (cases / "broken.nii.gz").write_bytes(b"\x1f\x8b not really a nifti" * 10)
    return cases


def audit(cases, card, out, *extra) -> list[dict[str, str]]:
    assert main(["audit", str(cases), "--model", str(card), "--out", str(out), "--methods", "protoseg,tta",
                 "--device", "cpu", "--progress", "none", *extra]) == 0
    with open(out / "audit.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_find_cases_reads_case_folders_and_scan_files(tmp_path, cohort):
    (cohort / ".hidden.nii.gz").write_bytes(b"")
    (cohort / "notes").mkdir()
    (cohort / "notes" / "image.json").write_text("{}")
    cases = find_cases(cohort)
    assert [(c.name, c.image.name, c.label and c.label.name) for c in cases] == [
        ("broken", "broken.nii.gz", None), ("case0", "image.nii.gz", "label.nii.gz"),
        ("case1", "image.nii.gz", "label.nii.gz")]
    assert all(c.image.is_absolute() for c in cases)
    (cohort / "case0.nrrd").write_bytes(b"")
    with pytest.raises(SegXAIError, match="several cases are named case0"):
        find_cases(cohort)


def test_review_order_puts_failed_then_flagged_then_least_reliable_first():
    rows = [CaseRow("fine", "ok", "", {"reliability": 0.9, "protoseg.mean_sa": 0.2}, False),
            CaseRow("unsure", "ok", "", {"reliability": 0.7, "protoseg.mean_sa": 0.9}, False),
            CaseRow("flagged-b", "ok", "", {"reliability": 0.4}, True),
            CaseRow("flagged-a", "ok", "", {"reliability": 0.1}, True),
            CaseRow("no-score", "ok", "", {}, False),
            CaseRow("sa-only", "ok", "", {"protoseg.mean_sa": 0.1}, False),
            CaseRow("failed", "failed", "", error="corrupt")]
    assert [r.case for r in sorted(rows, key=review_order)] == [
        "failed", "flagged-a", "flagged-b", "unsure", "fine", "sa-only", "no-score"]
    # a classifier that does not judge (cross-validated AUROC below 0.75) orders nothing: mean SA does
    for row in rows:
        row.reliability_judges = False
    assert [r.case for r in sorted(rows, key=review_order)] == [
        "failed", "flagged-a", "flagged-b", "sa-only", "fine", "unsure", "no-score"]


def test_review_order_puts_the_most_uncertain_before_the_least_separable():
    rows = [CaseRow("separable", "ok", "", {"tta.entropy_inside": 0.2, "protoseg.mean_sa": 0.3}, False),
            CaseRow("inseparable", "ok", "", {"tta.entropy_inside": 0.3, "protoseg.mean_sa": 0.01}, False),
            CaseRow("uncertain", "ok", "", {"tta.entropy_inside": 0.5, "protoseg.mean_sa": 0.9}, False),
            CaseRow("sa-only", "ok", "", {"protoseg.mean_sa": 0.001}, False)]
    assert [r.case for r in sorted(rows, key=review_order)] == ["uncertain", "inseparable", "separable", "sa-only"]


def test_a_scan_unlike_its_cohort_is_flagged_and_listed_before_the_rest():
    def image(noise):
        return {"image.noise": noise, "image.fwhm_mm": 2.0, "image.dark_ratio": 0.6}

    rows = [CaseRow(f"clean{n}", "ok", "", {"tta.entropy_inside": 0.5 + 0.01 * n, **image(0.02 + 0.001 * (n % 3))},
                    False) for n in range(8)]
    rows += [CaseRow("noisy", "ok", "", {"tta.entropy_inside": 0.1, **image(0.3)}, False, ["earlier reason"]),
             CaseRow("failed", "failed", "", error="corrupt")]
    flagged = flag_image_outliers(rows)
    assert [r.case for r in flagged] == [r.case for r in rows] and rows[8].review_needed is False  # a new list
    noisy = flagged[8]
    assert noisy.review_needed and noisy.review_reasons[0] == "earlier reason" and "noise" in noisy.review_reasons[1]
    assert not any(r.review_needed for r in flagged[:8]) and flagged[9] is rows[9]
    # the most certain case of all, but its scan stands out: listed right after the failed one, before a
    # case flagged by the model's own scores (whose calibration the unusual scan puts in doubt)
    flagged.append(CaseRow("unreliable", "ok", "", {"reliability": 0.01, **image(0.021)}, True, ["unreliable"]))
    assert [r.case for r in sorted(flagged, key=review_order)][:4] == ["failed", "noisy", "unreliable", "clean7"]
    # without the image scores (summaries written before them) nothing is flagged
    bare = [CaseRow(r.case, r.status, "", {"tta.entropy_inside": 0.1}, False) for r in rows]
    assert flag_image_outliers(bare) == bare


def test_the_reliability_classifiers_auroc_is_in_the_audits_output(tmp_path):
    record = {"file": "/models/m.reliability.json", "cases": 48, "auc_cv": 0.699, "auc_train": 0.943}
    rows = [CaseRow("a", "failed", str(tmp_path / "a"), error="corrupt"),
            CaseRow("b", "ok", str(tmp_path / "b"), {"reliability": 0.2}, False, reliability_model=record)]
    note = classifier_note(rows)
    assert note == ("m.reliability.json, fitted on 48 labelled cases: cross-validated AUROC for Dice < 0.9 0.699 "
                    "(training 0.943); below 0.75, so it is shown but neither flags nor orders cases")
    assert classifier_note(rows[:1]) is None
    assert classifier_note([replace(rows[1], reliability_model={**record, "auc_cv": 0.81})]).endswith(
        "0.810 (training 0.943); it flags and orders cases")
    result = write_audit(tmp_path / "out", rows, AuditSettings(model="m"), tmp_path)
    assert result.classifier == note
    page = result.html.read_text(encoding="utf-8")
    assert "Reliability classifier" in page and "AUROC for Dice &lt; 0.9 0.699" in page


def test_audit_records_the_failure_sorts_and_resumes(tmp_path, cohort, tiny_card, monkeypatch):
    out = tmp_path / "audit"
    rows = audit(cohort, tiny_card, out)
    assert [r["case"] for r in rows][0] == "broken" and len(rows) == 3
    broken = rows[0]
    assert broken["status"] == "failed" and "corrupt" in broken["error"]
    assert "corrupt" in (out / "cases" / "broken" / "error.txt").read_text()
    done = rows[1:]
    assert {r["status"] for r in done} == {"ok"} and {r["case"] for r in done} == {"case0", "case1"}
    keys = [(r["review_needed"] != "yes", float(r["protoseg.mean_sa"])) for r in done]  # no reliability model here
    assert keys == sorted(keys)
    assert all(0 <= float(r["dice"]) <= 1 and r["target"] == "lesion" for r in done)
    assert all((out / "cases" / r["case"] / "thumbnail.png").is_file() for r in done)
    page = (out / "audit.html").read_text(encoding="utf-8")
    assert page.count('class="thumb"') == 2 and "data:image/png;base64," in page and "broken" in page

    # a second run explains only the failed case again
    stamps = {r["case"]: (out / "cases" / r["case"] / "summary.json").stat().st_mtime_ns for r in done}
    calls = []
    real = SegXAILib.case.run_explain
    monkeypatch.setattr(SegXAILib.case, "run_explain", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    assert audit(cohort, tiny_card, out) == rows
    assert [Path(c).name for c in calls] == ["broken.nii.gz"]
    assert stamps == {c: (out / "cases" / c / "summary.json").stat().st_mtime_ns for c in stamps}


@pytest.mark.slow
def test_a_two_worker_dask_cluster_gives_the_same_rows(tmp_path, cohort, tiny_card):
    in_process = audit(cohort, tiny_card, tmp_path / "here")
    on_dask = audit(cohort, tiny_card, tmp_path / "dask", "--workers", "2")  # OMP_NUM_THREADS=1 in the workers
    assert on_dask == in_process


def test_with_labels_each_score_is_compared_with_dice(tmp_path, tiny_card):
    """Two cases labelled with the model's own segmentation (Dice 1), two with a blob (Dice < 0.9)."""
    cases = tmp_path / "cases"
    for n in range(4):
        scan = write_volume(oblique_scan(shape=(12, 14, 16), seed=n), cases / f"c{n}" / "image.nii.gz")
        label = blob_label(scan)
        if n % 2:
            assert main(["segment", str(scan), "--model", str(tiny_card), "--out", str(tmp_path / "s"),
                         "--progress", "none"]) == 0
            label = read_volume(tmp_path / "s" / "segmentation.nii.gz")
        write_volume(label, cases / f"c{n}" / "label.nii.gz")
    rows = audit(cases, tiny_card, tmp_path / "out")
    assert sorted(float(r["dice"]) == 1.0 for r in rows) == [False, False, True, True]
    with open(tmp_path / "out" / "scores_vs_dice.csv", newline="", encoding="utf-8") as f:
        table = {r["score"]: r for r in csv.DictReader(f)}
    assert set(table) >= {"object_volume_ml", "protoseg.mean_sa", "tta.entropy_inside"}
    sa = table["protoseg.mean_sa"]
    assert sa["cases"] == "4" and -1 <= float(sa["spearman_rho"]) <= 1 and 0 <= float(sa["auroc"]) <= 1
    assert float(sa["dice_below"]) == 0.9
    assert sa["poor_when"] == "low" and table["tta.entropy_inside"]["poor_when"] == "high"
    assert "How well each score predicts Dice" in (tmp_path / "out" / "audit.html").read_text(encoding="utf-8")


def test_score_vs_dice_statistics_and_undefined_cases():
    def row(n, sa, dice):
        return CaseRow(f"c{n}", "ok", "", {"protoseg.mean_sa": sa, "tta.entropy_inside": 1 - sa}, dice=dice)

    rows = [row(n, sa, d) for n, (sa, d) in enumerate([(0.1, 0.5), (0.2, 0.7), (0.5, 0.92), (0.9, 0.95)])]
    table = {r["score"]: r for r in score_vs_dice(rows)}
    assert table["protoseg.mean_sa"]["spearman_rho"] == pytest.approx(1.0)
    assert table["protoseg.mean_sa"]["auroc"] == 1.0  # low SA flags both poor cases
    assert table["tta.entropy_inside"]["spearman_rho"] == pytest.approx(-1.0)
    assert table["tta.entropy_inside"]["auroc"] == 1.0  # high entropy flags them
    good_only = score_vs_dice(rows[2:])[0]
    assert math.isnan(good_only["auroc"]) and "AUROC undefined" in good_only["note"]
    assert math.isnan(good_only["spearman_rho"]) and "fewer than 3" in good_only["note"]


def test_local_workers_share_the_gpus_round_robin(tmp_path, monkeypatch):
    """No GPU here: CUDA is faked; worker 3 of a cluster over 2 GPUs runs on cuda:1."""
    import types

    import distributed
    import torch

    from SegXAILib.audit import AuditCase, AuditSettings, _explain, _local_cluster_size

    with pytest.raises(SegXAIError, match="one worker per CUDA GPU"):
        _local_cluster_size("auto", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _local_cluster_size("auto", "auto") == (2, 2)
    assert _local_cluster_size("3", "cuda") == (3, 2) and _local_cluster_size(3, "cpu") == (3, 0)
    devices = []
    monkeypatch.setattr(distributed, "get_worker", lambda: types.SimpleNamespace(name=3))
    monkeypatch.setattr(SegXAILib.case, "run_explain", lambda *args, **kw: devices.append(args[5]))
    _explain(AuditCase("a", tmp_path / "a.nii.gz"), AuditSettings("tiny", gpus=2), tmp_path, None)
    assert devices == ["cuda:1"]


@pytest.mark.slow
def test_degraded_copies_rank_before_the_clean_cases(tmp_path, every_core):
    """The bundled lesion model: degraded copies (noise, blur, another contrast) of a clean case rank
    nearer the top of the review order than clean cases; the order uses no label (ProtoSeg's mean SA
    rule, then TTA's entropy inside the object)."""
    from SegXAILib.data.degrade import degrade
    from SegXAILib.data.lesion import synthesize_lesion, write_case
    from SegXAILib.data.samples import default_demo_host, load_host

    host = load_host(default_demo_host())
    cases = tmp_path / "cases"
    clean = [f"clean-{seed}" for seed in (20001, 20002)]
    for name in clean:
        write_case(synthesize_lesion(host, seed=int(name.split("-")[1])), cases / name)
    scan = read_volume(cases / clean[0] / "image.nii.gz")
    degraded = ["noise", "blur", "gamma"]
    for kind in degraded:
        write_volume(degrade(scan, kind, seed=0), cases / kind / "image.nii.gz")
    assert main(["audit", str(cases), "--model", "brain-lesion-unet", "--out", str(tmp_path / "out"),
                 "--methods", "protoseg,tta", "--device", "cpu", "--progress", "none"]) == 0
    with open(tmp_path / "out" / "audit.csv", newline="", encoding="utf-8") as f:
        order = [row["case"] for row in csv.DictReader(f)]
    # nearer the top on average, and the top case is degraded. Measured: noise (flagged: mean SA 0.017),
    # gamma, blur (TTA entropy 0.53, 0.43: over-segmented to 148 and 125 mL, with a mean SA above the
    # clean cases'), then the clean cases (entropy 0.21, 0.22)
    rank = {case: n for n, case in enumerate(order)}
    assert np.mean([rank[c] for c in degraded]) < np.mean([rank[c] for c in clean])
    assert order[0] in degraded


def test_resume_explains_again_the_cases_done_with_other_settings(tmp_path, cohort, tiny_card, capsys,
                                                                  monkeypatch):
    out = tmp_path / "out"
    audit(cohort, tiny_card, out)
    summary = json.loads((out / "cases" / "case0" / "summary.json").read_text())
    assert summary["run"]["methods"] == ["protoseg", "tta"] and len(summary["run"]["model_sha256"]) == 64
    assert summary["run"]["options"]["tta"]["transforms"] is None  # the defaults are recorded too (None: 8 here)
    calls = []
    real = SegXAILib.case.run_explain
    monkeypatch.setattr(SegXAILib.case, "run_explain", lambda *a, **k: calls.append(Path(a[0]).parent.name)
                        or real(*a, **k))
    capsys.readouterr()
    audit(cohort, tiny_card, out)  # the same settings: only the broken case is tried again
    assert calls == ["cases"] and "explained case" not in capsys.readouterr().out
    audit(cohort, tiny_card, out, "--option", "tta.transforms=3")
    assert sorted(calls) == ["case0", "case1", "cases", "cases"]
    printed = capsys.readouterr().out
    assert "explained case0 again: explained before with other options" in printed
    assert json.loads((out / "cases" / "case0" / "summary.json").read_text())["run"]["options"]["tta"] == {
        "margin": 3, "transforms": 3, "plane": [1, 2]}
    weights = tiny_card.parent / "tiny.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # one weight changed, same card and name
    calls.clear()
    audit(cohort, tiny_card, out, "--option", "tta.transforms=3")
    assert sorted(calls) == ["case0", "case1", "cases"]
    assert "explained case1 again: explained before with another model" in capsys.readouterr().out


@pytest.mark.parametrize("address", ["not an address", "tcp://host", "tcp://host:0", "tcp://host:99999",
                                     "http://host:8786", "host:8786; rm -rf /"])
def test_a_malformed_scheduler_address_is_one_error_line(tmp_path, cohort, tiny_card, capsys, address):
    out = tmp_path / "out"
    assert main(["audit", str(cohort), "--model", str(tiny_card), "--out", str(out), "--scheduler", address,
                 "--progress", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --scheduler") and "tcp://" in err[0]
    assert not (out / "cases").exists()


def test_valid_scheduler_addresses_pass_the_check():
    from SegXAILib.audit import check_scheduler_address

    for address in ("tcp://10.0.0.5:8786", "localhost:8786", "tls://scheduler.example.org:8786", "tcp://[::1]:8786"):
        check_scheduler_address(address)
