"""Uncertainty from several predictions of one scan: MC dropout, test-time augmentation, ensembles.

The three explainers share :class:`SampledUncertainty`, which draws T probability maps, feeds them
one at a time into an :class:`~.measures.UncertaintyAccumulator` (T samples of a large scan are
never held together) and returns the entropy, variance and mutual-information maps with their
means inside and far from the predicted object. A subclass only says how many samples there are
and how the t-th one is produced:

- :class:`MCDropoutUncertainty`: the model's dropout layers stay on (and nothing else changes),
  one seeded draw of dropout masks per sample;
- :class:`TTAUncertainty`: the scan flipped and rotated by 90 degrees (:func:`augment`), predicted, and mapped
  back exactly (:func:`invert`); by default a model's own test-time mirroring where it has one (nnU-Net's, then
  inside each of its windows);
- :class:`EnsembleUncertainty`: one sample per weights file listed in the model card (an nnU-Net model's folds).

Every sample is a full sliding-window prediction over the scan with the card's patch size,
exactly as the segmentation itself is computed.
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from ..explain.base import ExplainContext, Explainer, Explanation, ExplanationMap, NotApplicable
from ..explain.options import MethodOptions, option
from ..inference import network_probabilities, sliding_window_predict
from ..models.card import Windows
from ..models.loaders import LoadedModel
from ..progress import Progress
from ..symmetries import AXIAL, FlipRotate, augment, flip_rotate_transforms, invert, mirrorings
from .measures import UncertaintyAccumulator

DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def predict_softmax(network: nn.Module, image: torch.Tensor, windows: Windows,
                    device: torch.device, progress: Progress, stage: str, output: str = "logits") -> torch.Tensor:
    """Softmax of (1, C, D, H, W) ``image`` in the model's sliding ``windows``: (n_classes, D, H, W) float32 on the
    CPU (``output``: what the network returns, the card's ``output``; probabilities are taken as they are)."""
    with torch.inference_mode():
        logits = sliding_window_predict(network, image, windows, device, progress=progress, stage=stage)
        return network_probabilities(logits, output)[0]


@dataclass(frozen=True)
class SampledOptions(MethodOptions):
    """Options shared by every sampled method.

    margin: voxels (model grid) by which the predicted object is dilated before "far from the object"
    begins, for the ``*_outside`` scalars.
    """

    margin: int = option(3, minimum=0)


class SampledUncertainty(Explainer):
    """Uncertainty maps from T probability samples; subclasses define the samples.

    Options: a subclass of :class:`SampledOptions` (``margin``, and the subclass's own).

    Subclasses implement :meth:`sample_count` and :meth:`sample`, and may wrap the sampling loop
    in :meth:`sampling` (set-up and guaranteed tear-down, e.g. switching dropout on and off).
    """

    needs_hooks: ClassVar[bool] = False
    source: ClassVar[str] = "samples"
    """What the samples are, in words for the map descriptions ("dropout samples")."""

    @abstractmethod
    def sample_count(self, context: ExplainContext, options: SampledOptions) -> int:
        """Number of samples T (>= 2: a variance needs two)."""

    @contextlib.contextmanager
    def sampling(self, context: ExplainContext, options: SampledOptions) -> Iterator[None]:
        """Context around the whole sampling loop; nothing by default."""
        yield

    @abstractmethod
    def sample(self, t: int, context: ExplainContext, options: SampledOptions, progress: Progress) -> torch.Tensor:
        """The t-th probability sample, (n_classes, D, H, W) float32 on the model grid."""

    def metadata(self, context: ExplainContext, options: SampledOptions) -> dict[str, Any]:
        """Method-specific facts for the report (seed, transforms, members)."""
        return {}

    def explain(self, context: ExplainContext) -> Explanation:
        self.check_applicable(context.model)
        options: SampledOptions = context.options_for(self)
        count = self.sample_count(context, options)
        margin = options.margin
        accumulator = UncertaintyAccumulator(context.channels)
        with self.sampling(context, options):
            for t in range(count):
                # window progress of sample t, rescaled into the method's overall bar (and its cancel flag)
                sub = Progress(lambda stage, fraction, message, t=t: context.progress.update(
                    self.name, (t + fraction) / count, f"sample {t + 1}/{count}: {message}"),
                    context.progress.cancel_event)
                accumulator.add(self.sample(t, context, options, sub).numpy())
        context.progress.update(self.name, 1.0, f"{count} samples")
        maps = accumulator.maps()

        inside = context.predicted_mask
        # 6-connected dilation, `margin` times: "far" = more than `margin` face steps from the object
        # (scipy reads iterations=0 as "dilate until nothing changes", hence the guard)
        far = ~ndimage.binary_dilation(inside, iterations=margin) if margin else ~inside
        scalars: dict[str, float] = {"samples": float(count)}
        for key, array in maps.items():
            if inside.any():
                scalars[f"{key}_inside"] = float(array[inside].mean())
            if far.any():
                scalars[f"{key}_outside"] = float(array[far].mean())

        n_classes = context.probabilities.shape[0]
        descriptions = {
            "entropy": f"Predictive entropy of the mean of {count} {self.source}, over all classes, in nats: "
                       f"0 = certain, {np.log(n_classes):.2f} (= log {n_classes}) = no idea which class",
            "variance": f"Variance of the probability of {context.target} across {count} {self.source}: "
                        "0 = they agree, 0.25 = half say certainly yes, half certainly no",
            "mutual_information": f"Mutual information (BALD) in nats: the part of the entropy that comes from "
                                  f"the {count} {self.source} disagreeing (model uncertainty); 0 = they agree",
        }
        return Explanation(
            method=self.name,
            maps=[ExplanationMap(self.name, maps[key], key, descriptions[key], colormap="viridis", normalise=False)
                  for key in ("entropy", "variance", "mutual_information")],
            scalars=scalars,
            metadata={"samples": count, "margin_voxels": margin, "source": self.source,
                      **self.metadata(context, options)})


# --------------------------------------------------------------------------- MC dropout
@dataclass(frozen=True)
class MCDropoutOptions(SampledOptions):
    """samples: T (a variance needs two); seed: of the first sample's dropout masks."""

    samples: int = option(8, minimum=2)
    seed: int = option(0, minimum=0)


class MCDropoutUncertainty(SampledUncertainty):
    """Monte Carlo dropout: T predictions with the dropout layers switched on.

    Only dropout modules go to train mode; normalisation layers stay in eval mode (train-mode batch
    norm would use the statistics of each window and update its running statistics). Sample t
    draws its masks from ``torch.manual_seed(seed + t)`` inside a forked RNG, so runs are
    reproducible on one device and the caller's random state is left untouched.

    Options: ``samples`` (T, default 8), ``seed`` (default 0), ``margin``.
    """

    name = "mcdropout"
    Options = MCDropoutOptions
    needs_hooks = True
    summary = "MC dropout: entropy, variance and mutual information over T predictions with dropout on"
    source = "dropout samples"

    @staticmethod
    def dropout_modules(network: nn.Module) -> list[nn.Module]:
        return [m for m in network.modules() if isinstance(m, DROPOUT_TYPES)]

    def check_applicable(self, model: LoadedModel) -> None:
        super().check_applicable(model)
        layers = self.dropout_modules(model.network)
        if not any(m.p > 0 for m in layers):
            found = f"its {len(layers)} dropout layers all have p=0" if layers else "it has no dropout layers"
            raise NotApplicable(f"MC dropout needs a model trained with dropout, and {model.card.name!r} is not "
                                f"({found}); use a dropout-trained model (architecture argument 'dropout' > 0, "
                                "e.g. 0.1) or the 'tta' or 'ensemble' methods")

    def sample_count(self, context: ExplainContext, options: MCDropoutOptions) -> int:
        return options.samples

    @contextlib.contextmanager
    def sampling(self, context: ExplainContext, options: MCDropoutOptions) -> Iterator[None]:
        network = context.model.network
        modes = [(m, m.training) for m in network.modules()]
        try:
            network.eval()
            for m in self.dropout_modules(network):
                m.train()
            yield
        finally:
            for m, mode in modes:
                m.training = mode

    def sample(self, t: int, context: ExplainContext, options: MCDropoutOptions, progress: Progress) -> torch.Tensor:
        device = context.device
        fork = torch.random.fork_rng(devices=[]) if device.type == "cpu" else torch.random.fork_rng(
            device_type=device.type)
        with fork:
            torch.manual_seed(options.seed + t)
            return predict_softmax(context.model.network, context.image, context.model.card.windows,
                                   device, progress, self.name, context.model.card.output)

    def metadata(self, context: ExplainContext, options: MCDropoutOptions) -> dict[str, Any]:
        rates = sorted({m.p for m in self.dropout_modules(context.model.network) if m.p > 0})
        return {"seed": options.seed, "dropout_rates": rates}


# --------------------------------------------------------------------------- test-time augmentation
def mirrored_logits(network: nn.Module, image: torch.Tensor, flips: tuple[int, ...], windows: Windows,
                    device: torch.device, progress: Progress, stage: str) -> torch.Tensor:
    """The network's output for (1, C, D, H, W) ``image`` mirrored along the spatial axes ``flips`` and mirrored
    back, window by window as nnU-Net's predictor mirrors (each window flipped, predicted, flipped back: the windows
    stay where they are): (1, n_classes, D, H, W) on the CPU."""
    dims = [axis + 2 for axis in flips]

    def flipped(window: torch.Tensor) -> torch.Tensor:
        return torch.flip(network(torch.flip(window, dims)), dims)

    with torch.inference_mode():
        return sliding_window_predict(flipped, image, windows, device, progress=progress, stage=stage)


@dataclass(frozen=True)
class TTAOptions(SampledOptions):
    """transforms: T, the first T of :func:`~SegXAILib.symmetries.flip_rotate_transforms`, or null: an nnU-Net
    model's own test-time mirroring (the axes its checkpoint allows), else 8; plane: the rotation plane as two
    spatial axes."""

    transforms: int | None = option(None, check=lambda v: 2 <= v <= 16, must="an integer from 2 to 16")
    plane: tuple[int, int] = option(AXIAL, check=lambda v: len(set(v)) == 2 and set(v) <= {0, 1, 2},
                                    must="two different spatial axes among 0, 1, 2, e.g. 1,2")


DEFAULT_TTA_TRANSFORMS = 8


class TTAUncertainty(SampledUncertainty):
    """Test-time augmentation: predictions on flipped and rotated copies, mapped back exactly.

    Options: ``transforms`` (T, 2..16; see :func:`flip_rotate_transforms`; by default an nnU-Net model's own
    test-time mirroring, else 8), ``plane``
    (the rotation plane as two spatial axes, default ``(1, 2)``, the axial plane of a RAS grid) and ``margin``.
    Each transform is applied to the whole grid, and the patch size turns with it, so windows keep their extent
    along each anatomical axis; in nnU-Net's windows a flip is applied inside each window instead
    (:func:`mirrored_logits`), as nnU-Net mirrors.
    Only exact symmetries (no interpolation): a network that is equivariant to them gives zero uncertainty.
    """

    name = "tta"
    Options = TTAOptions
    summary = "Test-time augmentation (flips, 90-degree rotations): entropy, variance, mutual information"
    source = "augmented predictions"

    def transforms(self, options: TTAOptions, model: LoadedModel) -> list[FlipRotate]:
        own = model.card.inference.get("mirror_axes") if model.route == "nnunet" else None
        if options.transforms is None and own:
            return mirrorings(own)
        return flip_rotate_transforms(options.transforms or DEFAULT_TTA_TRANSFORMS, options.plane)

    def sample_count(self, context: ExplainContext, options: TTAOptions) -> int:
        return len(self.transforms(options, context.model))

    def sample(self, t: int, context: ExplainContext, options: TTAOptions, progress: Progress) -> torch.Tensor:
        model = context.model
        transform = self.transforms(options, model)[t]
        windows, output = model.card.windows, model.card.output
        if not transform.flips and not transform.k and model.route != "nnunet":
            # the identity's prediction is the segmentation's own (same network, image, windows and blending; not
            # so for nnU-Net's, which averages its mirror images and folds): one sliding-window pass less
            return torch.from_numpy(np.asarray(context.probabilities, dtype=np.float32))
        if not transform.k and windows.placement == "nnunet":  # nnU-Net mirrors inside each of its windows
            logits = mirrored_logits(model.network, context.image, transform.flips, windows, context.device,
                                     progress, self.name)
            return network_probabilities(logits, output)[0]
        patch = list(model.card.patch_size)
        if transform.k % 2:
            a, b = transform.plane
            patch[a], patch[b] = patch[b], patch[a]
        probs = predict_softmax(model.network, augment(context.image, transform), windows.adjusted(size=patch),
                                context.device, progress, self.name, output)
        return invert(probs, transform)

    def metadata(self, context: ExplainContext, options: TTAOptions) -> dict[str, Any]:
        return {"transforms": [t.name for t in self.transforms(options, context.model)]}


# --------------------------------------------------------------------------- deep ensemble
class EnsembleUncertainty(SampledUncertainty):
    """Deep ensemble: one prediction per weights file listed in the model card (same architecture).

    Members are loaded one at a time (:meth:`~SegXAILib.models.loaders.LoadedModel.member`: an nnU-Net model's
    members are its folds) and freed
    after their prediction, so memory holds one network besides the model itself.
    """

    name = "ensemble"
    Options = SampledOptions
    summary = "Deep ensemble (several weights files of one architecture): entropy, variance, mutual information"
    source = "ensemble members"

    def check_applicable(self, model: LoadedModel) -> None:
        super().check_applicable(model)
        if model.route == "bundle":
            raise NotApplicable("deep ensembles are loaded from a model card; write a card for the bundle's "
                                "architecture whose 'weights' entry lists every member's weights file")
        if len(model.card.weight_paths) < 2 and model.route == "nnunet":
            raise NotApplicable(f"nnU-Net model {model.card.name!r} has one trained fold, and its fold ensemble needs "
                                "several: train the other folds (nnUNetv2_train DATASET CONFIGURATION 1, 2 ...) into "
                                "the same folder")
        if len(model.card.weight_paths) < 2:
            raise NotApplicable(f"model card {model.card.name!r} lists a single weights file, and a deep ensemble "
                                "needs several trained copies of the same architecture: list them all in the "
                                "card's 'weights' entry, e.g. \"weights\": [\"member1.safetensors\", "
                                "\"member2.safetensors\", \"member3.safetensors\"]")

    def sample_count(self, context: ExplainContext, options: SampledOptions) -> int:
        return len(context.model.card.weight_paths)

    def sample(self, t: int, context: ExplainContext, options: SampledOptions, progress: Progress) -> torch.Tensor:
        member = context.model.member(t).to(context.device)
        return predict_softmax(member, context.image, context.model.card.windows, context.device,
                               progress, self.name, context.model.card.output)

    def metadata(self, context: ExplainContext, options: SampledOptions) -> dict[str, Any]:
        root = context.model.card.root
        return {"members": [str(p.relative_to(root)) if root and p.is_relative_to(root) else p.name
                            for p in context.model.card.weight_paths]}
