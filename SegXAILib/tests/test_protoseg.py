"""ProtoSeg against a direct NumPy implementation of the published formula, and on real MONAI U-Nets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from SegXAILib.errors import SegXAIError
from SegXAILib.explain import protoseg
from SegXAILib.explain.base import ExplainContext
from SegXAILib.explain.layers import conv_layers
from SegXAILib.explain.protoseg import (
    ProtoSegExplainer,
    SoftMaskPrototypes,
    _interpolation_adjoint,
    prototype_segmentation,
    sa_score,
    tiles_of,
    upsample,
)
from SegXAILib.inference import predict_probabilities
from SegXAILib.metrics import dice
from SegXAILib.models.card import ModelCard
from SegXAILib.models.loaders import load_from_card
from SegXAILib.upsampling import upsample_to

from .conftest import make_card


def numpy_protoseg(features: np.ndarray, soft_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paper Eq. 6-7 and Algorithm 1, written out in float64: (p_target, SAM, d_b - d_t)."""
    f = features.astype(np.float64).reshape(features.shape[0], -1)
    b = soft_mask.astype(np.float64).reshape(-1)
    c_t = (f * b).sum(1) / b.sum()
    c_b = (f * (1 - b)).sum(1) / (1 - b).sum()
    d_t = ((f - c_t[:, None]) ** 2).sum(0)
    d_b = ((f - c_b[:, None]) ** 2).sum(0)
    logits = np.stack([-d_b, -d_t])  # softmax over [background, target], as the official code
    p = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)
    shape = soft_mask.shape
    return p[1].reshape(shape), (np.argmax(logits, 0) == 1).reshape(shape), (d_b - d_t).reshape(shape)


def blob(shape, centre=0.0, radius=0.5) -> torch.Tensor:
    axes = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij")
    return sum((a - centre) ** 2 for a in axes) < radius**2


@pytest.mark.parametrize("shape", [(23, 31), (9, 11, 13)])
def test_prototype_segmentation_equals_published_formula(shape):
    torch.manual_seed(0)
    # a large common offset: float32 sums of raw values (or the expanded ||f||^2 - 2 f.c + ||c||^2) lose digits here
    features = torch.randn(7, *shape) + 50.0
    soft = torch.rand(shape)
    p, sam = prototype_segmentation(features, soft)
    p_ref, sam_ref, margin = numpy_protoseg(features.numpy(), soft.numpy())
    assert p.shape == soft.shape and p.dtype == torch.float32 and sam.dtype == torch.bool
    np.testing.assert_allclose(p.numpy(), p_ref, atol=1e-6)
    decided = np.abs(margin) > 1e-3  # float32 may flip exact near-ties only
    assert decided.mean() > 0.99
    np.testing.assert_array_equal(sam.numpy()[decided], sam_ref[decided])


@pytest.mark.parametrize("coarse,fine", [((5, 7), (16, 19)), ((3, 4, 5), (9, 13, 16))])
def test_coarse_features_equal_explicit_upsampling(coarse, fine):
    # the adjoint route must equal the paper's "upsample the features, then ProtoSeg"
    torch.manual_seed(1)
    features = torch.randn(6, *coarse)
    soft = torch.rand(fine)
    p, sam = prototype_segmentation(features, soft)
    explicit = F.interpolate(features[None].double(), size=fine, mode="bilinear" if len(fine) == 2 else "trilinear",
                             align_corners=False)[0]
    p_ref, sam_ref, margin = numpy_protoseg(explicit.numpy(), soft.numpy())
    np.testing.assert_allclose(p.numpy(), p_ref, atol=2e-6)
    np.testing.assert_array_equal(sam.numpy()[np.abs(margin) > 1e-5], sam_ref[np.abs(margin) > 1e-5])


