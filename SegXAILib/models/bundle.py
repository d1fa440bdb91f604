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

**No code runs unless trusted.** MONAI configs can hold code (``$`` Python expressions, ``_target_``
naming any callable). The configs are read as data (JSON/YAML, nothing evaluated), and only the keys in
:data:`NEEDED_KEYS` (``network_def``, ``preprocessing``, ``inferer``) and the ids they refer to (``@id``,
also ``$@id``) are looked at; ``imports``, ``datalist``, ``handlers`` and every other key never are. The
card is derived from plain values only (an expression is not evaluated: the field keeps its default).
:func:`code_in_bundle` lists what those keys would run: a ``$`` expression, a ``%`` macro, a non-default
``_mode_``, a ``_target_`` that is not a class of :data:`ALLOWED_MODULES` (``monai.networks``,
``monai.transforms``, ``monai.inferers``, ``torch.nn``), a ``pretrained`` argument that would download weights
(nothing is downloaded at run time). None: :func:`load_bundle_network` builds
``network_def`` itself from the allowed classes and the resolved arguments. Some: the bundle is refused with
one line naming the key and what it would run (:func:`check_bundle_trust`, via
:mod:`SegXAILib.models.trust`) unless the user passes ``--trust-model-code``; then MONAI's ConfigParser
builds ``network_def``, evaluating what it must. The weights themselves are never unpickled.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SegXAIError
from ..fileio import read_json_object
from .card import PALETTE, ModelCard
from .loaders import LoadedModel

INFERENCE_CONFIGS = ("configs/inference.json", "configs/inference.yaml", "configs/inference.yml")
METADATA_CONFIG = "configs/metadata.json"
OVERRIDES_CONFIG = "configs/segxai.json"
STATE_DICT = "models/model.pt"
TORCHSCRIPT = "models/model.ts"
DEFAULT_PATCH = (96, 96, 96)
MERGED_KEYS = ("input", "preprocessing", "extra")


_REFERENCE = re.compile(r"@([\w#:]+)")
_PURE_REFERENCE = re.compile(r"\$?@([\w#:]+)")

ALLOWED_MODULES = ("monai.networks", "monai.transforms", "monai.inferers", "torch.nn")
"""The only modules whose classes a bundle's ``_target_`` may name without ``--trust-model-code``."""
NEEDED_KEYS = ("network_def", "preprocessing", "inferer", "postprocessing")
"""The inference config's keys SegXAI reads (with every id they refer to); no other key is even looked at."""
SEGXAI_CHOICES = ("device", "sw_device", "progress", "cache_roi_weight_map", "cpu_thresh", "buffer_steps",
                  "buffer_dim", "sw_batch_size")
"""The inferer's settings SegXAI chooses itself (where and how many windows at a time, no effect on the result):
never read, so an expression there (``"device": "$torch.device('cuda')"``) runs nothing and needs no trust."""
WRITER_KINDS = ("saveimage",)
"""Transforms that write files (``SaveImaged``): never read or built; SegXAI writes its own outputs."""


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


def _read(folder: Path, path: Path) -> dict[str, Any]:
    """A JSON/YAML config file as plain data (MONAI's reader: ``json.load`` / ``yaml.safe_load``)."""
    from monai.bundle import ConfigParser

    try:
        data = ConfigParser.load_config_file(str(path))
    except Exception as exc:  # json/yaml errors of several kinds
        raise SegXAIError(f"MONAI bundle {folder}: cannot read its configs ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:150] if str(exc) else ''}); fix the JSON/YAML") from None
    if not isinstance(data, dict):
        raise SegXAIError(f"MONAI bundle {folder}: {path.name} is not a JSON/YAML object; fix it")
    return data


def _config(folder: Path) -> dict[str, Any]:
    """The inference config as data (nothing evaluated), ``bundle_root`` set to ``folder``."""
    return {**_read(folder, _inference_config(folder)), "bundle_root": str(folder)}


