"""The explanation report: orientation of the slices, object centre, overlay colours, the HTML page.

Orientation is checked two independent ways: markers placed at known anatomical corners of an
identity-direction volume must land at the matching picture corners, and a volume stored with
permuted and flipped axes (built voxel by voxel through world coordinates, not with the code under
test) must give exactly the same pictures.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from SegXAILib.errors import SegXAIError
from SegXAILib.quality import review_case
from SegXAILib.report import object_center, orthogonal_slices, write_report
from SegXAILib.report.display import (
    SIGNED_MIN_THRESHOLD,
    MapDisplay,
    display_range,
    head_mask,
    map_peak,
    readable,
)
from SegXAILib.report.montage import AnatomicalAxes, blend, point_in_slices, stage_names
from SegXAILib.volume import Volume, write_volume

SHAPE = (4, 5, 6)  # K, J, I: every axis a different length
SPACING = (1.0, 2.0, 3.0)  # along I, J, K


def identity_volume() -> Volume:
    """Index axes I, J, K run toward R, A, S: the reference the other grids are compared with."""
    array = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)  # every voxel different
    return Volume(array, spacing=SPACING, origin=(10.0, -5.0, 3.0), direction=np.eye(3))


def resample_exactly(reference: Volume, direction: np.ndarray) -> Volume:
    """``reference`` stored on a grid whose index axes are ``direction`` (a signed permutation).

    Spacing, shape and origin follow from the direction; every voxel is copied by brute force
    through its RAS position, so the result shows the same anatomy as ``reference``.
    """
    axis_of = [int(np.argmax(np.abs(direction[:, n]))) for n in range(3)]  # reference index axis under new axis n
    spacing = [reference.spacing[m] for m in axis_of]
    counts = [reference.shape[2 - m] for m in axis_of]  # along new i, j, k
    start = [0 if direction[m, n] > 0 else reference.shape[2 - m] - 1 for n, m in enumerate(axis_of)]
    corner = np.zeros(3)
    corner[axis_of] = start
    origin = (reference.ijk_to_ras @ np.append(corner, 1.0))[:3]
    out = Volume(np.zeros(counts[::-1], reference.array.dtype), spacing, origin, direction)
    to_reference = np.linalg.inv(reference.ijk_to_ras) @ out.ijk_to_ras
    for k, j, i in np.ndindex(out.shape):
        ijk = (to_reference @ np.array([i, j, k, 1.0]))[:3]
        assert np.allclose(ijk, np.rint(ijk), atol=1e-9)
        ri, rj, rk = np.rint(ijk).astype(int)
        out.array[k, j, i] = reference.array[rk, rj, ri]
    return out


def same_point(source: Volume, ijk: np.ndarray, target: Volume) -> np.ndarray:
    """Index in ``target`` of the RAS point at index ``ijk`` of ``source``."""
    return (np.linalg.inv(target.ijk_to_ras) @ source.ijk_to_ras @ np.append(ijk, 1.0))[:3]


# ------------------------------------------------------------------ orientation
def test_slices_put_anatomy_where_a_radiologist_expects_it():
    volume = identity_volume()
    array = np.zeros(SHAPE, np.float32)
    k_mid, j_mid, i_mid = 2, 2, 3
    ni, nj, nk = SHAPE[2], SHAPE[1], SHAPE[0]
    array[k_mid, nj - 1, ni - 1] = 1  # right, anterior: axial top-left
    array[nk - 1, j_mid, ni - 1] = 2  # right, superior: coronal top-left
    array[nk - 1, nj - 1, i_mid] = 3  # anterior, superior: sagittal top-left
    array[k_mid, 0, 0] = 4  # left, posterior: axial bottom-right
    slices = orthogonal_slices(volume.with_array(array), (i_mid, j_mid, k_mid))
    assert slices["axial"].shape == (nj, ni) and slices["coronal"].shape == (nk, ni)
    assert slices["sagittal"].shape == (nk, nj)
    assert slices["axial"][0, 0] == 1 and slices["axial"][-1, -1] == 4
    assert slices["coronal"][0, 0] == 2
    assert slices["sagittal"][0, 0] == 3
    assert sum(int(s.astype(bool).sum()) for s in slices.values()) == 4  # nothing else lit up
    # pixel height / width: axial rows are A (2 mm), columns R (1 mm); S is 3 mm
    assert AnatomicalAxes.of(volume).aspects() == {"axial": 2.0, "coronal": 3.0, "sagittal": 1.5}


@pytest.mark.parametrize("direction", [
    np.diag([-1.0, -1.0, 1.0]),  # the usual RAS reading of an LPS-stored scan
    np.array([[0, 1, 0], [0, 0, -1], [-1, 0, 0]], dtype=float),  # i along -S, j along +R, k along -A
    np.array([[0, 0, -1], [-1, 0, 0], [0, 1, 0]], dtype=float),  # i along -A, j along +S, k along -R
])
def test_permuted_and_flipped_grid_gives_the_same_pictures(direction):
    reference = identity_volume()
    stored = resample_exactly(reference, direction)
    center = np.array([4.0, 1.0, 2.0])  # i, j, k in the reference: off-centre on every axis
    expected = orthogonal_slices(reference, center)
    got = orthogonal_slices(stored, same_point(reference, center, stored))
    for plane in expected:
        np.testing.assert_array_equal(got[plane], expected[plane], err_msg=plane)
    assert AnatomicalAxes.of(stored).aspects() == AnatomicalAxes.of(reference).aspects()


def test_slightly_oblique_grid_is_shown_along_the_nearest_axes():
    reference = identity_volume()
    angle = np.radians(10)
    tilted = Volume(reference.array, reference.spacing, reference.origin,
                    np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]))
    for plane, expected in orthogonal_slices(reference, (1, 2, 3)).items():
        np.testing.assert_array_equal(orthogonal_slices(tilted, (1, 2, 3))[plane], expected)


# ------------------------------------------------------------------ object centre
def test_object_center_of_a_ball_is_its_centre():
    k, j, i = np.ogrid[:12, :18, :26]
    labels = np.zeros((12, 18, 26), np.uint8)
    labels[(i - 13) ** 2 + (j - 8) ** 2 + (k - 5) ** 2 <= 9] = 4
    labels[(i - 13) ** 2 + (j - 8) ** 2 + (k - 5) ** 2 <= 2] = 1
    np.testing.assert_allclose(object_center(labels, [1, 4]), [13, 8, 5], atol=1e-12)
    np.testing.assert_allclose(object_center(labels, [7]), [12.5, 8.5, 5.5])  # empty: the volume's centre


def test_object_center_of_a_crescent_is_a_voxel_of_it():
    k, j, i = np.ogrid[:9, :20, :20]
    ring = ((i - 10) ** 2 + (j - 10) ** 2 <= 64) & ((i - 10) ** 2 + (j - 10) ** 2 >= 36) & (i <= 10) & (k == 4)
    labels = ring.astype(np.uint8)
    center = object_center(labels, [1])
    assert labels[int(center[2]), int(center[1]), int(center[0])] == 1
    voxels = np.argwhere(ring)[:, ::-1].astype(float)  # i, j, k
    mean = voxels.mean(axis=0)
    distances = np.linalg.norm(voxels - mean, axis=1)
    assert np.linalg.norm(center - mean) == pytest.approx(distances.min())


# ------------------------------------------------------------------ overlay colours
def test_blend_colours_only_where_the_map_reaches_its_threshold():
    scan = np.full((2, 4), 50.0)
    values = np.array([[0.9, 0.5, 0.4, 0.0], [np.nan, 0.39, 1.0, 0.1]])  # 0.4: exactly at the cutoff
    display = MapDisplay(0.2, 1.0, False, 0.25, "viridis", "test")
    rgb = blend(scan, values, window=(0.0, 100.0), display=display, alpha=0.6)
    cutoff = 0.2 + 0.25 * 0.8  # 0.4: a quarter of the way up the range
    assert display.cutoff == pytest.approx(cutoff)
    for (r, c), v in np.ndenumerate(values):
        if np.isfinite(v) and v >= cutoff - 1e-12:
            colour = np.array(colormaps["viridis"](np.clip((v - 0.2) / 0.8, 0, 1))[:3])
            np.testing.assert_allclose(rgb[r, c], 0.4 * 0.5 + 0.6 * colour, atol=1e-12, err_msg=str(v))
        else:
            np.testing.assert_allclose(rgb[r, c], [0.5, 0.5, 0.5], err_msg=str(v))  # grey: the scan shows
    flat = blend(scan, np.full((2, 4), 3.0), (0.0, 100.0), MapDisplay(3.0, 3.0, False, 0.0, "inferno", "test"))
    np.testing.assert_allclose(flat, 0.5)  # a constant map says nothing and draws nothing


def test_a_signed_map_is_drawn_on_both_sides_of_a_two_sided_threshold():
    scan = np.full((1, 7), 50.0)
    values = np.array([[-3.0, -1.0, -0.49, 0.0, 0.3, 0.5, 2.0]])
    display = MapDisplay(-2.0, 2.0, True, 0.25, "RdBu_r", "test")  # hides |value| < 0.5
    rgb = blend(scan, values, (0.0, 100.0), display, alpha=1.0)
    for c, v in enumerate(values[0]):
        if abs(v) >= 0.5:
            expected = colormaps["RdBu_r"](np.clip((v + 2.0) / 4.0, 0, 1))[:3]  # -3 beyond the range: its end
            np.testing.assert_allclose(rgb[0, c], expected, atol=1e-12, err_msg=str(v))
        else:
            np.testing.assert_allclose(rgb[0, c], 0.5, err_msg=str(v))
    assert rgb[0, 0, 2] > rgb[0, 0, 0] and rgb[0, 6, 0] > rgb[0, 6, 2]  # negative blue, positive red


# ------------------------------------------------------------------ display ranges
def ball(shape: tuple[int, int, int], centre: tuple[float, float, float], radius: float) -> np.ndarray:
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return (i - centre[0]) ** 2 + (j - centre[1]) ** 2 + (k - centre[2]) ** 2 <= radius ** 2


def bump(shape: tuple[int, int, int], centre: tuple[float, float, float], width: float) -> np.ndarray:
    """A Gaussian bump of height 1 at ``centre`` (i, j, k)."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    r2 = (i - centre[0]) ** 2 + (j - centre[1]) ** 2 + (k - centre[2]) ** 2
    return np.exp(-r2 / (2 * width ** 2)).astype(np.float32)


