"""deepbet's brain extraction as a SegXAI model: its model grid, reproduced from deepbet's own pipeline.

deepbet (Fisch et al. 2024, PyPI ``deepbet``, MIT) ships two TorchScript 3D LinkNets inside its wheel: a box
network and the brain network. Its ``BrainExtraction.run_model`` (``deepbet/bet.py``, version 1.0.2) does, on the
scan in RAS (``nib.as_closest_canonical``, arrays indexed I, J, K):

1. NaN to 0; the whole scan resized (``nearest-exact``) to 128^3; ``low``, ``high``: that copy's 0.5 and 99.5
   percentiles;
2. the box network on ``normalize(copy)``; its brain channel > 0.5; the largest connected component; the box of
   the rows, columns and slices whose mean over that mask exceeds 0.02, scaled to the scan, grown by 10% of its
   size on each side (:func:`brain_box`);
3. that box of the full scan resized (``nearest-exact``) to 256^3 and ``normalize``-d: this is the input of the
   brain network; ``normalize(x) = 0.226 * z + 0.449``, z the z-score (over the array) of
   ``clip((x - low) / (high - low), 0, 1)``;
4. the brain probability resized back into the box (outside it: no brain), > 0.5, the largest component, holes
   filled (postprocessing; the card's ``largest_component`` and ``fill_holes``).

Here steps 1-3 make the model grid (:func:`deepbet_grid`, a card's ``"preprocessing": {"grid": {"kind":
"deepbet"}}``), so that the brain network is an ordinary network on it: the eager :class:`LinkNet3d` loaded with
the archive's tensors (read without running the archive's code, :mod:`SegXAILib.models.archive`), whose
activations lie on the model grid (Grad-CAM and the other layer methods apply). The model grid's array is
deepbet's (I, J, K)-indexed box at 256^3 as it is: a :class:`~SegXAILib.volume.Volume` whose index axes are the
scan's K, J, I axes (direction columns permuted), with the spacing and origin of a ``nearest-exact`` resize
(output voxel ``o`` is input position ``(o + 0.5) * n / 256 - 0.5``). Probabilities go back onto the scan's
grid by SegXAI's linear resampling rather than deepbet's nearest; the masks agree to a Dice of 0.99 or more
(docs/models.md, ``benchmarks/deepbet_vs_run_bet.py``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from ..errors import SegXAIError
from ..volume import Volume
from .packages import is_package_file, package_file

if TYPE_CHECKING:  # torch is imported where a network runs: validating a card (validate_grid) needs none
    import torch

    from .linknet import LinkNet3d

DEFAULTS: dict[str, Any] = {"small_shape": [128, 128, 128], "shape": [256, 256, 256], "margin": 0.1,
                            "lower": 0.5, "upper": 99.5, "box_threshold": 0.5}
"""deepbet 1.0.2's settings (``run_model``'s defaults, ``threshold`` .5 of the box network's brain channel)."""
GRID_KEYS = ("kind", "box_weights", *DEFAULTS)


def validate_grid(grid: dict[str, Any]) -> None:
    """Check a ``{"kind": "deepbet", ...}`` grid entry; nothing is read.

    Raises:
        SegXAIError: unknown keys, no ``box_weights``, or sizes that are not multiples of 32.
    """
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise SegXAIError(f"unknown deepbet grid setting(s) {unknown}; use any of {list(GRID_KEYS)}")
    if not isinstance(grid.get("box_weights"), str):
        raise SegXAIError("the deepbet grid needs \"box_weights\": the box network's file, e.g. "
                          "\"package:deepbet/data/models/bbox_model.pt\" (or an absolute path)")
    for key in ("small_shape", "shape"):
        value = grid.get(key, DEFAULTS[key])
        if not (isinstance(value, list) and len(value) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and 32 <= v <= 512 and v % 32 == 0
                        for v in value)):
            raise SegXAIError(f"deepbet grid {key} must be three multiples of 32 from 32 to 512, got {value!r}")
    for key, low, high in (("margin", 0, 1), ("lower", 0, 100), ("upper", 0, 100), ("box_threshold", 0, 1)):
        value = grid.get(key, DEFAULTS[key])
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise SegXAIError(f"deepbet grid {key} must be a number from {low} to {high}, got {value!r}")


def _settings(grid: dict[str, Any]) -> dict[str, Any]:
    return {**DEFAULTS, **{k: v for k, v in grid.items() if k in DEFAULTS}}


