"""Uncertainty measures and the MC dropout, TTA and ensemble explainers against direct references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from SegXAILib.errors import SegXAIError
from SegXAILib.explain.base import ExplainContext, NotApplicable
from SegXAILib.inference import predict_probabilities
from SegXAILib.models.card import ModelCard
from SegXAILib.models.loaders import LoadedModel, load_from_card
from SegXAILib.models.networks import build_network
from SegXAILib.progress import Progress
from SegXAILib.uncertainty.measures import (
    UncertaintyAccumulator,
    expected_entropy,
    mutual_information,
    predictive_entropy,
    uncertainty_maps,
    variance,
)
from SegXAILib.uncertainty.sampling import (
    EnsembleUncertainty,
    MCDropoutUncertainty,
    TTAUncertainty,
    augment,
    flip_rotate_transforms,
    invert,
    predict_softmax,
)

from .conftest import make_card

DROPOUT_ARCH = {"name": "unet", "args": {"channels": [4, 8, 16], "strides": [2, 2], "dropout": 0.3, "norm": "BATCH"}}


def dirichlet_stack(t=5, c=4, shape=(3, 4, 5), alpha=0.5, seed=0):
    """(T, C, *S) float32 probabilities, with some exact zeros (one-hot samples) at voxel (0, 0, 0)."""
    rng = np.random.default_rng(seed)
    probs = np.moveaxis(rng.dirichlet(np.full(c, alpha), size=(t, *shape)), -1, 1).astype(np.float32)
    probs[:, :, 0, 0, 0] = np.eye(c, dtype=np.float32)[np.arange(t) % c]
    return probs


def brute_force(probs, channels):
    """Float64 textbook formulas, one voxel at a time."""
    t, c = probs.shape[:2]
    out = {k: np.zeros(probs.shape[2:]) for k in ("entropy", "expected", "variance", "mutual_information")}
    for idx in np.ndindex(*probs.shape[2:]):
        p = probs[(slice(None), slice(None), *idx)].astype(np.float64)  # (T, C)
        mean = p.mean(0)
        h = -sum(m * np.log(m) for m in mean if m > 0)
        eh = np.mean([-sum(q * np.log(q) for q in row if q > 0) for row in p])
        target = p[:, channels].sum(1)
        out["entropy"][idx], out["expected"][idx] = h, eh
        out["variance"][idx] = sum((x - target.mean()) ** 2 for x in target) / t
        out["mutual_information"][idx] = h - eh
    return out


def test_measures_match_textbook_formulas():
    probs = dirichlet_stack()
    ref = brute_force(probs, [1, 3])
    assert np.allclose(predictive_entropy(probs), ref["entropy"], rtol=1e-5, atol=1e-6)
    assert np.allclose(expected_entropy(probs), ref["expected"], rtol=1e-5, atol=1e-6)
    assert np.allclose(mutual_information(probs), ref["mutual_information"], rtol=1e-4, atol=1e-6)
    assert np.allclose(variance(probs, [1, 3]), ref["variance"], rtol=1e-5, atol=1e-7)
    per_class = variance(probs)
    assert per_class.shape == probs.shape[1:]
    assert np.allclose(per_class[2], brute_force(probs, [2])["variance"], rtol=1e-5, atol=1e-7)
    maps = uncertainty_maps(probs, [1, 3])
    assert all(m.dtype == np.float32 and m.shape == probs.shape[2:] and np.isfinite(m).all() for m in maps.values())
    # the one-hot voxel: every sample certain (expected entropy 0), samples disagree -> MI = H(mean) = log 4
    assert expected_entropy(probs)[0, 0, 0] == 0
    assert mutual_information(probs)[0, 0, 0] == pytest.approx(-(np.log(0.4) * 0.4 + 3 * 0.2 * np.log(0.2)), abs=1e-6)


def test_known_answers():
    c = 5
    uniform = np.full((4, c, 2, 3, 2), 1 / c, np.float32)
    assert np.allclose(predictive_entropy(uniform), np.log(c), atol=1e-6)
    assert np.allclose(mutual_information(uniform), 0, atol=1e-6)
    same = np.repeat(dirichlet_stack(t=1, c=c), 6, axis=0)
    assert np.abs(mutual_information(same)).max() < 1e-6
    assert np.abs(variance(same, [1, 2])).max() < 1e-12
    # two confident samples that disagree: H = log 2, expected entropy 0, MI = log 2, var = 1/4
    split = np.zeros((2, 3, 1, 1, 1), np.float32)
    split[0, 0], split[1, 1] = 1, 1
    maps = uncertainty_maps(split, [1])
    assert maps["entropy"].item() == pytest.approx(np.log(2), abs=1e-6)
    assert maps["mutual_information"].item() == pytest.approx(np.log(2), abs=1e-6)
    assert maps["variance"].item() == pytest.approx(0.25, abs=1e-7)


def test_accumulator_equals_stacked_computation():
    probs = dirichlet_stack(t=6, c=3, shape=(6, 7, 8), seed=3)
    accumulator = UncertaintyAccumulator([1, 2])
    for p in probs:
        accumulator.add(p)
    stacked = uncertainty_maps(probs, [1, 2])
    streamed = accumulator.maps()
    assert set(streamed) == set(stacked)
    for key in stacked:
        assert streamed[key].dtype == np.float32
        assert np.allclose(streamed[key], stacked[key], atol=2e-6), key
    # Welford: identical samples give exactly zero variance (sums of p and p^2 would not)
    same = UncertaintyAccumulator([0, 2])
    for _ in range(7):
        same.add(probs[0])
    assert same.maps()["variance"].max() == 0
    with pytest.raises(ValueError):
        same.add(probs[0, :, :3])
    with pytest.raises(ValueError):
        UncertaintyAccumulator([1]).maps()


# --------------------------------------------------------------------------- explainer helpers
def lesion_probabilities(shape, box=(slice(6, 10), slice(5, 9), slice(7, 11))):
    """Probabilities whose argmax is class 1 in ``box`` and background elsewhere (known predicted mask)."""
    probs = np.zeros((3, *shape), np.float32)
    probs[0] = 0.8
    probs[1:] = 0.1
    probs[(1, *box)] = 0.8
    probs[(0, *box)] = 0.1
    return probs, box


def context_for(model, image, options=None, progress=None):
    probs, _ = lesion_probabilities(tuple(image.shape[2:]))
    return ExplainContext(model=model, image=image, target="lesion", channels=[1, 2], probabilities=probs,
                          progress=progress or Progress(), options=options or {})


def model_context(model, image, options=None, progress=None):
    """A context as the explain pipeline builds it: the probabilities are the model's own prediction."""
    probs = predict_probabilities(model, image[0].numpy(), torch.device("cpu"))
    return ExplainContext(model=model, image=image, target="lesion", channels=[1, 2], probabilities=probs,
                          progress=progress or Progress(), options=options or {})


