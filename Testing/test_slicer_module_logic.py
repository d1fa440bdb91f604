"""The module's logic on a real MRML scene (slicer-core): one ``segxai explain`` run on a lesion placed in
a brain MRI, resampled to a small oblique grid and put under a parent transform, then everything the panel
relies on: segmentation and map nodes against the command line's files, geometry, slice-view layers, the
saved scene, cancel, a failing run and a re-run.

The run happens once (module fixture); the tests that start more child processes come last because the
re-run replaces the first run's nodes.
"""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("slicer")
import slicer  # noqa: E402
import slicer.util  # noqa: E402
import vtk  # noqa: E402
from scipy import ndimage  # noqa: E402
from scipy.spatial.transform import Rotation  # noqa: E402
from vtk.util.numpy_support import vtk_to_numpy  # noqa: E402

from SegXAILib.data.lesion import synthesize_lesion  # noqa: E402
from SegXAILib.data.samples import load_host  # noqa: E402
from SegXAILib.errors import SegXAIError  # noqa: E402
from SegXAILib.preprocessing import resample_to_grid  # noqa: E402
from SegXAILib.tests.conftest import make_card  # noqa: E402
from SegXAILib.volume import Volume, read_volume  # noqa: E402
from SegXAILogic import ExplainLogic, findResults, showMap, shownMap, updateNodeFromVolume  # noqa: E402
from SegXAILogic.colors import colorTableNodeID, getColorTable  # noqa: E402
from SegXAILogic.exports import exportSegmentationToFile, saveSceneBundle  # noqa: E402
from SegXAILogic.results import INPUT_REFERENCE, mapStem, mapThreshold  # noqa: E402
from SegXAILogic.standalone import standaloneScene  # noqa: E402

METHODS = ["gradcam", "protoseg", "saliency"]
CLASS_COLORS = {"core": [255, 64, 64], "rim": [40, 200, 90]}


# ------------------------------------------------------------------ helpers
def lesion_case() -> Volume:
    """A synthetic tumour (seed 3) in MNI152, on a 34x40x34 oblique grid of 4.4-5 mm voxels."""
    host = load_host("mni152")
    shape, spacing = (34, 40, 34), np.array([4.6, 4.4, 5.0])
    direction = Rotation.from_euler("xyz", [10, -15, 25], degrees=True).as_matrix()
    centre = (host.ijk_to_ras @ np.r_[(np.array(host.shape[::-1]) - 1) / 2, 1])[:3]
    origin = centre - direction @ (spacing * (np.array(shape[::-1]) - 1) / 2)
    grid = Volume(np.zeros(shape, np.float32), spacing, origin, direction)
    return synthesize_lesion(resample_to_grid(host, grid), seed=3).image


def coloured_card(folder):
    """make_card's tiny random U-Net with distinct class colours (to see them reach the segments)."""
    path = make_card(folder, spacing=(7.0, 7.0, 7.0))
    data = json.loads(path.read_text(encoding="utf-8"))
    for entry in data["classes"]:
        entry["color"] = CLASS_COLORS.get(entry["name"], [0, 0, 0])
    path.write_text(json.dumps(data))
    return path


def ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def to_world(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetParentTransformNode().GetMatrixTransformToWorld(m)
    return slicer.util.arrayFromVTKMatrix(m)


def scene_state(scene) -> list[tuple]:
    """Every node with its class, name and modification time: equal states mean an untouched scene."""
    return [(n.GetID(), n.GetClassName(), n.GetName(), n.GetMTime())
            for n in (scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes()))]


def node_ids(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def input_state(node) -> dict:
    return {"array": slicer.util.arrayFromVolume(node).copy(), "matrix": ijk_to_ras(node), "name": node.GetName(),
            "transform": node.GetTransformNodeID(), "mtime": node.GetMTime(),
            "image_mtime": node.GetImageData().GetMTime(), "attributes": node.GetAttributeNames()}


def blended_slice(env) -> np.ndarray:
    """The Red view's blended RGBA image (H, W, 4), exactly as Slicer's slice view shows it."""
    connection = env.sliceLogic.GetImageDataConnection()
    connection.GetProducer().Update()
    image = connection.GetProducer().GetOutputDataObject(connection.GetIndex())
    width, height, _ = image.GetDimensions()
    return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1).copy()


