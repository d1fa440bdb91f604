"""The model card: everything SegXAI needs to know about a model besides its weights.

A card is a JSON file. Example (the bundled brain-lesion model)::

    {
      "name": "brain-lesion-unet",
      "description": "Brain tumour sub-regions on T1 MRI (synthetic lesions)",
      "architecture": {"name": "unet", "args": {"channels": [16, 32, 64, 128], "strides": [2, 2, 2]}},
      "input": {"channels": 1, "modality": "MRI-T1"},
      "classes": [
        {"name": "background", "label": 0, "color": [0, 0, 0]},
        {"name": "necrotic core", "label": 1, "color": [255, 64, 64]},
        ...
      ],
      "groups": {"whole tumour": [1, 2, 4], "tumour core": [1, 4]},
      "default_target": "whole tumour",
      "preprocessing": {
        "orientation": "RAS",
        "spacing": [2.0, 2.0, 2.0],
        "intensity": {"kind": "zscore_foreground"}
      },
      "patch_size": [96, 96, 96],
      "weights": "brain_lesion_unet.safetensors",
      "validation": {"dice": {"whole tumour": 0.9}, "cases": 24, "command": "..."}
    }

Output channel ``n`` of the network is ``classes[n]``; the label value written to files is
``classes[n].label``. ``groups`` name unions of labels that can be explained as one target.
Intensity normalisation kinds: ``zscore_foreground`` (MRI; mean/std inside the Otsu
foreground), ``percentile`` (``lower``/``upper`` percentiles to 0..1), ``ct_window``
(``window: [low, high]`` in HU to 0..1, ``clip`` true/false). An optional
``"brain_volume_ml"`` in ``preprocessing`` scales the target spacing to the scan's brain size
(see :func:`SegXAILib.preprocessing.brain_scaled_spacing`); ``"bias_field": "n4"`` divides the
scan by its N4-estimated intensity inhomogeneity first (see :mod:`SegXAILib.bias_field`). An
optional ``postprocessing`` object, e.g. ``{"brain_margin_mm": 10}``, keeps a brain-lesion model's
foreground within that many mm of the scan's brain (see :mod:`SegXAILib.postprocessing`). An
optional ``inference`` object, e.g. ``{"mirror_axes": [0, 1, 2]}``, averages the segmentation's
probabilities over the scan mirrored along every combination of those model-grid axes (test-time
mirroring, as nnU-Net; 2^n forward passes; see :func:`SegXAILib.inference.predict_probabilities`). The same
object sets the sliding windows (:class:`Windows`): ``overlap`` (0.25), ``blend`` (``gaussian`` or ``constant``),
``sigma_scale`` (0.125), ``padding_mode`` (``constant``, ``reflect``, ``replicate``, ``circular``), ``cval`` (the
constant padding; absent: the scan's minimum) and ``placement`` (``monai``, the default, or ``nnunet``: where the
windows fall, :class:`Windows`). A MONAI bundle's card takes them from its ``inferer``, an nnU-Net model's from
nnU-Net's predictor.

What a model is for: ``"intended_use"`` and ``"limitations"`` (text) say for which scans and questions it was
made and where it is known to fail; ``segxai models``, ``summary.json``, the report and the Slicer panel show
them. ``"output"``: ``"logits"`` (the default: a softmax over the classes, one class per voxel),
``"probabilities"`` (the network applies its softmax itself) or ``"sigmoid"`` (multi-label: each output channel is
its own class with its own sigmoid, classes may overlap, and no channel is background; a target is one channel).
A multi-label model's single label map, where it has one (a MONAI bundle's postprocessing that maps the classes to
values, BraTS's 1/2/4), names its values in ``"labelmap"``: ``{"1": "necrotic core", ...}``.
``input.sequences`` names a model's input channels in order (``["T1c", "T1", "T2", "FLAIR"]``): the scans it takes.
A weights file may be named as ``"package:<distribution>/<path>"``, a file an installed Python package ships
(:mod:`SegXAILib.models.packages`; such a card is listed only while the package is installed). A
``preprocessing.grid`` object (e.g. ``{"kind": "deepbet"}``) replaces spacing and intensity by a model's own way
to its grid (:data:`SegXAILib.preprocessing.MODEL_GRIDS`).

An optional ``review`` object calibrates the "review this case" thresholds for this model, e.g.
``"review": {"mean_sa_below": 0.05, "basis": "5th percentile of mean SA on 24 validation cases"}``:
keys ``<score>_below`` / ``<score>_above`` and the ``basis`` they come from, which reports quote. A
score's typical value depends on the model, so one fixed default can flag every case of one model and
none of another. Scores the card does not name keep the defaults of :mod:`SegXAILib.quality`, which
also checks the keys.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import SegXAIError
from ..fileio import read_json_object
from ..postprocessing import validate_postprocessing
from ..preprocessing import BIAS_FIELD_METHODS, validate_model_grid
from ..quality import review_limits
from ..symmetries import mirrorings
from .packages import is_package_file, package_file, split

INTENSITY_KINDS = ("zscore_foreground", "percentile", "ct_window")
ORIENTATIONS = ("RAS", None)
"""Values of ``preprocessing.orientation``: ``RAS`` (the default: axes permuted and flipped to R, A, S) or
``null`` (the scan's own orientation)."""
PATCH_LIMITS = (8, 512)
LABEL_LIMITS = (0, 65535)
CHANNEL_LIMITS = (1, 16)
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128),
)
"""Class colours of models whose files name none (MONAI bundles, nnU-Net): class n > 0 of a softmax model gets
``PALETTE[(n - 1) % len(PALETTE)]`` (0, the background, is black)."""
BLENDS = ("gaussian", "constant")
PADDING_MODES = ("constant", "reflect", "replicate", "circular")
PLACEMENTS = ("monai", "nnunet")
WINDOW_SETTINGS = ("overlap", "blend", "sigma_scale", "padding_mode", "cval", "placement")
"""The card's ``inference`` keys that set :class:`Windows` (besides ``mirror_axes``)."""