def l1_distance_to_box(shape, box):
    """City-block distance of each voxel to a box: what repeated 6-connected dilation measures."""
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return sum(np.maximum(np.maximum(b.start - g, g - (b.stop - 1)), 0) for g, b in zip(grids, box))


def forward_softmax(network, image):
    with torch.no_grad():
        return torch.softmax(network(image), 1)[0].numpy()


# --------------------------------------------------------------------------- test-time augmentation
@pytest.mark.parametrize("plane", [(1, 2), (0, 2), (0, 1)])
def test_tta_transforms_are_exactly_inverted_and_distinct(plane):
    transforms = flip_rotate_transforms(16, plane)
    x = torch.randn(2, 3, 5, 6, 7)
    for t in transforms:
        assert torch.equal(invert(augment(x, t), t), x), t.name
        assert torch.equal(augment(invert(x, t), t), x), t.name
    cube = torch.randn(1, 1, 4, 4, 4)
    outputs = [augment(cube, t) for t in transforms]
    assert sum(torch.equal(a, b) for a in outputs for b in outputs) == 16  # only each with itself
    assert transforms[0].name == "identity" and len(flip_rotate_transforms(plane=plane)) == 8
    with pytest.raises(SegXAIError):
        flip_rotate_transforms(17, plane)


def test_tta_on_an_equivariant_network_has_zero_variance(tmp_path):
    card = ModelCard.load(make_card(tmp_path))
    torch.manual_seed(1)
    pointwise = nn.Sequential(nn.Conv3d(1, 4, 1), nn.Tanh(), nn.Conv3d(4, 3, 1)).eval()
    image = torch.randn(1, 1, 12, 18, 20)  # larger than the 16^3 patch in two axes; rotations swap 18 and 20
    fractions = []
    context = model_context(LoadedModel(card, pointwise, "card"), image, {"tta": {"transforms": 16}},
                            Progress(lambda stage, fraction, message: fractions.append(fraction)))
    result = TTAUncertainty().explain(context)
    maps = {m.variant: m.array for m in result.maps}
    assert all(m.shape == (12, 18, 20) and m.dtype == np.float32 for m in maps.values())
    assert maps["variance"].max() < 1e-10
    assert maps["mutual_information"].max() < 1e-6
    direct = forward_softmax(pointwise, image)
    assert np.allclose(maps["entropy"], -(direct * np.log(direct)).sum(0), atol=1e-5)
    assert result.scalars["samples"] == 16 and len(result.metadata["transforms"]) == 16
    assert fractions == sorted(fractions) and fractions[-1] == 1.0

    # a U-Net is not equivariant: the same check must then see disagreement
    unet = load_from_card(card).network
    context = model_context(LoadedModel(card, unet, "card"), image, {"tta": {"transforms": 4}})
    assert next(m.array for m in TTAUncertainty().explain(context).maps if m.variant == "variance").max() > 1e-4