@pytest.mark.parametrize("coarse,fine", [((5, 7), (16, 19)), ((3, 4, 5), (9, 13, 16)), ((6, 6, 6), (12, 6, 24))])
def test_separable_upsampling_equals_f_interpolate(coarse, fine):
    # ProtoSeg upsamples by one matrix product per axis; it must be the interpolation the rest of SegXAI uses
    torch.manual_seed(3)
    x = torch.randn(3, *coarse, dtype=torch.float64)
    np.testing.assert_allclose(upsample(x, fine).numpy(), upsample_to(x[None], fine)[0].numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("slab_values", [1, 3 * 4 * 13 * 20, 10**9])  # rows per slab: 1, 3 (the last 2), all
def test_slab_counts_equal_counts_of_whole_upsampled_maps(monkeypatch, slab_values):
    """SAMs are counted slab by slab of fine rows; the counts and the per-voxel SAM sums must be those of the whole
    upsampled, cropped maps."""
    monkeypatch.setattr(protoseg, "_SLAB_VALUES", slab_values)
    torch.manual_seed(7)
    logits = torch.randn(4, 3, 4, 5).double()  # float64: no near-ties between the two routes
    grid, crop = (12, 16, 20), (11, 13, 20)
    weights = (torch.rand(3, *crop) < 0.4).double()
    whole = upsample_to(logits[None], grid)[0, :, :11, :13] > 0
    expected = whole.flatten(1).double() @ weights.flatten(1).T
    counts, total = protoseg._count_upsampled_sams(logits, grid, crop, weights.flatten(1), sam_sum=True)
    np.testing.assert_array_equal(counts.numpy(), expected.numpy())
    np.testing.assert_array_equal(total.numpy(), whole.sum(0).numpy())
    assert protoseg._count_upsampled_sams(logits, grid, crop, weights.flatten(1))[1] is None


def test_interpolation_adjoint_is_the_transpose_of_upsampling():
    torch.manual_seed(2)
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64)
    y = torch.randn(2, 9, 14, 5, dtype=torch.float64)
    adjoint = float((x * _interpolation_adjoint(y, x.shape[1:])).sum())
    assert float((upsample(x, y.shape[1:]) * y).sum()) == pytest.approx(adjoint, rel=1e-12)


@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_empty_and_full_masks_are_defined_and_warn(fill):
    features = torch.randn(3, 4, 5, 6)
    soft = torch.full((8, 10, 12), fill)
    with pytest.warns(UserWarning, match="empty" if fill == 0 else "full"):
        p, sam = prototype_segmentation(features, soft)
    assert torch.isfinite(p).all()
    assert torch.all(p == fill) and torch.all(sam == bool(fill))
    # the SA score of such a map is defined too: nothing found where nothing is, everything where everything is
    assert sa_score(sam, soft.bool()) == 1.0


def test_distinct_target_feature_gives_sa_one():
    target = blob((20, 24, 28), radius=0.6)
    rng = np.random.default_rng(3)
    # channel 0 marks the target; the others are the same noise inside and outside
    features = torch.from_numpy(rng.normal(size=(4, 20, 24, 28)).astype(np.float32)) * 0.1
    features[0] += 3.0 * target
    soft = 0.8 * target + 0.1  # a hesitant model: B is 0.9 inside, 0.1 outside
    p, sam = prototype_segmentation(features, soft)
    assert sa_score(sam, target) == 1.0
    assert p[target].min() > 0.5 > p[~target].max()


def test_sa_score_known_answers():
    sam = torch.zeros(4, 4, dtype=torch.bool)
    reference = torch.zeros(4, 4, dtype=torch.bool)
    sam[0, :3] = True            # 3 voxels
    reference[0, 1:] = True      # 3 voxels, 2 shared
    reference[1, 0] = True       # 4 voxels in all
    assert sa_score(sam, reference) == pytest.approx(2 * 2 / 7)
    stack = torch.stack([sam, reference, ~reference, torch.zeros_like(sam)])
    expected = [dice(s.numpy(), reference.numpy()) for s in stack]
    np.testing.assert_allclose(sa_score(stack, reference), expected)
    np.testing.assert_allclose(expected, [4 / 7, 1.0, 0.0, 0.0])
    assert sa_score(torch.zeros(3, 3, dtype=torch.bool), torch.zeros(3, 3, dtype=torch.bool)) == 1.0


def test_feature_resolution_agrees_with_input_resolution_on_a_smooth_case():
    fine, coarse = (32, 32, 32), (8, 8, 8)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in coarse], indexing="ij")
    r2 = sum((a - 0.1) ** 2 for a in axes)
    features = torch.stack([torch.exp(-r2 / 0.3), 0.5 * axes[0] + 0.2 * axes[1], torch.cos(2 * axes[2])])
    fine_axes = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in fine], indexing="ij")
    soft = torch.sigmoid((0.45 - torch.sqrt(sum((a - 0.1) ** 2 for a in fine_axes))) / 0.05)

    full = SoftMaskPrototypes(soft, resolution="input")
    fast = SoftMaskPrototypes(soft, resolution="feature")
    sam_full = full.to_mask_grid(full.logits(features)[None])[0] > 0
    sam_fast = fast.to_mask_grid(fast.logits(features)[None])[0] > 0
    assert sam_full.sum() > 1000
    assert dice(sam_full.numpy(), sam_fast.numpy()) > 0.95
    for a, b in zip(full.prototypes(features), fast.prototypes(features)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=0.05)