def slice_through_peak(env, inputNode, mapNode, magnitude: bool = False) -> None:
    """The Red view on the input's plane, through the map's largest value (|value| with ``magnitude``), in world
    coordinates (the input is transformed)."""
    composite = env.sliceLogic.GetSliceCompositeNode()
    composite.SetBackgroundVolumeID(inputNode.GetID())
    env.sliceLogic.GetSliceNode().RotateToVolumePlane(inputNode)
    env.sliceLogic.ResizeSliceNode(320, 320)
    env.sliceLogic.FitSliceToBackground()
    array = slicer.util.arrayFromVolume(mapNode)
    k, j, i = np.unravel_index(np.argmax(np.abs(array) if magnitude else array), array.shape)
    env.sliceLogic.GetSliceNode().JumpSliceByOffsetting(*(to_world(mapNode) @ ijk_to_ras(mapNode) @ [i, j, k, 1])[:3])


def map_under_pixels(env, node) -> np.ndarray:
    """The map sampled (trilinearly, as the slice reslice does) at every pixel centre of the Red view.

    NaN within a voxel of the map's border, where VTK's reslice and SciPy treat the edge differently
    (comparisons with NaN are false, so those pixels count as neither high nor low).
    """
    slice_node = env.sliceLogic.GetSliceNode()
    width, height, _ = slice_node.GetDimensions()
    xy_to_ras = slicer.util.arrayFromVTKMatrix(slice_node.GetXYToRAS())
    y, x = np.mgrid[0:height, 0:width]
    xy = np.stack([x.ravel(), y.ravel(), np.zeros(x.size), np.ones(x.size)])
    world_to_ijk = np.linalg.inv(to_world(node) @ ijk_to_ras(node))
    i, j, k, _ = world_to_ijk @ xy_to_ras @ xy
    array = slicer.util.arrayFromVolume(node)
    value = ndimage.map_coordinates(array, [k, j, i], order=1, mode="nearest")
    inside = np.all([(c >= 1) & (c <= n - 2) for c, n in zip((k, j, i), array.shape)], axis=0)
    return np.where(inside, value, np.nan).reshape(height, width)


# ------------------------------------------------------------------ the run
@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    env = standaloneScene()
    scene = env.scene
    folder = tmp_path_factory.mktemp("segxai-slicer")
    card = coloured_card(folder)

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "case 3")
    updateNodeFromVolume(node, lesion_case())
    node.CreateDefaultDisplayNodes()
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    matrix = np.eye(4)
    matrix[:3, :3] = Rotation.from_euler("z", 20, degrees=True).as_matrix()
    matrix[:3, 3] = [12.0, -7.5, 30.0]
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    node.SetAndObserveTransformNodeID(transform.GetID())
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.CreateFolderItem(sh.GetSceneItemID(), "Study")
    sh.CreateItem(study, node)

    before = input_state(node)
    events, lines = [], []
    logic = ExplainLogic(scene)
    start = time.perf_counter()
    results = logic.run(node, str(card), METHODS, device="cpu", outDir=folder / "out",
                        onProgress=events.append, onLog=lines.append)
    seconds = time.perf_counter() - start
    summary = json.loads((folder / "out" / "summary.json").read_text(encoding="utf-8"))
    return SimpleNamespace(env=env, scene=scene, input=node, card=card, logic=logic, results=results,
                           out=folder / "out", summary=summary, before=before, events=events, lines=lines,
                           study=study, seconds=seconds)


def test_the_run_reported_progress_and_used_the_cpu(explained):
    stages = {e.stage for e in explained.events}
    assert {"preprocess", "inference", *METHODS} <= stages
    assert explained.logic.job.state == "succeeded" and explained.logic.job.fraction == 1.0
    assert explained.summary["device"] == "cpu"  # --device cpu and CUDA_VISIBLE_DEVICES=-1 reached the child
    assert any("wrote" in line for line in explained.lines)  # the command line's own last line
    assert "protoseg.mean_sa" in explained.results.summary["scores"]


