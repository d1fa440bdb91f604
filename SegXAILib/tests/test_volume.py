"""Volume geometry and file I/O: round trips, the LPS/RAS convention, DICOM, bad input, atomic writes.

The test volume is oblique (rotated about all three axes), anisotropic and off-origin, so that a
swapped axis, a transposed direction matrix, a lost sign or a spacing applied to the wrong axis all
show up as a wrong physical point.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk

from SegXAILib.errors import SegXAIError
from SegXAILib.volume import Volume, read_volume, write_dicom_series, write_volume

SPACING = np.array([0.7, 1.3, 2.9])
ORIGIN = np.array([12.5, -30.25, 7.75])
SHAPE = (6, 7, 8)  # K, J, I: every axis a different length
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def euler_rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx for angles in degrees."""
    a, b, c = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


DIRECTION = euler_rotation(20.0, -35.0, 50.0)


def make_volume(dtype=np.float32, seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        array = rng.integers(max(info.min, -1000), min(info.max, 3000), SHAPE, endpoint=True).astype(dtype)
    else:
        array = (rng.standard_normal(SHAPE) * 100).astype(dtype)
    return Volume(array, SPACING, ORIGIN, DIRECTION)


def assert_same_voxels(read: Volume, written: Volume) -> None:
    assert read.array.dtype == written.array.dtype
    assert read.shape == written.shape
    np.testing.assert_array_equal(read.array, written.array)


def assert_same_geometry_exactly(a: Volume, b: Volume) -> None:
    np.testing.assert_array_equal(a.spacing, b.spacing)
    np.testing.assert_array_equal(a.origin, b.origin)
    np.testing.assert_array_equal(a.direction, b.direction)


def test_test_volume_is_oblique_and_anisotropic():
    vol = make_volume()
    assert np.allclose(DIRECTION.T @ DIRECTION, np.eye(3), atol=1e-15)
    assert np.isclose(np.linalg.det(DIRECTION), 1.0)
    assert np.all(np.abs(DIRECTION - np.diag(np.diag(DIRECTION))).max(axis=0) > 0.2)  # every axis tilted
    assert len(set(vol.spacing)) == 3 and len(set(vol.shape)) == 3


# ------------------------------------------------------------------ round trips
ROUND_TRIP_DTYPES = [np.float32, np.int16, np.uint8, np.float64]


@pytest.mark.parametrize("dtype", ROUND_TRIP_DTYPES, ids=lambda d: np.dtype(d).name)
def test_mha_round_trip_is_bit_exact(tmp_path, dtype):
    vol = make_volume(dtype)
    back = read_volume(write_volume(vol, tmp_path / "v.mha"))
    assert_same_voxels(back, vol)
    assert_same_geometry_exactly(back, vol)


@pytest.mark.parametrize("dtype", ROUND_TRIP_DTYPES, ids=lambda d: np.dtype(d).name)
def test_nrrd_round_trip(tmp_path, dtype):
    # NRRD stores "space directions" = direction * spacing; splitting them again may move the last bit.
    vol = make_volume(dtype)
    once = read_volume(write_volume(vol, tmp_path / "once.nrrd"))
    assert_same_voxels(once, vol)
    np.testing.assert_allclose(once.ijk_to_ras, vol.ijk_to_ras, rtol=0, atol=1e-12)
    np.testing.assert_allclose(once.spacing, vol.spacing, rtol=0, atol=1e-12)
    twice = read_volume(write_volume(once, tmp_path / "twice.nrrd"))
    assert_same_voxels(twice, vol)
    assert_same_geometry_exactly(twice, once)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("dtype", ROUND_TRIP_DTYPES, ids=lambda d: np.dtype(d).name)
def test_nifti_round_trip_within_float32(tmp_path, dtype, suffix):
    vol = make_volume(dtype)
    once = read_volume(write_volume(vol, tmp_path / f"once{suffix}"))
    assert_same_voxels(once, vol)
    # the NIfTI header holds float32: about 1e-7 relative
    np.testing.assert_allclose(once.ijk_to_ras, vol.ijk_to_ras, rtol=0, atol=1e-6)
    np.testing.assert_allclose(once.spacing, vol.spacing, rtol=0, atol=1e-6)
    np.testing.assert_allclose(once.direction, vol.direction, rtol=0, atol=1e-6)
    twice = read_volume(write_volume(once, tmp_path / f"twice{suffix}"))
    assert_same_voxels(twice, vol)
    np.testing.assert_allclose(twice.ijk_to_ras, once.ijk_to_ras, rtol=0, atol=1e-6)


def test_nifti_geometry_does_not_drift_over_many_round_trips(tmp_path):
    # For a volume rotated about several axes, ITK's NIfTI writer/reader (float32 sform and quaternion)
    # is not bit-exactly idempotent: each round trip may move the direction by ~1e-8. It must not
    # accumulate: after many trips the grid is still where it started, to float32 precision.
    vol = make_volume(np.int16)
    current = vol
    for n in range(8):
        current = read_volume(write_volume(current, tmp_path / f"trip{n}.nii.gz"))
    assert_same_voxels(current, vol)
    np.testing.assert_allclose(current.ijk_to_ras, vol.ijk_to_ras, rtol=0, atol=1e-6)
    assert np.allclose(current.direction.T @ current.direction, np.eye(3), atol=1e-6)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_round_trip_uncompressed_and_compressed_agree(tmp_path, suffix):
    vol = make_volume(np.float32)
    a = read_volume(write_volume(vol, tmp_path / f"a{suffix}", compress=True))
    b = read_volume(write_volume(vol, tmp_path / f"b{suffix}", compress=False))
    assert_same_voxels(a, vol)
    assert_same_voxels(b, vol)
    assert_same_geometry_exactly(a, b)


@pytest.mark.parametrize("suffix", [".nhdr", ".mhd"])
def test_detached_header_formats_round_trip_and_leave_no_temporary_files(tmp_path, suffix):
    vol = make_volume(np.int16)
    write_volume(vol, tmp_path / f"v{suffix}")
    write_volume(vol, tmp_path / f"v{suffix}")  # overwriting leaves nothing behind either
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and f"v{suffix}" in files, files
    assert all(not name.startswith(".") for name in files), files
    header = (tmp_path / f"v{suffix}").read_bytes()
    assert b".part" not in header  # the header names the data file by its final name
    back = read_volume(tmp_path / f"v{suffix}")
    assert_same_voxels(back, vol)
    np.testing.assert_allclose(back.ijk_to_ras, vol.ijk_to_ras, rtol=0, atol=1e-12)


def test_nifti_affine_matches_nibabel(tmp_path):
    # nibabel reads the NIfTI affine natively in RAS with (i, j, k) index order: an independent check
    # of our LPS->RAS flip and of the K,J,I array order.
    nib = pytest.importorskip("nibabel")
    vol = make_volume(np.int16)
    path = write_volume(vol, tmp_path / "v.nii.gz")
    img = nib.load(str(path))
    np.testing.assert_allclose(img.affine, vol.ijk_to_ras, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(img.dataobj), vol.array.transpose(2, 1, 0))


# ------------------------------------------------------------- LPS/RAS and indices
def test_ijk_to_ras_maps_voxel_centres_like_simpleitk():
    vol = make_volume()
    image = vol.to_sitk()
    for ijk in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (7, 6, 5), (3, 5, 2)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
        ras = (vol.ijk_to_ras @ np.array([*ijk, 1.0]))[:3]
        np.testing.assert_allclose(ras, LPS_TO_RAS @ lps, rtol=0, atol=1e-12)
        i, j, k = ijk
        assert image.GetPixel(i, j, k) == vol.array[k, j, i]  # array is K, J, I


def test_ijk_to_ras_of_a_file_matches_simpleitk_reading_it(tmp_path):
    vol = make_volume(np.int16)
    path = write_volume(vol, tmp_path / "v.mha")
    image = sitk.ReadImage(str(path))
    back = read_volume(path)
    for ijk in [(0, 0, 0), (7, 0, 0), (0, 6, 0), (0, 0, 5), (7, 6, 5)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
        np.testing.assert_allclose((back.ijk_to_ras @ np.array([*ijk, 1.0]))[:3], LPS_TO_RAS @ lps, atol=1e-12)


def test_lps_file_geometry_becomes_ras():
    # A plain LPS image: identity direction in LPS means I points to patient left, J posterior.
    image = sitk.GetImageFromArray(np.zeros((2, 3, 4), np.int16))
    image.SetOrigin((10.0, 20.0, 30.0))
    image.SetSpacing((0.5, 2.0, 3.0))
    vol = Volume.from_sitk(image)
    np.testing.assert_array_equal(vol.origin, [-10.0, -20.0, 30.0])
    np.testing.assert_array_equal(vol.direction, np.diag([-1.0, -1.0, 1.0]))
    np.testing.assert_array_equal(vol.spacing, [0.5, 2.0, 3.0])
    np.testing.assert_array_equal(vol.ijk_to_ras @ [1, 1, 1, 1], [-10.5, -22.0, 33.0, 1.0])
    back = vol.to_sitk()
    assert back.GetOrigin() == (10.0, 20.0, 30.0)
    assert back.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def test_from_ijk_to_ras_reproduces_the_geometry():
    vol = make_volume()
    rebuilt = Volume.from_ijk_to_ras(vol.array, vol.ijk_to_ras)
    np.testing.assert_allclose(rebuilt.spacing, vol.spacing, rtol=0, atol=1e-12)
    np.testing.assert_allclose(rebuilt.origin, vol.origin, rtol=0, atol=1e-12)
    np.testing.assert_allclose(rebuilt.direction, vol.direction, rtol=0, atol=1e-12)
    np.testing.assert_allclose(rebuilt.ijk_to_ras, vol.ijk_to_ras, rtol=0, atol=1e-12)
    assert rebuilt.array is vol.array


def test_from_ijk_to_ras_rejects_a_degenerate_matrix():
    m = make_volume().ijk_to_ras
    m[:3, 1] = 0.0
    with pytest.raises(SegXAIError, match="zero column"):
        Volume.from_ijk_to_ras(np.zeros(SHAPE), m)


# ------------------------------------------------------------------------- DICOM
def test_dicom_series_round_trip(tmp_path):
    vol = make_volume(np.int16, seed=3)
    files = write_dicom_series(vol, tmp_path / "series")
    assert len(files) == SHAPE[0] and all(f.exists() for f in files)
    back = read_volume(tmp_path / "series")
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.ijk_to_ras, vol.ijk_to_ras, rtol=0, atol=1e-5)


def test_dicom_series_float_voxels_are_rounded_to_int16(tmp_path):
    vol = make_volume(np.float32, seed=4)
    write_dicom_series(vol, tmp_path / "series")
    back = read_volume(tmp_path / "series")
    np.testing.assert_array_equal(back.array, np.round(vol.array).astype(np.int16))


def test_folder_without_dicom_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(SegXAIError, match="no DICOM series"):
        read_volume(tmp_path)


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(SegXAIError, match="no DICOM series"):
        read_volume(tmp_path)


# --------------------------------------------------------------------- bad input
def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(SegXAIError, match="not found"):
        read_volume(tmp_path / "missing.nii.gz")


def test_random_bytes_are_reported_as_corrupt(tmp_path):
    path = tmp_path / "x.nii.gz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(SegXAIError, match="corrupt") as info:
        read_volume(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("compress", [True, False])
def test_truncated_nrrd_is_reported_as_truncated(tmp_path, compress):
    path = write_volume(make_volume(np.float32), tmp_path / "v.nrrd", compress=compress)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SegXAIError, match=r"holds [0-9,]+ of the 1,344 bytes .* the file is truncated; copy or export"):
        read_volume(path)


def test_empty_file_is_reported_as_corrupt(tmp_path):
    path = tmp_path / "empty.mha"
    path.write_bytes(b"")
    with pytest.raises(SegXAIError, match="corrupt"):
        read_volume(path)


def test_unsupported_suffix_raises_before_writing(tmp_path):
    with pytest.raises(SegXAIError, match="unsupported output format"):
        write_volume(make_volume(), tmp_path / "v.png")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_voxel_type_leaves_no_file(tmp_path):
    vol = Volume(np.zeros(SHAPE, np.float16), SPACING, ORIGIN, DIRECTION)
    with pytest.raises((TypeError, SegXAIError)):
        write_volume(vol, tmp_path / "v.nrrd")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha", ".nhdr", ".mhd"])
def test_failing_write_leaves_no_file(tmp_path, monkeypatch, suffix):
    real_write = sitk.WriteImage

    def half_write(image, filename, *args, **kwargs):
        real_write(image, filename, *args, **kwargs)  # a complete file under the temporary name...
        with open(filename, "r+b") as handle:  # ...cut short, then the "disk" fails
            handle.truncate(10)
        raise RuntimeError("No space left on device")

    monkeypatch.setattr(sitk, "WriteImage", half_write)
    with pytest.raises(RuntimeError, match="No space left"):
        write_volume(make_volume(), tmp_path / f"v{suffix}")
    assert list(tmp_path.iterdir()) == []


def test_failing_write_keeps_the_previous_file(tmp_path, monkeypatch):
    old = make_volume(np.int16, seed=1)
    path = write_volume(old, tmp_path / "v.nrrd")

    def failing_write(image, filename, *args, **kwargs):
        open(filename, "wb").write(b"NRRD0004\n")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(sitk, "WriteImage", failing_write)
    with pytest.raises(RuntimeError):
        write_volume(make_volume(np.int16, seed=2), path)
    assert [p.name for p in tmp_path.iterdir()] == ["v.nrrd"]
    monkeypatch.undo()
    assert_same_voxels(read_volume(path), old)


def test_write_creates_missing_parent_folders(tmp_path):
    path = write_volume(make_volume(), tmp_path / "a" / "b" / "v.nii.gz")
    assert path.exists()
    assert [p.name for p in path.parent.iterdir()] == ["v.nii.gz"]


# ------------------------------------------------- the same file as Slicer reads it
@pytest.fixture(scope="module")
def slicer_volumes_logic():
    slicer = pytest.importorskip("slicer")
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = app.GetColorLogic()
    colors.SetMRMLScene(scene)
    app.SetModuleLogic("Colors", colors)
    logic = slicer.vtkSlicerVolumesLogic()
    logic.SetMRMLScene(scene)
    logic.SetMRMLApplicationLogic(app)
    app.SetModuleLogic("Volumes", logic)
    yield logic
    scene.Clear(1)


def _node_ijk_to_ras(node) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii.gz"])
def test_slicer_reads_our_file_with_the_same_geometry(tmp_path, slicer_volumes_logic, suffix):
    import slicer.util

    vol = make_volume(np.float32, seed=5)
    path = write_volume(vol, tmp_path / f"scan{suffix}")
    node = slicer_volumes_logic.AddArchetypeVolume(str(path), f"scan{suffix}")
    assert node is not None, f"Slicer could not read {path}"
    slicer_ijk_to_ras = _node_ijk_to_ras(node)
    np.testing.assert_allclose(slicer_ijk_to_ras, vol.ijk_to_ras, rtol=0, atol=1e-6)
    # Slicer and read_volume agree on the file to rounding (for NIfTI, both see the float32 header)
    np.testing.assert_allclose(slicer_ijk_to_ras, read_volume(path).ijk_to_ras, rtol=0, atol=1e-12)
    array = slicer.util.arrayFromVolume(node)
    assert array.dtype == vol.array.dtype
    np.testing.assert_array_equal(array, vol.array)


def test_we_read_a_file_written_by_slicer_with_the_same_geometry(tmp_path, slicer_volumes_logic):
    import slicer.util

    scene = slicer_volumes_logic.GetMRMLScene()
    vol = make_volume(np.int16, seed=6)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fromSlicer")
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(vol.ijk_to_ras))
    slicer.util.updateVolumeFromArray(node, vol.array)
    storage = node.CreateDefaultStorageNode()
    scene.AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(tmp_path / "slicer.nrrd"))
    assert storage.WriteData(node)
    back = read_volume(tmp_path / "slicer.nrrd")
    assert_same_voxels(back, vol)
    np.testing.assert_allclose(back.ijk_to_ras, vol.ijk_to_ras, rtol=0, atol=1e-6)
    assert os.path.getsize(tmp_path / "slicer.nrrd") > 0
