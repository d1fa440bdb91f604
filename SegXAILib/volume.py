"""The one volume type of SegXAI, and reading and writing it in every supported format.

A :class:`Volume` is a voxel array in K,J,I order (slice, row, column: NumPy's view of a
SimpleITK or Slicer image) plus its geometry in RAS, Slicer's world convention. The
geometry is stored as spacing, origin and direction, the numbers a file holds, so that
reading and writing a file gives back exactly what was in it; the 4x4 IJK-to-RAS matrix
is derived from them.

LPS (ITK, DICOM, every file format) and RAS (Slicer) meet in exactly one place:
:func:`_LPS_TO_RAS` in :meth:`Volume.from_sitk` and :meth:`Volume.to_sitk`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import SegXAIError
from .fileio import atomic_path

FILE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
"""Single-file formats; a folder is read as a DICOM series."""

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # its own inverse


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D image on a grid in RAS world coordinates.

    Attributes:
        array: voxels, shape (K, J, I); any NumPy dtype, kept when written.
        spacing: voxel size along I, J, K in mm, shape (3,).
        origin: RAS position of voxel (0, 0, 0) in mm, shape (3,).
        direction: 3x3, column n is the RAS unit vector of index axis n (I, J, K).
    """

    array: np.ndarray
    spacing: np.ndarray = field(default_factory=lambda: np.ones(3))
    origin: np.ndarray = field(default_factory=lambda: np.zeros(3))
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing", np.asarray(self.spacing, dtype=np.float64).reshape(3))
        object.__setattr__(self, "origin", np.asarray(self.origin, dtype=np.float64).reshape(3))
        object.__setattr__(self, "direction", np.asarray(self.direction, dtype=np.float64).reshape(3, 3))

    # ----------------------------------------------------------------- geometry
    @property
    def shape(self) -> tuple[int, ...]:
        """Array shape, (K, J, I)."""
        return tuple(self.array.shape)

    @property
    def ijk_to_ras(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous (i, j, k, 1) to RAS (Slicer's IJKToRAS)."""
        m = np.eye(4)
        m[:3, :3] = self.direction * self.spacing[None, :]
        m[:3, 3] = self.origin
        return m

    @classmethod
    def from_ijk_to_ras(cls, array: np.ndarray, ijk_to_ras: np.ndarray) -> Volume:
        """Build a volume from an array (K, J, I) and a 4x4 IJK-to-RAS matrix (e.g. a Slicer node)."""
        m = np.asarray(ijk_to_ras, dtype=np.float64)
        spacing = np.linalg.norm(m[:3, :3], axis=0)
        if np.any(spacing == 0):
            raise SegXAIError("the IJK-to-RAS matrix has a zero column: the volume has no valid geometry")
        return cls(array, spacing, m[:3, 3].copy(), m[:3, :3] / spacing[None, :])

    def with_array(self, array: np.ndarray) -> Volume:
        """The same grid holding other voxels (a map, a label) of the same (K, J, I) shape."""
        if tuple(array.shape) != self.shape:
            raise ValueError(f"array shape {array.shape} does not match the grid {self.shape}")
        return replace(self, array=array)

    def same_grid(self, other: Volume, atol: float = 1e-6) -> bool:
        """True if both volumes have the same shape and (to ``atol`` mm) the same IJK-to-RAS matrix."""
        return self.shape == other.shape and np.allclose(self.ijk_to_ras, other.ijk_to_ras, rtol=0, atol=atol)

    # ---------------------------------------------------------- SimpleITK / LPS
    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Volume:
        """Convert a scalar SimpleITK image (LPS) to a Volume (RAS)."""
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise SegXAIError(
                f"the image has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                "SegXAI needs a single-channel (scalar) 3D scan: save one channel or one time point")
        dim = image.GetDimension()
        direction = np.array(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
        return cls(
            array=sitk.GetArrayFromImage(image),
            spacing=np.array(image.GetSpacing(), dtype=np.float64)[:3] if dim >= 3 else np.ones(3),
            origin=_LPS_TO_RAS @ np.array(image.GetOrigin(), dtype=np.float64)[:3] if dim >= 3 else np.zeros(3),
            direction=_LPS_TO_RAS @ direction[:3, :3] if dim >= 3 else np.eye(3),
        )

    def to_sitk(self) -> sitk.Image:
        """Convert to a SimpleITK image (LPS); the voxel type is kept (bool becomes uint8)."""
        array = self.array.astype(np.uint8) if self.array.dtype == bool else self.array
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.SetSpacing(tuple(float(s) for s in self.spacing))
        image.SetOrigin(tuple(float(o) for o in _LPS_TO_RAS @ self.origin))
        image.SetDirection(tuple(float(d) for d in (_LPS_TO_RAS @ self.direction).ravel()))
        return image


# --------------------------------------------------------------------- reading
def read_volume(path: str | os.PathLike) -> Volume:
    """Read a NIfTI, NRRD or MHA file, or a folder holding one DICOM series.

    Raises:
        SegXAIError: missing path, unreadable or corrupt file, several series in a folder.
    """
    path = Path(path)
    if not path.exists():
        raise SegXAIError(f"file not found: {path}; check the path")
    if path.is_dir():
        return Volume.from_sitk(_read_dicom_series(path))
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1][:200]
        raise SegXAIError(
            f"cannot read {path}: the file is corrupt or not a supported image "
            f"(NIfTI, NRRD, MHA, or a DICOM series folder) [{reason}]") from None
    volume = Volume.from_sitk(image)
    if path.name.lower().endswith((".nii", ".nii.gz")) and np.issubdtype(volume.array.dtype, np.floating):
        _restore_non_finite_nifti(path, volume.array)
    return volume


def _restore_non_finite_nifti(path: Path, array: np.ndarray) -> None:
    """Put back the NaN/inf voxels that ITK's NIfTI reader silently turns into 0.

    A scan with NaNs must be refused with a clear message, not segmented as if they were 0; only
    NIfTI is affected, so its voxels are re-read with nibabel, one slice at a time to bound memory.
    """
    import nibabel

    data = nibabel.load(str(path), keep_file_open=True).dataobj  # one gzip stream, read once in order
    if array.ndim != 3 or len(data.shape) != 3:
        return
    for k in range(data.shape[2]):
        slab = np.asarray(data[:, :, k])
        bad = ~np.isfinite(slab)
        if bad.any():
            array[k][bad.T] = slab[bad].astype(array.dtype)


def _read_dicom_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise SegXAIError(f"no DICOM series found in folder {folder}; give a folder of DICOM slices or an image file")
    if len(series) > 1:
        raise SegXAIError(
            f"folder {folder} holds {len(series)} DICOM series; move the one to analyse into a folder of its own")
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise SegXAIError(f"cannot read the DICOM series in {folder}: a slice is corrupt "
                          f"[{str(exc).strip()[-200:]}]") from None


# --------------------------------------------------------------------- writing
def volume_suffix(path: str | os.PathLike) -> str:
    """The format suffix of ``path`` ('.nii.gz', '.nrrd', ...), or raise naming the supported ones."""
    name = Path(path).name.lower()
    for suffix in FILE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise SegXAIError(f"unsupported output format for {path}; use one of {', '.join(FILE_SUFFIXES)}")


def write_volume(volume: Volume, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write a volume atomically: to a temporary name in the same folder, then renamed.

    The format follows the suffix (.nii.gz, .nii, .nrrd, .mha); a half-written file is never left
    under the final name.
    """
    path = Path(path)
    suffix = volume_suffix(path)
    if suffix in (".nhdr", ".mhd"):
        return _write_detached_header(volume, path, compress)
    with atomic_path(path, suffix) as tmp:
        sitk.WriteImage(volume.to_sitk(), str(tmp), useCompression=compress and suffix != ".nii")
    return path


def _write_detached_header(volume: Volume, path: Path, compress: bool) -> Path:
    """Write a header (.nhdr, .mhd) and its data file, which the header names after itself.

    Both are written under their final names in a temporary folder beside ``path``; the data file
    is moved into place first and the header last, so the header never names a temporary file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    try:
        sitk.WriteImage(volume.to_sitk(), str(tmp_dir / path.name), useCompression=compress)
        for data_file in tmp_dir.iterdir():
            if data_file.name != path.name:
                os.replace(data_file, path.parent / data_file.name)
        os.replace(tmp_dir / path.name, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def write_dicom_series(volume: Volume, folder: str | os.PathLike, series_description: str = "SegXAI") -> list[Path]:
    """Write a volume as a DICOM series (one file per K slice) with correct patient geometry.

    Only integer voxel types are stored as DICOM pixels; floats are rounded to int16.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    array = volume.array
    if not np.issubdtype(array.dtype, np.integer):
        array = np.round(array).astype(np.int16)
    image = volume.with_array(array).to_sitk()
    direction = np.array(image.GetDirection()).reshape(3, 3)
    series_uid = "1.2.826.0.1.3680043.2.1125." + str(abs(hash((folder.resolve().as_posix(), array.shape))) % 10**12)
    common = {
        "0008|0060": "MR",
        "0008|103e": series_description,
        "0020|000e": series_uid,
        "0020|000d": series_uid + ".1",
        "0010|0010": "SegXAI^Test",
        "0020|0037": "\\".join(f"{v:.10g}" for v in (*direction[:, 0], *direction[:, 1])),
        "0028|0030": f"{image.GetSpacing()[1]:.10g}\\{image.GetSpacing()[0]:.10g}",
        "0018|0050": f"{image.GetSpacing()[2]:.10g}",
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    for k in range(image.GetDepth()):
        slice_image = image[:, :, k]
        for tag, value in common.items():
            slice_image.SetMetaData(tag, value)
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        slice_image.SetMetaData("0020|0032", "\\".join(f"{v:.10g}" for v in position))
        slice_image.SetMetaData("0020|0013", str(k + 1))
        slice_image.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        out = folder / f"slice_{k:04d}.dcm"
        writer.SetFileName(str(out))
        writer.Execute(slice_image)
        paths.append(out)
    return paths