def test_the_input_is_oblique_transformed_and_unchanged(explained):
    matrix = ijk_to_ras(explained.input)
    direction = matrix[:3, :3] / np.linalg.norm(matrix[:3, :3], axis=0)
    assert np.abs(direction - np.diag(np.diag(direction))).max() > 0.1  # not axis-aligned
    after = input_state(explained.input)
    np.testing.assert_array_equal(after.pop("array"), explained.before.pop("array"))
    np.testing.assert_array_equal(after.pop("matrix"), explained.before.pop("matrix"))
    assert after == explained.before


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_segmentation_exports_the_command_line_segmentation(explained, tmp_path, suffix):
    cli = read_volume(explained.out / "segmentation.nii.gz")
    assert {1, 4} <= set(np.unique(cli.array))  # both classes present: the comparison is not trivial
    nodes = node_ids(explained.scene)
    path = exportSegmentationToFile(explained.results.segmentation, explained.input, tmp_path / f"seg{suffix}")
    assert node_ids(explained.scene) == nodes  # the temporary labelmap and what came with it are gone
    ours = read_volume(path)
    np.testing.assert_array_equal(ours.array, cli.array)  # model's label values (4, not 2) on the input grid
    np.testing.assert_allclose(ours.ijk_to_ras, cli.ijk_to_ras, rtol=0, atol=1e-5)


def test_segments_are_named_and_coloured_from_the_model_card(explained):
    segmentation = explained.results.segmentation.GetSegmentation()
    segments = {segmentation.GetNthSegment(i).GetName(): segmentation.GetNthSegment(i).GetColor()
                for i in range(segmentation.GetNumberOfSegments())}
    assert set(segments) == {"core", "rim"}
    for name, color in segments.items():
        np.testing.assert_allclose(color, np.array(CLASS_COLORS[name]) / 255, atol=1e-6)
    seg = explained.results.segmentation
    assert seg.GetTransformNodeID() == explained.input.GetTransformNodeID()
    assert seg.GetNodeReferenceID(seg.GetReferenceImageGeometryReferenceRole()) == explained.input.GetID()
    # the input's own grid, not moved by its parent transform (the segmentation has that transform too)
    geometry = seg.GetSegmentation().GetConversionParameter("Reference image geometry").split(";")
    np.testing.assert_allclose(np.array(geometry[:16], float).reshape(4, 4), ijk_to_ras(explained.input), atol=1e-9)
    assert seg.GetName() == "case 3: segmentation (tiny)"


def test_map_nodes_equal_the_command_line_maps_on_the_input_geometry(explained):
    maps, items = explained.results.maps, explained.summary["maps"]
    assert [mapStem(n) for n in maps] == [item["file"].split("/")[1].rsplit("_", 1)[0] for item in items]
    assert len(maps) >= 2
    for node, item in zip(maps, items):
        on_disk = read_volume(explained.out / item["file"])
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), on_disk.array)
        np.testing.assert_array_equal(ijk_to_ras(node), ijk_to_ras(explained.input))  # exactly the input's
        np.testing.assert_allclose(on_disk.ijk_to_ras, ijk_to_ras(explained.input), rtol=0, atol=1e-4)
        assert node.GetTransformNodeID() == explained.input.GetTransformNodeID() is not None
        assert node.GetName() == f"case 3: {mapStem(node)} (lesion)"
        assert node.GetNodeReferenceID(INPUT_REFERENCE) == explained.input.GetID()


def test_map_display_colour_window_and_threshold(explained):
    gradcam = explained.results.map("gradcam")
    display = gradcam.GetDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLColorTableNodeFileInferno.txt"  # Slicer's own table ID
    item = next(i for i in explained.summary["maps"] if i["method"] == "gradcam")
    low, high = item["display"]["low"], item["display"]["high"]  # the report's colour bar
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx((low, high))
    assert high < 1.0  # the 99th percentile inside the head, below the relative map's maximum
    assert display.GetApplyThreshold()
    assert display.GetLowerThreshold() == pytest.approx(low + item["threshold"] * (high - low))


def test_results_sit_beside_the_input_in_the_subject_hierarchy(explained):
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(explained.scene)
    for node in [explained.results.segmentation, *explained.results.maps]:
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == explained.study