@dataclass(frozen=True)
class Windows:
    """How a network runs over a grid larger than its patch, as every windowed pass (segmentation and explanations
    alike) runs it (:func:`SegXAILib.inference.sliding_window_predict`).

    Attributes:
        size: the window, voxels along K, J, I (the card's ``patch_size``).
        overlap: the fraction by which neighbouring windows overlap.
        blend: ``gaussian`` (each window's centre weighs most) or ``constant`` (a plain mean).
        sigma_scale: the Gaussian's standard deviation as a fraction of the window.
        padding_mode: how a grid smaller than a window is padded (``torch.nn.functional.pad``'s modes).
        cval: the value of ``constant`` padding; None: the image's minimum (its background: 0 after intensity
            normalisation is mid-grey tissue, and would put a wall of false tissue around a small scan).
        placement: where the windows fall: ``monai`` (MONAI's ``sliding_window_inference``: every
            ``size * (1 - overlap)`` voxels, the last one flush with the end) or ``nnunet`` (nnU-Net's predictor: the
            fewest windows at most that far apart, spread evenly; :mod:`SegXAILib.nnunet_windows`).
    """

    size: tuple[int, ...]
    overlap: float = 0.25
    blend: str = "gaussian"
    sigma_scale: float = 0.125
    padding_mode: str = "constant"
    cval: float | None = None
    placement: str = "monai"

    def constant(self, image: Any) -> float:
        """The value of constant padding around ``image`` (a tensor or array): ``cval``, else its minimum."""
        return float(image.min()) if self.cval is None else float(self.cval)

    def adjusted(self, size: Sequence[int] | None = None, overlap: float | None = None) -> Windows:
        """These windows with another ``size`` or ``overlap`` where given (a method's crop or option)."""
        return replace(self, size=self.size if size is None else tuple(size),
                       overlap=self.overlap if overlap is None else overlap)