@lru_cache(maxsize=2)
def box_network(path: str) -> LinkNet3d:
    """deepbet's box network (eval mode, CPU), its tensors read from the archive without running its code."""
    from .archive import read_archive_state_dict
    from .linknet import LinkNet3d

    network = LinkNet3d()
    state = read_archive_state_dict(path)
    own = network.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise SegXAIError(f"{path} is not deepbet's box network (its tensors do not fit a 3D LinkNet); "
                          "reinstall deepbet 1.0.2 (pip install 'segxai[models]')")
    network.load_state_dict(state)
    return network.eval()


def _box_weights(grid: dict[str, Any]) -> Path:
    spec = grid["box_weights"]
    path = package_file(spec, "pip install 'segxai[models]'") if is_package_file(spec) else Path(spec)
    if not path.is_file():
        raise SegXAIError(f"deepbet's box network {path} not found; fix the card's preprocessing.grid.box_weights")
    return path


def normalize(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """deepbet's ``utils.normalize``."""
    x = (x - low) / (high - low)
    x = x.clamp(min=0, max=1)
    x = (x - x.mean()) / x.std()
    return 0.226 * x + 0.449


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a bool mask (deepbet's, with cc3d's default connectivity).

    Raises:
        SegXAIError: the mask is empty.
    """
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        raise SegXAIError("deepbet's box network found no brain in this scan; is it a T1-weighted head MRI?")
    return labels == np.bincount(labels.ravel())[1:].argmax() + 1


def brain_box(mask_small: torch.Tensor, shape: tuple[int, ...], margin: float,
              threshold: float = 0.02) -> tuple[slice, ...]:
    """deepbet's ``get_bbox_with_margin`` (float32 arithmetic as there): the box on the full scan's (I, J, K)
    array of the rows/columns/slices where the small mask's mean exceeds ``threshold``, grown by ``margin``.

    Raises:
        SegXAIError: too little foreground to take a box.
    """
    import torch

    ranges = [torch.where(mask_small.mean(dims) > threshold)[0] for dims in [(1, 2), (0, 2), (0, 1)]]
    if not all(r.numel() > 0 for r in ranges):
        raise SegXAIError("deepbet's box network found too little brain for a box; is it a T1-weighted head MRI?")
    center = torch.tensor([(r.max() + 1 + r.min()) / 2 for r in ranges])
    size = torch.tensor([(r.max() + 1) - r.min() for r in ranges])
    margins = margin * torch.ones(3)
    scale = torch.tensor(shape) / torch.tensor(mask_small.shape)
    center, size = scale * center, scale * size
    size = (1 + 2 * margins) * size
    center, size = center.round(), size.round()
    box = [[int(c - s / 2), int(c + s / 2)] for c, s in zip(center, size)]
    return tuple(slice(max(0, b[0]), min(n, b[1]), 1) for b, n in zip(box, shape))


def deepbet_grid(volume: Volume, grid: dict[str, Any]) -> Volume:
    """The model grid of deepbet's brain network for ``volume`` (in RAS): steps 1-3 of the module docstring.

    Raises:
        SegXAIError: the box network file is missing or not deepbet's, or it finds no brain.
    """
    import torch
    import torch.nn.functional as F

    settings = _settings(grid)
    network = box_network(str(_box_weights(grid)))
    x = torch.nan_to_num(torch.from_numpy(np.ascontiguousarray(volume.array.transpose(2, 1, 0), dtype=np.float32)))
    small = F.interpolate(x[None, None], tuple(settings["small_shape"]), mode="nearest-exact")[0, 0]
    low, high = small.quantile(settings["lower"] / 100), small.quantile(settings["upper"] / 100)
    if not high > low:
        raise SegXAIError("the scan has (almost) one intensity everywhere; deepbet needs a T1-weighted head MRI")
    with torch.inference_mode():
        brain_small = network(normalize(small, low, high)[None, None])[0, 1]
    mask_small = keep_largest_component((brain_small > settings["box_threshold"]).numpy())
    box = brain_box(torch.from_numpy(mask_small.astype(np.float32)), tuple(x.shape), float(settings["margin"]))
    shape = tuple(settings["shape"])
    cut = F.interpolate(x[box][None, None], shape, mode="nearest-exact")[0, 0]
    array = normalize(cut, low, high).numpy().astype(np.float32)

    # geometry: array[a, b, c] is scan voxel (i, j, k) = start + (a, b, c) * factor + (factor - 1) / 2
    start = np.array([s.start for s in box], dtype=np.float64)
    factor = np.array([s.stop - s.start for s in box], dtype=np.float64) / np.array(shape, dtype=np.float64)
    first = start + (factor - 1) / 2
    origin = volume.origin + volume.direction @ (volume.spacing * first)
    spacing = (volume.spacing * factor)[::-1]
    direction = volume.direction[:, ::-1]
    return Volume(array, spacing.copy(), origin, direction.copy())