def test_tta_identity_sample_is_the_segmentations_own_prediction(tmp_path):
    # TTA reuses the segmentation's probabilities for the identity instead of predicting again: the
    # two must be the same numbers (same network, windows and blending), here over several windows
    card = ModelCard.load(make_card(tmp_path))
    model = load_from_card(card)
    image = torch.randn(1, 1, 12, 18, 20)
    context = model_context(model, image)
    reused = TTAUncertainty().sample(0, context, TTAUncertainty.Options(), Progress())
    fresh = predict_softmax(model.network, image, card.windows, torch.device("cpu"), Progress(), "tta")
    torch.testing.assert_close(reused, fresh, rtol=0, atol=0)


# --------------------------------------------------------------------------- MC dropout
def test_mcdropout_not_applicable_without_active_dropout(tmp_path):
    card = ModelCard.load(make_card(tmp_path))  # MONAI UNet with Dropout(p=0) modules
    with pytest.raises(NotApplicable, match="p=0.*dropout-trained"):
        MCDropoutUncertainty().check_applicable(load_from_card(card))
    with pytest.raises(NotApplicable, match="no dropout layers"):
        MCDropoutUncertainty().check_applicable(LoadedModel(card, nn.Conv3d(1, 3, 1), "card"))


def test_mcdropout_samples_are_seeded_and_norm_layers_stay_in_eval(tmp_path):
    card = ModelCard.load(make_card(tmp_path, architecture=DROPOUT_ARCH))
    model = load_from_card(card)
    network = model.network
    norms = [m for m in network.modules() if isinstance(m, nn.BatchNorm3d)]
    dropouts = [m for m in network.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    assert norms and dropouts
    modes = []
    hooks = [m.register_forward_pre_hook(lambda m, i: modes.append((type(m), m.training))) for m in norms + dropouts]
    buffers = {k: v.clone() for k, v in network.named_buffers()}
    image = torch.randn(1, 1, 16, 16, 16)  # one window: each sample is one forward pass
    rng_state = torch.get_rng_state()

    def run(seed):
        result = MCDropoutUncertainty().explain(context_for(model, image, {"mcdropout": {"samples": 3, "seed": seed}}))
        return {m.variant: m.array for m in result.maps}, result

    first, result = run(4)
    for h in hooks:
        h.remove()
    assert {mode for kind, mode in modes if kind is nn.BatchNorm3d} == {False}
    assert {mode for kind, mode in modes if kind is nn.Dropout} == {True}
    assert not any(m.training for m in network.modules())  # modes restored
    assert all(torch.equal(buffers[k], v) for k, v in network.named_buffers())  # running stats untouched
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's random stream is untouched
    assert first["variance"].max() > 1e-3  # samples differ

    # brute force: sample t is one forward with dropout on after torch.manual_seed(seed + t)
    network.train()
    for m in norms:
        m.eval()
    stack = []
    for t in range(3):
        torch.manual_seed(4 + t)
        stack.append(forward_softmax(network, image))
    network.eval()
    reference = uncertainty_maps(np.stack(stack), [1, 2])
    for key in reference:
        assert np.allclose(first[key], reference[key], atol=1e-5), key

    again, _ = run(4)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    other, _ = run(5)
    assert not np.allclose(first["variance"], other["variance"])
    assert result.metadata["dropout_rates"] == [0.3] and result.scalars["samples"] == 3


# --------------------------------------------------------------------------- deep ensemble
def ensemble_card(tmp_path, seeds):
    """A card listing one weights file per seed (a list with a repeated seed repeats the file)."""
    card = ModelCard.load(make_card(tmp_path, name="member"))
    names = []
    for seed in seeds:
        torch.manual_seed(seed)
        network = build_network(card.architecture, 1, 3)
        names.append(f"member{seed}.safetensors")
        save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(tmp_path / names[-1]))
    card.weights = names
    return ModelCard.load(card.save(tmp_path / "ensemble.json"))