def _context(model, image: torch.Tensor, **kwargs) -> ExplainContext:
    probabilities = predict_probabilities(model, image[0].numpy(), torch.device("cpu"))
    return ExplainContext(model, image, "lesion", [1, 2], probabilities, **kwargs)


def test_explainer_on_tiny_unet_matches_brute_force(tiny_card):
    model = load_from_card(ModelCard.load(tiny_card))
    torch.manual_seed(4)
    shape = (18, 20, 22)  # not a multiple of the U-Net's stride 4: the explainer pads to (20, 20, 24)
    image = (blob(shape, radius=0.6).float() + 0.3 * torch.randn(shape))[None, None]
    context = _context(model, image)
    explanation = ProtoSegExplainer().explain(context)

    # brute force: hook by hand, upsample every feature map explicitly, the published formula in NumPy
    padded = F.pad(image, (0, 2, 0, 0, 0, 2), mode="replicate")
    features = {}
    layers = conv_layers(model.network)
    handles = [m.register_forward_hook(lambda m, i, o, n=n: features.__setitem__(n, o[0])) for n, m in layers]
    with torch.no_grad():
        model.network(padded)
    for h in handles:
        h.remove()
    soft, mask = context.target_probability, context.predicted_mask

    def protoseg_of(f):
        up = F.interpolate(f[None], size=padded.shape[2:], mode="trilinear", align_corners=False)[0, :, :18, :20, :22]
        return numpy_protoseg(up.numpy(), soft)

    def sam_of(f):
        return protoseg_of(f)[1]

    curve = explanation.curves["sa_per_layer"]
    # every conv block of the tiny U-Net in forward order; the output conv (model.2) is not a feature layer
    assert [c["layer"] for c in curve] == [n for n, _ in layers] == [
        "model.0", "model.1.submodule.0", "model.1.submodule.1.submodule", "model.1.submodule.2"]
    for entry in curve:
        assert entry["sa"] == pytest.approx(dice(sam_of(features[entry["layer"]]), mask), abs=1e-6)

    last, second = "model.1.submodule.2", "model.1.submodule.1.submodule"
    assert explanation.metadata["unit_layers"] == [second, last] and explanation.metadata["reference"] == "model"
    unit_sams = {(n, k): sam_of(features[n][k:k + 1]) for n in (second, last) for k in range(features[n].shape[0])}
    units = explanation.curves["sa_per_unit"]
    assert len(units) == 16 + 4
    for u in units:
        assert u["sa"] == pytest.approx(dice(unit_sams[u["layer"], u["unit"]], mask), abs=1e-6)
    assert explanation.scalars["mean_sa"] == pytest.approx(np.mean([u["sa"] for u in units]))
    assert 0.0 <= explanation.scalars["mean_sa"] <= 1.0

    maps = {m.name: m.array for m in explanation.maps}
    assert set(maps) == {"protoseg-heat", "protoseg-layer-last-decoder-stage"}
    assert [m.layer for m in explanation.maps] == [last, last]  # the module's name, for experts
    assert [c["title"] for c in curve] == ["encoder stage, 2x coarser grid", "encoder stage, 4x coarser grid",
                                          "bottleneck, 4x coarser grid", "last decoder stage, 2x coarser grid"]
    heat = maps["protoseg-heat"]
    assert heat.shape == shape and heat.dtype == np.float32 and 0.0 <= heat.min() and heat.max() <= 1.0
    np.testing.assert_allclose(heat, np.mean([unit_sams[last, k] for k in range(4)], 0), atol=1e-6)
    np.testing.assert_allclose(maps["protoseg-layer-last-decoder-stage"], protoseg_of(features[last])[0], atol=1e-5)
    expected = dice(numpy_protoseg(image[0].numpy(), soft)[1], mask)
    assert explanation.scalars["input_separableness"] == pytest.approx(expected)


