"""case.show(): the scan, the segmentation and each map in an ipyniivue widget, as `segxai explain` writes them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from SegXAILib.case import explain_case
from SegXAILib.errors import SegXAIError
from SegXAILib.fileio import OutputFolder
from SegXAILib.models.registry import load_model
from SegXAILib.outputs import explain_claims, listed_files, write_explain_outputs
from SegXAILib.report.display import map_display
from SegXAILib.report.montage import class_colours
from SegXAILib.report.viewer import colormap_rgb
from SegXAILib.tests.conftest import make_card, oblique_scan
from SegXAILib.volume import read_volume

METHODS = ["gradcam", "saliency", "tta"]  # colour maps inferno, RdBu_r (the signed saliency) and viridis


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    """A tiny real case on an oblique grid (maps are resampled from the model's 2 mm grid), and the folder
    where `segxai explain` writes it: (case, its summary, that folder)."""
    folder = tmp_path_factory.mktemp("case")
    card = make_card(folder)
    case = explain_case(oblique_scan(), load_model(card), METHODS, device="cpu", options={"tta": {"transforms": 2}})
    out = folder / "out"
    with OutputFolder(out, claims=explain_claims("nii.gz"), listed=listed_files) as staged:
        write_explain_outputs(staged, case.run, case.verdict, case.card, "scan.nii.gz", "nii.gz", {})
    return case, json.loads((out / "summary.json").read_text()), out


@pytest.fixture(scope="module")
def widget(explained, tmp_path_factory):
    """``case.show()``, called in an empty working folder that it must leave empty."""
    pytest.importorskip("ipyniivue")
    here = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(here)
        viewer = explained[0].show()
    assert list(here.iterdir()) == []  # nothing written where the user works
    return viewer


def given_volume(volume, folder: Path):
    """The volume a widget layer was given (gzipped NIfTI bytes), read back by SegXAI's own reader."""
    assert volume.path is None and volume.url is None  # handed over in memory, not as a file
    path = folder / volume.name
    path.write_bytes(volume.data)
    return read_volume(path)


def test_the_widget_holds_the_scan_segmentation_and_each_map_exactly_as_written(explained, widget, tmp_path):
    case, summary, out = explained
    assert type(widget).__name__ == "NiiVue"
    map_files = [Path(item["file"]) for item in summary["maps"]]
    assert len(map_files) == 6  # gradcam, saliency and its signed map, three of tta
    assert [v.name for v in widget.volumes] == ["scan.nii.gz", "segmentation.nii.gz", *(f.name for f in map_files)]

    scan = case.segmentation.scan
    written = [scan, read_volume(out / summary["files"]["segmentation"]), *(read_volume(out / f) for f in map_files)]
    for layer, expected in zip(widget.volumes, written, strict=True):
        given = given_volume(layer, tmp_path)
        assert given.same_grid(scan, atol=1e-4), layer.name  # every layer on the scan's (oblique) grid
        assert given.array.dtype == expected.array.dtype and np.array_equal(given.array, expected.array), layer.name
    assert np.unique(written[1].array).size > 1  # the tiny model segments something: the labels test something


def test_each_map_is_coloured_as_the_report_colours_it(explained, widget):
    case, summary, out = explained
    maps = widget.volumes[2:]
    displays = [map_display(item, read_volume(out / item["file"]).array, case.segmentation.scan.array)
                for item in summary["maps"]]
    assert {d.colormap for d in displays} == {"inferno", "RdBu_r", "viridis"}
    assert [d.signed for d in displays] == [False, False, True, False, False, False]
    assert [v.opacity for v in maps] == [0.65, 0, 0, 0, 0, 0]  # the first map shown, the others a tick away
    # before the page reports the canvas, NiiVue's own colour map of that name (none for RdBu_r: grey)
    assert [v.colormap for v in maps] == ["inferno", "inferno", "gray", "viridis", "viridis", "viridis"]

    widget._canvas_attached = True  # what the page sets once the widget is drawn
    for volume, display in zip(maps, displays, strict=True):
        assert (volume.cal_min, volume.cal_max) == (display.low, display.high)  # the report's colour range
        assert volume.colormap == f"segxai-{volume.id}"
        table = widget._cluts[volume.colormap]
        assert np.array_equal(np.stack([table.R, table.G, table.B], 1), colormap_rgb(display.colormap))
        hidden = np.flatnonzero(np.asarray(table.A) == 0)
        assert set(table.A) <= {0, 255} and hidden.size
        assert np.array_equal(hidden, np.arange(hidden[0], hidden[-1] + 1))  # one band of hidden values
        if display.signed:  # |value| below the cutoff, a band centred on 0
            assert abs(hidden.mean() - 127.5) <= 1 and abs(hidden.size / 256 - display.threshold) <= 2 / 256
        else:  # the bottom of the range up to the threshold
            assert hidden[0] == 0 and abs(hidden.size / 256 - display.threshold) <= 2 / 256


def test_the_segmentation_has_the_cards_names_and_the_reports_colours(explained, widget):
    case, summary, _ = explained
    lut = widget.volumes[1].colormap_label
    assert lut.labels == ["background", "core", "", "", "rim"]  # label values 0 to 4; 2 and 3 are no class
    rgba = np.asarray(lut.lut).reshape(-1, 4)
    assert rgba[:, 3].tolist() == [0, 255, 0, 0, 255]
    for label, colour in class_colours(summary["classes"]).items():
        assert rgba[label, :3].tolist() == [round(c * 255) for c in colour]


def test_without_ipyniivue_show_says_in_one_line_how_to_install_it(explained, monkeypatch):
    monkeypatch.setitem(sys.modules, "ipyniivue", None)  # `import ipyniivue` now fails as if not installed
    with pytest.raises(SegXAIError) as raised:
        explained[0].show()
    message = str(raised.value)
    assert "\n" not in message and "ipyniivue" in message and "pip install 'segxai[notebook]'" in message


def test_segxai_imports_without_ipyniivue():
    code = ("import sys; sys.modules['ipyniivue'] = None; "
            "import SegXAILib, SegXAILib.case, SegXAILib.notebook; print(SegXAILib.CaseResult.show.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "show", done.stderr