def _parser(folder: Path):
    """MONAI's ConfigParser on the inference config: it evaluates, so only for a bundle the user trusts."""
    from monai.bundle import ConfigParser

    return ConfigParser(_config(folder))


def _get(config: dict[str, Any], id: str) -> Any:
    """The raw value at a config id (``network_def#channels#0``; ``::`` works as ``#``), None if absent."""
    node: Any = config
    for part in id.replace("::", "#").split("#"):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _key(id: str) -> str:
    """A config id as the user reads it in an error: ``network_def._target_``."""
    return id.replace("::", "#").replace("#", ".")


def _reference(id: str, text: str) -> str | None:
    """The id that ``text`` refers to when it is only a reference (``@id``, or ``$@id``, which evaluates to the
    same object); relative ids (``@#key``) are made absolute with MONAI's own rule. None otherwise."""
    from monai.bundle import ConfigParser

    try:
        absolute = ConfigParser.resolve_relative_ids(id, text) if "@#" in text else text
    except ValueError:  # a relative id above the config's root
        return None
    match = _PURE_REFERENCE.fullmatch(absolute)
    return match.group(1).replace("::", "#") if match else None


class _NotData(Exception):
    """A config value that is not plain data (a ``$`` expression, a ``%`` macro, a missing reference)."""


def _allowed_class(target: Any) -> type | None:
    """The class a ``_target_`` names, if it is one from :data:`ALLOWED_MODULES` (a short name such as ``UNet`` is
    looked up in MONAI as MONAI does); None otherwise. Only a module on the allowlist is ever imported."""
    import importlib
    import inspect

    if not isinstance(target, str) or not target:
        return None
    if "." in target:
        module, _, name = target.rpartition(".")
    else:
        found = _component_locator().get_component_module_name(target)
        modules = [found] if isinstance(found, str) else list(found or [])
        module, name = next((m for m in modules if _in_allowlist(m)), ""), target
    if not _in_allowlist(module):
        return None
    try:
        value = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    return value if inspect.isclass(value) else None


@functools.cache
def _component_locator():
    """MONAI's table of short names (``UNet`` -> ``monai.networks.nets.unet``), over the allowed MONAI modules."""
    import importlib

    from monai.bundle.config_item import ComponentLocator

    for package in ALLOWED_MODULES[:3]:  # the table covers the MONAI modules already imported
        importlib.import_module(package)
    return ComponentLocator()


def _in_allowlist(module: str) -> bool:
    return any(module == allowed or module.startswith(allowed + ".") for allowed in ALLOWED_MODULES)


def code_in_bundle(folder: Path) -> list[tuple[str, str]]:
    """What the keys SegXAI needs (:data:`NEEDED_KEYS` and every id they refer to) would run, unevaluated:
    ``(key, what)`` per ``$`` expression, ``%`` macro, non-default ``_mode_`` and ``_target_`` outside
    :data:`ALLOWED_MODULES`, in config order. Empty: the network is built and the card derived as data."""
    config = _config(Path(folder))
    found: list[tuple[str, str]] = []
    seen: set[str] = set()

    def walk(node: Any, id: str) -> None:
        if _is_writer(node):
            return
        if isinstance(node, dict):
            if "_target_" in node and _allowed_class(node["_target_"]) is None:
                found.append((f"{_key(id)}._target_", str(node["_target_"])))
            if node.get("_mode_", "default") != "default":
                found.append((f"{_key(id)}._mode_", f"MONAI's {node['_mode_']!r} mode"))
            if "_target_" in node:  # e.g. DenseNet121(pretrained=True) downloads weights while it is built
                found.extend((f"{_key(id)}.{key}", "a download of pretrained weights") for key, value in node.items()
                             if str(key).startswith("pretrained")
                             and value not in (False, None, 0, "", "false", "False"))
            for key, value in node.items():
                if key not in ("_target_", "_mode_", "_desc_") and not (id == "inferer" and key in SEGXAI_CHOICES):
                    walk(value, f"{id}#{key}")
        elif isinstance(node, list):
            for n, value in enumerate(node):
                walk(value, f"{id}#{n}")
        elif isinstance(node, str) and node[:1] in "@$%":
            reference = _reference(id, node)
            if reference is not None:
                visit(reference)
            elif node.startswith("$"):
                found.append((_key(id), f"the Python expression {node[1:].strip()}"))
            elif node.startswith("%"):
                found.append((_key(id), f"a config read from {node[1:]}"))

    def visit(id: str) -> None:
        if id not in seen:
            seen.add(id)
            walk(_get(config, id), id)

    for key in NEEDED_KEYS:
        visit(key)
    return found


