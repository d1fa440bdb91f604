"""Volume nodes <-> :class:`SegXAILib.volume.Volume`.

Both sides describe geometry in RAS with the array in K, J, I order, so the bridge is a copy of the
voxels and of the node's IJK-to-RAS matrix, with no axis flips.
"""

from __future__ import annotations

import numpy as np
import slicer
import slicer.util
import vtk

from SegXAILib.errors import SegXAIError
from SegXAILib.volume import Volume

__all__ = ["volumeFromNode", "updateNodeFromVolume"]


def volumeFromNode(volumeNode) -> Volume:
    """A :class:`Volume` holding a copy of a scalar volume node's voxels and its IJK-to-RAS geometry.

    The node's own IJK-to-RAS matrix is used, as when Slicer saves the node to a file: a parent
    transform is not applied (harden it first to include it).
    """
    if volumeNode is None or volumeNode.GetImageData() is None:
        raise SegXAIError("the volume node holds no image; load a scan or pick another volume")
    array = slicer.util.arrayFromVolume(volumeNode)
    if array.ndim != 3:
        raise SegXAIError(
            f"volume '{volumeNode.GetName()}' has {array.shape[-1]} components per voxel; "
            "SegXAI needs a single-channel (scalar) volume")
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return Volume.from_ijk_to_ras(array.copy(), slicer.util.arrayFromVTKMatrix(matrix))


def updateNodeFromVolume(volumeNode, volume: Volume) -> None:
    """Set a volume node's voxels (copied) and IJK-to-RAS matrix from a :class:`Volume`.

    VTK has no bool voxels (stored as uint8) and slicer.util rejects int64: int64 voxels are stored
    as int32 when every value fits, else refused.
    """
    array = volume.array
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif array.dtype == np.int64:
        info = np.iinfo(np.int32)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise SegXAIError("the volume has int64 values beyond the int32 range, which Slicer cannot show")
        array = array.astype(np.int32)
    slicer.util.updateVolumeFromArray(volumeNode, np.ascontiguousarray(array))
    volumeNode.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(volume.ijk_to_ras))