def test_showing_a_map_blends_it_into_the_slice_view_and_none_removes_it(explained):
    env, gradcam = explained.env, explained.results.map("gradcam")
    slice_through_peak(env, explained.input, gradcam)
    showMap(explained.scene, None)
    background_only = blended_slice(env)
    showMap(explained.scene, gradcam, opacity=0.6)
    assert shownMap(explained.scene, explained.input) is gradcam
    with_map = blended_slice(env)
    showMap(explained.scene, None)
    assert shownMap(explained.scene, explained.input) is None
    hidden_again = blended_slice(env)

    value = map_under_pixels(env, gradcam)
    threshold = gradcam.GetDisplayNode().GetLowerThreshold()
    high, low = value > threshold + 0.1, value < threshold - 0.05
    assert high.sum() > 100 and low.sum() > 100
    changed = np.any(with_map[..., :3] != background_only[..., :3], axis=-1)
    assert changed[high].mean() > 0.99  # the map shows where it is high ...
    assert not changed[low].any()  # ... and is transparent below its threshold
    np.testing.assert_array_equal(hidden_again, background_only)  # "none" restores the slice exactly


def test_a_signed_map_hides_small_values_of_both_signs(explained):
    env, signed = explained.env, explained.results.map("saliency-signed")
    item = next(i for i in explained.summary["maps"] if i["variant"] == "signed")
    display = signed.GetDisplayNode()
    high = item["display"]["high"]
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx((-high, high))  # symmetric
    cutoff = item["display"]["threshold"] * high
    assert mapThreshold(signed) == pytest.approx(item["display"]["threshold"])
    slice_through_peak(env, explained.input, signed, magnitude=True)
    showMap(explained.scene, None)
    background_only = blended_slice(env)
    showMap(explained.scene, signed, opacity=1.0)
    with_map = blended_slice(env)
    showMap(explained.scene, None)

    value = map_under_pixels(env, signed)
    changed = np.any(with_map[..., :3] != background_only[..., :3], axis=-1)
    positive, negative, small = value > 1.2 * cutoff, value < -1.2 * cutoff, np.abs(value) < 0.8 * cutoff
    assert positive.sum() > 20 and negative.sum() > 20 and small.sum() > 100
    assert changed[positive].mean() > 0.99 and changed[negative].mean() > 0.99  # both signs drawn ...
    assert not changed[small].any()  # ... and |value| below the threshold transparent
    colour = with_map[..., :3].astype(int)
    assert (colour[positive, 0] > colour[positive, 2]).mean() > 0.9  # red for positive
    assert (colour[negative, 2] > colour[negative, 0]).mean() > 0.9  # blue for negative


def test_saved_bundle_reloads_equal_arrays(explained, tmp_path):
    path = saveSceneBundle(explained.scene, tmp_path / "scene.mrb")
    env = standaloneScene()
    getColorTable(env.scene, "inferno")  # real Slicer has it; slicer-core does not
    (tmp_path / "unpacked").mkdir()
    env.app.OpenSlicerDataBundle(str(path), str(tmp_path / "unpacked"))
    reloaded = env.scene.GetFirstNodeByName("case 3")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(reloaded), slicer.util.arrayFromVolume(explained.input))
    results = findResults(env.scene, reloaded)  # the links to the input survived
    assert results is not None and [m.GetName() for m in results.maps] == [m.GetName() for m in explained.results.maps]
    for before, after in zip(explained.results.maps, results.maps):
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(after), slicer.util.arrayFromVolume(before))
        np.testing.assert_allclose(ijk_to_ras(after), ijk_to_ras(before), rtol=0, atol=1e-9)  # via NRRD text
        assert after.GetDisplayNode().GetColorNodeID() == before.GetDisplayNode().GetColorNodeID()
        # MRML files keep 6 significant digits of display properties
        assert after.GetDisplayNode().GetLowerThreshold() == pytest.approx(before.GetDisplayNode().GetLowerThreshold(),
                                                                           rel=1e-5)
    np.testing.assert_allclose(to_world(results.maps[0]), to_world(explained.results.maps[0]), rtol=0, atol=1e-9)
    exported = read_volume(exportSegmentationToFile(results.segmentation, reloaded, tmp_path / "seg.nrrd"))
    np.testing.assert_array_equal(exported.array, read_volume(explained.out / "segmentation.nii.gz").array)
    assert results.summary["scores"] == explained.results.summary["scores"]