def check_bundle_trust(folder: Path, trust_model_code: bool = False) -> None:
    """Refuse (one line naming the key, what it would run and ``--trust-model-code``) a bundle whose needed keys
    hold code (:func:`code_in_bundle`), unless trusted; nothing of the config is evaluated."""
    from . import trust

    code = code_in_bundle(folder)
    if code:
        key, what = code[0]
        more = f" (and {len(code) - 1} more such entries)" if len(code) > 1 else ""
        trust.require(trust_model_code, "the MONAI bundle", folder, f"its config key {key} would run {what}{more}")


def _data(config: dict[str, Any], node: Any, id: str, build: bool, seen: frozenset[str] = frozenset(),
          built: dict[str, Any] | None = None) -> Any:
    """``node`` (at config id ``id``) with its references resolved, never evaluated.

    ``build``: a ``_target_`` entry becomes its class called with the resolved arguments (the class must be on
    the allowlist); otherwise it stays a dict. A referenced id is built once (``built``: id -> object), as MONAI's
    ConfigParser does: an ``Invertd`` must hold the very ``Compose`` that transformed the image. Writers
    (:data:`WRITER_KINDS`) are left out of lists, the inferer's :data:`SEGXAI_CHOICES` out of its arguments. Raises
    :class:`_NotData` for a ``$`` expression, a ``%`` macro, a reference to nothing or in a cycle, or (``build``)
    a target off the allowlist."""
    built = {} if built is None else built
    if isinstance(node, dict):
        arguments = {key: _data(config, value, f"{id}#{key}", build, seen, built)
                     for key, value in node.items() if not (build and str(key).startswith("_"))
                     and not (id == "inferer" and key in SEGXAI_CHOICES)}
        if not (build and "_target_" in node):
            return arguments
        if node.get("_disabled_") in (True, "true", "True"):
            return None
        target = _allowed_class(node["_target_"])
        if target is None or node.get("_mode_", "default") != "default":
            raise _NotData(f"{_key(id)}._target_")
        return target(**arguments)
    if isinstance(node, list):
        return [_data(config, value, f"{id}#{n}", build, seen, built) for n, value in enumerate(node)
                if not _is_writer(value)]
    if isinstance(node, str) and node[:1] in "@$%":
        reference = _reference(id, node)
        if reference is None or reference in seen or _get(config, reference) is None:
            raise _NotData(_key(id))
        if not build:
            return _data(config, _get(config, reference), reference, build, seen | {reference}, built)
        if reference not in built:
            built[reference] = _data(config, _get(config, reference), reference, build, seen | {reference}, built)
        return built[reference]
    return node


def _is_writer(node: Any) -> bool:
    return isinstance(node, dict) and _transform_kind(node.get("_target_")) in WRITER_KINDS


def _value(config: dict[str, Any], id: str, default: Any = None) -> Any:
    """A config value as data, references followed; ``default`` if absent or not plain data (a ``$``
    expression, which is never evaluated here)."""
    try:
        value = _data(config, _get(config, id), id, build=False, seen=frozenset({id}))
    except _NotData:
        return default
    return default if value is None else value


