"""Which input sequence drove the segmentation (explain/sequences.py): on networks that read one known sequence,
against a hand computation of the hidden-sequence passes, against integrated gradients, and under a permutation of
the sequences."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet
from torch import nn

from SegXAILib.errors import SegXAIError
from SegXAILib.explain.base import NotApplicable
from SegXAILib.explain.integrated_gradients import IntegratedGradients
from SegXAILib.explain.sequences import SequenceAttribution
from SegXAILib.explain.targets import target_scores
from SegXAILib.inference import target_mask
from SegXAILib.methods import check_options, get_explainer
from SegXAILib.metrics import dice
from SegXAILib.models.loaders import LoadedModel

from .conftest import explain_context

NAMES = ["T1c", "T1", "T2", "FLAIR"]
SHAPE = (16, 16, 16)


def head_and_tumour() -> tuple[np.ndarray, np.ndarray]:
    """A ball-shaped head (bool SHAPE) and an off-centre tumour inside it (bool SHAPE)."""
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij")
    head = k**2 + j**2 + i**2 < 0.8
    tumour = (k - 0.25) ** 2 + (j + 0.2) ** 2 + i**2 < 0.12
    return head, tumour


def four_sequences(seed=0) -> torch.Tensor:
    """(1, 4, *SHAPE): air 0, tissue 0.8-1.2 in every sequence; the tumour bright (+2) in T1c and T2, dark in FLAIR."""
    head, tumour = head_and_tumour()
    rng = np.random.default_rng(seed)
    sequences = [head * rng.uniform(0.8, 1.2, SHAPE) for _ in NAMES]
    sequences[0] = sequences[0] + 2.0 * tumour
    sequences[2] = sequences[2] + 2.0 * tumour
    sequences[3] = sequences[3] - 0.5 * tumour
    return torch.from_numpy(np.stack(sequences).astype(np.float32))[None]


def reading_one_sequence(k: int, count: int = 4) -> nn.Module:
    """A small convolutional network that reads sequence ``k`` only (its first layer's weights are 0 for the
    others): the target (class 1) where the local mean of sequence k is above 2, plus random features of it."""
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv3d(count, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1))
    with torch.no_grad():
        first, last = network[0], network[2]
        others = [c for c in range(count) if c != k]
        first.weight[:, others] = 0
        first.weight[0] = 0
        first.weight[0, k] = 1 / 27  # the local mean of sequence k
        first.bias[0] = 0
        last.weight.mul_(0.1)
        last.weight[1, 0] = 8.0
        last.bias.copy_(torch.tensor([0.0, -16.0]))
    return network.eval()


def with_sequences(context, names):
    """``context`` with a card that reads ``len(names)`` input sequences named ``names`` (None: unnamed)."""
    card = dataclasses.replace(context.model.card, input_channels=context.image.shape[1], sequences=list(names or []))
    context.model = LoadedModel(card, context.model.network, context.model.route)
    return context


def run(network, image, names=NAMES, patch=None, **options):
    context = with_sequences(explain_context(network, image, patch=patch,
                                             options={"sequences": {"margin": None, **options}}), names)
    explainer = SequenceAttribution()
    explainer.check_applicable(context.model)
    return context, explainer.explain(context)


def per_sequence(explanation, key):
    return {name: explanation.scalars[f"{key}.{name}"] for name in explanation.metadata["sequences"]}


# ------------------------------------------------------------------ a network that reads one sequence
@pytest.mark.parametrize("patch", [None, (8, 8, 8)], ids=["one window", "27 sliding windows"])
def test_a_network_reading_only_t2_is_explained_by_t2(patch):
    image = four_sequences()
    context, explanation = run(reading_one_sequence(2), image, patch=patch)
    _, tumour = head_and_tumour()
    assert dice(context.predicted_mask, tumour) > 0.7  # the network segments the tumour, from T2 alone
    ig = per_sequence(explanation, "ig_share")
    assert ig["T2"] > 0.99 and sum(ig.values()) == pytest.approx(1)
    drops, dices = per_sequence(explanation, "occlusion_logit_drop"), per_sequence(explanation, "occlusion_dice")
    score = explanation.scalars["score"]
    for name in ("T1c", "T1", "FLAIR"):  # T1c shows the same tumour, but the network does not read it
        assert abs(drops[name]) <= 1e-6 * abs(score) and dices[name] == 1.0
    assert drops["T2"] > 0.5 * abs(score) and dices["T2"] < 0.1  # hidden T2: the tumour is gone
    assert per_sequence(explanation, "occlusion_share") == {"T1c": 0.0, "T1": 0.0, "T2": 1.0, "FLAIR": 0.0}
    assert explanation.maps == [] and explanation.metadata["sequences"] == NAMES
    # one pass per hidden sequence and one of the scan, then 16 steps of integrated gradients
    assert (explanation.metadata["forward_passes"], explanation.metadata["backward_passes"]) == (5 + 16, 16)


def test_a_torchscript_network_gives_the_same_answer():
    image = four_sequences()
    _, eager = run(reading_one_sequence(2), image)
    _, scripted = run(torch.jit.trace(reading_one_sequence(2), image), image)
    assert scripted.scalars.keys() == eager.scalars.keys()
    np.testing.assert_allclose(list(scripted.scalars.values()), list(eager.scalars.values()), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ against references
def unet(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return UNet(3, 4, 2, channels=(4, 8, 16), strides=(2, 2), norm="BATCH").eval()


def test_hiding_a_sequence_equals_the_hand_computation():
    """Each sequence's voxels inside the head set to its mean there, the network run on the whole grid: the drop
    of the target's summed log-odds and the Dice of the masks, computed here without the explainer."""
    image = four_sequences(seed=1)
    network = unet()
    context, explanation = run(network, image)
    head, _ = head_and_tumour()
    region = torch.from_numpy(context.predicted_mask.astype(np.float32))
    with torch.no_grad():
        score = float(target_scores(network(image), [1], region))
        for k, name in enumerate(NAMES):
            hidden = image.clone()
            hidden[0, k][torch.from_numpy(head)] = float(image[0, k][torch.from_numpy(head)].mean())
            logits = network(hidden)
            assert explanation.metadata["head"][name]["voxels"] == int(head.sum())
            assert explanation.scalars[f"occlusion_logit_drop.{name}"] == pytest.approx(
                score - float(target_scores(logits, [1], region)), rel=1e-4, abs=1e-3)
            assert explanation.scalars[f"occlusion_dice.{name}"] == pytest.approx(
                dice(target_mask(torch.softmax(logits, 1)[0], [1]), context.predicted_mask), abs=1e-6)
    # the reference checks something: hiding a sequence moves the score and the outline
    assert max(abs(d) for d in per_sequence(explanation, "occlusion_logit_drop").values()) > 1.0
    assert min(per_sequence(explanation, "occlusion_dice").values()) < 0.995


