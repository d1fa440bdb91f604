"""nnU-Net v2 trained-model folders: a card derived from their files, and segmentation as nnU-Net runs it.

A trained-model folder (what ``nnUNetv2_train`` writes to ``nnUNet_results/DatasetXXX/Trainer__Plans__Config``)
holds ``dataset.json``, ``plans.json`` and ``fold_N/checkpoint_final.pth`` (or ``checkpoint_best.pth``). SegXAI
reads it with nnU-Net's own code (``pip install segxai[nnunet]``), but never as nnU-Net's
``initialize_from_trained_model_folder`` does (``torch.load(weights_only=False)``: unpickling, which runs code):

- the checkpoint is read by ``torch.load(weights_only=True)`` allowing only the few NumPy globals nnU-Net's
  checkpoints hold (its training log's numbers, :data:`CHECKPOINT_GLOBALS`); a checkpoint naming any other global
  is refused (:func:`read_checkpoint`);
- the network is built by nnU-Net's ``get_network_from_plans`` from ``plans.json``, whose class names are imported
  by name: only a network class of ``dynamic_network_architectures`` and layers of ``torch.nn`` are accepted
  (:func:`check_architecture`), so that a plans file cannot name other code to run;
- the segmentation is nnU-Net's: its preprocessing (transpose, crop to the non-zero region, resampling to the
  configuration's spacing, normalisation per plans), its predictor (``nnUNetPredictor``: Gaussian-weighted sliding
  windows with tile step 0.5, test-time mirroring along the axes the checkpoint allows, the folds' mean) and its
  resampling of the logits back to the scan (:class:`NnunetPipeline`), so that the labels are those
  ``nnUNetv2_predict`` writes for the same file (``SegXAILib/tests/test_nnunet.py``).

Explanations run the network in SegXAI's windows on nnU-Net's preprocessed grid (the card's ``patch_size`` and
nnU-Net's window settings); they explain the first fold's network.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import SegXAIError
from ..fileio import read_json_object
from ..volume import Volume, label_dtype
from .card import PALETTE, ModelCard

if TYPE_CHECKING:  # torch is imported where a network runs: listing models and resolving names stay light
    import torch

CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_best.pth")
"""The checkpoint of each fold, in the order SegXAI takes them (``nnUNetv2_predict``'s default first)."""
CONFIGURATIONS = ("3d_fullres", "3d_lowres", "2d")
NETWORK_MODULE = "dynamic_network_architectures.architectures."
LAYER_MODULE = "torch.nn."
TILE_STEP = 0.5
"""nnU-Net's default tile step (``nnUNetv2_predict -step_size``): windows overlap by half."""
GAUSSIAN_SIGMA_SCALE = 0.125
"""nnU-Net's Gaussian importance map: its standard deviation is 1/8 of the window."""
INSTALL = "pip install 'segxai[nnunet]'"


def _checkpoint_globals() -> list[Any]:
    """The globals an nnU-Net v2 checkpoint holds besides tensors and plain containers: NumPy scalars and their
    dtypes (the training log's losses and Dice values, ``_best_ema``). A checkpoint written with NumPy 1 names the
    scalar constructor ``numpy.core.multiarray.scalar``, one written with NumPy 2 ``numpy._core...``: both allowed."""
    import numpy.dtypes

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # NumPy 1
        from numpy.core.multiarray import scalar
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, numpy.dtypes.Float64DType,
            numpy.dtypes.Float32DType]