def test_forward_pass_stops_after_the_last_feature_layer(tiny_card):
    model = load_from_card(ModelCard.load(tiny_card))
    torch.manual_seed(8)
    image = (blob((20, 20, 20), radius=0.5).float() + 0.2 * torch.randn(20, 20, 20))[None, None]
    context = _context(model, image)
    head_outputs = []  # grids the output conv (after every feature layer) writes; layer discovery probes 16^3, 32^3
    head = dict(model.network.named_modules())["model.2"]
    handle = head.register_forward_hook(lambda module, inputs, output: head_outputs.append(tuple(output.shape[2:])))
    explanation = ProtoSegExplainer().explain(context)
    assert (20, 20, 20) not in head_outputs and len(explanation.curves["sa_per_layer"]) == 4
    with torch.no_grad():  # the network is left as it was: ProtoSeg's hooks are gone, the head runs
        assert model.network(image).shape == (1, 3, 20, 20, 20)
    handle.remove()
    assert head_outputs[-1] == (20, 20, 20)


def test_explainer_with_label_feature_resolution_and_layer_option(tiny_card):
    model = load_from_card(ModelCard.load(tiny_card))
    torch.manual_seed(5)
    label = blob((16, 16, 16), radius=0.5)
    image = (label.float() + 0.2 * torch.randn(label.shape))[None, None]
    options = {"protoseg": {"resolution": "feature", "layers": "model.0,bottleneck"}}
    explanation = ProtoSegExplainer().explain(_context(model, image, label=label.numpy(), options=options,
                                                       spacing=(1.5, 1.5, 1.5)))
    assert explanation.metadata["reference"] == "label" and explanation.metadata["resolution"] == "feature"
    assert all(np.isfinite(c["sa"]) and 0 <= c["sa"] <= 1 for c in explanation.curves["sa_per_layer"])
    assert {"mean_sa", "mean_sa_label", "input_separableness"} <= set(explanation.scalars)
    assert sorted(m.name for m in explanation.maps) == [
        "protoseg-heat", "protoseg-layer-bottleneck", "protoseg-layer-encoder-stage-3mm"]
    descriptions = {m.variant: m.description for m in explanation.maps}
    assert descriptions["layer-encoder-stage-3mm"].startswith("probability that the features of the encoder stage "
                                                              "(3 mm grid) put this voxel")
    assert descriptions["heat"].startswith("fraction of the units of the last decoder stage (3 mm grid) whose")
    assert explanation.metadata["layers"] == {"model.0": ["model.0"], "bottleneck": ["model.1.submodule.1.submodule"]}
    for m in explanation.maps:
        assert m.array.shape == (16, 16, 16) and np.isfinite(m.array).all() and 0 <= m.array.min() <= m.array.max() <= 1
    with pytest.raises(SegXAIError, match="no layer 'nope'"):
        ProtoSegExplainer().explain(_context(model, image, options={"protoseg": {"layers": ["nope"]}}))