def test_the_head_is_the_bright_foreground_with_its_dark_inside():
    shape = (30, 32, 34)
    head = ball(shape, (17, 16, 15), 12)
    ventricle = ball(shape, (17, 16, 15), 4)  # dark fluid inside: still the head
    rng = np.random.default_rng(0)
    scan = np.where(head & ~ventricle, 300.0, 15.0) + rng.normal(0, 5, shape)
    np.testing.assert_array_equal(head_mask(scan), head)


def test_a_map_concentrated_low_gets_a_range_far_below_its_maximum():
    shape = (30, 32, 34)
    head = ball(shape, (17, 16, 15), 12)
    rng = np.random.default_rng(1)
    entropy = (0.02 * rng.random(shape) + 1.2 * bump(shape, (17, 16, 15), 1.0)).astype(np.float32)  # low but a few
    entropy[0, 0, 0] = 5.0  # outside the head: not counted
    meta = {"method": "tta", "variant": "entropy", "normalised": False, "threshold": 0.2, "colormap": "viridis"}
    display = display_range(entropy, head, meta)
    assert not display.signed and display.low == 0.0
    assert display.high == pytest.approx(np.percentile(entropy[head], 99))  # brute force
    assert display.high < 0.1 * entropy[head].max()
    assert display.cutoff == pytest.approx(0.2 * display.high)
    assert display.caption() == (f"colours from 0 to {readable(display.high)} nats (0 to the 99th percentile of the "
                                 f"values inside the head); values below {readable(0.2 * display.high)} not drawn")
    assert display.peak == (17.0, 16.0, 15.0)  # the peak inside the head, not the larger value outside it
    assert display.peak_value == pytest.approx(entropy[15, 16, 17])
    assert MapDisplay.from_json(json.loads(json.dumps(display.to_json()))) == display  # through summary.json