def _transform_kind(target: Any) -> str:
    """'monai.transforms.Spacingd' / 'SpacingD' / 'SpacingDict' / 'Spacing' -> 'spacing'."""
    if not isinstance(target, str):
        return ""
    name = target.rsplit(".", 1)[-1].lower()
    if name.endswith("dict"):
        return name[:-4]
    return name[:-1] if name.endswith("d") else name


def _find_transforms(config: dict[str, Any], root_id: str = "preprocessing") -> list[tuple[str, str]]:
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
        node = _get(config, id)
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


def _intensity(config: dict[str, Any], transforms: list[tuple[str, str]]) -> dict[str, Any]:
    for id, kind in transforms:
        if kind == "scaleintensityrange":
            a_min, a_max = _value(config, f"{id}#a_min"), _value(config, f"{id}#a_max")
            if a_min is None or a_max is None:
                continue
            spec: dict[str, Any] = {"kind": "ct_window", "window": [float(a_min), float(a_max)],
                                    "clip": bool(_value(config, f"{id}#clip", False))}
            b_min, b_max = _value(config, f"{id}#b_min", 0.0), _value(config, f"{id}#b_max", 1.0)
            if b_min is not None and b_max is not None and (float(b_min), float(b_max)) != (0.0, 1.0):
                spec["output_range"] = [float(b_min), float(b_max)]
            return spec
        if kind == "normalizeintensity":
            return {"kind": "zscore_foreground"}
        if kind == "scaleintensityrangepercentiles":
            return {"kind": "percentile", "lower": float(_value(config, f"{id}#lower", 0.5)),
                    "upper": float(_value(config, f"{id}#upper", 99.5)),
                    "clip": bool(_value(config, f"{id}#clip", False))}
    return {"kind": "percentile", "lower": 0.5, "upper": 99.5}


def _classes(folder: Path, config: dict[str, Any], pred: dict[str, Any], multilabel: bool) -> list[dict[str, Any]]:
    """The classes of the output channels: channel n is label n with a softmax (0 the background); with sigmoid
    outputs (``multilabel``) every channel is a class of its own, label n + 1 (0 stays "none")."""
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
        count = pred.get("num_channels") or _value(config, "network_def#out_channels")
        if not isinstance(count, int):
            raise SegXAIError(f"MONAI bundle {folder}: cannot tell its output classes (no channel_def or "
                              f"num_channels in {METADATA_CONFIG}); give 'classes' in {OVERRIDES_CONFIG}")
    if multilabel:
        return [{"name": names.get(n, f"class {n + 1}"), "label": n + 1, "color": list(PALETTE[n % len(PALETTE)])}
                for n in range(count)]
    return [{"name": names.get(n, "background" if n == 0 else f"class {n}"), "label": n,
             "color": [0, 0, 0] if n == 0 else list(PALETTE[(n - 1) % len(PALETTE)])}
            for n in range(count)]


def _output(config: dict[str, Any]) -> str:
    """``sigmoid`` when the postprocessing's ``Activationsd`` applies a sigmoid (independent, overlapping classes),
    else ``logits`` (a softmax, or an argmax of the logits, which is the same segmentation)."""
    for id, kind in _find_transforms(config, "postprocessing"):
        if kind == "activations" and _value(config, f"{id}#sigmoid", False) is True:
            return "sigmoid"
    return "logits"


def _sequences(image: dict[str, Any], channels: int) -> list[str]:
    """The input channels' names from metadata ``inputs.image.channel_def`` (BraTS: T1c, T1, T2, FLAIR)."""
    channel_def = image.get("channel_def")
    if not isinstance(channel_def, dict) or len(channel_def) != channels:
        return []
    try:
        return [str(channel_def[key]) for key in sorted(channel_def, key=int)]
    except ValueError:
        return []


