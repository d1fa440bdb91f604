"""A user's local MONAI bundle folder (MONAI Model Zoo layout) as a SegXAI model.

Expected layout::

    my_bundle/
      configs/inference.json     (or inference.yaml / .yml): network_def, preprocessing, inferer
      configs/metadata.json      network_data_format: input channels, modality, output classes
      configs/segxai.json        optional: overrides for what cannot be derived (see below)
      models/model.pt            a state dict (read with weights_only=True: pickles that run code are refused)
      models/model.ts            optional TorchScript export, used when model.pt is absent

:func:`card_from_bundle` derives a :class:`~SegXAILib.models.card.ModelCard` from the configs:

- ``input.channels`` / ``modality``: metadata ``network_data_format.inputs.image.num_channels`` /
  ``modality``;
- ``classes``: metadata ``network_data_format.outputs.pred.channel_def`` (``{"0": "background",
  "1": "spleen"}``; the label value written to files is the channel index; colours from a fixed
  palette), else ``num_channels`` generic names (``class 1``, ...);
- ``patch_size``: the ``inferer`` entry's ``roi_size`` (a SlidingWindowInferer), else 96^3;
- ``preprocessing.orientation``: a ``Orientationd``'s ``axcodes`` (absent: key left out, i.e. SegXAI's
  default RAS);
- ``preprocessing.spacing``: a ``Spacingd``'s ``pixdim`` in the ``preprocessing`` transforms, else
  ``null``. **``spacing: null`` means "keep the scan's native spacing"** (no resampling);
- ``preprocessing.intensity``: ``ScaleIntensityRanged`` -> ``{"kind": "ct_window", "window": [a_min,
  a_max], "clip": clip}`` (a ``b_min``/``b_max`` other than 0/1 is kept as ``"output_range"``);
  ``NormalizeIntensityd`` -> ``{"kind": "zscore_foreground"}``; ``ScaleIntensityRangePercentilesd`` ->
  ``{"kind": "percentile", "lower", "upper", "clip"}``; otherwise ``percentile`` 0.5 / 99.5.

**Fixing what cannot be derived**: if ``configs/segxai.json`` exists, its keys (in model-card form,
see :mod:`SegXAILib.models.card`) override the derived ones. Top-level keys replace the derived
value, except ``input``, ``preprocessing`` and ``extra``, which are merged key by key (so
``{"preprocessing": {"spacing": [1, 1, 1]}}`` changes only the spacing). Example::

    {"classes": [{"name": "background", "label": 0}, {"name": "spleen", "label": 1, "color": [255, 0, 0]}],
     "default_target": "spleen", "patch_size": [96, 96, 96]}

**Axis order.** MONAI arrays are (C, I, J, K) (``x, y, z``); SegXAI feeds (C, K, J, I) (see
:class:`~SegXAILib.volume.Volume`). :func:`load_bundle_network` therefore wraps the bundle's network
in :class:`BundleAxes`, which transposes the spatial axes in and out, so the network sees exactly
the array layout it was trained on. For the same reason the card's ``patch_size`` is ``roi_size``
reversed (K, J, I), while ``spacing`` stays ``pixdim`` as is (card spacing is along I, J, K).
Layer activations inside the wrapped network are in I, J, K order.

A bundle's configs are code (``_target_`` and ``$`` expressions are executed by MONAI's
ConfigParser when the network is built): load only bundles from a source you trust. The weights
themselves are never unpickled.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SegXAIError
from ..fileio import read_json_object
from .card import ModelCard

INFERENCE_CONFIGS = ("configs/inference.json", "configs/inference.yaml", "configs/inference.yml")
METADATA_CONFIG = "configs/metadata.json"
OVERRIDES_CONFIG = "configs/segxai.json"
STATE_DICT = "models/model.pt"
TORCHSCRIPT = "models/model.ts"
DEFAULT_PATCH = (96, 96, 96)
MERGED_KEYS = ("input", "preprocessing", "extra")

PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128),
)
"""Class colours: channel n > 0 gets ``PALETTE[(n - 1) % len(PALETTE)]``; channel 0 is black."""

_REFERENCE = re.compile(r"@([\w#]+)")


class BundleAxes(nn.Module):
    """Runs a MONAI network (trained on I, J, K arrays) on SegXAI's K, J, I arrays.

    ``forward`` transposes the three spatial axes of the input, calls ``network`` and transposes
    the output back. The bundle's own module is ``self.network``.
    """

    spatial_permutation = (0, 1, 4, 3, 2)

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.network(x.permute(0, 1, 4, 3, 2))
        return y.permute(0, 1, 4, 3, 2)


# ---------------------------------------------------------------------------- reading the configs
def _inference_config(folder: Path) -> Path:
    for name in INFERENCE_CONFIGS:
        if (folder / name).is_file():
            return folder / name
    raise SegXAIError(
        f"{folder} is not a MONAI bundle: configs/inference.json (or .yaml) not found; a bundle folder "
        "needs configs/inference.json, configs/metadata.json and models/model.pt (or models/model.ts)")


def _parser(folder: Path, with_meta: bool = True):
    from monai.bundle import ConfigParser

    config = _inference_config(folder)
    parser = ConfigParser()
    try:
        parser.read_config(str(config))
        meta = folder / METADATA_CONFIG
        if with_meta and meta.is_file():
            parser.read_meta(str(meta))
    except Exception as exc:  # json/yaml errors of several kinds
        raise SegXAIError(f"MONAI bundle {folder}: cannot read its configs ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:150] if str(exc) else ''}); fix the JSON/YAML") from None
    parser["bundle_root"] = str(folder)  # configs refer to their files through @bundle_root
    return parser


def _value(parser, id: str, default: Any = None) -> Any:
    """A config value with references and expressions resolved; ``default`` if absent or failing."""
    if parser.get(id) is None:
        return default
    try:
        return parser.get_parsed_content(id, instantiate=False)
    except Exception:
        raw = parser.get(id)
        return default if isinstance(raw, str) and raw[:1] in "@$%" else raw


def _transform_kind(target: Any) -> str:
    """'monai.transforms.Spacingd' / 'SpacingD' / 'SpacingDict' / 'Spacing' -> 'spacing'."""
    if not isinstance(target, str):
        return ""
    name = target.rsplit(".", 1)[-1].lower()
    if name.endswith("dict"):
        return name[:-4]
    return name[:-1] if name.endswith("d") else name


def _find_transforms(parser, root_id: str = "preprocessing") -> list[tuple[str, str]]:
    """(config id, kind) of every ``_target_`` entry reachable from ``root_id``, in config order.

    Plain ``@id`` references (also inside ``$`` expressions) are followed, so a ``Compose`` whose
    ``transforms`` is ``"$@preprocessing_transforms"`` is searched too.
    """
    found: list[tuple[str, str]] = []
    seen: set[str] = set()

    def walk(node: Any, id: str) -> None:
        if isinstance(node, dict):
            if "_target_" in node:
                found.append((id, _transform_kind(node["_target_"])))
            for key, value in node.items():
                if not str(key).startswith("_"):
                    walk(value, f"{id}#{key}")
        elif isinstance(node, list):
            for n, value in enumerate(node):
                walk(value, f"{id}#{n}")
        elif isinstance(node, str):
            for ref in _REFERENCE.findall(node):
                visit(ref)

    def visit(id: str) -> None:
        if id in seen or id == "bundle_root":
            return
        seen.add(id)
        node = parser.get(id)
        if node is not None:
            walk(node, id)

    visit(root_id)
    return found


def _first(transforms: list[tuple[str, str]], kind: str) -> str | None:
    return next((id for id, k in transforms if k == kind), None)


def _floats(value: Any, n: int = 3) -> list[float] | None:
    try:
        values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * n)]
    except (TypeError, ValueError):
        return None
    return values if len(values) == n else None


def _intensity(parser, transforms: list[tuple[str, str]]) -> dict[str, Any]:
    for id, kind in transforms:
        if kind == "scaleintensityrange":
            a_min, a_max = _value(parser, f"{id}#a_min"), _value(parser, f"{id}#a_max")
            if a_min is None or a_max is None:
                continue
            spec: dict[str, Any] = {"kind": "ct_window", "window": [float(a_min), float(a_max)],
                                    "clip": bool(_value(parser, f"{id}#clip", False))}
            b_min, b_max = _value(parser, f"{id}#b_min", 0.0), _value(parser, f"{id}#b_max", 1.0)
            if b_min is not None and b_max is not None and (float(b_min), float(b_max)) != (0.0, 1.0):
                spec["output_range"] = [float(b_min), float(b_max)]
            return spec
        if kind == "normalizeintensity":
            return {"kind": "zscore_foreground"}
        if kind == "scaleintensityrangepercentiles":
            return {"kind": "percentile", "lower": float(_value(parser, f"{id}#lower", 0.5)),
                    "upper": float(_value(parser, f"{id}#upper", 99.5)),
                    "clip": bool(_value(parser, f"{id}#clip", False))}
    return {"kind": "percentile", "lower": 0.5, "upper": 99.5}


def _classes(folder: Path, parser, pred: dict[str, Any]) -> list[dict[str, Any]]:
    channel_def = pred.get("channel_def")
    if isinstance(channel_def, dict) and channel_def:
        try:
            names = {int(k): str(v) for k, v in channel_def.items()}
        except ValueError:
            raise SegXAIError(f"MONAI bundle {folder}: channel_def keys must be channel numbers, got "
                              f"{sorted(channel_def)}; fix metadata.json or give 'classes' in "
                              f"{OVERRIDES_CONFIG}") from None
        count = max(names) + 1
    else:
        names = {}
        count = pred.get("num_channels") or _value(parser, "network_def#out_channels")
        if not isinstance(count, int):
            raise SegXAIError(f"MONAI bundle {folder}: cannot tell its output classes (no channel_def or "
                              f"num_channels in {METADATA_CONFIG}); give 'classes' in {OVERRIDES_CONFIG}")
    return [{"name": names.get(n, "background" if n == 0 else f"class {n}"), "label": n,
             "color": [0, 0, 0] if n == 0 else list(PALETTE[(n - 1) % len(PALETTE)])}
            for n in range(count)]


def _derive(folder: Path) -> dict[str, Any]:
    parser = _parser(folder)
    meta = parser.get("_meta_") or {}
    data_format = meta.get("network_data_format", {}) if isinstance(meta, dict) else {}
    image = data_format.get("inputs", {}).get("image", {})
    pred = data_format.get("outputs", {}).get("pred", {})

    transforms = _find_transforms(parser)
    preprocessing: dict[str, Any] = {}
    orientation = _first(transforms, "orientation")
    if orientation is not None:
        axcodes = _value(parser, f"{orientation}#axcodes")
        if isinstance(axcodes, str):
            preprocessing["orientation"] = axcodes.upper()
    spacing = _first(transforms, "spacing")
    preprocessing["spacing"] = _floats(_value(parser, f"{spacing}#pixdim")) if spacing else None
    preprocessing["intensity"] = _intensity(parser, transforms)

    roi = _value(parser, "inferer#roi_size")
    roi = [int(r) for r in _floats(roi)] if _floats(roi) else list(DEFAULT_PATCH)
    channels = image.get("num_channels") or _value(parser, "network_def#in_channels") or 1

    weights = STATE_DICT if (folder / STATE_DICT).is_file() or not (folder / TORCHSCRIPT).is_file() else TORCHSCRIPT
    return {
        "name": str(meta.get("name") or folder.name),
        "description": str(meta.get("description", "")),
        "architecture": {"name": "monai_bundle", "args": {}},
        "input": {"channels": int(channels), "modality": str(image.get("modality", "MRI"))},
        "classes": _classes(folder, parser, pred),
        "preprocessing": preprocessing,
        "patch_size": roi[::-1],  # MONAI roi_size is I, J, K; SegXAI arrays are K, J, I
        "weights": weights,
        "extra": {"bundle_version": meta.get("version")} if meta.get("version") else {},
    }


def card_from_bundle(folder: Path) -> ModelCard:
    """The model card of a MONAI bundle folder (derived from its configs, then ``configs/segxai.json``).

    Raises:
        SegXAIError: the folder is not a bundle, its configs are unreadable, or the derived card is
            invalid (the message says what to put into ``configs/segxai.json``).
    """
    folder = Path(folder).resolve()
    data = _derive(folder)
    overrides_path = folder / OVERRIDES_CONFIG
    if overrides_path.is_file():
        overrides = read_json_object(overrides_path, "bundle overrides", "fix it: a JSON object of model-card keys")
        for key, value in overrides.items():
            if key in MERGED_KEYS and isinstance(value, dict):
                data[key] = {**data.get(key, {}), **value}
            else:
                data[key] = value
    data["extra"] = {**data.get("extra", {}), "bundle_root": str(folder)}
    return ModelCard.from_dict(data, root=folder, source=f"MONAI bundle {folder} (fix via {OVERRIDES_CONFIG})")


# ---------------------------------------------------------------------------- the network
def bundle_weights(card: ModelCard) -> Path:
    """The file :func:`load_bundle_network` loads: the card's weights (``models/model.pt``), or ``models/model.ts``
    when that is absent and the TorchScript export exists (a ``.ts`` file is TorchScript: its code runs)."""
    folder = Path(card.extra["bundle_root"])
    paths = card.weight_paths
    path = paths[0] if paths else folder / STATE_DICT
    if path.suffix != ".ts" and not path.is_file() and (folder / TORCHSCRIPT).is_file():
        path = folder / TORCHSCRIPT
    return path


def load_bundle_network(card: ModelCard, trust_model_code: bool = False) -> nn.Module:
    """The bundle's network with its weights, wrapped in :class:`BundleAxes`, in eval mode on the CPU.

    ``models/model.pt`` (or the card's ``weights``) is loaded into ``network_def`` with
    ``torch.load(weights_only=True)``; when it is absent and ``models/model.ts`` exists (or the
    weights named end in ``.ts``), the TorchScript file is loaded instead (no hooks then), which runs its code:
    only with ``trust_model_code`` (:mod:`SegXAILib.models.trust`).
    """
    from .loaders import load_torchscript, load_weights

    folder = Path(card.extra["bundle_root"])
    path = bundle_weights(card)
    if path.suffix == ".ts":
        return torch.jit.script(BundleAxes(load_torchscript(path, trust_model_code))).eval()
    if not path.is_file():
        raise SegXAIError(f"MONAI bundle {folder}: weights file {path} not found; put the state dict in "
                          f"{STATE_DICT} (or a TorchScript export in {TORCHSCRIPT})")

    parser = _parser(folder, with_meta=False)
    if parser.get("network_def") is None:
        raise SegXAIError(f"MONAI bundle {folder}: its inference config has no 'network_def'; add one "
                          f"or export the model to {TORCHSCRIPT}")
    try:
        network = parser.get_parsed_content("network_def")
    except Exception as exc:
        message = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise SegXAIError(f"MONAI bundle {folder}: cannot build its network_def ({type(exc).__name__}: "
                          f"{message}); check the config against this MONAI version") from None
    if not isinstance(network, nn.Module):
        raise SegXAIError(f"MONAI bundle {folder}: network_def builds a {type(network).__name__}, not a "
                          "torch module; fix network_def")
    target = parser.get("network_def#_target_", "network_def")
    load_weights(network, path, f"monai_bundle {target}")
    return BundleAxes(network.cpu()).eval()
