"""Preprocessing and sliding-window inference against direct references."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from SegXAILib.errors import Cancelled, SegXAIError
from SegXAILib.inference import predict_probabilities, segment, sliding_window_predict, window_count
from SegXAILib.models.card import ModelCard, Windows
from SegXAILib.models.loaders import load_from_card
from SegXAILib.models.registry import load_model
from SegXAILib.outputs import segmentation_summary
from SegXAILib.preprocessing import (
    normalise_intensity,
    reorient_to_ras,
    resample_to_grid,
    resample_to_spacing,
    validate_scan,
)
from SegXAILib.progress import Progress
from SegXAILib.symmetries import mirrorings
from SegXAILib.volume import Volume

from .conftest import oblique_scan


def test_sliding_window_equals_whole_volume_for_pointwise_network():
    # a 1x1x1 network sees no context, so every overlapping window predicts the same values
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 3, 1), nn.Tanh(), nn.Conv3d(3, 2, 1)).eval()
    x = torch.randn(1, 1, 37, 29, 41)
    calls = []
    progress = Progress(lambda stage, fraction, message: calls.append(fraction))
    with torch.no_grad():
        stitched = sliding_window_predict(net, x, Windows((16, 16, 16), overlap=0.5), torch.device("cpu"), progress)
        direct = net(x)
    assert torch.allclose(stitched, direct, atol=1e-5)
    assert calls[-1] == pytest.approx(1.0)
    assert window_count(x.shape[2:], (16, 16, 16), 0.5) * 2 == len(calls)


def test_sliding_window_equals_whole_volume_for_unet_when_one_window(tiny_card):
    model = load_model(tiny_card)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        stitched = sliding_window_predict(model.network, x, Windows((16, 16, 16)), torch.device("cpu"))
        direct = model.network(x)
    assert torch.allclose(stitched, direct, atol=1e-5)


def test_cancel_stops_inference():
    event = threading.Event()
    event.set()
    net = nn.Conv3d(1, 2, 1)
    with pytest.raises(Cancelled):
        sliding_window_predict(net, torch.zeros(1, 1, 8, 8, 8), Windows((8, 8, 8)), torch.device("cpu"),
                               progress=Progress(cancel_event=event))


def test_reorient_is_exact_and_keeps_physical_positions():
    scan = oblique_scan()
    ras = reorient_to_ras(scan)
    # each index axis now points mostly along R, A, S with positive sign
    assert np.all(np.argmax(np.abs(ras.direction), axis=0) == [0, 1, 2])
    assert np.all(np.diag(ras.direction) > 0)
    assert sorted(ras.array.ravel().tolist()) == sorted(scan.array.ravel().tolist())
    for ijk in [(0, 0, 0), (3, 5, 7), (27, 23, 19)]:
        point = scan.ijk_to_ras @ np.array([*ijk, 1.0])
        new_ijk = np.linalg.solve(ras.ijk_to_ras, point)[:3]
        assert np.allclose(new_ijk, np.round(new_ijk), atol=1e-6)
        assert ras.array[tuple(np.round(new_ijk).astype(int)[::-1])] == scan.array[ijk[::-1]]


def test_resampling_back_to_the_scan_grid_restores_labels():
    scan = oblique_scan()
    labels = scan.with_array((scan.array > 60).astype(np.uint8))
    model_grid = reorient_to_ras(labels)
    back = resample_to_grid(model_grid, labels, interpolation="nearest")
    assert back.same_grid(labels)
    assert np.array_equal(back.array, labels.array)


def test_resample_to_spacing_keeps_extent_and_mean():
    volume = Volume(np.full((10, 20, 30), 7.0, np.float32), spacing=(1.0, 1.0, 2.0))
    out = resample_to_spacing(volume, (2.0, 2.0, 2.0))
    assert out.shape == (10, 10, 15)
    # the outer corner of the field of view stays put
    corner_in = volume.origin - volume.spacing / 2
    assert np.allclose(out.origin - out.spacing / 2, corner_in)
    assert np.allclose(out.array, 7.0, atol=1e-4)


def test_intensity_normalisations_on_known_values():
    array = np.zeros((4, 4, 4), np.float32)
    array[1:3, 1:3, 1:3] = [[[100, 102], [104, 106]], [[108, 110], [112, 114]]]  # Otsu: all foreground
    z = normalise_intensity(array, {"kind": "zscore_foreground"})
    inside = z[1:3, 1:3, 1:3]
    assert inside.mean() == pytest.approx(0, abs=1e-6) and inside.std() == pytest.approx(1, abs=1e-5)
    ct = normalise_intensity(np.array([[[-1000, 0, 40, 3000]]], np.int16), {"kind": "ct_window", "window": [-160, 240]})
    assert np.allclose(ct, [[[0, 0.4, 0.5, 1.0]]])


@pytest.mark.parametrize("array, message", [
    (np.zeros((5, 5)), "2D"),
    (np.zeros((3, 5, 5, 5)), "4D"),
    (np.zeros((1, 5, 5)), "single slice"),
    (np.full((5, 5, 5), np.nan, np.float32), "NaN"),
    (np.full((5, 5, 5), 3.0), "empty"),
])
def test_validate_scan_refuses_bad_volumes(array, message):
    with pytest.raises(SegXAIError, match=message):
        validate_scan(Volume(array))


def test_segment_returns_labels_on_the_oblique_scan_grid(tiny_card):
    scan = oblique_scan()
    before = scan.array.copy()
    result = segment(scan, load_model(tiny_card), device="cpu")
    assert result.labels.same_grid(scan, atol=0)
    assert set(np.unique(result.labels.array)) <= {0, 1, 4}
    assert np.array_equal(scan.array, before)
    # the labels are the argmax of the probabilities, brought back to the scan grid
    probability = np.stack([result.probability_on_scan([c]).array for c in range(3)])
    expected = np.array([0, 1, 4])[probability.argmax(0)]
    assert np.mean(expected == result.labels.array) > 0.999


def test_scans_smaller_than_a_window_are_padded_with_their_background():
    # after z-scoring, 0 is mid-grey tissue: padding with 0 would surround a small scan with false tissue
    torch.manual_seed(0)
    net = nn.Conv3d(1, 1, 3, padding=1).eval()
    x = torch.randn(1, 1, 6, 7, 8) - 5
    roi = (12, 12, 12)
    pads = []
    for size, r in zip(reversed(x.shape[2:]), reversed(roi)):  # F.pad takes the last axis first
        half = (r - size) // 2
        pads += [half, r - size - half]
    with torch.no_grad():
        stitched = sliding_window_predict(net, x, Windows(roi), torch.device("cpu"))
        padded = net(torch.nn.functional.pad(x, pads, value=float(x.min())))
    d0, h0, w0 = pads[4], pads[2], pads[0]
    expected = padded[..., d0:d0 + 6, h0:h0 + 7, w0:w0 + 8]
    assert torch.allclose(stitched, expected, atol=1e-5)


def test_mirrorings_are_every_flip_combination_identity_first():
    transforms = mirrorings([2, 0, 1])
    assert [t.flips for t in transforms] == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert [t.flips for t in mirrorings([])] == [()]
    for bad in ([0, 0], [3], "01", [1.0]):
        with pytest.raises(SegXAIError, match="mirror_axes must be distinct spatial axes"):
            mirrorings(bad)


def test_mirrored_prediction_is_the_mean_over_flipped_scans(tiny_card):
    # the tiny U-Net with random weights is far from mirror-symmetric, so each flip predicts differently
    model = load_from_card(ModelCard.load(tiny_card))
    image = np.random.default_rng(3).standard_normal((20, 16, 24)).astype(np.float32)
    plain = predict_probabilities(model, image, torch.device("cpu"))
    by_hand = np.mean([np.flip(predict_probabilities(model, np.flip(image, axes).copy(), torch.device("cpu")),
                               [a + 1 for a in axes]) for axes in [(), (0,), (2,), (0, 2)]], axis=0)
    mirrored = predict_probabilities(model, image, torch.device("cpu"), mirror_axes=(2, 0))
    np.testing.assert_allclose(mirrored, by_hand, atol=1e-6)
    assert np.abs(mirrored - plain).max() > 1e-3


def test_segment_mirrors_as_the_card_says_and_the_card_checks_the_axes(tiny_card, tmp_path):
    card = ModelCard.load(tiny_card)
    scan = oblique_scan()
    plain = segment(scan, load_from_card(card), "cpu")
    mirrored_card = replace(card, inference={"mirror_axes": [0, 1, 2]})
    mirrored = segment(scan, load_from_card(mirrored_card), "cpu")
    expected = predict_probabilities(load_from_card(card), plain.model_grid.array, torch.device("cpu"),
                                     mirror_axes=(0, 1, 2))
    np.testing.assert_allclose(mirrored.probabilities, expected, atol=1e-6)
    assert np.abs(mirrored.probabilities - plain.probabilities).max() > 1e-3
    assert ModelCard.load(mirrored_card.save(tmp_path / "mirrored.json")).inference == {"mirror_axes": [0, 1, 2]}
    # summary.json says how the segmentation was predicted
    summary = segmentation_summary(mirrored, mirrored_card, "scan", {}, {})
    assert summary["model"]["inference"] == {"mirror_axes": [0, 1, 2]}
    assert "inference" not in segmentation_summary(plain, card, "scan", {}, {})["model"]
    for inference, message in [({"mirror_axes": [0, 3]}, "mirror_axes must be distinct"),
                               ({"mirror_axes": 2}, "mirror_axes must be distinct"),
                               ({"flips": [0]}, "unknown inference setting")]:
        with pytest.raises(SegXAIError, match=message):
            ModelCard.from_dict({**card.to_dict(), "inference": inference})