def read_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """An nnU-Net checkpoint, read without running code: ``torch.load(weights_only=True)`` allowing only
    :func:`_checkpoint_globals`; ``mmap``: the tensors mapped, not read (for the checkpoint's other entries).

    Raises:
        SegXAIError: missing file, a pickle naming any other global (one line naming it), not a torch file, or no
            ``network_weights``.
    """
    import torch

    if not path.is_file():
        raise SegXAIError(f"nnU-Net checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_checkpoint_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        named = re.search(r"GLOBAL ([\w.]+)|but got (<class '[\w.]+'>)", str(exc))
        what = next(g for g in named.groups() if g) if named else "an object torch does not build from weights"
        raise SegXAIError(f"refusing to load the nnU-Net checkpoint {path}: it holds more than nnU-Net's weights "
                          f"and training log ({what}), and loading it would construct objects or run code; "
                          "use a checkpoint nnUNetv2_train wrote") from None
    except Exception as exc:  # noqa: BLE001 - the restricted unpickler fails on junk bytes in many ways
        raise SegXAIError(f"nnU-Net checkpoint {path} is corrupt or not a torch file "
                          f"({type(exc).__name__}: {str(exc)[:120]})") from None
    weights = checkpoint.get("network_weights") if isinstance(checkpoint, dict) else None
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise SegXAIError(f"nnU-Net checkpoint {path} holds no network_weights; give a checkpoint nnUNetv2_train "
                          "wrote (checkpoint_final.pth or checkpoint_best.pth)")
    return checkpoint


# ------------------------------------------------------------------------------------------- the folder
def fold_checkpoints(folder: Path) -> list[Path]:
    """Each ``fold_N`` folder's checkpoint (final, else best), folds in order; ``fold_all`` only without others."""
    folds = sorted((p for p in folder.glob("fold_*") if p.is_dir()),
                   key=lambda p: (p.name == "fold_all", int(p.name[5:]) if p.name[5:].isdigit() else 0))
    found = [next((p / name for name in CHECKPOINTS if (p / name).is_file()), None) for p in folds]
    found = [p for p in found if p is not None]
    numbered = [p for p in found if p.parent.name != "fold_all"]
    return numbered or found


def is_nnunet_folder(path: Path) -> bool:
    """Whether ``path`` is an nnU-Net v2 trained-model folder (``dataset.json``, ``plans.json``, a fold's
    checkpoint); nothing is opened."""
    path = Path(path)
    return (path.is_dir() and (path / "dataset.json").is_file() and (path / "plans.json").is_file()
            and bool(fold_checkpoints(path)))


def nnunet_folders_in(folder: Path, depth: int = 2) -> list[Path]:
    """The nnU-Net trained-model folders inside ``folder``, down to ``depth`` levels below it (an nnU-Net results
    folder's ``DatasetXXX_Name/Trainer__Plans__Configuration`` is two), in path order; a trained-model folder and
    hidden folders are not searched further. Nothing is opened."""
    try:
        children = sorted(p for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:  # not a folder, or not readable: nothing found there
        return []
    found: list[Path] = []
    for child in children:
        if is_nnunet_folder(child):
            found.append(child)
        elif depth > 1:
            found += nnunet_folders_in(child, depth - 1)
    return found


def _configuration(folder: Path, plans: dict[str, Any], checkpoints: list[Path]) -> str:
    """The configuration the folder was trained in: the last part of nnU-Net's folder name
    (``Trainer__Plans__3d_fullres``), else the one recorded in the first checkpoint (read as data, its tensors
    mapped but not read)."""
    configurations = plans.get("configurations", {})
    named = folder.name.rsplit("__", 1)[-1] if "__" in folder.name else _overrides(folder).get("configuration")
    name = named if named in configurations else read_checkpoint(checkpoints[0], mmap=True).get(
        "init_args", {}).get("configuration")
    if name not in configurations:
        raise SegXAIError(f"nnU-Net model {folder}: its configuration {name!r} is not in plans.json")
    if name not in CONFIGURATIONS and configurations[name].get("inherits_from") not in CONFIGURATIONS:
        raise SegXAIError(f"nnU-Net model {folder}: configuration {name!r} is not supported; SegXAI runs "
                          f"{', '.join(CONFIGURATIONS)} (a cascade's second stage needs the first's segmentation)")
    return str(name)


OVERRIDES = "segxai.json"
"""An optional file beside ``plans.json``: ``configuration`` (which one the folder holds, when its name does not
say: then no checkpoint is opened to find out), ``folds`` (the folds to use, e.g. ``[0]``, as ``nnUNetv2_predict
-f``; default: all), ``mirroring`` (false: no test-time mirroring, as ``nnUNetv2_predict --disable_tta``) and card
keys that replace the derived ones (``name``, ``description``, ``intended_use``, ``limitations``, ``validation``)."""
CARD_OVERRIDES = ("name", "description", "intended_use", "limitations", "validation")


def _overrides(folder: Path) -> dict[str, Any]:
    path = folder / OVERRIDES
    return read_json_object(path, "SegXAI's nnU-Net notes", "fix it: a JSON object") if path.is_file() else {}


def _classes(folder: Path, labels: dict[str, Any]) -> list[dict[str, Any]]:
    """Output channel n is label n (nnU-Net requires consecutive labels from 0, the background); colours as a MONAI
    bundle's classes get them."""
    if not labels or not all(isinstance(v, int) for v in labels.values()):
        raise SegXAIError(f"nnU-Net model {folder}: dataset.json's labels are regions (lists of labels); SegXAI "
                          "explains models with one label per class")
    by_value = sorted((int(v), str(k)) for k, v in labels.items())
    if [v for v, _ in by_value] != list(range(len(by_value))):
        raise SegXAIError(f"nnU-Net model {folder}: dataset.json's labels are not 0, 1, 2 ...: {labels}")
    return [{"name": name, "label": value,
             "color": [0, 0, 0] if value == 0 else list(PALETTE[(value - 1) % len(PALETTE)])}
            for value, name in by_value]


def card_from_nnunet(folder: Path) -> ModelCard:
    """The model card of an nnU-Net trained-model folder, derived from ``dataset.json`` and ``plans.json``: classes
    from the labels, input channels from ``channel_names``, the window from the configuration's patch size, the
    weights the folds' checkpoints; :data:`OVERRIDES` where present. Reads JSON only, and the first checkpoint's
    recorded configuration where neither the folder's name nor its ``segxai.json`` gives it (:func:`_configuration`)."""
    folder = Path(folder).resolve()
    overrides = _overrides(folder)
    checkpoints = _chosen_folds(folder, fold_checkpoints(folder), overrides.get("folds"))
    mirroring = overrides.get("mirroring", True)
    if not isinstance(mirroring, bool):
        raise SegXAIError(f"nnU-Net model {folder}: {OVERRIDES}'s mirroring must be true or false, got {mirroring!r}")
    dataset = read_json_object(folder / "dataset.json", "nnU-Net dataset.json", "use the one nnU-Net wrote")
    plans = read_json_object(folder / "plans.json", "nnU-Net plans.json", "use the one nnU-Net wrote")
    name = _configuration(folder, plans, checkpoints)
    config = _configuration_dict(plans, name)
    channels = [str(v) for _, v in sorted(dataset.get("channel_names", {"0": "image"}).items(), key=lambda kv:
                                           int(kv[0]))]
    transpose = list(plans.get("transpose_forward", [0, 1, 2]))
    spacing = [float(s) for s in config["spacing"]]
    patch = [int(p) for p in config["patch_size"]]
    if len(patch) == 2:  # a 2D network: one slice of the model grid at a time
        patch, spacing = [1, *patch], [0.0, *spacing]
    original_spacing = [0.0] * 3  # K, J, I of the scan; the model grid's axis t is the scan's transpose[t]
    for t, axis in enumerate(transpose):
        original_spacing[axis] = spacing[t]
    ct = "CTNormalization" in config.get("normalization_schemes", [])
    data = {
        "name": _model_name(folder, plans, name),
        "description": str(dataset.get("description") or f"nnU-Net v2 model ({plans.get('dataset_name')}, {name})"),
        "architecture": {"name": "nnunet", "args": {}},
        "input": {"channels": len(channels), "modality": "CT" if ct else "MRI",
                  **({"sequences": channels} if len(channels) > 1 else {})},
        "classes": _classes(folder, dataset.get("labels", {})),
        "preprocessing": {"orientation": None,
                          "spacing": None if 0.0 in original_spacing else original_spacing[::-1],
                          "intensity": {"kind": "zscore_foreground"}},
        "patch_size": patch,
        "inference": {"overlap": 1.0 - TILE_STEP, "blend": "gaussian", "sigma_scale": GAUSSIAN_SIGMA_SCALE,
                      "padding_mode": "constant", "cval": 0.0, "placement": "nnunet"},
        "weights": [str(p.relative_to(folder)) for p in checkpoints],
        "extra": {"nnunet_root": str(folder), "nnunet_configuration": name, "nnunet_mirroring": mirroring,
                  "install": INSTALL},
    }
    data.update({key: value for key, value in overrides.items() if key in CARD_OVERRIDES})
    return ModelCard.from_dict(data, root=folder, source=f"nnU-Net model {folder}")


DEFAULT_TRAINER_AND_PLANS = ("nnUNetTrainer", "nnUNetPlans")


def _model_name(folder: Path, plans: dict[str, Any], configuration: str) -> str:
    """A folder named as nnU-Net names it (``Trainer__Plans__Configuration``): the dataset and configuration, with the
    trainer and plans where they are not nnU-Net's defaults (``Dataset291_Organs-nnUNetTrainerNoMirroring-3d_fullres``),
    so that the trained models of one results folder have distinct names; any other folder: its own name."""
    if "__" not in folder.name:
        return folder.name
    parts = folder.name.split("__")[:-1]
    named = [part for part, default in zip(parts, DEFAULT_TRAINER_AND_PLANS) if part != default]
    return "-".join([str(plans.get("dataset_name", "nnunet")), *named, configuration])


def _chosen_folds(folder: Path, checkpoints: list[Path], folds: Any) -> list[Path]:
    """``checkpoints`` of the ``folds`` named in :data:`OVERRIDES` (a list of fold numbers), in that order; all of
    them when none are named."""
    if not checkpoints:
        raise SegXAIError(f"nnU-Net model {folder}: no fold_N/checkpoint_final.pth or checkpoint_best.pth")
    if folds is None:
        return checkpoints
    by_fold = {p.parent.name[len("fold_"):]: p for p in checkpoints}
    wanted = [str(f) for f in folds] if isinstance(folds, list) else None
    if not wanted or any(f not in by_fold for f in wanted):
        raise SegXAIError(f"nnU-Net model {folder}: {OVERRIDES}'s folds must be a list of trained folds "
                          f"({', '.join(sorted(by_fold))}), got {folds!r}")
    return [by_fold[f] for f in wanted]


def _configuration_dict(plans: dict[str, Any], name: str) -> dict[str, Any]:
    """The configuration ``name`` of ``plans`` with what it inherits (as nnU-Net's PlansManager resolves it)."""
    config = dict(plans["configurations"][name])
    parent = config.pop("inherits_from", None)
    return {**_configuration_dict(plans, parent), **config} if parent else config


# ------------------------------------------------------------------------------------------- the network
def check_architecture(folder: Path, config: Any) -> None:
    """Refuse (one line) a plans file whose network or layers name classes outside ``dynamic_network_architectures``
    and ``torch.nn``: nnU-Net imports them by name and calls them."""
    names = {"network": config.network_arch_class_name}
    names.update({key: config.network_arch_init_kwargs.get(key) for key in config.network_arch_init_kwargs_req_import})
    for key, value in names.items():
        allowed = NETWORK_MODULE if key == "network" else LAYER_MODULE
        if value is not None and not str(value).startswith(allowed):
            raise SegXAIError(f"refusing nnU-Net model {folder}: plans.json names {value!r} as its {key}; SegXAI "
                              f"builds networks of {allowed}* only (nnU-Net would import and run it)")


def _nnunet() -> None:
    try:
        import nnunetv2  # noqa: F401
    except ImportError:
        raise SegXAIError(f"nnU-Net models need the Python package nnunetv2, which is not installed; install it "
                          f"({INSTALL})") from None


@dataclass
class NnunetPrepared:
    """A scan after nnU-Net's preprocessing.

    Attributes:
        image: the network's input, (1, C, K', J', I') float32 (K', J', I': the scan's axes in plans'
            ``transpose_forward`` order, cropped to the non-zero region and resampled).
        model_grid: the first channel as a :class:`Volume` (its geometry: the crop and resampling applied to the
            scan's).
        properties: nnU-Net's record of the preprocessing (the crop's box, shapes, spacing), which its export
            inverts.
        read_by: ``"nnU-Net"`` (its reader read the scan's file) or ``"SegXAI"`` (the scan handed over as read).
    """

    image: torch.Tensor
    model_grid: Volume
    properties: dict[str, Any]
    read_by: str


@dataclass
class NnunetPipeline:
    """nnU-Net's preprocessing, predictor and export for one configuration (:func:`load_nnunet`)."""

    predictor: Any

    def preprocess(self, scans: list[Volume]) -> NnunetPrepared:
        """``scans`` (one per channel, co-registered) through nnU-Net's preprocessor; read by the plans' reader from
        their files where it reads them (as ``nnUNetv2_predict`` does), else handed over as SegXAI read them."""
        p = self.predictor
        preprocessor = p.configuration_manager.preprocessor_class(verbose=False)
        reader = p.plans_manager.image_reader_writer_class()
        files = [scan.source for scan in scans]
        if all(f is not None and any(str(f).endswith(e) for e in reader.supported_file_endings) for f in files):
            data, _, properties = preprocessor.run_case([str(f) for f in files], None, p.plans_manager,
                                                        p.configuration_manager, p.dataset_json)
            read_by = "nnU-Net"
        else:
            arrays = np.stack([np.asarray(scan.array, dtype=np.float32) for scan in scans])  # (C, K, J, I)
            properties = {"spacing": [float(s) for s in scans[0].spacing[::-1]]}
            data, _, properties = preprocessor.run_case_npy(arrays, None, properties, p.plans_manager,
                                                            p.configuration_manager, p.dataset_json)
            read_by = "SegXAI"
        if tuple(properties["shape_before_cropping"]) != tuple(scans[0].shape[i] for i in self._transpose):
            raise SegXAIError(f"nnU-Net read the scan as {tuple(properties['shape_before_cropping'])} voxels but "
                              f"SegXAI as {scans[0].shape}; give the scan as NIfTI")
        import torch

        image = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
        return NnunetPrepared(image[None], self._model_grid(data[0], properties, scans[0]), properties, read_by)

    @property
    def _transpose(self) -> list[int]:
        return list(self.predictor.plans_manager.transpose_forward)

    def _model_grid(self, array: np.ndarray, properties: dict[str, Any], scan: Volume) -> Volume:
        """(K', J', I') ``array`` on the scan's grid cropped to nnU-Net's box and resampled as its resize does
        (voxel centres: source index (n + 0.5) * old/new size - 0.5)."""
        box = properties["bbox_used_for_cropping"]
        cropped = properties["shape_after_cropping_and_before_resampling"]
        matrix = np.eye(4)
        origin = scan.origin.copy()
        for t, axis in enumerate(self._transpose):
            step = scan.direction[:, 2 - axis] * scan.spacing[2 - axis]  # world step along scan array axis
            scale = cropped[t] / array.shape[t] if array.ndim == 3 else 1.0
            matrix[:3, 2 - t] = step * scale
            origin += step * (box[t][0] + 0.5 * scale - 0.5)
        matrix[:3, 3] = origin
        return Volume.from_ijk_to_ras(array, matrix)

    def predict(self, prepared: NnunetPrepared, device: torch.device) -> torch.Tensor:
        """nnU-Net's predictor on the prepared input: (1, n_classes, K', J', I') logits (the folds' mean) on the
        CPU, from Gaussian-weighted windows with test-time mirroring, as ``nnUNetv2_predict`` computes them."""
        self.predictor.device = device
        return self.predictor.predict_logits_from_preprocessed_data(prepared.image[0]).cpu()[None]

    def postprocess(self, prepared: NnunetPrepared, logits: torch.Tensor, scan: Volume,
                    multilabel_classes: int = 0) -> tuple[Volume, list[Volume]]:
        """nnU-Net's export of (1, C, K', J', I') ``logits``: resampled to the cropped scan, argmax, put back in the
        crop's box, transposed back; the label map on the scan's grid (no per-class masks)."""
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

        p = self.predictor
        labels = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits[0], p.plans_manager, p.configuration_manager, p.label_manager, prepared.properties)
        return scan.with_array(np.asarray(labels).astype(label_dtype(int(labels.max(initial=0))))), []


def load_nnunet(card: ModelCard) -> Any:
    """The nnU-Net model of ``card`` (:func:`card_from_nnunet`): the network built from the plans with the first
    fold's weights, the :class:`NnunetPipeline` that segments with every fold, each fold as an ensemble member, and
    the card's ``mirror_axes`` set to the axes the checkpoint lets nnU-Net mirror. A 2d configuration's network and
    members are lifted to act on one slice, (N, C, 1, H, W) (:func:`~SegXAILib.models.lift2d.lift_2d_network`).

    Raises:
        SegXAIError: nnunetv2 not installed, a refused checkpoint or plans file, weights that do not fit.
    """
    import torch

    from .lift2d import lift_2d_network
    from .loaders import LoadedModel

    _nnunet()
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = Path(card.extra["nnunet_root"])
    dataset = json.loads((folder / "dataset.json").read_text())
    plans_manager = PlansManager(json.loads((folder / "plans.json").read_text()))
    config = plans_manager.get_configuration(card.extra["nnunet_configuration"])
    check_architecture(folder, config)
    checkpoints = [read_checkpoint(path) for path in card.weight_paths]
    network = get_network_from_plans(
        config.network_arch_class_name, config.network_arch_init_kwargs, config.network_arch_init_kwargs_req_import,
        determine_num_input_channels(plans_manager, config, dataset),
        plans_manager.get_label_manager(dataset).num_segmentation_heads, allow_init=False, deep_supervision=False)
    try:
        network.load_state_dict(checkpoints[0]["network_weights"])
    except RuntimeError as exc:
        raise SegXAIError(f"nnU-Net model {folder}: the checkpoint's weights do not fit the network plans.json "
                          f"describes ({str(exc).splitlines()[0][:160]})") from None
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a note for every device but CUDA
        predictor = nnUNetPredictor(tile_step_size=TILE_STEP, use_gaussian=True,
                                    use_mirroring=bool(card.extra.get("nnunet_mirroring", True)),
                                    perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                    verbose_preprocessing=False, allow_tqdm=False)
    first = checkpoints[0]
    folds = [c["network_weights"] for c in checkpoints]
    mirror_axes = first.get("inference_allowed_mirroring_axes")
    # a 2d network explains on one slice of the model grid at a time: lifted to (N, C, 1, H, W), its mirror axes
    # (of H, W) shifted past the depth axis; nnU-Net's predictor keeps the 2D network
    flat = len(config.patch_size) == 2
    lift = lift_2d_network if flat else (lambda net: net)
    predictor.manual_initialization(copy.deepcopy(network), plans_manager, config, folds, dataset,
                                    str(first.get("trainer_name", "nnUNetTrainer")), mirror_axes)

    def fold(t: int) -> torch.nn.Module:
        member = copy.deepcopy(network)
        member.load_state_dict(folds[t])
        return lift(member)

    # the checkpoint's mirroring axes are nnU-Net's test-time augmentation: the card says so for the 'tta' method
    # (the segmentation itself is mirrored by nnU-Net's predictor, never by SegXAI again)
    mirrored = mirror_axes if predictor.use_mirroring else None
    card = dataclasses.replace(card, inference={**card.inference,
                                                "mirror_axes": sorted(int(a) + int(flat) for a in mirrored or ())})
    return LoadedModel(card, lift(network).eval(), "nnunet", NnunetPipeline(predictor), members=fold)
