"""EU-Nets, MHEX+ CAMs and the collaboration-gradient uncertainty, against references computed another way."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

from SegXAILib.explain.base import NotApplicable
from SegXAILib.explain.mhex import MHEXCAM, equivalent_kernel, stage_cams
from SegXAILib.methods import get_explainer
from SegXAILib.models.card import ModelCard
from SegXAILib.models.eunet import build_eunet, deep_supervision_loss
from SegXAILib.models.loaders import LoadedModel, load_from_card
from SegXAILib.models.networks import build_network
from SegXAILib.uncertainty.collaboration import (
    CollaborationOptions,
    CollaborationUncertainty,
    agreement,
    collaboration_map,
    collaboration_reference,
    collaboration_volume,
)
from SegXAILib.upsampling import upsample_to

from .conftest import explain_context, make_card

TINY = {"channels": (4, 8, 16, 32), "strides": (2, 2, 2), "head_channels": 4}
DEMO = {"channels": (16, 32, 64, 128), "strides": (2, 2, 2)}




def blob_image(shape=(16, 16, 16), seed=0) -> torch.Tensor:
    """A bright off-centre ball in noise, (1, 1, *shape)."""
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    ball = (grids[0] - 0.2) ** 2 + grids[1] ** 2 + (grids[2] + 0.3) ** 2 < 0.3
    noise = np.random.default_rng(seed).standard_normal(shape)
    return torch.from_numpy((2.0 * ball + 0.3 * noise).astype(np.float32))[None, None]


def tiny_eunet(base="unet", seed=0, **kwargs):
    torch.manual_seed(seed)
    return build_eunet(1, 3, base=base, **{**TINY, **kwargs}).eval()


def context_for(network, image, channels=(1,), patch=None, options=None):
    return explain_context(network, image, channels, patch, options, architecture="eunet")


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- EU-Net construction
@pytest.mark.parametrize("base, stage_channels", [
    ("unet", (32, 16)), ("residual_unet", (32, 16)), ("attention_unet", (64, 32, 16))])
def test_heads_attach_to_every_base_under_100k_parameters(base, stage_channels):
    torch.manual_seed(0)
    eunet = build_network({"name": "eunet", "args": {"base": base, **DEMO}}, 1, 4)
    plain = build_network({"name": base, "args": DEMO}, 1, 4)
    extra = parameter_count(eunet) - parameter_count(plain)
    assert 0 < extra < 100_000
    assert tuple(head.conv1.in_channels for head in eunet.heads) == stage_channels

    image = torch.randn(1, 1, 16, 16, 16)
    eunet.train()
    final, predictions = eunet(image)
    assert final.shape == (1, 4, 16, 16, 16)
    # coarse to fine: the finest head of MONAI's UNet sits at 1/2 resolution, AttentionUnet's at full
    sizes = [p.shape[2] for p in predictions]
    assert sizes == sorted(sizes) and sizes[-1] == (16 if base == "attention_unet" else 8)
    assert all(p.shape[:2] == (1, 4) for p in predictions)
    eunet.eval()
    with torch.no_grad():
        assert isinstance(eunet(image), torch.Tensor)


@pytest.mark.parametrize("base", ["unet", "residual_unet", "attention_unet"])
def test_feed_head_keeps_the_base_output_and_feed_decoder_changes_it(base):
    image = blob_image()
    side = tiny_eunet(base, feed="head")
    fed = tiny_eunet(base, seed=1, feed="decoder")
    fed.backbone.load_state_dict(side.backbone.state_dict())  # same base weights, heads differ by design
    with torch.no_grad():
        base_output = side.backbone(image)  # the network without heads
        if base != "attention_unet":  # our traversal reproduces MONAI's own forward
            torch.testing.assert_close(base_output, side.backbone.net(image), rtol=0, atol=1e-6)
        torch.testing.assert_close(side(image), base_output, rtol=0, atol=0)
        assert (fed(image) - base_output).abs().max() > 1e-3


def test_deep_supervision_loss_is_the_weighted_sum_and_reaches_every_head():
    torch.manual_seed(0)
    network = tiny_eunet(feed="head").train()  # side heads: only the deep terms reach their weights
    image = blob_image()
    target = (image > 1.0).float()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    outputs = network(image)
    final, predictions = outputs
    expected = loss_fn(final, target) + sum(
        w * loss_fn(torch.nn.functional.interpolate(p, size=(16, 16, 16), mode="trilinear"), target)
        for w, p in zip([0.25, 0.5], predictions))  # default: the finest head 1/2, halving per coarser stage
    loss = deep_supervision_loss(outputs, target, loss_fn)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    for head in network.heads:
        for weight in (head.conv1.weight, head.conv2.weight):
            assert weight.grad is not None and weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- MHEX+ CAM
def test_stage_outputs_are_those_of_the_whole_forward_pass():
    network = tiny_eunet()
    image = blob_image()
    with torch.no_grad():
        _, whole = network.forward_with_heads(image)
        for full, short in zip(whole, network.stage_outputs(image), strict=True):
            for a, b in zip(full, short, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_equivalent_kernel_cam_is_the_two_convolutions_where_the_relu_is_active():
    network = tiny_eunet(head_channels=2)  # two hidden units: both are active at many voxels
    image = blob_image()
    with torch.no_grad():
        _, stages = network.forward_with_heads(image)
        cams = stage_cams(network, image, [2])
        for head, stage, cam in zip(network.heads, stages, cams):
            assert equivalent_kernel(head).shape == (3, head.conv1.in_channels)
            # without the ReLU the two convolutions are the equivalent kernel, everywhere
            torch.testing.assert_close(cam[:, 0], head.conv2(head.conv1(stage.features))[:, 2], rtol=1e-4, atol=1e-5)
            # with it, the deep prediction itself, where every hidden unit is active
            active = (stage.hidden > 0).all(1)
            assert active.float().mean() > 0.05
            torch.testing.assert_close(cam[:, 0][active], stage.prediction[:, 2][active], rtol=1e-4, atol=1e-5)
            assert (cam[:, 0][~active] - stage.prediction[:, 2][~active]).abs().max() > 1e-3


def test_mhex_explainer_maps_and_sliding_windows():
    network = tiny_eunet()
    image = blob_image((24, 16, 16))
    explanation = MHEXCAM().explain(context_for(network, image, channels=[1, 2]))  # one window
    maps = {m.variant: m.array for m in explanation.maps}
    assert list(maps) == [None, "stage1", "stage2"]
    with torch.no_grad():
        expected = [upsample_to(c, (24, 16, 16))[0, 0].numpy() for c in stage_cams(network, image, [1, 2])]
    np.testing.assert_allclose(maps["stage1"], expected[0], atol=1e-5)
    np.testing.assert_allclose(maps["stage2"], expected[1], atol=1e-5)
    scaled = [(e - e.min()) / (e.max() - e.min()) for e in expected]
    np.testing.assert_allclose(maps[None], (scaled[0] + scaled[1]) / 2, atol=1e-5)

    windowed = MHEXCAM().explain(context_for(network, image, channels=[1, 2], patch=(16, 16, 16)))
    assert all(m.array.shape == (24, 16, 16) and np.isfinite(m.array).all() for m in windowed.maps)


def test_methods_refuse_networks_without_heads(tiny_card):
    model = load_from_card(ModelCard.load(tiny_card))
    for explainer in (get_explainer("mhex"), get_explainer("mhex-uncertainty")):
        with pytest.raises(NotApplicable, match="MHEX"):
            explainer.check_applicable(model)
    side = LoadedModel(model.card, tiny_eunet(feed="head"), "card")
    MHEXCAM().check_applicable(side)
    with pytest.raises(NotApplicable, match="feed='decoder'"):
        CollaborationUncertainty().check_applicable(side)


# ----------------------------------------------------------------------------- collaboration gradient
@pytest.fixture(scope="module")
def collaboration_case():
    """A tiny EU-Net on a 16^3 blob; its exact map, and the brute-force reference at 64 voxels.

    Three hidden units per head: head 1's ReLU is dead all around a few dozen voxels (zero gradient),
    and the sample includes some of them, which both routes must flag.
    """
    network = tiny_eunet(head_channels=3)
    image = blob_image()
    with torch.no_grad():
        label = network(image).argmax(1)
    exact, zero = collaboration_map(network, image, label, route="exact", chunk=64)
    rng = np.random.default_rng(0)
    dead = [tuple(v) for v in np.argwhere(zero[0, 0].numpy())[:12]]
    voxels = dead + [tuple(v) for v in rng.integers(0, 16, size=(64 - len(dead), 3))]
    reference, reference_zero = collaboration_reference(network, image, label, voxels)
    return network, image, label, exact[0, 0].numpy(), zero[0, 0].numpy(), voxels, reference, reference_zero


def test_exact_route_equals_brute_force(collaboration_case):
    _, _, _, exact, zero, voxels, reference, reference_zero = collaboration_case
    at = tuple(np.array(voxels).T)
    assert reference_zero.any() and not reference_zero.all()
    np.testing.assert_array_equal(zero[at], reference_zero)
    np.testing.assert_allclose(exact[at], reference, atol=1e-5)
    assert exact.min() >= 0 and exact.max() <= 2 and exact.std() > 0.05


def test_exact_route_equals_brute_force_on_a_whole_attention_eunet():
    torch.manual_seed(0)
    network = build_eunet(1, 3, base="attention_unet", channels=(4, 8, 16), strides=(2, 1), head_channels=3).eval()
    image = blob_image((8, 8, 8))
    with torch.no_grad():
        label = network(image).argmax(1)
    exact, zero = collaboration_map(network, image, label, route="exact", chunk=64)
    reference, reference_zero = collaboration_reference(network, image, label)
    np.testing.assert_array_equal(zero.flatten().numpy(), reference_zero)
    np.testing.assert_allclose(exact.flatten().numpy(), reference, atol=1e-5)


def test_sketch_correlates_with_brute_force(collaboration_case):
    network, image, label, exact, _, voxels, reference, _ = collaboration_case
    sketch, _ = collaboration_map(network, image, label, k=128, chunk=128)
    sketch = sketch[0, 0].numpy()
    assert np.corrcoef(sketch[tuple(np.array(voxels).T)], reference)[0, 1] > 0.95
    assert np.corrcoef(sketch.ravel(), exact.ravel())[0, 1] > 0.95
    few, _ = collaboration_map(network, image, label, k=4)
    assert np.corrcoef(few[0, 0].numpy().ravel(), exact.ravel())[0, 1] < 0.95  # k matters


def test_zero_gradient_voxels_are_counted_and_maximal():
    network = tiny_eunet()
    image = blob_image((24, 16, 16))
    with torch.no_grad():
        network.heads[0].conv1.weight.zero_()  # Y = ReLU(0): dead everywhere, no gradient anywhere
    explanation = CollaborationUncertainty().explain(context_for(network, image, patch=(16, 16, 16), options={
        "mhex-uncertainty": {"k": 4}}))  # two sliding windows, stitched
    assert explanation.scalars["zero_gradient_voxels"] == 24 * 16 * 16
    np.testing.assert_array_equal(explanation.maps[0].array, 2.0)
    _, reference_zero = collaboration_reference(network, image, torch.zeros(1, 16, 16, 16, dtype=torch.long),
                                                [(0, 0, 0), (8, 8, 8)])
    assert reference_zero.all()


def test_uncertainty_explainer_equals_the_single_window_map(collaboration_case):
    network, image, label, exact, zero, *_ = collaboration_case
    explanation = get_explainer("mhex-uncertainty").explain(context_for(network, image, options={
        "mhex-uncertainty": {"route": "exact", "chunk": "64"}}))
    np.testing.assert_allclose(explanation.maps[0].array, exact, atol=1e-5)
    assert explanation.scalars["zero_gradient_voxels"] == zero.sum() > 0
    assert explanation.maps[0].normalise is False


def test_whole_scan_map_uses_the_label_it_is_given(collaboration_case):
    """A label other than the argmax (a ground truth) travels through the sliding window: the scan's map
    equals :func:`collaboration_map` with that label, and differs from the argmax-label map where they differ."""
    network, image, label, exact, *_ = collaboration_case
    other = label.clone()
    other[0, 4:12, 4:12, 4:12] = (other[0, 4:12, 4:12, 4:12] + 1) % 3  # another class in a cube
    reference, _ = collaboration_map(network, image, other, route="exact", chunk=64)
    model = context_for(network, image).model
    array, zero = collaboration_volume(model, image, other[0].numpy(), CollaborationOptions(route="exact", chunk=64),
                                       torch.device("cpu"))
    np.testing.assert_allclose(array, reference[0, 0].numpy(), atol=1e-5)
    changed = other[0].numpy() != label[0].numpy()
    assert np.abs(array - exact)[changed].mean() > 0.1


# ----------------------------------------------------------------------------- agreement
def test_agreement_known_answers():
    a = np.arange(100, dtype=np.float32).reshape(4, 5, 5)
    same = agreement(a, 3 * a + 1)
    assert same == pytest.approx({"pearson": 1.0, "iou_top10": 1.0, "dice_top10": 1.0})
    opposite = agreement(a, -a)
    assert opposite == pytest.approx({"pearson": -1.0, "iou_top10": 0.0, "dice_top10": 0.0})
    shifted = a.copy().ravel()
    shifted[95:] = 0  # top 10 of a: 90..99; of shifted: 85..94 -> 5 shared of 15
    result = agreement(a, shifted.reshape(a.shape))
    assert result["iou_top10"] == pytest.approx(5 / 15) and result["dice_top10"] == pytest.approx(0.5)
    mask = np.zeros(a.shape, bool)
    mask[0] = True  # values 0..24: top 3
    assert agreement(a, -a, mask)["pearson"] == pytest.approx(-1.0)


def test_eunet_card_round_trip(tmp_path):
    arch = {"name": "eunet", "args": {**{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()},
                                      "base": "residual_unet"}}
    model = load_from_card(ModelCard.load(make_card(tmp_path, architecture=arch)))
    image = blob_image()
    with torch.no_grad():
        assert model.network(image).shape == (1, 3, 16, 16, 16)
    assert isinstance(MHEXCAM().explain(context_for(model.network, image)).maps[0].array, np.ndarray)


# ----------------------------------------------------------------------------- agreement in summary.json
def test_summary_records_agreement_with_sampled_uncertainty(tmp_path, scan_file):
    from SegXAILib.case import explain_case
    from SegXAILib.cli import main
    from SegXAILib.preprocessing import foreground_mask
    from SegXAILib.verdict import uncertainty_agreement
    from SegXAILib.volume import read_volume

    from .conftest import oblique_scan

    arch = {"name": "eunet", "args": {**{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()},
                                      "dropout": 0.3}}
    card_path = make_card(tmp_path, architecture=arch)
    model = load_from_card(ModelCard.load(card_path))
    options = {"mcdropout": {"samples": 3}, "mhex-uncertainty": {"k": 4}}
    case = explain_case(oblique_scan(), model, ["mhex-uncertainty", "mcdropout"], device="cpu", options=options)
    run = case.run
    found = uncertainty_agreement(run, "CT")
    maps = {(e.method, m.variant): m.array for e in run.explanations for m in e.maps}
    region = foreground_mask(run.segmentation.model_grid.array)
    assert found["region"] == "foreground (Otsu)" and found["region_voxels"] == int(region.sum())
    assert set(found["against"]) == {"mcdropout-entropy", "mcdropout-variance"}
    for variant in ("entropy", "variance"):
        expected = agreement(maps[("mhex-uncertainty", None)], maps[("mcdropout", variant)], region)
        assert found["against"][f"mcdropout-{variant}"] == pytest.approx(expected, nan_ok=True)
    assert -1 <= found["against"]["mcdropout-entropy"]["pearson"] <= 1

    # through the command line: the section exists only when both kinds of map were made
    scan = scan_file
    args = ["explain", str(scan), "--model", str(card_path), "--target", "lesion", "--no-report", "--progress", "none",
            "--option", "mcdropout.samples=3", "--option", "mhex-uncertainty.k=4"]
    assert main(args + ["--methods", "mhex-uncertainty,mcdropout", "--out", str(tmp_path / "both")]) == 0
    summary = json.loads((tmp_path / "both" / "summary.json").read_text(encoding="utf-8"))
    assert set(summary["agreement"]["against"]) == {"mcdropout-entropy", "mcdropout-variance"}
    assert summary["agreement"]["map"] == "mhex-uncertainty"
    assert main(args + ["--methods", "mhex-uncertainty", "--out", str(tmp_path / "one")]) == 0
    assert "agreement" not in json.loads((tmp_path / "one" / "summary.json").read_text(encoding="utf-8"))
    assert read_volume(scan).same_grid(read_volume(tmp_path / "both" / "segmentation.nii.gz"), atol=1e-6)


@pytest.mark.parametrize("option, message", [
    ("route=bogus", "error: option mhex-uncertainty.route must be one of sketch, exact, got 'bogus'"),
    ("k=0", "error: option mhex-uncertainty.k must be an integer >= 1, got 0")])
def test_bad_uncertainty_options_exit_2_with_one_line(tmp_path, scan_file, capsys, option, message):
    from SegXAILib.cli import main

    card_path = make_card(tmp_path, architecture={"name": "eunet", "args": {
        k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}})
    out = tmp_path / "out"
    assert main(["explain", str(scan_file), "--model", str(card_path), "--methods", "mhex-uncertainty",
                 "--option", f"mhex-uncertainty.{option}", "--out", str(out), "--no-report", "--progress", "none"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == message
    assert not out.exists()  # nothing half-written
