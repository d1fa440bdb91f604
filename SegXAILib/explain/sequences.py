"""Which input sequence drove the segmentation (METHODS.md section 9), for a model that reads several scans at
once (input channels, e.g. BraTS's T1c, T1, T2 and FLAIR), measured two ways for the target:

- Hiding one sequence (channel occlusion): every voxel of sequence k inside the head is set to that sequence's
  mean inside the head, the other sequences are left as they are, and the network runs once on the result.
  Recorded: the drop of the target score S (:mod:`.targets`: the target's log-odds summed over its predicted
  region R; ``occlusion_logit_drop``, positive when hiding the sequence lowers the model's confidence) and the
  Dice between the target's mask with the sequence hidden and its mask without (``occlusion_dice``; 1: the
  sequence does not change the outline). ``occlusion_share`` is each sequence's part of the positive drops
  (a sequence whose hiding raises S counts 0; all 0 when none lowers it).
  Why the mean inside the head: it removes the sequence's contrast (what tells tissues apart) but keeps an
  intensity the model saw in training; a whole channel at one value (the head's outline removed too) is unlike
  any training scan, and a network with instance normalisation divides it by a standard deviation near 0. The
  head is the sequence's foreground (above its Otsu threshold, :func:`SegXAILib.preprocessing.foreground_mask`,
  holes filled), on the whole model grid.
- Integrated gradients summed per sequence: the attributions of integrated gradients
  (:mod:`.integrated_gradients`, the same integral :func:`.blackbox.path_integral`, quadratic rule) from a blank
  scan, each sequence at its own no-signal level (:func:`SegXAILib.preprocessing.no_signal_level`; each sequence
  is normalised on its own, so one level for all would count a sequence's air as signal), summed over the
  crop's voxels of each sequence: ``ig_sum`` (signed, log-odds; all of them add up to about S(X) - S(blank),
  reported by ``ig_relative_gap``) and ``ig_share``, each sequence's part of the total |attribution| (they sum
  to 1).

Both run on R's crop in the card's sliding windows (:mod:`.blackbox`); both masks of the Dice come from passes
on that same crop, so a sequence that does not matter gives exactly 1. Cost: one forward pass of the crop per
sequence plus one for the scan (``batch`` per pass), and ``steps`` forward and backward passes for integrated
gradients. Needs only the network's output: runs on TorchScript models. Not applicable to a model with one
input channel. Options: ``steps`` [16], ``batch`` [4], ``margin`` [16; null: the whole grid], ``overlap``
[null: the model's own windows].
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from scipy import ndimage

from ..inference import network_probabilities, target_mask
from ..metrics import dice
from ..models.card import ModelCard
from ..models.loaders import LoadedModel
from ..preprocessing import foreground_mask, no_signal_level
from ..progress import part_of
from .base import ExplainContext, Explainer, Explanation, NotApplicable
from .blackbox import CropOptions, CropScorer, chunks, path_integral, predicted_region
from .options import option
from .targets import SCORE_WORDS

IG_RULE = "quadratic"
"""The integration rule (see :mod:`.integrated_gradients`: exact enough with 16 steps on instance-normalised U-Nets)."""


@dataclass(frozen=True)
class SequenceOptions(CropOptions):
    """Options of the sequence attribution (module docstring)."""

    steps: int = option(16, minimum=2)
    batch: int = option(4, minimum=1)


def sequence_names(card: ModelCard, count: int) -> list[str]:
    """The names of the ``count`` input sequences in channel order: the card's, else ``sequence 1`` ...."""
    names = card.sequence_names
    return list(names) if len(names) == count else [f"sequence {n + 1}" for n in range(count)]


def head_and_mean(sequence: np.ndarray) -> tuple[np.ndarray, float]:
    """The head in one sequence (D, H, W): its foreground, holes filled (bool (D, H, W); the whole grid for a
    blank sequence), and the sequence's mean inside it."""
    head = ndimage.binary_fill_holes(foreground_mask(sequence))
    if not head.any():
        head = np.ones(sequence.shape, bool)
    return head, float(sequence[head].mean())


def hidden(image: torch.Tensor, sequences: Sequence[int | None], heads: np.ndarray,
           means: Sequence[float]) -> torch.Tensor:
    """Copies of (1, C, *S) ``image``, one per entry of ``sequences``: sequence k's voxels inside its head
    (``heads``, bool (C, *S)) set to ``means[k]``; ``None``: the image as it is. Returns (len(sequences), C, *S)."""
    copies = image.repeat(len(sequences), *[1] * (image.ndim - 1))
    for n, k in enumerate(sequences):
        if k is not None:
            copies[n, k][torch.from_numpy(heads[k])] = means[k]
    return copies