def test_ensemble_not_applicable_with_one_weights_file(tmp_path):
    card = ModelCard.load(make_card(tmp_path))
    with pytest.raises(NotApplicable, match="single weights file.*'weights' entry"):
        EnsembleUncertainty().check_applicable(load_from_card(card))


def test_ensemble_of_identical_members_has_zero_mutual_information(tmp_path):
    card = ensemble_card(tmp_path, [7, 7, 7])
    image = torch.randn(1, 1, 16, 16, 16)
    model = load_from_card(card)
    EnsembleUncertainty().check_applicable(model)
    result = EnsembleUncertainty().explain(context_for(model, image))
    maps = {m.variant: m.array for m in result.maps}
    assert maps["mutual_information"].max() < 1e-6 and maps["variance"].max() == 0
    assert maps["entropy"].max() > 0.1  # not trivially zero: each member is uncertain on its own
    assert result.scalars["samples"] == 3


def test_ensemble_maps_and_region_means_match_direct_computation(tmp_path):
    card = ensemble_card(tmp_path, [1, 2, 3])
    shape = (16, 16, 16)
    image = torch.randn(1, 1, *shape)
    context = context_for(load_from_card(card), image, {"ensemble": {"margin": 2}})
    result = EnsembleUncertainty().explain(context)
    maps = {m.variant: m for m in result.maps}
    assert all(m.colormap == "viridis" and not m.normalise and m.description for m in maps.values())

    members = [load_from_card(card, i).network for i in range(3)]
    reference = uncertainty_maps(np.stack([forward_softmax(n, image) for n in members]), [1, 2])
    for key, array in reference.items():
        assert np.allclose(maps[key].array, array, atol=1e-5), key
    assert reference["mutual_information"].max() > 1e-3

    _, box = lesion_probabilities(shape)
    distance = l1_distance_to_box(shape, box)
    for key, array in reference.items():
        assert result.scalars[f"{key}_inside"] == pytest.approx(array[distance == 0].mean(), abs=1e-6)
        assert result.scalars[f"{key}_outside"] == pytest.approx(array[distance > 2].mean(), abs=1e-6)