def _derive(folder: Path) -> dict[str, Any]:
    config = _config(folder)
    meta = _read(folder, folder / METADATA_CONFIG) if (folder / METADATA_CONFIG).is_file() else {}
    data_format = meta.get("network_data_format", {}) if isinstance(meta, dict) else {}
    image = data_format.get("inputs", {}).get("image", {})
    pred = data_format.get("outputs", {}).get("pred", {})

    transforms = _find_transforms(config)
    preprocessing: dict[str, Any] = {}
    orientation = _first(transforms, "orientation")
    if orientation is not None:
        axcodes = _value(config, f"{orientation}#axcodes")
        if isinstance(axcodes, str):
            preprocessing["orientation"] = axcodes.upper()
    spacing = _first(transforms, "spacing")
    preprocessing["spacing"] = _floats(_value(config, f"{spacing}#pixdim")) if spacing else None
    preprocessing["intensity"] = _intensity(config, transforms)

    roi, windows = _windows(folder, config, _builder(folder, config, trusted_code=False))
    channels = image.get("num_channels") or _value(config, "network_def#in_channels") or 1
    output = _output(config)

    weights = STATE_DICT if (folder / STATE_DICT).is_file() or not (folder / TORCHSCRIPT).is_file() else TORCHSCRIPT
    return {
        "name": str(meta.get("name") or folder.name),
        "description": str(meta.get("description", "")),
        "architecture": {"name": "monai_bundle", "args": {}},
        "input": {"channels": int(channels), "modality": str(image.get("modality", "MRI")),
                  **({"sequences": _sequences(image, int(channels))} if _sequences(image, int(channels)) else {})},
        "classes": _classes(folder, config, pred, output == "sigmoid"),
        "output": output,
        "preprocessing": preprocessing,
        "patch_size": roi[::-1],  # MONAI roi_size is I, J, K; SegXAI arrays are K, J, I
        "inference": windows,
        "weights": weights,
        "extra": {"bundle_version": meta.get("version")} if meta.get("version") else {},
    }


def _windows(folder: Path, config: dict[str, Any], build: Callable[[str], Any]) -> tuple[list[int], dict[str, Any]]:
    """The ``inferer``'s ``roi_size`` (I, J, K) and the card's window settings (:class:`~.card.Windows`), read off
    the inferer ``build("inferer")`` makes: MONAI's own ``SlidingWindowInferer`` with its defaults (constant
    blending, padding with 0). Without an inferer: SegXAI's windows of :data:`DEFAULT_PATCH`. A config whose
    inferer is code gives the defaults here; the bundle is refused until trusted, and loading it reads them again."""
    from monai.inferers import SlidingWindowInferer

    if _get(config, "inferer") is None:
        return list(DEFAULT_PATCH), {}
    try:
        inferer = build("inferer")
    except _NotData:
        return list(DEFAULT_PATCH), {}
    if not isinstance(inferer, SlidingWindowInferer):
        raise SegXAIError(f"MONAI bundle {folder}: its inferer is a {type(inferer).__name__}; SegXAI runs a "
                          "bundle's SlidingWindowInferer (the windows its explanations run in too): use one")
    roi, overlap, sigma = inferer.roi_size, inferer.overlap, inferer.sigma_scale
    if not (_floats(roi) and isinstance(overlap, (int, float)) and isinstance(sigma, (int, float))):
        raise SegXAIError(f"MONAI bundle {folder}: its inferer has roi_size {roi!r}, overlap {overlap!r}, sigma_scale "
                          f"{sigma!r}; SegXAI needs three sizes and one overlap and sigma for every axis")
    return [int(r) for r in _floats(roi)], {
        "overlap": float(overlap), "blend": str(inferer.mode.value), "sigma_scale": float(sigma),
        "padding_mode": str(getattr(inferer.padding_mode, "value", inferer.padding_mode)), "cval": float(inferer.cval)}


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


