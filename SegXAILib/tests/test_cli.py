"""The command line: outputs on the scan's grid, and one clear error line for each bad input."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from SegXAILib.cli import build_parser, main
from SegXAILib.methods import EXPLAINERS, explainer_class
from SegXAILib.volume import Volume, read_volume, write_volume

from .conftest import make_card, oblique_scan


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_segment_writes_labels_on_the_scan_grid_and_a_summary(tmp_path, tiny_card, scan_file):
    before = scan_file.read_bytes()
    out = tmp_path / "out"
    assert run_cli("segment", scan_file, "--model", tiny_card, "--out", out, "--format", "nrrd",
                   "--progress", "none") == 0
    labels = read_volume(out / "segmentation.nrrd")
    scan = read_volume(scan_file)
    assert labels.same_grid(scan, atol=1e-9)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["model"]["name"] == "tiny"
    assert [c["name"] for c in summary["classes"]] == ["background", "core", "rim"]
    counts = {c["label"]: c["voxels"] for c in summary["classes"]}
    assert counts == {v: int((labels.array == v).sum()) for v in (0, 1, 4)}
    voxel_ml = np.prod(scan.spacing) / 1000
    assert summary["classes"][1]["volume_ml"] == pytest.approx(counts[1] * voxel_ml, abs=1e-3)
    assert set(summary["seconds"]) >= {"preprocess", "inference", "resample"}
    assert summary["model_grid"]["spacing_mm"] == [2.0, 2.0, 2.0]  # the tiny card's spacing
    extent = np.array(scan.shape[::-1]) * scan.spacing
    assert summary["model_grid"]["shape_ijk"] == np.maximum(1, np.round(extent / 2.0)).astype(int).tolist()
    assert scan_file.read_bytes() == before  # the input is never modified
    assert not [p for d in (out, out.parent) for p in d.iterdir() if p.name.startswith(".")]  # no staging left


def test_segment_reads_a_dicom_series_folder(tmp_path, tiny_card):
    from SegXAILib.volume import write_dicom_series

    scan = oblique_scan()
    write_dicom_series(scan.with_array((scan.array * 10).astype(np.int16)), tmp_path / "dicom")
    assert run_cli("segment", tmp_path / "dicom", "--model", tiny_card, "--out", tmp_path / "out",
                   "--progress", "none") == 0
    assert read_volume(tmp_path / "out" / "segmentation.nii.gz").same_grid(read_volume(tmp_path / "dicom"), atol=1e-6)


def _bad_scans(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Bad inputs -> (file, words the error line must contain)."""
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b not really a nifti" * 10)
    nan = oblique_scan()
    nan.array[3, 4, 5] = np.nan
    flat = Volume(np.zeros((8, 8, 1), np.float32) + 1)
    return {
        "missing": (tmp_path / "nope.nii.gz", "not found"),
        "corrupt": (corrupt, "corrupt"),
        "2D": (write_volume(Volume(np.random.rand(1, 9, 9).astype(np.float32)), tmp_path / "slice.nii.gz"),
               "single slice"),
        "nan": (write_volume(nan, tmp_path / "nan.nii.gz"), "NaN"),
        "constant": (write_volume(Volume(np.full((6, 7, 8), 5, np.int16)), tmp_path / "flat.nrrd"), "empty"),
        "one-slice": (write_volume(flat, tmp_path / "flat1.nii.gz"), "single slice"),
    }


@pytest.mark.parametrize("case", ["missing", "corrupt", "2D", "nan", "constant", "one-slice"])
def test_bad_scans_give_one_error_line_exit_2_and_no_output(tmp_path, tiny_card, capsys, case):
    scan, words = _bad_scans(tmp_path)[case]
    out = tmp_path / "out"
    assert run_cli("segment", scan, "--model", tiny_card, "--out", out, "--progress", "none") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]
    assert not out.exists()


def test_4d_input_is_refused(tmp_path, tiny_card, capsys):
    import SimpleITK as sitk

    image = sitk.JoinSeries([sitk.GetImageFromArray(np.random.rand(5, 6, 7).astype(np.float32))] * 3)
    sitk.WriteImage(image, str(tmp_path / "series.nii.gz"))
    assert run_cli("segment", tmp_path / "series.nii.gz", "--model", tiny_card, "--out", tmp_path / "o",
                   "--progress", "none") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "4D" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("problem", ["channels", "unknown-model", "weights", "unknown-class"])
