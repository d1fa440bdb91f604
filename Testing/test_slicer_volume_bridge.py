"""SegXAILogic's volume bridge against a real MRML scalar volume node (slicer-core, no Qt)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("slicer")
import slicer  # noqa: E402
import slicer.util  # noqa: E402
import vtk  # noqa: E402

from SegXAILib.errors import SegXAIError  # noqa: E402
from SegXAILib.volume import Volume, read_volume, write_volume  # noqa: E402
from SegXAILogic import updateNodeFromVolume, volumeFromNode  # noqa: E402
from SegXAILogic.standalone import standaloneScene  # noqa: E402

SPACING = np.array([0.7, 1.3, 2.9])
ORIGIN = np.array([-41.5, 17.25, 88.0])
SHAPE = (5, 9, 12)  # K, J, I


def oblique_direction() -> np.ndarray:
    """A rotation about all three axes (30, -20, 65 degrees), so no axis is aligned."""
    def rot(axis, deg):
        c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
        i, j = [a for a in range(3) if a != axis]
        m = np.eye(3)
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        return m
    return rot(2, 65) @ rot(1, -20) @ rot(0, 30)


def make_volume(dtype=np.float32) -> Volume:
    rng = np.random.default_rng(7)
    array = (rng.standard_normal(SHAPE) * 50).astype(dtype)
    return Volume(array, SPACING, ORIGIN, oblique_direction())


@pytest.fixture()
def scene():
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    yield scene
    scene.Clear(1)


def node_matrix(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8, np.float64])
def test_round_trip_through_a_scalar_volume_node(scene, dtype):
    vol = make_volume(dtype)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "scan")
    updateNodeFromVolume(node, vol)

    # the node holds our voxels and geometry, as Slicer sees them
    np.testing.assert_allclose(node_matrix(node), vol.ijk_to_ras, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), vol.array)
    np.testing.assert_allclose(node.GetSpacing(), SPACING, rtol=0, atol=1e-12)
    np.testing.assert_allclose(node.GetOrigin(), ORIGIN, rtol=0, atol=1e-12)
    directions = np.zeros((3, 3))
    node.GetIJKToRASDirections(directions)
    np.testing.assert_allclose(directions, vol.direction, rtol=0, atol=1e-12)

    back = volumeFromNode(node)
    assert back.array.dtype == vol.array.dtype
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.ijk_to_ras, vol.ijk_to_ras, rtol=0, atol=1e-12)
    np.testing.assert_allclose(back.spacing, vol.spacing, rtol=0, atol=1e-12)
    np.testing.assert_allclose(back.direction, vol.direction, rtol=0, atol=1e-12)


def test_voxel_centres_agree_with_slicer(scene):
    vol = make_volume()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "scan")
    updateNodeFromVolume(node, vol)
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    for i, j, k in [(0, 0, 0), (11, 0, 0), (0, 8, 0), (0, 0, 4), (11, 8, 4), (3, 7, 2)]:
        ras = np.array(m.MultiplyPoint((i, j, k, 1.0))[:3])
        np.testing.assert_allclose(ras, (vol.ijk_to_ras @ [i, j, k, 1.0])[:3], rtol=0, atol=1e-12)
        # the node's image data is indexed (i, j, k) by VTK; our array is (k, j, i)
        assert node.GetImageData().GetScalarComponentAsDouble(i, j, k, 0) == pytest.approx(float(vol.array[k, j, i]))


def test_volume_from_node_is_a_copy(scene):
    vol = make_volume()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "scan")
    updateNodeFromVolume(node, vol)
    back = volumeFromNode(node)
    back.array[0, 0, 0] = 12345.0
    assert slicer.util.arrayFromVolume(node)[0, 0, 0] != 12345.0
    vol.array[1, 1, 1] = -777.0  # and the node does not share the Volume's array
    assert slicer.util.arrayFromVolume(node)[1, 1, 1] != -777.0


def test_update_replaces_shape_and_geometry(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "scan")
    updateNodeFromVolume(node, Volume(np.zeros((2, 3, 4), np.int16)))
    vol = make_volume()
    updateNodeFromVolume(node, vol)
    assert slicer.util.arrayFromVolume(node).shape == SHAPE
    np.testing.assert_allclose(node_matrix(node), vol.ijk_to_ras, rtol=0, atol=1e-12)


def test_bool_and_int64_voxels(scene):
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    mask = make_volume().array > 0
    updateNodeFromVolume(node, make_volume().with_array(mask))
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), mask.astype(np.uint8))
    labels = np.arange(np.prod(SHAPE), dtype=np.int64).reshape(SHAPE)
    updateNodeFromVolume(node, make_volume().with_array(labels))
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), labels)
    with pytest.raises(SegXAIError, match="int32"):
        updateNodeFromVolume(node, make_volume().with_array(labels + 2**40))


def test_volume_from_an_empty_node_is_an_error(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(SegXAIError, match="no image"):
        volumeFromNode(node)


def test_node_loaded_from_our_file_matches_read_volume(tmp_path):
    # The whole chain: our writer -> Slicer's reader -> our bridge == our reader.
    env = standaloneScene()  # keep the scene alive as long as its logics are used
    vlogic = env.volumes

    vol = make_volume(np.int16)
    path = write_volume(vol, tmp_path / "scan.nrrd")
    node = vlogic.AddArchetypeVolume(str(path), "scan")
    assert node is not None
    bridged = volumeFromNode(node)
    ours = read_volume(path)
    np.testing.assert_array_equal(bridged.array, ours.array)
    np.testing.assert_allclose(bridged.ijk_to_ras, ours.ijk_to_ras, rtol=0, atol=1e-12)
    np.testing.assert_allclose(bridged.ijk_to_ras, vol.ijk_to_ras, rtol=0, atol=1e-12)
