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

import io
import math
import os
import shutil
import tempfile
import zlib
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
        source: the file this volume was read from, while its voxels and geometry are that file's as read (None
            for a volume made in memory or derived from another): a model's own framework may read the file
            itself (a MONAI bundle's ``LoadImaged``: :mod:`SegXAILib.models.bundle_pipeline`).
    """

    array: np.ndarray
    spacing: np.ndarray = field(default_factory=lambda: np.ones(3))
    origin: np.ndarray = field(default_factory=lambda: np.zeros(3))
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    source: Path | None = None

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
        return replace(self, array=array, source=None)

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
        return cls._from_itk_geometry(sitk.GetArrayFromImage(image), image.GetDimension(), image.GetSpacing(),
                                      image.GetOrigin(), image.GetDirection())

    @classmethod
    def _from_itk_geometry(cls, array: np.ndarray, dim: int, spacing, origin, direction) -> Volume:
        """A Volume from voxels and ITK's (LPS) geometry of an image of dimension ``dim``."""
        matrix = np.array(direction, dtype=np.float64).reshape(dim, dim)
        return cls(
            array=array,
            spacing=np.array(spacing, dtype=np.float64)[:3] if dim >= 3 else np.ones(3),
            origin=_LPS_TO_RAS @ np.array(origin, dtype=np.float64)[:3] if dim >= 3 else np.zeros(3),
            direction=_LPS_TO_RAS @ matrix[:3, :3] if dim >= 3 else np.eye(3),
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
def label_dtype(largest: int) -> type[np.unsignedinteger]:
    """The integer type of a label map whose largest label is ``largest``: uint8, or uint16 above 255."""
    return np.uint8 if largest < 256 else np.uint16


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a NIfTI, NRRD or MHA file, or a folder holding one DICOM series.

    A file's voxel data is checked against its header before anything trusts it: ITK fills what a
    truncated file lacks with zeros and reads a bad voxel size as 1 mm. For NIfTI, NRRD and MetaImage
    (raw or compressed, attached or detached data) the data must hold every byte the header declares,
    and a compressed stream must be complete and pass its checksum; the voxels read by that check are
    the volume's (ITK reads only the geometry), so a compressed file is decompressed once. Other files
    (e.g. ASCII encodings, scaled NIfTI, several components) are read by ITK after the same size check.

    Raises:
        SegXAIError: missing path, unreadable, truncated or corrupt file, a voxel size that is not
            positive, a sheared direction matrix, several series in a folder.
    """
    path = Path(path)
    if not path.exists():
        raise SegXAIError(f"file not found: {path}; check the path")
    if path.is_dir():
        series = _read_dicom_series(path)
        _check_geometry(path, series)
        return _volume_of(path, series)
    layout = _data_layout(path)  # the header and the data are checked first: ITK's messages are vaguer
    voxels = _read_voxels(layout) if layout is not None else None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _unreadable(path, exc) from None
    _check_geometry(path, reader)
    if voxels is not None and _itk_agrees(reader, voxels):
        return replace(Volume._from_itk_geometry(voxels, reader.GetDimension(), reader.GetSpacing(),
                                                 reader.GetOrigin(), reader.GetDirection()), source=path.resolve())
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise _unreadable(path, exc) from None
    volume = _volume_of(path, image)
    if path.name.lower().endswith((".nii", ".nii.gz")) and np.issubdtype(volume.array.dtype, np.floating):
        _restore_non_finite_nifti(path, volume.array)
    return replace(volume, source=path.resolve())


def _volume_of(path: Path, image: sitk.Image) -> Volume:
    try:
        return Volume.from_sitk(image)
    except SegXAIError as exc:
        raise SegXAIError(f"{path}: {exc}") from None


def _unreadable(path: Path, exc: Exception) -> SegXAIError:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
    return SegXAIError(f"cannot read {path}: the file is corrupt or not a supported image "
                       f"(NIfTI, NRRD, MHA, or a DICOM series folder) [{reason}]")


_EXPORT_AGAIN = "copy or export it again"

_ORTHONORMAL_TOLERANCE = 1e-4
"""Largest deviation of a direction matrix's D^T D from the identity that counts as orthonormal (a
file's directions are printed to 6 or more digits; a real shear is far larger)."""


def _check_geometry(path: Path, reader: sitk.ImageFileReader | sitk.Image) -> None:
    """Refuse a voxel spacing that is not positive and a direction matrix that is not orthonormal
    (of a file's header, or of a DICOM series as read).

    A sheared grid (e.g. a gantry-tilted CT stored with its tilt) cannot be written to NIfTI: ITK would
    silently rotate it (writing its "closest orthogonal" matrix), so every output would sit elsewhere.
    """
    dim = reader.GetDimension()
    spacing = np.array(reader.GetSpacing(), dtype=np.float64)
    if not (np.all(np.isfinite(spacing)) and np.all(spacing > 0)):
        raise SegXAIError(f"{path}: its header gives the voxel spacing {_numbers(spacing)} mm; every spacing "
                          f"must be a positive number: fix the header or {_EXPORT_AGAIN}")
    direction = np.array(reader.GetDirection(), dtype=np.float64).reshape(dim, dim)
    deviation = float(np.abs(direction.T @ direction - np.eye(dim)).max()) if np.all(np.isfinite(direction)) else np.inf
    if deviation > _ORTHONORMAL_TOLERANCE:
        raise SegXAIError(
            f"{path}: its direction matrix {_numbers(direction.ravel())} is not orthonormal (its axes are "
            f"sheared or scaled: D^T D differs from the identity by {deviation:.3g}); SegXAI cannot keep such a "
            "grid (a NIfTI output would be silently rotated): resample the scan onto an orthogonal grid "
            "(e.g. Slicer's Resample Scalar Volume) or export it again without the shear")


def _numbers(values) -> str:
    return "[" + ", ".join(f"{float(v):.6g}" for v in np.ravel(values)) + "]"


# ------------------------------------------------------------- the voxel data against the header
@dataclass(frozen=True)
class _Layout:
    """Where a file's voxels are and how many bytes its header declares.

    Attributes:
        path: the file the user named (the header).
        data_path: the file holding the voxels (``path`` itself, or a detached data file).
        offset: bytes before the voxels (or before the compressed stream) in ``data_path``.
        compression: None, "gzip" (gzip members) or "zlib" (a zlib or gzip stream, MetaImage).
        skip: decompressed bytes before the voxels (the NIfTI header inside a .nii.gz).
        dims: sizes along the file's axes, fastest first (NRRD: its component axes too).
        item: bytes per entry of ``dims`` (MetaImage: all the components of a voxel).
        dtype: the element type with its byte order, or None where only the size can be checked.
        direct: the bytes are the volume's voxels as they are (3D, one component, no scaling).
        at_end: the voxels are the last bytes of ``data_path`` (a skip of -1), from ``offset`` on at the earliest.
    """

    path: Path
    data_path: Path
    offset: int
    compression: str | None
    skip: int
    dims: tuple[int, ...]
    item: int
    dtype: np.dtype | None
    direct: bool
    at_end: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.dims) * self.item

    def where(self) -> str:
        """The data file, named with its header when they differ."""
        return str(self.path) if self.data_path == self.path else f"{self.data_path} (the voxel data of {self.path})"


def _data_layout(path: Path) -> _Layout | None:
    """The layout a file's header declares, or None for a format or variant left to ITK alone.

    Raises:
        SegXAIError: the header itself is truncated or declares something impossible.
    """
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return _nifti_layout(path)
    if name.endswith((".nrrd", ".nhdr")):
        return _nrrd_layout(path)
    if name.endswith((".mha", ".mhd")):
        return _meta_layout(path)
    return None


_GZIP_MAGIC = b"\x1f\x8b"

_NIFTI_TYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8"}
"""NIfTI datatype codes whose voxels are read as they are."""

_NIFTI_ITEM_BYTES = {**{code: np.dtype(t).itemsize for code, t in _NIFTI_TYPES.items()},
                     32: 8, 128: 3, 1536: 16, 1792: 16, 2048: 32, 2304: 4}
"""Bytes per voxel of every NIfTI datatype ITK reads (complex, RGB, RGBA, float128 included)."""


def _inflate_head(path: Path, f, size: int) -> bytes:
    """The first ``size`` decompressed bytes of gzip file ``f`` (fewer if the stream is shorter)."""
    f.seek(0)
    stream, head = zlib.decompressobj(31), b""
    while len(head) < size and not stream.eof and (data := stream.unconsumed_tail or f.read(64 << 10)):
        try:
            head += stream.decompress(data, size - len(head))
        except zlib.error as exc:
            raise SegXAIError(f"{path} is corrupt: its compressed data fails to decompress ({exc}); "
                              f"{_EXPORT_AGAIN}") from None
    return head


def _nifti_layout(path: Path) -> _Layout | None:
    from nibabel.nifti1 import Nifti1Header
    from nibabel.nifti2 import Nifti2Header

    with open(path, "rb") as f:
        head = f.read(540)
        compressed = head[:2] == _GZIP_MAGIC  # by content: ITK also reads a .nii.gz that is not gzipped
        if compressed:
            head = _inflate_head(path, f, 540)
    sizes = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")} if len(head) >= 4 else set()
    header_class = Nifti1Header if 348 in sizes else Nifti2Header if 540 in sizes else None
    if header_class is None:
        raise SegXAIError(f"cannot read {path}: the file is corrupt or not a supported image (NIfTI, NRRD, MHA, "
                          "or a DICOM series folder) [no NIfTI header: its first 4 bytes are not 348 or 540]")
    header_size = 348 if header_class is Nifti1Header else 540
    if len(head) < header_size:
        raise SegXAIError(f"{path} holds {len(head):,} of the {header_size:,} bytes of a NIfTI header: the file "
                          f"is truncated; {_EXPORT_AGAIN}")
    header = header_class.from_fileobj(io.BytesIO(head[:header_size]), check=False)
    if bytes(header["magic"]).rstrip(b"\0") != (b"n+1" if header_class is Nifti1Header else b"n+2"):
        return None  # a header-and-image pair (.hdr/.img) or Analyze: ITK's business
    dim = [int(d) for d in header["dim"]]
    if not 1 <= dim[0] <= 7 or min(dim[1:dim[0] + 1]) < 1:
        raise SegXAIError(f"{path}: its header declares the impossible size {dim[1:max(1, min(dim[0], 7)) + 1]} "
                          f"(dim = {dim}); the file is corrupt: {_EXPORT_AGAIN}")
    dims = tuple(dim[1:dim[0] + 1])
    pixdim = np.array(header["pixdim"][1:min(dim[0], 3) + 1], dtype=np.float64)
    if not (np.all(np.isfinite(pixdim)) and np.all(pixdim > 0)):
        raise SegXAIError(
            f"{path}: its header gives the voxel size {_numbers(pixdim)} mm (pixdim); a voxel size must be a "
            "positive number (ITK would silently read 0 as 1 mm and a negative size as a mirrored axis): fix "
            f"the header's pixdim or {_EXPORT_AGAIN}")
    code = int(header["datatype"])
    if code not in _NIFTI_ITEM_BYTES:
        return None  # ITK refuses the type itself
    vox_offset = float(header["vox_offset"])
    offset = max(int(vox_offset) if np.isfinite(vox_offset) else 0, header_size + 4)
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    scaled = np.isfinite(slope) and slope != 0 and (slope != 1 or (np.isfinite(inter) and inter != 0))
    while len(dims) > 3 and dims[-1] == 1:
        dims = dims[:-1]
    direct = code in _NIFTI_TYPES and not scaled and len(dims) == 3 and offset == vox_offset
    dtype = np.dtype(_NIFTI_TYPES[code]).newbyteorder(header.endianness) if code in _NIFTI_TYPES else None
    return _Layout(path, path, 0 if compressed else offset, "gzip" if compressed else None,
                   offset if compressed else 0, dims, _NIFTI_ITEM_BYTES[code], dtype, direct)


_NRRD_TYPES = {
    **dict.fromkeys(("signed char", "int8", "int8_t"), "i1"),
    **dict.fromkeys(("uchar", "unsigned char", "uint8", "uint8_t"), "u1"),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t"), "i2"),
    **dict.fromkeys(("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), "u2"),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t"), "i4"),
    **dict.fromkeys(("uint", "unsigned int", "uint32", "uint32_t"), "u4"),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                     "int64_t"), "i8"),
    **dict.fromkeys(("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"), "u8"),
    "float": "f4",
    "double": "f8",
}