def test_bad_models_give_one_error_line(tmp_path, scan_file, capsys, problem):
    out = tmp_path / "out"
    if problem == "channels":
        args = ["segment", scan_file, "--model", make_card(tmp_path, "two", input_channels=2)]
        words = "takes 2 scan(s), in this order: sequence 1, sequence 2; 1 given"
    elif problem == "unknown-model":
        args = ["segment", scan_file, "--model", "no-such-model"]
        words = "unknown model"
    elif problem == "weights":
        wider = {"name": "unet", "args": {"channels": [8, 16, 32], "strides": [2, 2]}}
        args = ["segment", scan_file, "--model", make_card(tmp_path, "bad", weights_from=wider)]
        words = "does not match"
    else:
        args = ["explain", scan_file, "--model", make_card(tmp_path), "--target", "spleen", "--methods", "gradcam"]
        words = "unknown class"
    assert run_cli(*args, "--out", out, "--progress", "none") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert not out.exists()


def test_a_sequence_that_does_not_overlap_the_first_is_one_error_line(tmp_path, scan_file, capsys):
    """A model of two sequences given a second scan 1 m away (not co-registered): exit 2, one line, nothing written."""
    first = read_volume(scan_file)
    far = write_volume(Volume(first.array, first.spacing, first.origin + 1000.0, first.direction),
                       tmp_path / "far.nii.gz")
    out = tmp_path / "out"
    card = make_card(tmp_path, "two", input_channels=2)
    assert run_cli("segment", scan_file, far, "--model", card, "--out", out, "--progress", "none") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: the sequence 2 scan does not overlap the sequence 1 scan in space; the scans must be "
                   "co-registered (register them first, e.g. in 3D Slicer)"]
    assert not out.exists()


REPO = Path(__file__).resolve().parents[2]


def _bad_arguments(tmp_path: Path, tiny_card: Path, scan_file: Path) -> dict[str, tuple[list, str]]:
    """Bad command lines -> (arguments, words the error line must contain)."""
    (tmp_path / "a-file").write_text("")
    explain = ["explain", scan_file, "--out", tmp_path / "o"]
    return {
        "explain missing scan": (["explain", tmp_path / "no.nii.gz", "--model", "brain-lesion-unet", "--out",
                                  tmp_path / "o"], "file not found"),
        "segment missing scan": (["segment", tmp_path / "no.nii.gz", "--out", tmp_path / "o"], "file not found"),
        "missing label": ([*explain, "--label", tmp_path / "no-label.nii.gz"], "label file not found"),
        "unknown method": ([*explain, "--methods", "gradcam,gradkam"], "unknown method 'gradkam'"),
        "option of an unknown method": ([*explain, "--option", "gradkam.layer=x"], "unknown method 'gradkam'"),
        "unknown model": ([*explain, "--model", "brain-lesoin-unet"], "unknown model 'brain-lesoin-unet'"),
        "unknown class": ([*explain, "--model", tiny_card, "--target", "lesoin"], "did you mean 'lesion'?"),
        "unknown format": ([*explain, "--format", "png"], "invalid choice: 'png'"),
        "output folder is a file": (["segment", scan_file, "--out", tmp_path / "a-file"], "is a file"),
        "audit missing cases": (["audit", tmp_path / "no-cases", "--out", tmp_path / "o"], "cases folder not found"),
        "audit workers": (["audit", tmp_path, "--workers", "0", "--out", tmp_path / "o"], "--workers"),
        "demo missing host": (["demo", "--host", tmp_path / "no-host.nii.gz", "--out", tmp_path / "o"],
                              "host not found"),
        "demo unknown method": (["demo", "--methods", "bogus", "--out", tmp_path / "o"], "unknown method 'bogus'"),
        "demo bad seed": (["demo", "--seed", "x"], "invalid int value: 'x'"),
    }


@pytest.mark.parametrize("case", ["explain missing scan", "segment missing scan", "missing label", "unknown method",
                                  "option of an unknown method", "unknown model", "unknown class", "unknown format",
                                  "output folder is a file", "audit missing cases", "audit workers",
                                  "demo missing host", "demo unknown method", "demo bad seed"])
