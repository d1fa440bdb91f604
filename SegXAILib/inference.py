"""Segmenting a scan: preprocessing, sliding-window inference, and results on the scan's grid.

Windows run on the chosen device; MONAI stitches them with Gaussian blending into a buffer on
the CPU, so a whole CT never has to fit on the accelerator (nor, at once, through the
network). Probabilities stay on the model grid; labels are brought back to the scan's grid
one class at a time (a running argmax), which keeps a 512x512x300 CT within a few GB.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from .errors import SegXAIError
from .models.card import Windows
from .models.loaders import LoadedModel
from .postprocessing import postprocess
from .preprocessing import (
    BrainMask,
    input_scans,
    preprocess_with_brain,
    reorient_to_ras,
    resample_to_grid,
    validate_scan,
)
from .progress import Progress, part_of
from .symmetries import augment, invert, mirrorings
from .volume import Volume, label_dtype


def select_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA, then Apple MPS, then CPU; or a torch device name (``cpu``, ``cuda:1``, ``mps``)."""
    if name in ("auto", None, ""):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SegXAIError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SegXAIError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SegXAIError("device 'mps' was asked for but Apple MPS is not available; use --device cpu or auto")
    return device


def window_count(image_shape: Sequence[int], patch_size: Sequence[int], overlap: float) -> int:
    """Number of windows MONAI's sliding_window_inference visits (for progress reporting)."""
    count = 1
    for size, roi in zip(image_shape, patch_size):
        interval = max(int(roi * (1 - overlap)), 1)
        count *= 1 if size <= roi else math.ceil((size - roi) / interval) + 1
    return count


def mixed_precision(device: torch.device):
    """The context of :func:`sliding_window_predict`'s network passes (and the black-box methods' passes of one
    window, :mod:`.explain.blackbox`): float16 autocast on CUDA (mixed precision), nothing on the CPU."""
    return torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else nullcontext()


