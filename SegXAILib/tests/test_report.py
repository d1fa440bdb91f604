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
from SegXAILib.report.montage import AnatomicalAxes, blend
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
    rgb = blend(scan, values, window=(0.0, 100.0), colormap="viridis", value_range=(0.2, 1.0), threshold=0.25,
                alpha=0.6)
    cutoff = 0.2 + 0.25 * 0.8  # 0.4: a quarter of the way up the range
    for (r, c), v in np.ndenumerate(values):
        if np.isfinite(v) and v >= cutoff - 1e-12:
            colour = np.array(colormaps["viridis"](np.clip((v - 0.2) / 0.8, 0, 1))[:3])
            np.testing.assert_allclose(rgb[r, c], 0.4 * 0.5 + 0.6 * colour, atol=1e-12, err_msg=str(v))
        else:
            np.testing.assert_allclose(rgb[r, c], [0.5, 0.5, 0.5], err_msg=str(v))  # grey: the scan shows
    flat = blend(scan, np.full((2, 4), 3.0), (0.0, 100.0), "inferno", (3.0, 3.0), 0.0)
    np.testing.assert_allclose(flat, 0.5)  # a constant map says nothing and draws nothing


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
    for method, reason in summary["not_applicable"].items():
        assert f"<b>{method}</b>: {reason}" in page
    assert "tiny (unet)" in page and "image.nii.gz" in page


def verdict(page: str) -> str:
    return re.search(r"<p class=\"verdict (review|ok)\">", page).group(1)


def test_report_shows_the_verdict_written_into_the_summary(explain_folder):
    folder, summary = explain_folder
    basis = "5th percentile of mean SA on 24 validation cases"
    summary["review"] = review_case(summary, {"mean_sa_below": 0.05, "basis": basis})
    (folder / "summary.json").write_text(json.dumps(summary))
    page = write_report(folder).read_text(encoding="utf-8")
    assert verdict(page) == "ok" and "Review this case" not in page  # mean SA 0.421 is fine for this model
    assert f"review if &lt; 0.05, calibrated: {basis}" in page

    summary["scores"]["mcdropout.entropy_inside"] = 0.9  # 0.82 of log(3 classes)
    summary["review"] = review_case(summary, {"mean_sa_below": 0.05, "basis": basis})
    (folder / "summary.json").write_text(json.dumps(summary))
    page = write_report(folder).read_text(encoding="utf-8")
    assert verdict(page) == "review"
    assert ("<span class=\"flag\">Review this case</span> Uncertainty inside the object (entropy, nats) (mcdropout) "
            "= 0.900 (review if &gt; 0.549)</p>") in page  # the one flagged score, with its threshold


def test_report_needs_its_scan(explain_folder):
    folder, summary = explain_folder
    summary["input"] = str(folder / "moved.nii.gz")
    (folder / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(SegXAIError, match="moved.nii.gz .* is not found"):
        write_report(folder)
    assert not (folder / "report.html").exists()