def test_bad_arguments_fail_in_one_line_before_torch_is_imported(tmp_path, tiny_card, scan_file, case):
    """A real process: its imports are listed by ``-X importtime`` (one line per module on stderr), so torch
    (seconds to import) must not be among them."""
    args, words = _bad_arguments(tmp_path, tiny_card, scan_file)[case]
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "SegXAILib.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    imported = [line.rpartition("|")[2].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith("error: ") and words in errors[0], errors
    assert "SegXAILib.errors" in imported and "torch" not in imported and "monai" not in imported
    assert not (tmp_path / "o").exists()


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def _help(command: str, capsys) -> str:
    """``segxai COMMAND --help``, its words separated by single spaces (the help is wrapped to the terminal)."""
    with pytest.raises(SystemExit) as stop:
        run_cli(command, "--help")
    assert stop.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", ["explain", "audit", "train-reliability", "demo"])
def test_help_of_a_command_with_methods_lists_each_method_and_its_summary(command, capsys):
    text = _help(command, capsys)
    for name in EXPLAINERS:
        summary = " ".join(explainer_class(name).summary.split())
        assert f" {name} {summary}" in text, name
    assert ("options: layer=last_decoder," in text) == (command != "demo")  # the options where --option is taken


def test_explain_help_lists_every_option_of_every_method_with_its_default(capsys):
    text = _help("explain", capsys)
    order = [text.index(f" {name} {' '.join(explainer_class(name).summary.split())}") for name in EXPLAINERS]
    assert order == sorted(order)
    for name, start, end in zip(EXPLAINERS, order, [*order[1:], len(text)]):
        block = text[start:end]
        defaults = explainer_class(name).Options()
        for public, field in zip(defaults.names(), dataclasses.fields(defaults)):
            value = getattr(defaults, field.name)
            shown = "null" if value is None else ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            assert f" {public}={shown}" in block, (name, public)
    assert " lambda=0.01," in text and " margin=16," in text  # an aliased option (the field lam) and a number


def test_help_of_every_command_shows_every_default(capsys):
    commands = _subcommands()
    assert {"segment", "explain", "audit", "demo", "train", "ct-phantom"} <= set(commands)
    for command, parser in commands.items():
        text = _help(command, capsys)
        for action in parser._actions:
            if not action.option_strings or action.default in (None, False, [], argparse.SUPPRESS):
                continue  # positional, off by default, or nothing to show (the help says what happens)
            shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
            help_text = " ".join(action.help.split())
            assert f"{help_text} (default: {shown})" in text or "default" in help_text, (command, action.dest)
    assert "--device DEVICE auto (cuda, mps, cpu), cpu, cuda, cuda:N, mps (default: auto)" in _help("segment", capsys)
    assert "--shape K J I voxels along each axis (default: 64 128 128)" in _help("ct-phantom", capsys)


def test_synth_lesion_and_ct_phantom_commands(tmp_path):
    from SegXAILib.data.samples import mni152_t1

    assert run_cli("synth-lesion", "mni152", "--seed", 3, "--out", tmp_path / "case") == 0
    image, label = read_volume(tmp_path / "case" / "image.nii.gz"), read_volume(tmp_path / "case" / "label.nii.gz")
    assert image.same_grid(mni152_t1()) and label.same_grid(image)
    assert set(np.unique(label.array)) == {0, 1, 2, 4}
    assert run_cli("ct-phantom", "--out", tmp_path / "ct", "--shape", 16, 32, 32) == 0
    ct = read_volume(tmp_path / "ct" / "image.nii.gz")
    assert ct.shape == (16, 32, 32) and ct.array.dtype == np.int16 and ct.array.min() <= -900