def test_colour_table_is_built_with_slicers_node_id():
    env = standaloneScene()
    import matplotlib

    for name in ("inferno", "viridis"):
        table = getColorTable(env.scene, name)
        assert table.GetID() == colorTableNodeID(name) == f"vtkMRMLColorTableNodeFile{name.capitalize()}.txt"
        assert table.GetNumberOfColors() == 256 and not table.GetSaveWithScene()
        rgba = [0.0] * 4
        table.GetColor(200, rgba)
        np.testing.assert_allclose(rgba, matplotlib.colormaps[name](200 / 255), atol=0.5 / 255)  # stored as bytes
        assert getColorTable(env.scene, name) is table  # found again, not duplicated
    with pytest.raises(SegXAIError, match="unknown colour map"):
        getColorTable(env.scene, "no-such-map")


# ------------------------------------------------------ more child processes
@pytest.mark.slow
def test_cancel_kills_the_child_and_leaves_the_scene_as_before(explained):
    before = scene_state(explained.scene)
    old = [n.GetID() for n in explained.results.nodes]
    events = []
    job = explained.logic.run(explained.input, str(explained.card), ["gradcam"], device="cpu", wait=False,
                              onProgress=events.append)
    deadline = time.monotonic() + 120
    while not any(e.stage == "inference" for e in events):  # the child is mid-run
        assert job.poll() and time.monotonic() < deadline
        time.sleep(0.05)
    pid = job.process.pid
    job.cancel()
    assert job.state == "cancelled" and not job.poll()
    assert scene_state(explained.scene) == before
    assert [n.GetID() for n in findResults(explained.scene, explained.input).nodes] == old
    assert not job.workDir.exists()
    if os.name == "posix":
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # no process of the child's group is left


def test_a_failing_run_reports_the_command_lines_error_and_adds_nothing(explained):
    before = scene_state(explained.scene)
    with pytest.raises(SegXAIError, match="unknown class 'no such class'.*choose one of: core, rim, lesion"):
        explained.logic.run(explained.input, str(explained.card), ["gradcam"], targetClass="no such class",
                            device="cpu")
    assert explained.logic.job.state == "failed"
    assert scene_state(explained.scene) == before


@pytest.mark.slow
def test_a_callers_output_folder_survives_a_failed_and_a_cancelled_run(explained, tmp_path):
    """The logic removes only what it made: a caller's outDir and the user's file in it stay, and the
    cancelled child (SIGTERM first) leaves no staging folder behind."""
    out = tmp_path / "my results"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own notes\n")
    with pytest.raises(SegXAIError, match="unknown class"):
        explained.logic.run(explained.input, str(explained.card), ["gradcam"], targetClass="no such class",
                            device="cpu", outDir=out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    events = []
    job = explained.logic.run(explained.input, str(explained.card), ["gradcam"], device="cpu", wait=False,
                              outDir=out, onProgress=events.append)
    deadline = time.monotonic() + 120
    while not any(e.stage == "inference" for e in events):  # the child is mid-run, its staging made
        assert job.poll() and time.monotonic() < deadline
        time.sleep(0.05)
    job.cancel()
    assert job.state == "cancelled" and not job.workDir.exists()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "the user's own notes\n"


@pytest.mark.slow
def test_rerun_replaces_the_previous_results(explained):
    """Runs last: the first run's nodes are gone afterwards."""
    scene = explained.scene

    def shape():
        # Saving the scene gave the old nodes storage nodes, which go with them: compare the rest.
        # Display nodes are numbered as they come (VolumeDisplay_4): compare their classes only.
        nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        return sorted((n.GetClassName(), "" if n.IsA("vtkMRMLDisplayNode") else n.GetName())
                      for n in nodes if not n.IsA("vtkMRMLStorageNode"))

    before = shape()
    old = {n.GetID() for n in explained.results.nodes}
    results = explained.logic.run(explained.input, str(explained.card), METHODS, device="cpu")
    assert not old & {n.GetID() for n in results.nodes}
    assert all(scene.GetNodeByID(node_id) is None for node_id in old)
    assert shape() == before  # the same nodes again (display nodes included), no copies piled up
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(results.map("gradcam")),
                                  read_volume(explained.out / explained.summary["maps"][0]["file"]).array)