def test_mean_sa_drops_on_a_noisy_copy(tmp_path):
    architecture = {"name": "unet", "args": {"channels": [8, 16], "strides": [2]}}
    model = load_from_card(ModelCard.load(make_card(tmp_path, architecture=architecture)))
    generator = torch.Generator().manual_seed(0)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 16)] * 3, indexing="ij"))

    def blobs(n):
        centres = (torch.rand(n, 3, 1, 1, 1, generator=generator) - 0.5) * 0.8
        radii = 0.3 + 0.2 * torch.rand(n, 1, 1, 1, generator=generator)
        masks = ((grid[None] - centres) ** 2).sum(1) < radii**2
        return masks.float()[:, None] + 0.1 * torch.randn(n, 1, 16, 16, 16, generator=generator), masks.long()

    network = model.network.train()
    optimiser = torch.optim.Adam(network.parameters(), 1e-2)
    for _ in range(60):
        x, y = blobs(4)
        loss = F.cross_entropy(network(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    network.eval()

    clean, truth = blobs(1)
    noisy = clean + 0.5 * torch.randn(clean.shape, generator=generator)
    scores = {}
    for name, image in (("clean", clean), ("noisy", noisy)):
        context = _context(model, image)
        context.channels = [1]
        scores[name] = ProtoSegExplainer().explain(context).scalars["mean_sa"]
        if name == "clean":  # the network did learn the task
            assert dice(context.predicted_mask, truth[0].numpy()) > 0.9
        else:  # and still finds the blob in noise, so mu does not drop merely because the mask is empty
            assert context.predicted_mask.sum() > 0.3 * truth.sum()
    assert scores["noisy"] < 0.75 * scores["clean"]


def test_tiles_cover_the_grid_once_in_sizes_the_network_takes():
    grid, most, multiple = (120, 512, 40), (96, 96, 96), (8, 8, 8)
    tiles = tiles_of(grid, most, multiple)
    cover = np.zeros(grid, dtype=int)
    for tile in tiles:
        cover[tile] += 1
        assert all(0 < s.stop - s.start <= 96 and (s.stop - s.start) % 8 == 0 for s in tile)
    assert (cover == 1).all()
    assert len(tiles) == 2 * 6 * 1  # as few per axis as fit: 120 -> 64 + 56, 512 -> 6 of 80-88, 40 -> 1


def test_tiled_run_equals_whole_volume_where_tiles_cannot_differ(tmp_path):
    """Tiles differ from one whole-volume pass only through what crosses their borders: the network's
    receptive field, its normalisation and, at ``input`` resolution, upsampling. A U-Net of 1x1x1
    convolutions without normalisation has none of the first two, so at ``feature`` resolution the two
    runs agree exactly; at ``input`` resolution only the input separableness (nothing upsampled) does."""
    architecture = {"name": "unet", "args": {"channels": [4, 8, 8], "strides": [2, 2], "kernel_size": 1,
                                             "up_kernel_size": 1, "norm": None}}
    model = load_from_card(ModelCard.load(make_card(tmp_path, architecture=architecture)))
    torch.manual_seed(6)
    shape = (30, 20, 36)  # pads to (32, 20, 36): tiles of 16 | 8, 12 | 12, 12, 12
    image = (blob(shape, radius=0.6).float() + 0.3 * torch.randn(shape))[None, None]
    for resolution in ("feature", "input"):
        options = {"resolution": resolution, "layers": "decoder_all"}
        whole = ProtoSegExplainer().explain(_context(model, image, options={"protoseg": options}))
        tiled_options = {"protoseg": {**options, "max_voxels": 1000}}
        tiled = ProtoSegExplainer().explain(_context(model, image, options=tiled_options))
        assert whole.metadata["tiles"] == 1 and tiled.metadata["tiles"] == 12
        assert whole.scalars["input_separableness"] == pytest.approx(tiled.scalars["input_separableness"], abs=1e-9)
        for a, b in zip(whole.curves["sa_per_layer"], tiled.curves["sa_per_layer"]):
            assert (a["layer"], a["shape"], a["channels"]) == (b["layer"], b["shape"], b["channels"])
        pairs = {curve: [(a["sa"], b["sa"]) for a, b in zip(whole.curves[key], tiled.curves[key])]
                 for curve, key in (("curve", "sa_per_layer"), ("units", "sa_per_unit"))}
        pairs["mean_sa"] = [(whole.scalars["mean_sa"], tiled.scalars["mean_sa"])]
        # maps are upsampled within each tile: they agree away from the tiles' inner borders
        away = np.ones(shape, dtype=bool)
        for axis, borders in enumerate(([16], [8], [12, 24])):
            for border in borders:
                away[(slice(None),) * axis + (slice(border - 3, border + 3),)] = False
        maps = {m.name: (m.array[away], n.array[away]) for m, n in zip(whole.maps, tiled.maps)}
        assert list(maps) == ["protoseg-heat", "protoseg-layer-last-decoder-stage"]
        if resolution == "feature":
            for values in pairs.values():
                np.testing.assert_allclose(*zip(*values), atol=1e-6)
            for a, b in maps.values():
                np.testing.assert_allclose(a, b, atol=1e-6)
        else:  # the prototypes move a little with the upsampling, which flips a few voxels' SAMs
            for values in pairs.values():
                np.testing.assert_allclose(*zip(*values), atol=0.05)
            np.testing.assert_allclose(*maps["protoseg-layer-last-decoder-stage"], atol=1e-3)
            assert np.mean(np.not_equal(*maps["protoseg-heat"])) < 0.01


@pytest.mark.parametrize("value, given", [("0", "0"), ("many", "'many'")])
def test_bad_max_voxels_exits_2_with_one_line(tmp_path, tiny_card, scan_file, capsys, value, given):
    from SegXAILib.cli import main

    out = tmp_path / "out"
    assert main(["explain", str(scan_file), "--model", str(tiny_card), "--methods", "protoseg", "--option",
                 f"protoseg.max_voxels={value}", "--out", str(out), "--no-report", "--progress", "none"]) == 2
    assert capsys.readouterr().err.strip() == f"error: option protoseg.max_voxels must be an integer >= 1, got {given}"
    assert not out.exists()  # nothing half-written