@pytest.mark.slow
def test_synth_dataset_degrades_hosts_before_drawing_the_lesion(tmp_path, capsys):
    from SegXAILib.data.brain_mask import estimate_brain_mask
    from SegXAILib.data.degrade import degrade
    from SegXAILib.data.lesion import synthesize_lesion
    from SegXAILib.data.samples import mni152_t1

    args = ["synth-dataset", "--hosts", "mni152", "--seeds", "6:7", "--progress", "none"]
    assert run_cli(*args, "--out", tmp_path / "clean") == 0
    assert run_cli(*args, "--host-blur", 6, "--host-noise", 0.05, "--out", tmp_path / "degraded") == 0
    clean, degraded = (tmp_path / name / "mni152_00006" for name in ("clean", "degraded"))
    label = read_volume(degraded / "label.nii.gz").array
    assert np.array_equal(label, read_volume(clean / "label.nii.gz").array)  # same place, same labels
    # the host is degraded, then the lesion drawn into it (as sharp as in a clean host), placed by the clean host's mask
    blur, noise = np.random.default_rng([6, 2]).uniform(0.0, 1.0, 2) * (6, 0.05)
    clean_host = mni152_t1()
    host = degrade(degrade(clean_host, "blur", blur), "noise", noise, seed=6)
    expected = synthesize_lesion(host, seed=6, brain_mask=estimate_brain_mask(clean_host), brain_scale=1.0).image.array
    image = read_volume(degraded / "image.nii.gz").array
    np.testing.assert_allclose(image, expected, rtol=1e-6, atol=1e-4)
    outside = ~ndimage.binary_dilation(label > 0, iterations=8)
    assert not np.allclose(image[outside], read_volume(clean / "image.nii.gz").array[outside], atol=1.0)
    capsys.readouterr()
    assert run_cli(*args, "--host-blur", -1, "--out", tmp_path / "bad") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --host-blur must be a number >= 0")
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_synth_dataset_shrinks_hosts_by_a_seeded_factor(tmp_path):
    from SegXAILib.data.samples import mni152_t1

    args = ["synth-dataset", "--hosts", "mni152", "--seeds", "3:5", "--host-scale", "0.5:0.6", "--progress", "none"]
    assert run_cli(*args, "--out", tmp_path / "a") == 0
    host = mni152_t1()
    spacings = []
    for seed in (3, 4):
        image = read_volume(tmp_path / "a" / f"mni152_{seed:05d}" / "image.nii.gz")
        factor = image.spacing / host.spacing
        assert np.allclose(factor, factor[0]) and 0.5 <= factor[0] <= 0.6
        assert np.allclose(image.origin, host.origin * factor[0], atol=1e-4)
        spacings.append(factor[0])
    assert spacings[0] != spacings[1]  # drawn per seed
    assert run_cli(*args[:4], "3:4", *args[5:], "--out", tmp_path / "b") == 0  # same seed, same factor
    again = read_volume(tmp_path / "b" / "mni152_00003" / "image.nii.gz")
    assert np.allclose(again.spacing / host.spacing, spacings[0])


def test_demo_prints_and_records_the_dice_against_its_label(tmp_path, capsys):
    """`segxai demo` on a small host: the Dice it prints are the ones summary.json records as the truth, and
    they are the Dice of the written segmentation against the written label."""
    from SegXAILib.data.samples import mni152_t1

    mni = mni152_t1()
    host = Volume(mni.array[::3, ::3, ::3].astype(np.float32), spacing=tuple(3.0 * s for s in mni.spacing),
                  origin=mni.origin, direction=mni.direction)  # a 3 mm head: quick to segment
    host_path = write_volume(host, tmp_path / "host.nii.gz")
    card = make_card(tmp_path, spacing=(6.0, 6.0, 6.0))
    out = tmp_path / "demo"
    assert run_cli("demo", "--host", host_path, "--model", card, "--methods", "gradcam", "--out", out,
                   "--device", "cpu", "--progress", "none") == 0
    printed = {line.split()[1]: float(line.split()[2]) for line in capsys.readouterr().out.splitlines()
               if line.startswith("  Dice ")}
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["truth"]["label"] == str(out / "case" / "label.nii.gz")
    dice = summary["truth"]["dice"]
    assert printed == {name: round(value, 3) for name, value in dice.items()} and set(dice) == {"core", "rim", "lesion"}
    predicted = read_volume(out / "segmentation.nii.gz").array
    truth = read_volume(out / "case" / "label.nii.gz").array
    for name, values in (("core", [1]), ("rim", [4]), ("lesion", [1, 4])):
        a, b = np.isin(predicted, values), np.isin(truth, values)
        total = int(a.sum()) + int(b.sum())
        assert dice[name] == pytest.approx(1.0 if total == 0 else 2 * int((a & b).sum()) / total, abs=1e-12)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<h2>Against the known label</h2>" in page