_HEADER_LIMIT = 1 << 20
"""Bytes searched for the end of a text header (NRRD, MetaImage)."""


def _text_header(path: Path, magic: bytes | None = None) -> tuple[list[tuple[str, int]], bytes] | None:
    """The lines of a text header with the offset just after each line, or None if it does not look like one."""
    with open(path, "rb") as f:
        head = f.read(_HEADER_LIMIT)
    if magic is not None and not head.startswith(magic):
        return None
    lines, position = [], 0
    while position < len(head):
        end = head.find(b"\n", position)
        end = len(head) if end < 0 else end + 1
        try:
            lines.append((head[position:end].decode("latin-1").rstrip("\r\n"), end))
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
            return None
        position = end
    return lines, head


def _data_file(path: Path, name: str) -> Path:
    data_path = Path(name) if Path(name).is_absolute() else path.parent / name
    if not data_path.is_file():
        raise SegXAIError(f"{path} keeps its voxels in {data_path}, which is missing: copy that file next to the "
                          "header (or open a single-file export)")
    return data_path


def _nrrd_layout(path: Path) -> _Layout | None:
    parsed = _text_header(path, b"NRRD000")
    if parsed is None:
        return None
    lines, head = parsed
    fields: dict[str, str] = {}
    data_start = None
    for line, end in lines[1:]:
        if not line.strip():
            data_start = end
            break
        if line.startswith("#") or ":=" in line:
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.strip()
    data_name = fields.get("data file", fields.get("datafile"))
    if data_start is None and data_name is None:
        return None  # the header goes on beyond what was read: ITK's business
    try:
        dimension = int(fields["dimension"])
        dims = tuple(int(v) for v in fields["sizes"].split())
        skip = int(fields.get("byte skip", fields.get("byteskip", "0")))
        line_skip = int(fields.get("line skip", fields.get("lineskip", "0")))
    except (KeyError, ValueError):
        return None
    code = _NRRD_TYPES.get(" ".join(fields.get("type", "").split()))
    encoding = {"raw": None, "gzip": "gzip", "gz": "gzip"}.get(fields.get("encoding", ""), "other")
    endian = fields.get("endian", "little")
    if (code is None or encoding == "other" or len(dims) != dimension or min(dims, default=0) < 1 or line_skip
            or skip < -1 or (skip == -1 and encoding) or endian not in ("little", "big")):
        return None  # ASCII, hex, bzip2, block types, line skips: read by ITK alone
    if data_name is not None:
        if data_name.startswith("LIST") or "%" in data_name or len(data_name.split()) > 1:
            return None  # several data files
        data_path, start = _data_file(path, data_name), 0
    else:
        data_path, start = path, data_start
    dtype = np.dtype(code).newbyteorder("<" if endian == "little" else ">")
    while len(dims) > 3 and dims[-1] == 1:
        dims = dims[:-1]
    if encoding is None:
        return _Layout(path, data_path, start + max(skip, 0), None, 0, dims, dtype.itemsize, dtype, len(dims) == 3,
                       at_end=skip == -1)
    return _Layout(path, data_path, start, "gzip", skip, dims, dtype.itemsize, dtype, len(dims) == 3)