def test_signed_maps_get_a_symmetric_range_and_fractions_the_whole_scale():
    shape = (30, 32, 34)
    head = ball(shape, (17, 16, 15), 12)
    rng = np.random.default_rng(2)
    attribution = rng.normal(0.5, 1.0, shape).astype(np.float32)  # more positive than negative
    meta = {"method": "occlusion", "variant": None, "normalised": False, "threshold": 0.2, "colormap": "inferno"}
    display = display_range(attribution, head, meta)
    end = np.percentile(np.abs(attribution[head]), 99)
    assert display.signed and (display.low, display.high) == pytest.approx((-end, end))
    assert display.colormap == "RdBu_r"  # a one-sided colour map cannot show the sign
    shown = display.shown(attribution)
    np.testing.assert_array_equal(shown, np.abs(attribution) >= 0.2 * end)
    assert (attribution[shown] < 0).any() and (attribution[shown] > 0).any()
    assert display.caption().startswith(f"colours from \u2212{readable(end)} to +{readable(end)} (\u00b1 the 99th")

    ripple = np.abs(attribution)
    ripple[head & (ripple < 0.05)] = -1e-4  # interpolation ripple below 0: not a signed map
    assert not display_range(ripple, head, meta).signed
    signed_zero = display_range(np.abs(attribution), head, {**meta, "variant": "signed", "threshold": 0.0})
    assert signed_zero.signed and signed_zero.threshold == SIGNED_MIN_THRESHOLD  # near-0 white would veil the scan

    probability = (0.3 * rng.random(shape)).astype(np.float32)
    fraction = display_range(probability, head, {"method": "protoseg", "variant": "heat", "normalised": False})
    assert (fraction.low, fraction.high) == (0.0, 1.0)