def test_the_integrated_gradients_of_the_sequences_add_up_to_those_of_the_whole_scan():
    """With every sequence's no-signal level 0 (air 0) the baseline is integrated gradients' own: the per-sequence
    sums add up to its attribution sum."""
    image = four_sequences(seed=2)
    network = unet(seed=1)
    context, explanation = run(network, image, steps=8)
    context.options = {"integrated-gradients": {"margin": None, "steps": 8}}
    whole = IntegratedGradients().explain(context)
    sums = per_sequence(explanation, "ig_sum")
    assert sum(sums.values()) == pytest.approx(whole.scalars["attribution_sum"], rel=1e-5)
    assert explanation.metadata["baseline"] == {name: 0.0 for name in NAMES}
    assert sum(per_sequence(explanation, "ig_share").values()) == pytest.approx(1)


def test_each_sequence_has_its_own_blank_level():
    """Integrated gradients start from a blank scan with each sequence at its own no-signal level."""
    image = four_sequences()
    image[0, 1] -= 1.5  # T1 shifted as by z-scoring: its air is at -1.5
    network = unet(seed=3)
    context, explanation = run(network, image, steps=4)
    assert explanation.metadata["baseline"] == {"T1c": 0.0, "T1": -1.5, "T2": 0.0, "FLAIR": 0.0}
    blank = torch.zeros_like(image)
    blank[0, 1] = -1.5
    region = torch.from_numpy(context.predicted_mask.astype(np.float32))
    with torch.no_grad():
        expected = float(target_scores(network(blank), [1], region))
    assert explanation.metadata["integrated_gradients"]["baseline_score"] == pytest.approx(expected, rel=1e-4)


# ------------------------------------------------------------------ the order of the sequences
def test_permuting_the_sequences_permutes_the_result():
    order = [3, 0, 2, 1]
    image = four_sequences(seed=3)
    network = unet(seed=2)

    class Permuted(nn.Module):
        """The same function, of the sequences given in ``order``."""

        def __init__(self) -> None:
            super().__init__()
            self.network = network

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.network(x[:, np.argsort(order).tolist()])

    _, original = run(network, image)
    _, permuted = run(Permuted().eval(), image[:, order], [NAMES[k] for k in order])
    assert permuted.metadata["sequences"] == ["FLAIR", "T1c", "T2", "T1"]
    assert original.scalars.keys() == permuted.scalars.keys()
    for key, value in original.scalars.items():
        assert permuted.scalars[key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
    shares = per_sequence(original, "ig_share")
    assert max(shares.values()) - min(shares.values()) > 0.05  # the sequences differ: a swap would show


def test_unnamed_sequences_are_numbered():
    _, explanation = run(reading_one_sequence(2), four_sequences(), names=None, steps=2)
    assert explanation.metadata["sequences"] == ["sequence 1", "sequence 2", "sequence 3", "sequence 4"]
    assert explanation.scalars["ig_share.sequence 3"] > 0.99


# ------------------------------------------------------------------ applicability and options
def test_a_model_with_one_input_is_not_applicable():
    image = four_sequences()[:, 2:3]
    context = explain_context(reading_one_sequence(0, count=1), image)
    explainer = get_explainer("sequences")
    with pytest.raises(NotApplicable, match="needs a model with several input sequences"):
        explainer.check_applicable(context.model)
    with pytest.raises(NotApplicable, match="needs a model with several input sequences"):
        explainer.explain(context)


@pytest.mark.parametrize(("given", "error"), [
    ({"nonsense": 1},
     "unknown option sequences.nonsense; the options of sequences are: margin, overlap, window, steps, batch"),
    ({"steps": 1}, "option sequences.steps must be an integer >= 2, got 1"),
    ({"overlap": 1.5},
     "option sequences.overlap must be a number in [0, 1), or null: the model's own windows, got 1.5"),
])
def test_bad_options_are_one_line(given, error):
    with pytest.raises(SegXAIError) as raised:
        check_options({"sequences": given})
    assert str(raised.value) == error