def sliding_window_predict(
    network: Callable[[torch.Tensor], torch.Tensor | Sequence[torch.Tensor]],
    image: torch.Tensor,
    windows: Windows,
    device: torch.device,
    progress: Progress | None = None,
    stage: str = "inference",
    with_coord: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Run ``network`` over (1, C, D, H, W) ``image`` in ``windows`` (a card's
    :attr:`~SegXAILib.models.card.ModelCard.windows`: MONAI's sliding windows, or nnU-Net's where the card places
    them so, :mod:`SegXAILib.nnunet_windows`); the stitched results on the CPU.

    ``network`` may return several tensors (e.g. logits plus an activation); each is stitched.
    With ``with_coord`` it is called as ``network(window, coordinates)``, as MONAI does.
    """
    progress = progress or Progress()
    nnunet = windows.placement == "nnunet"
    if nnunet:
        from .nnunet_windows import stitch_nnunet_windows, window_total
    total = window_total(image.shape[2:], windows) if nnunet else window_count(image.shape[2:], windows.size,
                                                                                windows.overlap)
    done = 0

    def predictor(window: torch.Tensor, *coords):
        nonlocal done
        progress.update(stage, done / total, f"window {done + 1}/{total}")
        with mixed_precision(device):
            out = network(window.to(device), *coords)
        done += window.shape[0]
        progress.update(stage, done / total, f"window {min(done, total)}/{total}")
        return tuple(o.float() for o in out) if isinstance(out, (tuple, list)) else out.float()

    if nnunet:
        return stitch_nnunet_windows(predictor, image, windows, lambda x, pad: pad_as_windows(x, pad, windows),
                                     with_coord)
    return sliding_window_inference(
        image, roi_size=tuple(windows.size), sw_batch_size=1, predictor=predictor, overlap=windows.overlap,
        mode=windows.blend, sigma_scale=windows.sigma_scale, padding_mode=windows.padding_mode,
        cval=windows.constant(image), sw_device=device, device=torch.device("cpu"), with_coord=with_coord)


def pad_as_windows(image: torch.Tensor, pad: Sequence[int], windows: Windows) -> torch.Tensor:
    """(1, C, *S) ``image`` padded by ``pad`` (``F.pad`` order) as the sliding windows pad a grid smaller than a
    window: ``windows.padding_mode``, constant padding with ``windows.cval`` (None: the image's minimum)."""
    if windows.padding_mode != "constant":
        return F.pad(image, tuple(pad), mode=windows.padding_mode)
    return F.pad(image, tuple(pad), value=windows.constant(image))


def network_probabilities(output: torch.Tensor, kind: str = "logits") -> torch.Tensor:
    """Class probabilities from a network's (N, n_classes, *S) output: its softmax over the classes when the
    network returns ``logits`` (the card's ``output``, the default), the output itself (as float32) when it
    returns ``probabilities`` (a softmax already applied: a second one would flatten them towards uniform)."""
    if kind == "probabilities":
        return output.float()
    if kind == "sigmoid":  # independent classes (multi-label): each channel its own probability
        return torch.sigmoid(output.float())
    if kind != "logits":
        raise SegXAIError(f"unknown network output {kind!r}; a model card's output is logits, probabilities or "
                          "sigmoid")
    return torch.softmax(output.float(), dim=1)


def target_mask(probabilities: np.ndarray | torch.Tensor, channels: Sequence[int]) -> np.ndarray:
    """Bool (*S): the argmax of (n_classes, *S) probabilities is one of ``channels`` (the first index wins a tie).

    Compared as the target channels' maximum against the other channels' (an argmax only on tied voxels):
    several times faster than an argmax over the class axis, which matters where a mask is taken after
    every one of many perturbed passes.
    """
    p = probabilities.detach().cpu().numpy() if isinstance(probabilities, torch.Tensor) else np.asarray(probabilities)
    inside = np.zeros(p.shape[0], bool)
    inside[list(channels)] = True
    if inside.all() or not inside.any():
        return np.full(p.shape[1:], inside.all())
    target, other = p[inside].max(0), p[~inside].max(0)
    mask = target > other
    tied = target == other
    if tied.any():
        mask[tied] = inside[p[:, tied].argmax(0)]
    return mask


@dataclass
class SegmentationResult:
    """A segmentation on the scan's grid, with the model-grid probabilities it came from.

    Attributes:
        labels: label values of the model's classes on the scan's grid (uint8 or uint16).
        probabilities: softmax, shape (n_classes, K, J, I) on ``model_grid``.
        model_grid: the preprocessed scan (its geometry is the model grid).
        scan: the input scan (read-only).
        brain: the scan's brain, estimated at most once for the whole case (every later step that needs
            it, on any grid, asks this object).
        timings: seconds per stage.
        device: the device the network ran on.
        model_input: the network's input (C, K, J, I) on the model grid when it takes several scans (``model_grid``
            holds the first); None for one scan.
        resampled: the scans (indices, in the model's order) resampled onto the first one's grid.
        masks: a multi-label model's classes, one 0/1 uint8 volume per output channel on the scan's grid (they may
            overlap; ``labels`` then holds the model's own label map, or each voxel's last class); empty otherwise.
    """

    labels: Volume
    probabilities: np.ndarray
    model_grid: Volume
    scan: Volume
    brain: BrainMask
    timings: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    masks: list[Volume] = field(default_factory=list)
    model_input: np.ndarray | None = None
    resampled: list[int] = field(default_factory=list)

    @property
    def network_input(self) -> np.ndarray:
        """(C, K, J, I): what the network ran on (every scan's channel, or the one scan's)."""
        return self.model_input if self.model_input is not None else self.model_grid.array[None]

    def probability_on_scan(self, channels: Sequence[int]) -> Volume:
        """Summed probability of ``channels`` (e.g. the classes of a group) on the scan's grid."""
        summed = self.probabilities[list(channels)].sum(axis=0)
        return resample_to_grid(self.model_grid.with_array(summed), self.scan)


def predict_probabilities(model: LoadedModel, image: np.ndarray, device: torch.device,
                          progress: Progress | None = None, mirror_axes: Sequence[int] = ()) -> np.ndarray:
    """Softmax probabilities (n_classes, D, H, W) for a preprocessed (C, D, H, W) or (D, H, W) array (the network's
    own output when its card says it returns probabilities: :func:`network_probabilities`).

    ``mirror_axes``: test-time mirroring (nnU-Net's default): the mean of the softmax of the scan flipped
    along every combination of these model-grid axes, each flipped back (2^n sliding-window passes).
    A model trained with random flips sees each mirror image as another scan; averaging them removes
    part of the prediction's dependence on the scan's exact voxels. The default is one plain pass.
    """
    x = torch.from_numpy(np.ascontiguousarray(image if image.ndim == 4 else image[None]))[None]
    progress = progress or Progress()
    transforms = mirrorings(mirror_axes)
    total = None
    for n, transform in enumerate(transforms):
        logits = network_output(model, augment(x, transform), device, part_of(progress, n, len(transforms)))
        probabilities = invert(network_probabilities(logits, model.card.output), transform)
        total = probabilities if total is None else total.add_(probabilities)
    return (total[0] / len(transforms)).numpy()


def network_output(model: LoadedModel, x: torch.Tensor, device: torch.device, progress: Progress) -> torch.Tensor:
    """The network's output (N, n_classes, D, H, W) for (1, C, D, H, W) ``x`` in the card's windows, on the CPU;
    the input channels and output classes checked against the card."""
    if x.shape[1] != model.card.input_channels:
        raise SegXAIError(f"model {model.card.name!r} expects {model.card.input_channels} input channel(s) but "
                          f"the scan has {x.shape[1]}; choose a model made for this kind of scan")
    model.network.to(device).eval()
    with torch.inference_mode():
        output = sliding_window_predict(model.network, x, model.card.windows, device, progress)
    if output.shape[1] != model.card.n_classes:
        raise SegXAIError(f"model {model.card.name!r} returns {output.shape[1]} channels but its card "
                          f"lists {model.card.n_classes} classes; fix the card's classes")
    return output


def labels_on_grid(probabilities: np.ndarray, model_grid: Volume, scan: Volume,
                   label_values: Sequence[int]) -> Volume:
    """Argmax of model-grid probabilities, taken on the scan's grid one class at a time."""
    best = None
    index = np.zeros(scan.shape, dtype=np.uint8)
    for c in range(probabilities.shape[0]):
        p = resample_to_grid(model_grid.with_array(probabilities[c]), scan).array
        if best is None:
            best = p.copy()
        else:
            better = p > best
            index[better] = c
            np.maximum(best, p, out=best)
    return scan.with_array(np.asarray(label_values, dtype=label_dtype(max(label_values)))[index])


def masks_on_grid(probabilities: np.ndarray, model_grid: Volume, scan: Volume) -> list[Volume]:
    """A multi-label model's classes on the scan's grid: each channel's probability resampled, above 0.5."""
    return [scan.with_array((resample_to_grid(model_grid.with_array(p), scan).array > 0.5).astype(np.uint8))
            for p in probabilities]


def multilabel_labels(masks: Sequence[Volume], label_values: Sequence[int]) -> Volume:
    """One label map of overlapping classes: each voxel the label of its last class (channel order)."""
    labels = np.zeros(masks[0].shape, label_dtype(max(label_values)))
    for mask, value in zip(masks, label_values):
        labels[mask.array > 0] = value
    return masks[0].with_array(labels)


def segment(scan: Volume | Sequence[Volume], model: LoadedModel, device: str | torch.device = "auto",
            progress: Progress | None = None) -> SegmentationResult:
    """Segment ``scan`` with ``model``: the labels on the scan's grid and the probabilities behind them.

    A model with several input sequences takes a list of co-registered scans in its order
    (:attr:`~SegXAILib.models.card.ModelCard.sequence_names`); those on another grid are resampled onto the first
    one's (:func:`~SegXAILib.preprocessing.input_scans`), whose grid the results are on.
    """
    progress = progress or Progress()
    device = device if isinstance(device, torch.device) else select_device(device)
    scans, resampled = input_scans(scan, model.card.sequence_names, model.card.name)
    if model.pipeline is not None:
        return segment_with_pipeline(scans, resampled, model, device, progress)
    scan = scans[0]
    timings: dict[str, float] = {}
    label_values = [c.label for c in model.card.classes]

    start = time.perf_counter()
    progress.update("preprocess", 0.0)
    model_grid, brain = preprocess_with_brain(scan, model.card.preprocessing, model.card.n_classes,
                                              model.card.patch_size)
    others = [resample_to_grid(preprocess_with_brain(s, model.card.preprocessing, model.card.n_classes,
                                                     model.card.patch_size)[0], model_grid).array for s in scans[1:]]
    model_input = np.stack([model_grid.array, *others]) if others else None
    timings["preprocess"] = time.perf_counter() - start

    start = time.perf_counter()
    probabilities = predict_probabilities(model, model_grid.array if model_input is None else model_input, device,
                                          progress, model.card.inference.get("mirror_axes", ()))
    timings["inference"] = time.perf_counter() - start

    if model.card.postprocessing:
        start = time.perf_counter()
        postprocess(probabilities, model_grid, model.card.postprocessing, label_values, brain)
        timings["postprocess"] = time.perf_counter() - start

    start = time.perf_counter()
    progress.update("resample", 0.0)
    masks = masks_on_grid(probabilities, model_grid, scan) if model.card.multilabel else []
    labels = multilabel_labels(masks, label_values) if masks else labels_on_grid(probabilities, model_grid, scan,
                                                                                  label_values)
    timings["resample"] = time.perf_counter() - start
    progress.update("resample", 1.0)
    return SegmentationResult(labels, probabilities, model_grid, scan, brain, timings, str(device), masks,
                              model_input, resampled)


def volumes_ml(labels: Volume, label_values: Sequence[int]) -> dict[int, tuple[int, float]]:
    """Voxel count and volume in mL for each label value."""
    voxel_ml = float(np.prod(labels.spacing)) / 1000.0
    counts = np.bincount(labels.array.ravel(), minlength=max(label_values) + 1)
    return {v: (int(counts[v]), int(counts[v]) * voxel_ml) for v in label_values}



def segment_with_pipeline(scans: list[Volume], resampled: list[int], model: LoadedModel, device: torch.device,
                          progress: Progress | None = None) -> SegmentationResult:
    """Segment ``scans`` (:func:`segment`'s) as the model's own framework does (a MONAI bundle's preprocessing,
    windows and postprocessing: :mod:`SegXAILib.models.bundle_pipeline`; nnU-Net's: :mod:`SegXAILib.models.nnunet`).
    The windows are SegXAI's (:func:`network_output`) unless the pipeline has its own ``predict(prepared, device)``
    giving the (1, n_classes, K, J, I) logits (nnU-Net's predictor). The probabilities are the network's on the
    framework's model grid; the labels are the framework's, on the first scan's grid."""
    progress = progress or Progress()
    for n, scan in enumerate(scans):
        validate_scan(scan, model.card.sequence_names[n])
    scan = scans[0]
    timings: dict[str, float] = {}
    start = time.perf_counter()
    progress.update("preprocess", 0.0)
    prepared = model.pipeline.preprocess(scans)
    timings["preprocess"] = time.perf_counter() - start

    start = time.perf_counter()
    predict = getattr(model.pipeline, "predict", None)  # a framework with its own windows (nnU-Net's predictor)
    if predict is not None:
        progress.update("inference", 0.0)
        logits = predict(prepared, device)
        progress.update("inference", 1.0)
    else:
        logits = network_output(model, prepared.image, device, progress)
    probabilities = network_probabilities(logits, model.card.output)[0].numpy()
    timings["inference"] = time.perf_counter() - start

    start = time.perf_counter()
    progress.update("postprocess", 0.0)
    label_values = [c.label for c in model.card.classes]
    labels, masks = model.pipeline.postprocess(prepared, logits, scan,
                                                 model.card.n_classes if model.card.multilabel else 0)
    if model.card.multilabel and not masks:
        masks = masks_on_grid(probabilities, prepared.model_grid, scan)
    if labels is None:
        labels = (multilabel_labels(masks, label_values) if model.card.multilabel
                  else labels_on_grid(probabilities, prepared.model_grid, scan, label_values))
    timings["postprocess"] = time.perf_counter() - start
    progress.update("postprocess", 1.0)
    return SegmentationResult(labels, probabilities, prepared.model_grid, scan, BrainMask(reorient_to_ras(scan)),
                              timings, str(device), masks,
                              prepared.image[0].numpy() if prepared.image.shape[1] > 1 else None, resampled)
