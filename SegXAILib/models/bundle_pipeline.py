"""A MONAI bundle's own preprocessing, sliding windows and postprocessing, as MONAI runs them.

An explanation is true only of the segmentation it explains, so a bundle segments here as its own
``SupervisedEvaluator`` would: the ``preprocessing`` ``Compose`` of its config, the ``inferer``'s windows
(``roi_size``, ``overlap``, ``mode``, ``sigma_scale``, ``padding_mode``, ``cval``), and the ``postprocessing``
``Compose`` (``Activationsd``, ``Invertd``, ``AsDiscreted``, ``KeepLargestConnectedComponentd`` ...), each built
from the config with MONAI's own classes (:func:`build_bundle_pipeline`).

What differs, and why it changes nothing:

- The scan file is read by the config's own ``LoadImaged`` (:attr:`SegXAILib.volume.Volume.source`). Only a scan
  with no file (made in memory) or one MONAI cannot read (its readers for NRRD need ``pynrrd`` or ``itk``) is
  handed over as SegXAI read it, in the form ``LoadImaged`` gives: the voxels in the file's I, J, K order as its
  ``dtype``, the IJK-to-RAS affine in ``float64``, ``original_channel_dim`` (none for one scan, 0 for several,
  stacked as channels). Its geometry can then differ from MONAI's reading in the 8th digit (ITK and nibabel round
  a NIfTI header's float32 differently), which moves a label wherever the inversion ties: between two classes in
  nearest-neighbour resampling, or at exactly one half after a bilinear one (the prostate form's), which is
  rounded. With the test bundles' random weights (a label change at almost every voxel) the spleen form still
  agrees on 100 % of voxels that way, the 105-class form on 99.5 %, the prostate form on 78 %; read by MONAI, all
  three on 100 % (``SegXAILib/tests/test_bundle_pipeline.py``).
- A transform that writes files (``SaveImaged``) is left out: SegXAI writes its own outputs.
- The windows run through :func:`SegXAILib.inference.sliding_window_predict` with the inferer's settings (the
  card's :attr:`~SegXAILib.models.card.ModelCard.windows`), one window at a time (``sw_batch_size`` changes only
  the speed), on SegXAI's device; explanations run in the same windows. The network sees the arrays it was
  trained on (:class:`~SegXAILib.models.bundle.BundleAxes`); with the window sizes reversed to SegXAI's K, J, I
  the windows are MONAI's, visited in another order (the blending sums differ by float rounding).

``SegXAILib/tests/test_bundle_pipeline.py`` runs each Model Zoo form through MONAI's own ``SupervisedEvaluator``
(``monai.bundle`` ``run``) and compares the labels it saves with SegXAI's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import SegXAIError
from ..volume import Volume, label_dtype

LOADERS = ("LoadImage", "LoadImaged")
"""Transforms that read files: replaced by the scan SegXAI has read (module docstring)."""
WRITERS = ("SaveImage", "SaveImaged")
"""Transforms that write files: left out (SegXAI writes its own outputs)."""
IMAGE_KEY = "image"
PRED_KEY = "pred"


@dataclass
class PreparedInput:
    """A scan after the bundle's preprocessing.

    Attributes:
        data: MONAI's data dictionary (the image under its key, with the trace of applied transforms that
            ``Invertd`` inverts).
        model_grid: the preprocessed image as a :class:`Volume` (K, J, I; its geometry is the image's affine).
        image: the network's input, (1, C, K, J, I) float32.
        read_by: who read the scan: ``"LoadImaged"`` (the bundle's own loader, from the file) or ``"SegXAI"``.
    """

    data: dict[str, Any]
    model_grid: Volume
    image: torch.Tensor
    read_by: str


@dataclass
class BundlePipeline:
    """The bundle's transforms, built with MONAI's classes (:func:`build_bundle_pipeline`).

    Attributes:
        loader: the ``preprocessing``'s first transform, its ``LoadImaged``.
        preprocessing: the ``preprocessing`` transforms after its loader (the same instances the config's
            ``Invertd`` refers to, which MONAI checks when it inverts).
        postprocessing: the ``postprocessing`` transforms without writers; None when the config has none (the
            labels are then the argmax of the probabilities, taken on the scan's grid).
        image_key: the key the transforms read the image from (``image`` unless the config says otherwise).
    """

    loader: Any
    preprocessing: Any
    postprocessing: Any | None
    image_key: str = IMAGE_KEY

    def preprocess(self, scans: list[Volume]) -> PreparedInput:
        """``scans`` (one, or several co-registered on the first one's grid) through the preprocessing: read by
        the bundle's loader from their files where they have them, else handed over (module docstring)."""
        loaded = self._read(scans) if all(scan.source is not None for scan in scans) else None
        read_by = "SegXAI" if loaded is None else "LoadImaged"
        data = self.preprocessing({self.image_key: self._handed_over(scans)} if loaded is None else loaded)
        return self._prepared(data, read_by)

    def _read(self, scans: list[Volume]) -> dict[str, Any] | None:
        """The bundle's ``LoadImaged`` on the scans' files (a list of files is stacked as channels, as MONAI
        does); None where MONAI has no reader for them."""
        files = [str(scan.source) for scan in scans]
        try:
            return self.loader({self.image_key: files[0] if len(files) == 1 else files})
        except Exception:  # noqa: BLE001 - MONAI raises several kinds when none of its readers is installed
            return None

    def _handed_over(self, scans: list[Volume]) -> Any:
        """The scans as ``LoadImaged`` would give them, built from SegXAI's reading."""
        from monai.data import MetaTensor
        from monai.utils import SpaceKeys

        loader = getattr(self.loader, "_loader", self.loader)
        dtype = getattr(loader, "dtype", np.float32)
        channel_first = bool(getattr(loader, "ensure_channel_first", False))
        first = scans[0]
        arrays = [np.asarray(scan.array, dtype=dtype).transpose(2, 1, 0) for scan in scans]  # I, J, K
        affine = torch.as_tensor(first.ijk_to_ras, dtype=torch.float64)
        meta = {"original_affine": first.ijk_to_ras.copy(), "spatial_shape": np.asarray(arrays[0].shape),
                "space": SpaceKeys.RAS, "filename_or_obj": "segxai-scan",
                "original_channel_dim": 0 if len(scans) > 1 else float("nan")}
        array = np.stack(arrays) if len(scans) > 1 else arrays[0]
        if channel_first and len(scans) == 1:
            array, meta["original_channel_dim"] = array[None], 0
        return MetaTensor(torch.from_numpy(np.ascontiguousarray(array)), affine=affine, meta=meta)

    def _prepared(self, data: dict[str, Any], read_by: str) -> PreparedInput:
        from monai.data import MetaTensor

        prepared = data[self.image_key]
        if not isinstance(prepared, MetaTensor) or prepared.ndim != 4:
            raise SegXAIError("the MONAI bundle's preprocessing does not give a channel-first 3D image with its "
                              "geometry (add EnsureChannelFirstd after LoadImaged and keep MetaTensors); fix the "
                              "preprocessing in configs/inference.json")
        voxels = prepared.detach().cpu().float().permute(0, 3, 2, 1).contiguous()  # (C, K, J, I)
        grid = Volume.from_ijk_to_ras(voxels[0].numpy(), prepared.affine.detach().cpu().numpy().astype(np.float64))
        return PreparedInput(data, grid, voxels[None], read_by)

    def postprocess(self, prepared: PreparedInput, logits: torch.Tensor, scan: Volume,
                    multilabel_classes: int = 0) -> tuple[Volume | None, list[Volume]]:
        """The bundle's postprocessing of (1, C, K, J, I) ``logits``, on the scan's grid (nearest-neighbour onto it
        where the postprocessing does not invert the preprocessing): its label map, and the per-class masks of a
        multi-label model of ``multilabel_classes`` classes (the last output of the transforms with one channel per
        class, thresholded at 0.5 if still probabilities: BraTS's, before its ``Lambdad`` maps them to 1/2/4).
        (None, []) when the config has no postprocessing; no label map where it ends on one channel per class."""
        from monai.data import MetaTensor
        from monai.transforms import apply_transform

        if self.postprocessing is None:
            return None, []
        image = prepared.data[self.image_key]
        pred = MetaTensor(logits[0].permute(0, 3, 2, 1).contiguous(), affine=image.affine, meta=dict(image.meta))
        data, per_class = {**prepared.data, PRED_KEY: pred}, None
        compose = self.postprocessing
        for transform in compose.transforms:  # one at a time, as Compose runs them, to see the per-class outputs
            data = apply_transform(transform, data, compose.map_items, compose.unpack_items)
            if multilabel_classes and data[PRED_KEY].shape[0] == multilabel_classes:
                per_class = data[PRED_KEY]
        out = data[PRED_KEY]
        masks = [] if per_class is None else [self._on_scan(channel[None] > 0.5, per_class, prepared, scan)
                                             for channel in torch.as_tensor(per_class)]
        if out.shape[0] != 1:
            if per_class is None:
                raise SegXAIError(f"the MONAI bundle's postprocessing gives {out.shape[0]} channels, neither one label "
                                  f"map nor one per class; end it with AsDiscreted")
            return None, masks
        return self._on_scan(out, out, prepared, scan), masks

    def _on_scan(self, values: Any, like: Any, prepared: PreparedInput, scan: Volume) -> Volume:
        """(1, I, J, K) ``values`` (on the grid of the MetaTensor ``like``) as integer labels on the scan's grid."""
        from monai.data import MetaTensor

        labels = torch.as_tensor(values).detach().cpu()
        array = np.rint(labels[0].double().permute(2, 1, 0).numpy()).astype(np.int64)
        affine = like.affine.detach().cpu().numpy() if isinstance(like, MetaTensor) else prepared.model_grid.ijk_to_ras
        result = Volume.from_ijk_to_ras(array, np.asarray(affine, dtype=np.float64))
        if not result.same_grid(scan, atol=1e-3):
            from ..preprocessing import resample_to_grid

            result = resample_to_grid(result, scan, interpolation="nearest")
        # a negative value (no label map should hold one) keeps the wider type, as before
        largest = int(array.max(initial=0)) if array.min(initial=0) >= 0 else 256
        return scan.with_array(result.array.astype(label_dtype(largest)))


def _without(compose: Any, names: tuple[str, ...]) -> Any:
    """A shallow copy of a ``Compose`` without its transforms of class ``names`` (the others the same instances)."""
    kept = copy.copy(compose)
    kept.transforms = [t for t in compose.transforms if type(t).__name__ not in names]
    return kept


def build_bundle_pipeline(folder: Path, build: Any) -> BundlePipeline:
    """The pipeline of the bundle in ``folder``; ``build(id)`` builds a config entry (the trust decision is the
    caller's: :func:`SegXAILib.models.bundle.load_bundle`)."""
    from monai.transforms import Compose

    preprocessing = build("preprocessing")
    if not isinstance(preprocessing, Compose):
        raise SegXAIError(f"MONAI bundle {folder}: its preprocessing is not a Compose of transforms; fix "
                          "configs/inference.json")
    loaders = [t for t in preprocessing.transforms if type(t).__name__ in LOADERS]
    if len(loaders) != 1 or preprocessing.transforms[0] is not loaders[0]:
        raise SegXAIError(f"MONAI bundle {folder}: its preprocessing must start with one LoadImaged; fix "
                          "configs/inference.json")
    keys = getattr(loaders[0], "keys", (IMAGE_KEY,))
    postprocessing = build("postprocessing")
    if postprocessing is not None and not isinstance(postprocessing, Compose):
        raise SegXAIError(f"MONAI bundle {folder}: its postprocessing is not a Compose of transforms; fix "
                          "configs/inference.json")
    return BundlePipeline(loaders[0], _without(preprocessing, LOADERS),
                          None if postprocessing is None else _without(postprocessing, WRITERS), str(keys[0]))