def test_a_map_that_is_0_on_most_of_the_head_is_shown_up_to_its_largest_value():
    shape = (30, 32, 34)
    head = ball(shape, (17, 16, 15), 12)
    cam = np.zeros(shape, np.float32)
    cam[ball(shape, (17, 16, 15), 2)] = 0.7  # 33 voxels of over 7,000 in the head
    display = display_range(cam, head, {"method": "gradcam", "normalised": True, "threshold": 0.2})
    assert display.high == pytest.approx(0.7) and "largest" in display.rule


def test_the_peak_is_inside_the_head_and_not_one_stray_voxel():
    shape = (30, 32, 34)
    head = ball(shape, (17, 16, 15), 12)
    values = bump(shape, (10, 20, 12), 2.0)  # the map's blob
    values[20, 10, 22] = 10.0  # one stray voxel
    values[1, 1, 1] = 50.0  # outside the head
    assert map_peak(values, head, signed=False) == (10.0, 20.0, 12.0)
    assert map_peak(-values, head, signed=True) == (10.0, 20.0, 12.0)  # the largest size, whatever its sign


def test_numbers_are_rounded_for_a_reader():
    assert [readable(v) for v in (0.31234, 4521.7, 338.8, 0.00123, 1.0, 0.0, -0.04)] == [
        "0.31", "4,500", "340", "0.0012", "1", "0", "-0.04"]
    assert readable(2.81e-18) == "0"  # a floor of 2.81e-18 is no information


def test_slices_through_a_point_meet_at_it():
    volume = identity_volume()
    for ijk in ((0, 0, 0), (5, 4, 3), (2, 1, 3)):
        marks = point_in_slices(volume, ijk)
        slices = orthogonal_slices(volume, ijk)
        value = volume.array[ijk[2], ijk[1], ijk[0]]  # every voxel different
        for plane, (row, column) in marks.items():
            assert slices[plane][row, column] == value, plane