_META_TYPES = {"MET_CHAR": "i1", "MET_UCHAR": "u1", "MET_SHORT": "i2", "MET_USHORT": "u2", "MET_INT": "i4",
               "MET_UINT": "u4", "MET_LONG_LONG": "i8", "MET_ULONG_LONG": "u8", "MET_FLOAT": "f4", "MET_DOUBLE": "f8"}


def _meta_layout(path: Path) -> _Layout | None:
    parsed = _text_header(path)
    if parsed is None:
        return None
    fields: dict[str, str] = {}
    data_start = None
    for line, end in parsed[0]:
        key, equals, value = line.partition("=")
        if not equals:
            continue
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            data_start = end
            break
    if data_start is None:
        return None
    true = ("true", "1")
    try:
        dims = tuple(int(v) for v in fields["DimSize"].split())
        ndims = int(fields.get("NDims", len(dims)))
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        header_size = int(fields.get("HeaderSize", "0"))
    except (KeyError, ValueError):
        return None
    code = _META_TYPES.get(fields.get("ElementType", ""))
    compressed = fields.get("CompressedData", "False").lower() in true
    binary = fields.get("BinaryData", "True").lower() in true
    big = (fields.get("BinaryDataByteOrderMSB", fields.get("ElementByteOrderMSB", "False")).lower() in true)
    name = fields["ElementDataFile"]
    if (code is None or not binary or len(dims) != ndims or min(dims, default=0) < 1 or channels < 1
            or header_size < -1 or (header_size and (compressed or name == "LOCAL"))):
        return None  # ASCII data, unknown types, odd headers: read by ITK alone
    if name == "LOCAL":
        data_path, start = path, data_start
    elif name.startswith("LIST") or "%" in name or len(name.split()) > 1:
        return None  # several data files
    else:
        data_path, start = _data_file(path, name), max(header_size, 0)
    dtype = np.dtype(code).newbyteorder(">" if big else "<")
    while len(dims) > 3 and dims[-1] == 1:
        dims = dims[:-1]
    direct = len(dims) == 3 and channels == 1
    return _Layout(path, data_path, start, "zlib" if compressed else None, 0, dims, dtype.itemsize * channels,
                   dtype, direct, at_end=header_size == -1)