def _builder(folder: Path, config: dict[str, Any], trusted_code: bool) -> Callable[[str], Any]:
    """``build(id)``: the object a top-level config entry makes (None where the config has no such entry), each
    built once and shared as MONAI's ConfigParser shares them. ``trusted_code``: MONAI's ConfigParser builds
    (it evaluates); otherwise :func:`_data` builds from the allowlisted classes."""
    parser = _parser(folder) if trusted_code else None
    built: dict[str, Any] = {}

    def build(id: str) -> Any:
        if _get(config, id) is None:
            return None
        if parser is not None:
            return parser.get_parsed_content(id)
        if id not in built:
            built[id] = _data(config, config[id], id, True, frozenset({id}), built)
        return built[id]

    return build


def _built(folder: Path, what: str, build: Callable[[], Any]) -> Any:
    """``build()``, with a constructor's failure as one line naming the config entry."""
    try:
        return build()
    except SegXAIError:
        raise
    except Exception as exc:  # noqa: BLE001 - MONAI's constructors fail in many ways on wrong arguments
        message = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise SegXAIError(f"MONAI bundle {folder}: cannot build its {what} ({type(exc).__name__}: {message}); "
                          "check the config against this MONAI version") from None


def load_bundle(card: ModelCard, trust_model_code: bool = False) -> LoadedModel:
    """The bundle as a model: its network with its weights (wrapped in :class:`BundleAxes`, in eval mode on the
    CPU) and its own pipeline (:class:`~.bundle_pipeline.BundlePipeline`), which segments as MONAI does.

    ``models/model.pt`` (or the card's ``weights``) is loaded into ``network_def`` with
    ``torch.load(weights_only=True)``; when it is absent and ``models/model.ts`` exists (or the
    weights named end in ``.ts``), the TorchScript file is loaded instead (no hooks then), which runs its code:
    only with ``trust_model_code`` (:mod:`SegXAILib.models.trust`). A config whose needed keys hold code is
    refused before anything is built unless trusted (:func:`check_bundle_trust`).
    """
    from .bundle_pipeline import build_bundle_pipeline
    from .loaders import load_torchscript, load_weights

    folder = Path(card.extra["bundle_root"])
    config = _config(folder)
    path = bundle_weights(card)
    if path.suffix != ".ts" and not path.is_file():
        raise SegXAIError(f"MONAI bundle {folder}: weights file {path} not found; put the state dict in "
                          f"{STATE_DICT} (or a TorchScript export in {TORCHSCRIPT})")
    if path.suffix != ".ts" and _get(config, "network_def") is None:
        raise SegXAIError(f"MONAI bundle {folder}: its inference config has no 'network_def'; add one "
                          f"or export the model to {TORCHSCRIPT}")
    check_bundle_trust(folder, trust_model_code)
    code = bool(code_in_bundle(folder))
    build = _builder(folder, config, code)
    if code:  # the card was derived without evaluating; the evaluated inferer gives the windows
        roi, windows = _built(folder, "inferer", lambda: _windows(folder, config, build))
        card = dataclasses.replace(card, patch_size=tuple(roi[::-1]), inference={**card.inference, **windows})
    pipeline = (_built(folder, "preprocessing and postprocessing", lambda: build_bundle_pipeline(folder, build))
                if _get(config, "preprocessing") is not None else None)
    if path.suffix == ".ts":
        network = torch.jit.script(BundleAxes(load_torchscript(path, trust_model_code))).eval()
        return LoadedModel(card, network, "bundle", pipeline)
    network = _built(folder, "network_def", lambda: build("network_def"))
    if not isinstance(network, nn.Module):
        raise SegXAIError(f"MONAI bundle {folder}: network_def builds a {type(network).__name__}, not a "
                          "torch module; fix network_def")
    target = _get(config, "network_def#_target_") or "network_def"
    load_weights(network, path, f"monai_bundle {target}")
    return LoadedModel(card, BundleAxes(network.cpu()).eval(), "bundle", pipeline)