def test_layers_of_the_sa_curve_get_stage_names():
    shapes = [[60, 72, 60], [30, 36, 30], [15, 18, 15], [15, 18, 15], [30, 36, 30], [60, 72, 60]]
    curve = [{"layer": f"model.{n}", "sa": 0.1, "shape": shape} for n, shape in enumerate(shapes)]
    assert stage_names(curve, [120, 144, 120], [1.5, 1.5, 1.5]) == [
        "encoder stage 1, 3 mm grid", "encoder stage 2, 6 mm grid", "encoder stage 3, 12 mm grid",
        "bottleneck, 12 mm grid", "decoder stage 1, 6 mm grid", "last decoder stage, 3 mm grid"]
    curve[0]["title"] = "first convolution"
    assert stage_names(curve)[:2] == ["first convolution", "encoder stage 2"]


# ------------------------------------------------------------------ the page
@pytest.fixture
def explain_folder(tmp_path):
    """An output folder as 'segxai explain' writes it: scan, segmentation, two maps, summary.json."""
    shape, spacing = (14, 18, 22), (1.2, 1.0, 2.5)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    r2 = (i - 12) ** 2 + (j - 8) ** 2 + (k - 6) ** 2
    rng = np.random.default_rng(0)
    scan = Volume((100.0 * (r2 <= 16) + 20 + 3 * rng.standard_normal(shape)).astype(np.float32),
                  spacing=spacing, origin=(-20.0, 15.0, -7.5), direction=np.diag([-1.0, -1.0, 1.0]))
    labels = np.where(r2 <= 4, 1, np.where(r2 <= 16, 4, 0)).astype(np.uint8)
    saliency = np.exp(-r2 / 20.0).astype(np.float32)
    entropy = (0.8 * np.exp(-np.abs(np.sqrt(r2) - 4.0))).astype(np.float32)  # high on the object's edge
    write_volume(scan, tmp_path / "case" / "image.nii.gz")
    out = tmp_path / "out"
    write_volume(scan.with_array(labels), out / "segmentation.nii.gz")
    write_volume(scan.with_array(saliency), out / "maps" / "gradcam_blob.nii.gz")
    write_volume(scan.with_array(entropy), out / "maps" / "mcdropout-entropy_blob.nii.gz")
    voxel_ml = float(np.prod(spacing)) / 1000
    maps = [
        {"file": "maps/gradcam_blob.nii.gz", "method": "gradcam", "variant": None, "class": "blob",
         "description": "where the features raise the blob logits (test saliency)", "colormap": "inferno",
         "threshold": 0.2, "normalised": True, "range": [float(saliency.min()), float(saliency.max())],
         "seconds": 1.5},
        {"file": "maps/mcdropout-entropy_blob.nii.gz", "method": "mcdropout", "variant": "entropy", "class": "blob",
         "description": "predictive entropy of 8 dropout samples in nats (test uncertainty)", "colormap": "viridis",
         "threshold": 0.2, "normalised": False, "range": [float(entropy.min()), float(entropy.max())],
         "seconds": 4.25},
    ]
    summary = {
        "input": str(tmp_path / "case" / "image.nii.gz"),
        "model": {"name": "tiny", "architecture": "unet", "validation": {}},
        "classes": [{"name": "background", "label": 0, "color": [0, 0, 0], "voxels": int((labels == 0).sum()),
                     "volume_ml": round(int((labels == 0).sum()) * voxel_ml, 4)},
                    {"name": "core", "label": 1, "color": [255, 64, 64], "voxels": int((labels == 1).sum()),
                     "volume_ml": round(int((labels == 1).sum()) * voxel_ml, 4)},
                    {"name": "rim", "label": 4, "color": [128, 128, 128], "voxels": int((labels == 4).sum()),
                     "volume_ml": round(int((labels == 4).sum()) * voxel_ml, 4)}],
        "groups": {"blob": {"labels": [1, 4], "voxels": int((labels > 0).sum()),
                            "volume_ml": round(int((labels > 0).sum()) * voxel_ml, 4)}},
        "files": {"segmentation": "segmentation.nii.gz"},
        "seconds": {"read_and_load": 0.1, "inference": 2.0},
        "device": "cpu",
        "versions": {"segxai": "0.1.0"},
        "target": {"name": "blob", "labels": [1, 4]},
        "maps": maps,
        "explanations": [
            {"method": "gradcam", "scalars": {"score": 3.0}, "curves": {}, "metadata": {"seconds": 1.5}},
            {"method": "mcdropout", "scalars": {"entropy_inside": 0.1234}, "curves": {}, "metadata": {"seconds": 4.25}},
            {"method": "protoseg", "scalars": {"mean_sa": 0.4213},
             "curves": {"sa_per_layer": [{"layer": f"model.{n}.conv", "sa": sa, "output": n == 3}
                                         for n, sa in enumerate([0.3, 0.55, 0.7, 0.8])]},
             "metadata": {"seconds": 0.75, "reference": "model"}},
        ],
        "not_applicable": {"attention": "the model has no attention gates", "mhex": "the model has no MHEX+ heads"},
        "scores": {"object_volume_ml": round(int((labels > 0).sum()) * voxel_ml, 4), "mcdropout.entropy_inside": 0.1234,
                   "protoseg.mean_sa": 0.4213},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return out, summary


def test_report_is_one_self_contained_page(explain_folder):
    folder, summary = explain_folder
    page = write_report(folder).read_text(encoding="utf-8")
    assert (folder / "report.html").is_file()

    pictures = ["segmentation.png", "montage_gradcam_blob.png", "montage_mcdropout-entropy_blob.png", "sa_curve.png"]
    for name in pictures:
        assert (folder / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    sources = re.findall(r"<img [^>]*src=\"([^\"]*)\"", page)
    assert len(sources) == len(pictures) == page.count("<img ")
    embedded = []
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        data = base64.b64decode(source.split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG" and min(image.size) > 100
        embedded.append(data)
    assert sorted(embedded) == sorted((folder / "report" / n).read_bytes() for n in pictures)
    assert not re.search(r"(src|href)=\"(?!data:)", page) and "<link" not in page
    assert not any("src=" in tag for tag in re.findall(r"<script\b[^>]*>", page))  # the viewer's scripts: inline

    for value in ("0.421", "0.123", f"{summary['scores']['object_volume_ml']:.3f}"):
        assert value in page
    for item in summary["maps"]:
        assert html.escape(item["description"]) in page
    assert "Review this case" in page  # no "review" in this summary: judged by the default, mean SA 0.421 < 0.5
    for method, reason in (("attention gates", "the model has no attention gates"),
                           ("MHEX+ heads", "the model has no MHEX+ heads")):  # the methods by their reader names
        assert f"<b>{method}</b>: {reason}" in page
    assert "tiny (unet)" in page and "image.nii.gz" in page


def verdict(page: str) -> str:
    return re.search(r"<p class=\"verdict (review|incomplete|ok)\">", page).group(1)


def test_report_shows_the_verdict_written_into_the_summary(explain_folder):
    folder, summary = explain_folder
    basis = "5th percentile of mean SA on 24 validation cases"
    summary["review"] = review_case(summary, {"mean_sa_below": 0.05, "basis": basis})
    (folder / "summary.json").write_text(json.dumps(summary))
    page = write_report(folder).read_text(encoding="utf-8")
    # mean SA 0.421 is fine for this model, but reliability was not checked: no all-clear
    assert verdict(page) == "incomplete" and "Review this case" not in page
    assert f"review if &lt; 0.05, calibrated: {basis}" in page

    summary["scores"]["reliability"] = 0.9  # every check made now
    summary["review"] = review_case(summary, {"mean_sa_below": 0.05, "basis": basis})
    (folder / "summary.json").write_text(json.dumps(summary))
    assert verdict(write_report(folder).read_text(encoding="utf-8")) == "ok"

    summary["scores"]["mcdropout.entropy_inside"] = 0.9  # 0.82 of log(3 classes)
    summary["review"] = review_case(summary, {"mean_sa_below": 0.05, "basis": basis})
    (folder / "summary.json").write_text(json.dumps(summary))
    page = write_report(folder).read_text(encoding="utf-8")
    assert verdict(page) == "review"
    assert ("<span class=\"flag\">Review this case</span> Uncertainty inside the object (entropy, nats) (Monte Carlo "
            "dropout) = 0.9 (review if &gt; 0.549)</p>") in page  # the one flagged score, with its threshold


def without_viewer(page: str) -> str:
    """The page without its interactive viewer (whose layer names and controls test_report_viewer.py checks)."""
    return re.sub(r"<section class=\"segxai-viewer\".*?</section>", "", page, flags=re.S)


def visible_text(page: str) -> str:
    """The words a reader sees: no scripts, styles, tags or embedded pictures."""
    return html.unescape(re.sub(r"<(script|style)\b.*?</\1>|<[^>]+>|data:[^\"]+", " ", page, flags=re.S))


def test_report_speaks_plain_words(explain_folder):
    """Numbers rounded (no 2.81e-18, no 0.08733427710197218), units and jargon explained once, methods by
    their reader names, and the Dice against a known label in a table."""
    folder, summary = explain_folder
    summary["maps"][1]["range"] = [2.81e-18, 0.8]  # an uncertainty map's floor, as MC dropout writes it
    summary["scores"]["protoseg.mean_sa"] = 0.08733427710197218
    summary["scores"]["mcdropout.mutual_information_inside"] = 0.0138763
    summary["truth"] = {"label": "case/label.nii.gz", "dice": {"core": 0.87654, "rim": 0.5, "blob": 0.91234}}
    (folder / "summary.json").write_text(json.dumps(summary))
    page = without_viewer(write_report(folder).read_text(encoding="utf-8"))
    text = visible_text(page)

    assert not re.search(r"\d[eE][-+]?\d", text)  # no exponent notation anywhere a reader looks
    assert not re.search(r"\d\.\d{5,}", text)  # nor a number with more than 4 decimals
    assert ">0.0873</td>" in page and ">0.0139</td>" in page  # three significant digits
    assert "0 to 0.8 (in the method's own units)" in text
    # the Dice table: every class and group of the truth, rounded, the group marked as one
    truth = re.search(r"<h2>Against the known label</h2>(.*?)</section>", page, re.S).group(1)
    assert re.findall(r"<tr><td>(.*?)</td><td class=\"num\">(.*?)</td></tr>", truth) == [
        ("core", "0.877"), ("rim", "0.5"), ("blob <i>(group)</i>", "0.912")]
    assert "case/label.nii.gz" in truth

    # reader names, no registry or score keys
    assert "Monte Carlo dropout: entropy (total uncertainty)" in text and "Grad-CAM" in text
    assert "<code>" not in page and "mcdropout / entropy" not in text
    assert "(mean SA \u03bc) (ProtoSeg)" in text

    # each unit and term explained once, in the glossary, with the maximum entropy of this model's 3 classes
    glossary = re.search(r"<h2>Words and units on this page</h2>(.*?)</section>", page, re.S).group(1)
    terms = re.findall(r"<dt>(.*?)</dt>", glossary)
    assert len(terms) == len(set(terms))
    assert {"mL", "nats", "log-odds (logits)", "mutual information (BALD)", "Dice"} <= set(terms)
    assert "ln 3 = 1.10 nats" in html.unescape(glossary)
    assert "variance" not in terms  # no variance map or score on this page: not explained


def test_a_report_without_a_known_label_has_no_dice_table(explain_folder):
    folder, _ = explain_folder
    page = write_report(folder).read_text(encoding="utf-8")
    assert "Against the known label" not in page
    assert "<dt>Dice</dt>" in page  # the SA curve's caption still speaks of Dice, so the glossary explains it


def test_report_needs_its_scan(explain_folder):
    folder, summary = explain_folder
    summary["input"] = str(folder / "moved.nii.gz")
    (folder / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(SegXAIError, match="moved.nii.gz .* is not found"):
        write_report(folder)
    assert not (folder / "report.html").exists()