_READ_CHUNK = 1 << 20
_INFLATE_CHUNK = 1 << 24
"""Compressed bytes read, and decompressed bytes produced, at a time: memory stays bounded."""

_MAX_INFLATE_RATIO = 1100
"""Deflate expands by at most about 1032:1; a header declaring more than this per compressed byte lies."""


def _read_voxels(layout: _Layout) -> np.ndarray | None:
    """Check that ``layout``'s data file holds every voxel byte its header declares (a compressed stream:
    complete and with a correct checksum); return the voxels (K, J, I, native byte order) when ``direct``.

    Raises:
        SegXAIError: the data is short, the stream is cut off, corrupt, or followed by foreign data.
    """
    need = layout.nbytes
    if layout.compression is None:
        size = layout.data_path.stat().st_size
        have = max(0, size - layout.offset)
        if have < need:
            raise SegXAIError(f"{layout.where()} holds {have:,} of the {need:,} bytes of voxel data its header "
                              f"declares: the file is truncated; {_EXPORT_AGAIN}")
        if not layout.direct:
            return None
        offset = size - need if layout.at_end else layout.offset
        try:
            raw = np.fromfile(layout.data_path, dtype=layout.dtype, count=need // layout.item, offset=offset)
        except MemoryError:
            raise _too_large(layout) from None
    else:
        raw = _inflate(layout)
        if raw is None:
            return None
        raw = raw.view(layout.dtype)
    return raw.astype(raw.dtype.newbyteorder("="), copy=False).reshape(layout.dims[::-1])


def _too_large(layout: _Layout) -> SegXAIError:
    return SegXAIError(f"{layout.where()} declares {layout.nbytes:,} bytes of voxels, more than this machine's "
                       "memory can hold; crop or downsample the scan")


def _inflate(layout: _Layout) -> np.ndarray | None:
    """Decompress ``layout``'s stream once, in chunks, checking it; the voxel bytes when ``direct``."""
    need, skip = layout.nbytes, layout.skip
    compressed = max(0, layout.data_path.stat().st_size - layout.offset)
    keep = layout.direct and skip + need <= _MAX_INFLATE_RATIO * compressed + _READ_CHUNK
    try:
        out = np.empty(need, np.uint8) if keep else None
    except MemoryError:
        raise _too_large(layout) from None
    wbits = 31 if layout.compression == "gzip" else 47  # 47: a zlib or gzip header, detected
    produced = 0
    with open(layout.data_path, "rb") as f:
        f.seek(layout.offset)
        stream = zlib.decompressobj(wbits)
        data = b""
        while True:
            if not data:
                data = f.read(_READ_CHUNK)
                if not data:
                    break
            try:
                chunk = stream.decompress(data, _INFLATE_CHUNK)
            except zlib.error as exc:
                raise SegXAIError(f"{layout.where()} is corrupt: its compressed data fails to decompress ({exc}); "
                                  f"{_EXPORT_AGAIN}") from None
            data = stream.unconsumed_tail
            if out is not None and chunk:
                lo, hi = max(produced, skip), min(produced + len(chunk), skip + need)
                if lo < hi:
                    out[lo - skip:hi - skip] = np.frombuffer(chunk, np.uint8, hi - lo, lo - produced)
            produced += len(chunk)
            if stream.eof:
                data = stream.unused_data
                while len(data) < 2 and (more := f.read(_READ_CHUNK)):
                    data += more
                if layout.compression == "gzip" and data[:2] == _GZIP_MAGIC:
                    stream = zlib.decompressobj(wbits)  # the next member of a multi-member gzip file
                    continue
                _check_padding(layout, data, f)
                break
    have = max(0, min(produced, skip + need) - skip)
    if have < need:
        raise SegXAIError(f"{layout.where()} holds {have:,} of the {need:,} bytes of voxel data its header declares: "
                          f"the file is truncated; {_EXPORT_AGAIN}")
    if not stream.eof:
        raise SegXAIError(f"{layout.where()} is truncated: its compressed stream stops before its end marker "
                          f"(the last bytes of the file are missing); {_EXPORT_AGAIN}")
    return out


_PADDING = b"\0 \t\r\n"


def _check_padding(layout: _Layout, data: bytes, f) -> None:
    """After the compressed stream only padding (zero bytes, white space) may follow."""
    while data:
        if data.strip(_PADDING):
            at = f.tell() - len(data.lstrip(_PADDING))
            raise SegXAIError(f"{layout.where()} is corrupt: foreign data follows its compressed stream (from byte "
                              f"{at:,} on); {_EXPORT_AGAIN}")
        data = f.read(_READ_CHUNK)


_SITK_DTYPES = {sitk.sitkUInt8: "u1", sitk.sitkInt8: "i1", sitk.sitkUInt16: "u2", sitk.sitkInt16: "i2",
                sitk.sitkUInt32: "u4", sitk.sitkInt32: "i4", sitk.sitkUInt64: "u8", sitk.sitkInt64: "i8",
                sitk.sitkFloat32: "f4", sitk.sitkFloat64: "f8"}


def _itk_agrees(reader: sitk.ImageFileReader, voxels: np.ndarray) -> bool:
    """True if ITK sees the same grid and voxel type in the header as the check did (else ITK reads)."""
    expected = _SITK_DTYPES.get(reader.GetPixelID())
    return (reader.GetDimension() == 3 and reader.GetNumberOfComponents() == 1 and expected is not None
            and np.dtype(expected) == voxels.dtype and tuple(reader.GetSize()) == voxels.shape[::-1])


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
