"""Training a segmentation model from image/label pairs and writing its model card.

Data: a folder of case folders, each holding ``image.<ext>`` and ``label.<ext>`` (label values
as listed in the card's classes). Every case goes through exactly the preprocessing that
inference uses (:func:`~SegXAILib.preprocessing.preprocess`), so what the network sees at
training and at inference time cannot drift apart.

The configuration is a JSON file; the bundled model was trained with::

    segxai synth-dataset --hosts colin27,colin27-brain,mni152 --seeds 0:240 --out data/lesions/train
    segxai synth-dataset --hosts colin27,colin27-brain,mni152 --seeds 10000:10024 --out data/lesions/val
    segxai train --config Resources/Training/brain_lesion_unet.json
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import SegXAIError
from .fileio import read_json_object
from .models.card import ModelCard
from .preprocessing import preprocess, resample_to_grid
from .progress import Progress
from .volume import Volume, read_volume


@dataclass
class TrainConfig:
    """Everything a training run needs; paths are relative to the current directory."""

    name: str
    architecture: dict[str, Any]
    classes: list[dict[str, Any]]
    preprocessing: dict[str, Any]
    patch_size: list[int]
    train_dir: str
    val_dir: str
    out: str
    description: str = ""
    intended_use: str = ""
    limitations: str = ""
    modality: str = "MRI"
    input_channels: int = 1
    groups: dict[str, list[int]] = field(default_factory=dict)
    default_target: str | None = None
    postprocessing: dict[str, Any] = field(default_factory=dict)
    inference: dict[str, Any] = field(default_factory=dict)
    train_patch: list[int] = field(default_factory=lambda: [64, 64, 64])
    iterations: int = 3000
    batch_size: int = 2
    learning_rate: float = 2e-3
    validate_every: int = 500
    seed: int = 0
    ensemble_seeds: list[int] | None = None
    member_iterations: int | None = None
    threads: int | None = None
    command: str = ""
    compare_with: list[str] = field(default_factory=list)
    """Models (names or card paths) whose validation Dice the card records beside its own, e.g. the
    plain U-Net beside the EU-Net; each must have been validated on the same cases."""

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        data = read_json_object(path, "training configuration", "fix it")
        try:
            return cls(**data)
        except TypeError as exc:
            raise SegXAIError(f"invalid training configuration {path}: {exc}") from None

    def iterations_for(self, member: int) -> int:
        """Training steps of ensemble member ``member`` (extra members may train shorter)."""
        return self.iterations if member == 0 or not self.member_iterations else self.member_iterations

    @property
    def seeds(self) -> list[int]:
        """One network per seed; several seeds make a deep ensemble (the first is the default member)."""
        return list(self.ensemble_seeds) if self.ensemble_seeds else [self.seed]

    def card(self, validation: dict[str, Any] | None = None) -> ModelCard:
        out = Path(self.out)
        weights = [out.stem + ".safetensors"] + [f"{out.stem}-seed{s}.safetensors" for s in self.seeds[1:]]
        return ModelCard.from_dict({
            "name": self.name, "description": self.description, "architecture": self.architecture,
            "input": {"channels": self.input_channels, "modality": self.modality}, "classes": self.classes,
            "groups": self.groups, "default_target": self.default_target, "preprocessing": self.preprocessing,
            "postprocessing": self.postprocessing, "inference": self.inference, "patch_size": self.patch_size,
            "weights": weights[0] if len(weights) == 1 else weights, "validation": validation or {},
            "intended_use": self.intended_use, "limitations": self.limitations,
        }, root=out.parent)


# --------------------------------------------------------------------- data
def synthesize_dataset(hosts: Sequence[str], seeds: Iterable[int], out: Path, progress: Progress | None = None,
                       host_scale: tuple[float, float] | None = None, host_blur: float | None = None,
                       host_noise: float | None = None) -> list[Path]:
    """Write one lesion case per seed, cycling through the sample ``hosts``; returns the case folders.

    ``host_scale`` (low, high): each case's host is first shrunk or grown by a factor drawn from the
    seed (its voxel spacing scaled), so that the model also sees smaller and larger heads than the
    two human hosts; lesion sizes stay those of an adult brain (``brain_scale=1``), so a shrunken
    head holds a lesion that is large for it.

    ``host_blur`` (mm) and ``host_noise`` (std / tissue level): each case's host is then degraded
    (:func:`~SegXAILib.data.degrade.degrade`) by a blur of FWHM and Rician noise drawn from the seed
    between 0 and these, *before* the lesion is drawn: a blurrier or noisier head than the templates,
    holding a lesion as sharp as the generator draws it, as another scanner shows one. The lesion's
    place and labels are those of the undegraded host (same seed, same brain mask).
    """
    from .data.brain_mask import estimate_brain_mask
    from .data.degrade import degrade
    from .data.lesion import synthesize_lesion, write_case
    from .data.samples import load_host

    for name, value in (("--host-blur", host_blur), ("--host-noise", host_noise)):
        if value is not None and not value >= 0:
            raise SegXAIError(f"{name} must be a number >= 0 (the largest degradation drawn), got {value}")
    progress = progress or Progress()
    volumes = {name: load_host(name) for name in hosts}
    masks = {name: estimate_brain_mask(v) for name, v in volumes.items()}
    seeds = list(seeds)
    written = []
    for n, seed in enumerate(seeds):
        host = hosts[seed % len(hosts)]
        folder = Path(out) / f"{host}_{seed:05d}"
        if not (folder / "label.nii.gz").exists():
            volume = volumes[host]
            if host_scale is not None:
                factor = np.random.default_rng([seed, 1]).uniform(*host_scale)
                volume = Volume(volume.array, volume.spacing * factor, volume.origin * factor, volume.direction)
            strengths = np.random.default_rng([seed, 2]).uniform(0.0, 1.0, 2)
            if host_blur:
                volume = degrade(volume, "blur", strengths[0] * host_blur)
            if host_noise:
                volume = degrade(volume, "noise", strengths[1] * host_noise, seed=seed)
            write_case(synthesize_lesion(volume, seed=seed, brain_mask=masks[host], brain_scale=1.0), folder)
        written.append(folder)
        progress.update("synthesize", (n + 1) / len(seeds), folder.name)
    return written


def case_folders(root: str | Path) -> list[Path]:
    folders = sorted(p.parent for p in Path(root).glob("*/label.*"))
    if not folders:
        raise SegXAIError(f"no cases found in {root}: expected sub-folders holding image.<ext> and label.<ext>")
    return folders


def _case_file(folder: Path, stem: str) -> Path:
    found = sorted(folder.glob(f"{stem}.*"))
    if not found:
        raise SegXAIError(f"case {folder} has no {stem} file")
    return found[0]


def load_case(folder: Path, card: ModelCard) -> np.ndarray:
    """One case on the model grid: [preprocessed image, channel-index labels], shape (2, D, H, W)."""
    scan = read_volume(_case_file(folder, "image"))
    label = read_volume(_case_file(folder, "label"))
    unknown = set(np.unique(label.array).tolist()) - {c.label for c in card.classes}
    if unknown:
        raise SegXAIError(f"case {folder} has label values {sorted(unknown)} that the card's classes do not list")
    grid = preprocess(scan, card.preprocessing)
    on_grid = resample_to_grid(label, grid, interpolation="nearest").array
    lookup = np.zeros(int(max(c.label for c in card.classes)) + 1, dtype=np.int64)
    for channel, c in enumerate(card.classes):
        lookup[c.label] = channel
    return np.stack([grid.array, lookup[on_grid].astype(np.float32)])


def load_training_arrays(folders: list[Path], card: ModelCard, progress: Progress, stage: str) -> list[np.ndarray]:
    """Model-grid arrays of many cases, cached beside each case (keyed by the preprocessing).

    Preprocessing a 1 mm brain takes seconds; the cache makes a second training run start at once.
    """
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    from .fileio import atomic_write

    key = hashlib.sha1(json.dumps([card.preprocessing, [c.label for c in card.classes]],
                                  sort_keys=True).encode()).hexdigest()[:12]

    def load(folder: Path) -> np.ndarray:
        cache = folder / f".model-grid-{key}.npy"
        if cache.exists():
            return np.load(cache)
        array = load_case(folder, card)
        atomic_write(cache, lambda tmp: np.save(tmp, array), suffix=".npy")  # runs may share a cache
        return array

    arrays = []
    with ThreadPoolExecutor(max_workers=2) as pool:  # SimpleITK releases the GIL while resampling
        for n, array in enumerate(pool.map(load, folders)):
            arrays.append(array)
            progress.update(stage, (n + 1) / len(folders), folders[n].name)
    return arrays


def augmentations(patch: Sequence[int]):
    """MONAI augmentations for one {"image", "label"} dict: crops around lesions, geometry, intensity."""
    from monai import transforms as T

    keys = ["image", "label"]
    return T.Compose([
        T.SpatialPadd(keys, spatial_size=patch),
        T.RandCropByPosNegLabeld(keys, label_key="label", spatial_size=patch, pos=2, neg=1, num_samples=1),
        T.RandFlipd(keys, prob=0.5, spatial_axis=0), T.RandFlipd(keys, prob=0.5, spatial_axis=1),
        T.RandFlipd(keys, prob=0.5, spatial_axis=2),
        # brains of other shapes (their size is normalised by the card's brain_volume_ml)
        T.RandAffined(keys, prob=0.5, rotate_range=(0.3, 0.3, 0.3), scale_range=(0.25, 0.25, 0.25),
                      mode=("bilinear", "nearest"), padding_mode="border"),
        T.RandBiasFieldd("image", prob=0.3, coeff_range=(0.0, 0.3)),
        T.RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5)),
        # monotone but non-linear intensity curves: grey/white contrasts of other scanners and brains
        T.RandHistogramShiftd("image", num_control_points=(5, 10), prob=0.2),
        T.RandScaleIntensityd("image", factors=0.2, prob=0.5),
        T.RandShiftIntensityd("image", offsets=0.3, prob=0.5),
        T.RandGaussianSmoothd("image", prob=0.2, sigma_x=(0.3, 1.0), sigma_y=(0.3, 1.0), sigma_z=(0.3, 1.0)),
        T.RandGaussianNoised("image", prob=0.3, std=0.15),
    ])


# ----------------------------------------------------------------- training
def validation_dice(network: torch.nn.Module, cases: list[np.ndarray], card: ModelCard) -> float:
    """Mean over cases and foreground classes of Dice on the model grid (for choosing checkpoints)."""
    from .inference import sliding_window_predict
    from .metrics import dice

    network.eval()
    scores = []
    with torch.inference_mode():
        for case in cases:
            logits = sliding_window_predict(network, torch.from_numpy(case[:1])[None], card.windows,
                                            torch.device("cpu"))
            predicted = logits.argmax(1)[0].numpy()
            scores += [dice(predicted == c, case[1] == c) for c in range(1, card.n_classes)]
    network.train()
    return float(np.mean(scores))


def train_network(config: TrainConfig, card: ModelCard, train_cases: list[np.ndarray],
                  val_cases: list[np.ndarray], seed: int, iterations: int,
                  progress: Progress) -> tuple[dict, list[dict]]:
    """Train one network; returns the state dict of the best validation checkpoint and the history."""
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    from .models.networks import build_network

    set_determinism(seed)
    network = build_network(card.architecture, card.input_channels, card.n_classes)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.learning_rate,
                                                   total_steps=iterations, pct_start=0.05)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    augment = augmentations(config.train_patch)
    augment.set_random_state(seed)
    rng = np.random.default_rng(seed)

    best_score, best_state, history = -1.0, None, []
    network.train()
    for iteration in range(1, iterations + 1):
        batch = [augment({"image": c[:1], "label": c[1:]})[0]
                 for c in (train_cases[i] for i in rng.integers(len(train_cases), size=config.batch_size))]
        x = torch.stack([torch.as_tensor(np.asarray(b["image"])) for b in batch]).float()
        y = torch.stack([torch.as_tensor(np.asarray(b["label"])) for b in batch]).round()
        optimizer.zero_grad(set_to_none=True)
        outputs = network(x)
        if isinstance(outputs, tuple):  # deep supervision (EU-Nets): (final, per-stage predictions)
            from .models.eunet import deep_supervision_loss

            loss = deep_supervision_loss(outputs, y, loss_fn)
        else:
            loss = loss_fn(outputs, y)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.update(f"train seed {seed}", iteration / iterations, f"loss {loss.item():.3f}")
        if iteration % config.validate_every == 0 or iteration == iterations:
            score = validation_dice(network, val_cases, card)
            history.append({"iteration": iteration, "loss": round(loss.item(), 4), "val_dice": round(score, 4)})
            if score > best_score:
                best_score = score
                best_state = {k: v.detach().clone().contiguous() for k, v in network.state_dict().items()}
    return best_state, history


def train(config: TrainConfig, progress: Progress | None = None, evaluate_only: bool = False) -> Path:
    """Train one network per seed, evaluate the first on the scans' grids, write weights + card.

    With ``evaluate_only`` the weights the configuration names must exist: they are evaluated and the
    card written, nothing is trained (e.g. after changing the validation cases or the preprocessing).
    """
    from safetensors.torch import save_file

    from .fileio import atomic_write

    progress = progress or Progress()
    if config.threads:
        torch.set_num_threads(config.threads)
    card = config.card()
    train_folders, val_folders = case_folders(config.train_dir), case_folders(config.val_dir)
    if evaluate_only:
        missing = [str(path) for path in card.weight_paths if not path.is_file()]
        if missing:
            raise SegXAIError(f"--evaluate-only needs the trained weights, missing: {', '.join(missing)}; "
                              "train without --evaluate-only first")
        return write_evaluated_card(config, card, val_folders, len(train_folders), progress, _recorded_run(config.out))

    train_cases = load_training_arrays(train_folders, card, progress, "load training cases")
    val_cases = load_training_arrays(val_folders, card, progress, "load validation cases")
    start = time.perf_counter()
    histories = {}
    for member, (seed, weights) in enumerate(zip(config.seeds, card.weight_paths)):
        state, histories[seed] = train_network(config, card, train_cases, val_cases, seed,
                                               config.iterations_for(member), progress)
        atomic_write(weights, lambda tmp: save_file(state, str(tmp)), suffix=".safetensors")
    run = {"seconds": round(time.perf_counter() - start), "history": histories}
    return write_evaluated_card(config, card, val_folders, len(train_folders), progress, run)


def _recorded_run(card_path: str | Path) -> dict[str, Any] | None:
    """``seconds`` and ``history`` of the run an existing card records (kept when only evaluating again)."""
    if not Path(card_path).is_file():
        return None
    training = ModelCard.load(card_path).validation.get("training", {})
    run = {key: training[key] for key in ("seconds", "history") if key in training}
    return {**run, "note": "figures from 'segxai train --evaluate-only', after the training run recorded here"} \
        if run else None


def write_evaluated_card(config: TrainConfig, card: ModelCard, val_folders: list[Path], train_cases: int,
                         progress: Progress, run: dict[str, Any] | None = None) -> Path:
    """Evaluate the card's first weights on the validation cases; write the card with the figures.

    ``run``: ``seconds`` and ``history`` of the training run that made the weights (None when they are
    unknown: the card then says so).
    """
    from .models.loaders import load_from_card

    model = load_from_card(card)
    per_case, mean_sa = [], []
    for n, folder in enumerate(val_folders):
        dice_scores, case_mean_sa = evaluate_case(model, folder)
        per_case.append(dice_scores)
        mean_sa.append(case_mean_sa)
        progress.update("evaluate", (n + 1) / len(val_folders), folder.name)
    card.review = review_calibration(per_case, mean_sa, card)
    training = {"cases": train_cases, "seeds": config.seeds,
                "iterations": [config.iterations_for(m) for m in range(len(config.seeds))],
                "batch_size": config.batch_size, "train_patch": config.train_patch,
                "threads": torch.get_num_threads(), "command": config.command}
    training.update(run if run is not None else
                    {"note": "evaluated by 'segxai train --evaluate-only': the training run's time and "
                             "validation history were not recorded"})
    card.validation = {
        "dice": {k: round(float(np.mean([c[k] for c in per_case])), 4) for k in per_case[0]},
        "dice_std": {k: round(float(np.std([c[k] for c in per_case])), 4) for k in per_case[0]},
        "cases": len(val_folders),
        "val_dir": str(config.val_dir),
        "evaluated_on": "first ensemble member; the scans' own grids, full inference pipeline",
        "training": training,
    }
    if config.compare_with:
        card.validation["compared_with"] = compared_dice(config, len(val_folders))
    return card.save(config.out)


def compared_dice(config: TrainConfig, cases: int) -> dict[str, dict[str, float]]:
    """The validation Dice of each model of ``config.compare_with``, by model name.

    Raises:
        SegXAIError: a model was validated on other cases (another folder or count): its figures
            would not compare.
    """
    from .models.registry import resolve_card

    compared = {}
    for spec in config.compare_with:
        other = resolve_card(spec)
        theirs = other.validation
        if theirs.get("val_dir") != str(config.val_dir) or theirs.get("cases") != cases:
            raise SegXAIError(f"model {other.name!r} was validated on {theirs.get('cases')} cases in "
                              f"{theirs.get('val_dir')!r}, this run on {cases} in {str(config.val_dir)!r}: their Dice "
                              "would not compare; evaluate it on the same cases or drop it from 'compare_with'")
        compared[other.name] = theirs["dice"]
    return compared


def evaluate_case(model, folder: Path) -> tuple[dict[str, float], float]:
    """Dice per class and group of ``model`` on one case, on the scan's own grid, and the case's
    mean SA mu (ProtoSeg, default target), the label-free score that :func:`review_calibration` calibrates."""
    from .explain.pipeline import explain_segmentation
    from .inference import segment
    from .methods import get_explainer
    from .metrics import dice_per_target

    scan = read_volume(_case_file(folder, "image"))  # segment() preprocesses it: no load_case here
    label = read_volume(_case_file(folder, "label"))
    cpu = torch.device("cpu")
    run = explain_segmentation(segment(scan, model, cpu), model, [get_explainer("protoseg")], None, cpu)
    return dice_per_target(run.segmentation.labels.array, label.array, model.card), \
        float(run.explanations[0].scalars["mean_sa"])


GOOD_CASE_DICE = 0.7
"""Validation cases segmented at least this well (Dice of the default target) calibrate the review threshold."""

REVIEW_PERCENTILE = 5.0
"""A case whose mean SA is below this percentile of the good validation cases' is flagged for review."""


def review_calibration(dice_per_case: list[dict[str, float]], mean_sa: list[float], card: ModelCard
                       ) -> dict[str, Any]:
    """The card's ``review`` thresholds from its validation cases ({} when fewer than 5 are good).

    Mean SA's scale depends on the network (our U-Nets: about 0.1-0.3 on good segmentations), so a
    fixed threshold would flag every case of one model and none of another.
    """
    target, _ = card.target_channels(None)
    good = [mu for scores, mu in zip(dice_per_case, mean_sa)
            if scores.get(target, 0.0) >= GOOD_CASE_DICE and np.isfinite(mu)]
    if len(good) < 5:
        return {}
    return {"mean_sa_below": round(float(np.percentile(good, REVIEW_PERCENTILE)), 4),
            "basis": f"{REVIEW_PERCENTILE:g}th percentile of mean SA on the {len(good)} of {len(mean_sa)} "
                     f"validation cases with {target} Dice >= {GOOD_CASE_DICE}"}