def validate_windows(settings: dict[str, Any]) -> None:
    """Raise one :class:`SegXAIError` line for an invalid window setting of a card's ``inference`` object."""
    overlap = _number(settings.get("overlap", 0.25))
    if overlap is None or not 0 <= overlap < 1:
        raise SegXAIError(f"inference overlap must be a number from 0 to below 1, got {settings.get('overlap')!r}")
    sigma = _number(settings.get("sigma_scale", 0.125))
    if sigma is None or sigma <= 0:
        raise SegXAIError(f"inference sigma_scale must be a positive number, got {settings.get('sigma_scale')!r}")
    for key, allowed in (("blend", BLENDS), ("padding_mode", PADDING_MODES), ("placement", PLACEMENTS)):
        if key in settings and settings[key] not in allowed:
            raise SegXAIError(f"inference {key} must be one of {', '.join(allowed)}, got {settings[key]!r}")
    if settings.get("cval") is not None and _number(settings["cval"]) is None:
        raise SegXAIError(f"inference cval must be a number (or null: the scan's minimum), got {settings['cval']!r}")


def _integer(value: Any, what: str) -> int:
    """``value`` as an int if it is an integral number (1 or 1.0, not true, 1.5, NaN or "1")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
        raise SegXAIError(f"{what} must be an integer, got {value!r}")
    return int(value)


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None if it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def stride_multiple(architecture: dict[str, Any], ndim: int = 3) -> tuple[int, ...] | None:
    """Per-axis multiple a network's input size must be: the product of the architecture's ``strides`` (MONAI
    U-Nets), or None when it lists none; :func:`SegXAILib.models.networks.input_multiple` falls back on the
    patch size's powers of two then.

    Raises:
        SegXAIError: ``strides`` is not a list of positive integers (or of per-axis lists of them).
    """
    strides = (architecture.get("args") or {}).get("strides") if isinstance(architecture, dict) else None
    if strides is None:
        return None
    per_axis = [1] * ndim
    try:
        for s in strides:
            values = [s] * ndim if not isinstance(s, (list, tuple)) else list(s)
            if len(values) != ndim:
                raise ValueError
            per_axis = [m * _integer(v, "a stride") for m, v in zip(per_axis, values)]
    except (TypeError, ValueError, SegXAIError):
        raise SegXAIError(f"architecture strides must be a list of positive integers, got {strides!r}") from None
    if min(per_axis) < 1:
        raise SegXAIError(f"architecture strides must be a list of positive integers, got {strides!r}")
    return tuple(per_axis)


@dataclass(frozen=True)
class ClassInfo:
    """One output channel: its name, label value in files, and display colour (RGB 0..255)."""

    name: str
    label: int
    color: tuple[int, int, int] = (128, 128, 128)


@dataclass
class ModelCard:
    """A parsed model card. Paths inside it are relative to the card's folder (``root``)."""

    name: str
    architecture: dict[str, Any]
    classes: list[ClassInfo]
    preprocessing: dict[str, Any]
    patch_size: tuple[int, int, int]
    weights: str | list[str] | None = None
    input_channels: int = 1
    modality: str = "MRI"
    description: str = ""
    groups: dict[str, list[int]] = field(default_factory=dict)
    default_target: str | None = None
    postprocessing: dict[str, Any] = field(default_factory=dict)
    inference: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    review: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    root: Path = Path(".")
    output: str = "logits"
    """What the network returns (the card's ``"output"``): ``logits`` (the default) or ``probabilities`` (a softmax
    already applied, e.g. deepbet): :func:`SegXAILib.inference.network_probabilities` then applies none, and
    gradient targets use log-probabilities (:mod:`SegXAILib.explain.targets`)."""

    labelmap: dict[int, str] = field(default_factory=dict)
    """A multi-label model's label map values and their names (the card's ``"labelmap"``); empty otherwise."""
    sequences: list[str] = field(default_factory=list)
    """The input channels' names in order (``input.sequences``); empty: ``sequence 1`` ... (:attr:`sequence_names`)."""

    intended_use: str = ""
    """What the model is for: the scans (modality, population) and the question it answers."""
    limitations: str = ""
    """Where it is known not to work, or was never tested; what its validation figures do not cover."""

    OUTPUTS = ("logits", "probabilities", "sigmoid")
    """The valid values of ``output`` (a class constant, not a field)."""

    def __post_init__(self) -> None:
        if self.output not in self.OUTPUTS:
            raise SegXAIError(f"output must be \"logits\" (the network returns logits, the default), "
                              f"\"probabilities\" (it applies a softmax itself) or \"sigmoid\" (independent classes "
                              f"that may overlap), got {self.output!r}")

    # ------------------------------------------------------------ parsing
    @classmethod
    def from_dict(cls, data: dict[str, Any], root: Path = Path("."), source: str = "model card") -> ModelCard:
        try:
            classes = [ClassInfo(c["name"], _integer(c["label"], f"class {c['name']!r}: label"),
                                 tuple(c.get("color", (128, 128, 128))))
                       for c in data["classes"]]
            card = cls(
                name=str(data["name"]),
                architecture=dict(data["architecture"]),
                classes=classes,
                preprocessing=dict(data.get("preprocessing", {})),
                patch_size=tuple(_integer(p, "patch_size") for p in data["patch_size"]),
                weights=data.get("weights"),
                input_channels=_integer(data.get("input", {}).get("channels", 1), "input.channels"),
                modality=str(data.get("input", {}).get("modality", "MRI")),
                description=str(data.get("description", "")),
                groups={k: [_integer(x, f"group {k!r}: label") for x in v] for k, v in data.get("groups", {}).items()},
                default_target=data.get("default_target"),
                postprocessing=dict(data.get("postprocessing", {})),
                inference=dict(data.get("inference", {})),
                validation=dict(data.get("validation", {})),
                review=dict(data.get("review", {})),
                extra=dict(data.get("extra", {})),
                root=Path(root),
                output=str(data.get("output", "logits")),
                intended_use=str(data.get("intended_use", "")),
                limitations=str(data.get("limitations", "")),
                labelmap={_integer(int(k) if str(k).isdigit() else k, "labelmap value"): str(v)
                          for k, v in data.get("labelmap", {}).items()},
                sequences=[str(s) for s in data.get("input", {}).get("sequences", [])],
            )
        except SegXAIError as exc:
            raise SegXAIError(f"{source}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SegXAIError(f"{source} is missing or has an invalid field ({exc!r}); "
                              "see the model card format in docs/models.md") from None
        card.validate(source)
        return card

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        path = Path(path)
        data = read_json_object(path, "model card", "fix or regenerate it")
        return cls.from_dict(data, root=path.parent, source=f"model card {path}")

    def validate(self, source: str = "model card") -> None:
        """Raise one :class:`SegXAIError` line (``source``: the problem and the fix) for the first invalid entry."""
        try:
            self._validate_shape()
            self._validate_preprocessing()
        except SegXAIError as exc:
            raise SegXAIError(f"{source}: {exc}") from None
        for group, labels in self.groups.items():
            unknown = set(labels) - {c.label for c in self.classes}
            if unknown:
                raise SegXAIError(f"{source}: group {group!r} names labels {sorted(unknown)} that no class has")
        try:  # checks owned by the modules that apply these entries
            validate_postprocessing(self.postprocessing, [c.label for c in self.classes])
            unknown = set(self.inference) - {"mirror_axes", *WINDOW_SETTINGS}
            if unknown:
                raise SegXAIError(f"unknown inference setting(s) {sorted(unknown)}; the settings are mirror_axes, "
                                  f"{', '.join(WINDOW_SETTINGS)}")
            mirrorings(self.inference.get("mirror_axes", []))
            validate_windows(self.inference)
            review_limits(self.review)
        except SegXAIError as exc:
            raise SegXAIError(f"{source}: {exc}") from None

    def _validate_shape(self) -> None:
        """Patch size, input channels and class labels."""
        low, high = PATCH_LIMITS
        sizes = list(self.patch_size)
        if sizes.count(1) == 1:  # a 2D network's window (an nnU-Net 2d model's): one slice
            sizes.remove(1)
        if len(self.patch_size) != 3 or not all(low <= p <= high for p in sizes):
            raise SegXAIError(f"patch_size must be three integers from {low} to {high} (voxels along K, J, I; one "
                              f"may be 1, the slice of a 2D network), got {list(self.patch_size)}; use the window "
                              "size the model was trained with")
        multiple = stride_multiple(self.architecture)
        if multiple is not None and any(p % m for p, m in zip(self.patch_size, multiple)):
            raise SegXAIError(f"patch_size {list(self.patch_size)} is not divisible by {list(multiple)}, the product "
                              f"of the network's strides; use a multiple of it (e.g. "
                              f"{[max(m, -(-p // m) * m) for p, m in zip(self.patch_size, multiple)]})")
        low, high = CHANNEL_LIMITS
        if not low <= self.input_channels <= high:
            raise SegXAIError(f"input.channels must be an integer from {low} to {high}, got {self.input_channels}")
        if len(self.classes) < (1 if self.multilabel else 2):
            raise SegXAIError("classes need at least two entries with distinct labels (the background first)")
        if self.sequences and len(self.sequences) != self.input_channels:
            raise SegXAIError(f"input.sequences names {len(self.sequences)} scans but input.channels is "
                              f"{self.input_channels}; name one sequence per input channel")
        if self.multilabel and self.groups:
            raise SegXAIError("a multi-label (sigmoid) model's target is one output channel: remove its groups")
        low, high = LABEL_LIMITS
        for c in self.classes:
            if not low <= c.label <= high:
                raise SegXAIError(f"class {c.name!r} has label {c.label}; labels must be integers from {low} to "
                                  f"{high} (the values written to label files)")
        labels = [c.label for c in self.classes]
        if len(set(labels)) != len(labels):
            repeated = sorted({label for label in labels if labels.count(label) > 1})
            raise SegXAIError(f"classes need distinct labels: {repeated} used more than once; give each class its own")

    def _validate_preprocessing(self) -> None:
        """Orientation, spacing, brain volume, bias field and intensity normalisation."""
        spec = self.preprocessing
        if "grid" in spec:
            validate_model_grid(spec)
        orientation = spec.get("orientation", "RAS")
        if orientation not in ORIENTATIONS:
            raise SegXAIError(f"preprocessing.orientation {orientation!r} is not supported: use \"RAS\" (the scan's "
                              "axes permuted and flipped to R, A, S) or null (the scan's own orientation)")
        spacing = spec.get("spacing")
        if spacing is not None:
            values = [_number(v) for v in spacing] if isinstance(spacing, (list, tuple)) else []
            if len(values) != 3 or not all(v is not None and v > 0 for v in values):
                raise SegXAIError(f"preprocessing.spacing must be three positive numbers (mm along I, J, K) or null "
                                  f"(keep the scan's spacing), got {spacing!r}")
        brain = spec.get("brain_volume_ml")
        if brain is not None and not (_number(brain) or 0) > 0:
            raise SegXAIError(f"preprocessing.brain_volume_ml must be a positive number of mL, got {brain!r}")
        bias_field = spec.get("bias_field")
        if bias_field is not None and bias_field not in BIAS_FIELD_METHODS:
            raise SegXAIError(f"unknown bias_field correction {bias_field!r}; use one of {BIAS_FIELD_METHODS} or "
                              "leave it out")
        intensity = spec.get("intensity", {})
        if not isinstance(intensity, dict):
            raise SegXAIError(f"preprocessing.intensity must be an object such as {{\"kind\": \"zscore_foreground\"}}, "
                              f"got {intensity!r}")
        kind = intensity.get("kind", "zscore_foreground")
        if kind not in INTENSITY_KINDS:
            raise SegXAIError(f"unknown intensity normalisation {kind!r}; use one of {INTENSITY_KINDS}")
        if kind == "ct_window":
            window = intensity.get("window")
            values = [_number(v) for v in window] if isinstance(window, (list, tuple)) else []
            if len(values) != 2 or None in values or not values[0] < values[1]:
                raise SegXAIError("the ct_window intensity needs \"window\": [low, high], two finite numbers (HU) "
                                  f"with low < high, got {window!r}")
        if kind == "percentile":
            lower, upper = (_number(intensity.get(k, d)) for k, d in (("lower", 0.5), ("upper", 99.5)))
            if lower is None or upper is None or not 0 <= lower < upper <= 100:
                given = {k: intensity.get(k, d) for k, d in (("lower", 0.5), ("upper", 99.5))}
                raise SegXAIError("the percentile intensity needs \"lower\" < \"upper\", percentiles from 0 to 100, "
                                  f"got {given}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "architecture": self.architecture,
            "input": {"channels": self.input_channels, "modality": self.modality,
                      **({"sequences": self.sequences} if self.sequences else {})},
            "classes": [asdict(c) | {"color": list(c.color)} for c in self.classes],
            "groups": self.groups,
            "default_target": self.default_target,
            "preprocessing": self.preprocessing,
            **({"postprocessing": self.postprocessing} if self.postprocessing else {}),
            **({"inference": self.inference} if self.inference else {}),
            "patch_size": list(self.patch_size),
            "weights": self.weights,
            "validation": self.validation,
            **({"review": self.review} if self.review else {}),
            **({"extra": self.extra} if self.extra else {}),
            **({"output": self.output} if self.output != "logits" else {}),
            **({"labelmap": {str(k): v for k, v in self.labelmap.items()}} if self.labelmap else {}),
            **({"intended_use": self.intended_use} if self.intended_use else {}),
            **({"limitations": self.limitations} if self.limitations else {}),
        }

    def save(self, path: str | Path) -> Path:
        from ..fileio import atomic_write_text

        return atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    # ------------------------------------------------------------ queries
    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def multilabel(self) -> bool:
        """Each output channel is its own class with its own sigmoid (``output`` ``sigmoid``); classes may overlap."""
        return self.output == "sigmoid"

    @property
    def sequence_names(self) -> list[str]:
        """The input channels' names in order: ``input.sequences``, else ``sequence 1`` ... (``scan`` for one)."""
        if self.sequences:
            return list(self.sequences)
        return ["scan"] if self.input_channels == 1 else [f"sequence {n + 1}" for n in range(self.input_channels)]

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def windows(self) -> Windows:
        """The sliding windows every windowed pass of this model runs in: ``patch_size`` and the ``inference``
        object's window settings."""
        settings = {key: self.inference[key] for key in WINDOW_SETTINGS if key in self.inference}
        return Windows(tuple(self.patch_size), **settings)

    @property
    def weight_paths(self) -> list[Path]:
        """Weights files (several for a deep ensemble), resolved against the card's folder."""
        if self.weights is None:
            return []
        names = [self.weights] if isinstance(self.weights, str) else list(self.weights)
        return [package_file(n, self.extra.get("install", "")) if is_package_file(n) else self.root / n
                for n in names]

    @property
    def packages(self) -> list[str]:
        """The Python distributions whose files the card names (``package:`` weights and grid files), and nnunetv2 for
        an nnU-Net model (:mod:`SegXAILib.models.nnunet` runs nnU-Net's own code)."""
        names = [self.weights] if isinstance(self.weights, str) else list(self.weights or [])
        grid = self.preprocessing.get("grid")
        names += [v for v in grid.values() if is_package_file(v)] if isinstance(grid, dict) else []
        framework = ["nnunetv2"] if self.extra.get("nnunet_root") else []
        return sorted({split(n)[0] for n in names if is_package_file(n)} | set(framework))

    def target_channels(self, target: str | None) -> tuple[str, list[int]]:
        """Resolve a target (class name, group name, or label value) to output channel indices.

        ``None`` means the card's ``default_target`` (else the first non-background class).

        Raises:
            SegXAIError: the name is neither a class nor a group of this model.
        """
        if target is None:
            target = self.default_target or self.classes[0 if self.multilabel else 1].name
        by_label = {c.label: n for n, c in enumerate(self.classes)}
        for n, c in enumerate(self.classes):
            if target.lower() == c.name.lower() or target == str(c.label):
                return c.name, [n]
        for group, labels in self.groups.items():
            if target.lower() == group.lower():
                return group, [by_label[label] for label in labels]
        known = self.class_names[0 if self.multilabel else 1:] + list(self.groups)
        close = difflib.get_close_matches(target.lower(), [k.lower() for k in known], n=1, cutoff=0.6)
        hint = f"did you mean {next(k for k in known if k.lower() == close[0])!r}? " if close else ""
        raise SegXAIError(f"unknown class {target!r} for model {self.name!r}; {hint}choose one of: {', '.join(known)}")