def shares(values: np.ndarray) -> np.ndarray:
    """Non-negative ``values`` as fractions of their sum (0 everywhere when the sum is 0)."""
    total = float(values.sum())
    return values / total if total > 0 else np.zeros_like(values)


class SequenceAttribution(Explainer):
    """Each input sequence's part in the segmentation of the target: hidden one at a time, and integrated gradients
    summed per sequence."""

    name: ClassVar[str] = "sequences"
    Options = SequenceOptions
    needs_hooks: ClassVar[bool] = False
    summary: ClassVar[str] = ("Sequences: which input scan (e.g. T1c, T2, FLAIR) the model relied on for the target, "
                              "by hiding each one and by integrated gradients (models with several input scans; "
                              "options: steps, margin)")

    def check_applicable(self, model: LoadedModel) -> None:
        super().check_applicable(model)
        if model.card.input_channels < 2:
            raise NotApplicable("sequences needs a model with several input sequences (scans read together, "
                                "e.g. T1c, T2 and FLAIR); this model reads one")

    def explain(self, context: ExplainContext) -> Explanation:
        start = time.perf_counter()
        options: SequenceOptions = context.options_for(self)
        count = context.image.shape[1]
        if count < 2:
            raise NotApplicable("sequences needs a model with several input sequences; this scan has one")
        names = sequence_names(context.model.card, count)
        region = predicted_region(context, self.name)
        scorer = CropScorer(context, region, options.margin, options.overlap, options.batch, options.window)
        image = context.image[0].numpy()
        heads, means = zip(*(head_and_mean(sequence) for sequence in image))
        crop_heads = np.stack(heads)[(slice(None), *scorer.crop.slices)]

        occlusion = part_of(context.progress, 0, 2)
        copies: list[int | None] = [None, *range(count)]
        scores: list[float] = []
        masks: list[np.ndarray] = []
        for part in chunks(len(copies), options.batch):
            occlusion.update(self.name, part.start / len(copies), "hiding each sequence in turn")
            output = scorer.outputs(hidden(scorer.image, copies[part.start:part.stop], crop_heads, means))
            scores += scorer.scores_of(output).tolist()
            masks += [target_mask(p, context.channels) for p in network_probabilities(output, scorer.kind)]
        drops = scores[0] - np.array(scores[1:])
        dices = [dice(mask, masks[0]) for mask in masks[1:]]

        levels = torch.tensor([no_signal_level(sequence) for sequence in image], dtype=torch.float32)
        baseline = levels.view(1, count, *[1] * (scorer.image.ndim - 2)).expand_as(scorer.image).contiguous()
        path = path_integral(scorer, baseline, options.steps, IG_RULE, part_of(context.progress, 1, 2), self.name)
        context.progress.update(self.name, 1.0, "done")
        sums = path.attribution.astype(np.float64).reshape(count, -1).sum(1)
        sizes = np.abs(path.attribution.astype(np.float64)).reshape(count, -1).sum(1)

        per_sequence = {"occlusion_logit_drop": drops, "occlusion_dice": dices,
                        "occlusion_share": shares(np.maximum(drops, 0)), "ig_sum": sums, "ig_share": shares(sizes)}
        scalars = {"score": scores[0], "ig_relative_gap": path.completeness()["relative_gap"]}
        scalars |= {f"{key}.{name}": float(value) for key, values in per_sequence.items()
                    for name, value in zip(names, values)}
        metadata: dict[str, Any] = {
            **scorer.metadata(), "sequences": names,
            "description": (f"Which input scan the model relied on for {context.target}. Hiding a scan (its voxels "
                            "inside the head set to its mean there): occlusion_logit_drop is how much the model's "
                            f"confidence ({SCORE_WORDS} summed over the segmented region) falls, occlusion_dice "
                            "how much of the outline stays (1: unchanged), occlusion_share each scan's part of the "
                            "falls. Integrated gradients from blank scans: ig_sum each scan's signed contribution "
                            "to the confidence, ig_share its part of all contributions (they add up to 1)."),
            "head": {name: {"voxels": int(head.sum()), "mean": mean} for name, head, mean in zip(names, heads, means)},
            "baseline": dict(zip(names, levels.tolist())), "score_with_sequence_hidden": dict(zip(names, scores[1:])),
            "integrated_gradients": {"rule": IG_RULE, "baseline_score": path.baseline_score,
                                     "path_scores": path.path_scores, **path.completeness()},
            "parameters": {"steps": options.steps, "batch": options.batch, "margin": options.margin,
                           "overlap": options.overlap},
            "seconds": time.perf_counter() - start}
        return Explanation(self.name, scalars=scalars, metadata=metadata)
