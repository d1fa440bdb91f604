"""How well the collaboration-gradient uncertainty agrees with sampled uncertainties, under several protocols.

Issue 23: paper 000 (Table 1) reports Pearson 0.6175 between its collaboration-gradient map and deep-ensemble
entropy (0.5651 with the variance); our EU-Net gave -0.04 and 0.33. For each held-out case (a synthetic
lesion drawn with ``segxai synth-lesion`` into a host, seeds >= 20001, never used in training or validation)
this script computes, on the model grid:

- the collaboration-gradient map (``mhex-uncertainty``) with the argmax pseudo-label and k = 16 random
  directions (the default), with more directions (``--ks``), and with the true label as y (METHODS.md:
  "or the ground truth when given");
- the 3-member deep ensemble's predictive entropy over all classes, the binary entropy of the target's
  (whole tumour's) probability, the variance of that probability and the mutual information; TTA and
  MC-dropout predictive entropy (``--samples`` each);

then :func:`~SegXAILib.uncertainty.collaboration.agreement` (Pearson, top-10 % Dice) of every collaboration
map, raw and Gaussian-smoothed (sigma in voxels), against every reference, in every region:

- ``grid``: the whole model grid (the paper's choice: whole 2D images, background included);
- ``brain``: the case's brain estimate (what ``segxai explain`` reports in summary.json);
- ``band``: voxels within ``--band`` voxels of the predicted object's surface (where the models disagree);
- ``confident``: brain voxels outside the band (where every reference is near 0).

and, as the paper writes its map (U = sum of cosines, i.e. the consistency, not 1 - consistency), the
Pearson of the other sign is the negative of the one reported. Writes every number to ``--out``/results.json,
prints the tables of docs/collaboration_uncertainty.md and draws one figure per case.

    python benchmarks/collaboration_agreement.py --cases colin27:20001,colin27:20002,mni152:20003 \\
        --cases-macaque 20004 --out /tmp/collab
"""

from __future__ import annotations

import argparse
import json
import time
from itertools import product
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

import SegXAILib as sx
from SegXAILib.cli import main as segxai
from SegXAILib.explain.pipeline import explain_segmentation, target_mask_on_grid
from SegXAILib.inference import select_device
from SegXAILib.methods import get_explainer
from SegXAILib.metrics import dice
from SegXAILib.models.loaders import load_from_card
from SegXAILib.preprocessing import resample_to_grid
from SegXAILib.progress import Progress
from SegXAILib.uncertainty.collaboration import (
    CollaborationOptions,
    agreement,
    collaboration_map,
    collaboration_volume,
)
from SegXAILib.uncertainty.measures import entropy, mutual_information, predictive_entropy, variance
from SegXAILib.uncertainty.sampling import predict_softmax

MACAQUE = "/usr/share/mricron/templates/inia19-t1-brain.nii.gz"
SIGMAS = (0.0, 1.0, 2.0)


def make_case(host: str, seed: int, root: Path) -> Path:
    """``segxai synth-lesion HOST --seed SEED`` into ROOT/<host>-<seed> (kept: a second run reuses it)."""
    case = root / f"{Path(host).name.split('.')[0]}-{seed}"
    if not (case / "label.nii.gz").exists():
        assert segxai(["synth-lesion", host, "--seed", str(seed), "--out", str(case)]) == 0
    return case


def references(segmentation: sx.SegmentationResult, model: sx.LoadedModel, channels: list[int],
               device: torch.device, samples: int) -> dict[str, np.ndarray]:
    """The sampled uncertainty maps (D, H, W) the collaboration map is compared with."""
    image = torch.from_numpy(np.ascontiguousarray(segmentation.model_grid.array))[None, None]
    progress = Progress()
    members = np.stack([predict_softmax(load_from_card(model.card, t).network.to(device).eval(), image,
                                        model.card.windows, device, progress, "ensemble").numpy()
                        for t in range(len(model.card.weight_paths))])  # (T, n_classes, D, H, W)
    target = members[:, channels].sum(axis=1).mean(axis=0)  # mean probability of the target
    maps = {"ensemble entropy (all classes)": predictive_entropy(members),
            "ensemble entropy (target vs rest)": entropy(np.stack([target, 1 - target])),
            "ensemble variance (target)": variance(members, channels),
            "ensemble mutual information": mutual_information(members)}
    sampled = explain_segmentation(segmentation, model, [get_explainer("tta"), get_explainer("mcdropout")],
                                   None, device, options={"tta": {"transforms": samples},
                                                          "mcdropout": {"samples": samples}})
    for explanation in sampled.explanations:
        maps[f"{explanation.method} entropy (all classes)"] = next(m.array for m in explanation.maps
                                                                     if m.variant == "entropy")
    return maps


def regions(segmentation: sx.SegmentationResult, predicted: np.ndarray, band: int) -> dict[str, np.ndarray]:
    """Boolean masks (D, H, W) of the model grid where the maps are compared."""
    grid = segmentation.model_grid
    brain = segmentation.brain.on(grid)
    near = ndimage.binary_dilation(predicted, iterations=band) & ~ndimage.binary_erosion(predicted, iterations=band)
    return {"grid": np.ones(grid.shape, bool), "brain": brain, "band": near, "confident": brain & ~near}


def run_case(case: Path, model: sx.LoadedModel, device: torch.device, ks: list[int], samples: int,
             band: int, true_label: bool, crop: int, crop_ks: list[int]) -> dict[str, object]:
    scan, label = sx.read_volume(case / "image.nii.gz"), sx.read_volume(case / "label.nii.gz")
    start = time.perf_counter()
    segmentation = sx.segment(scan, model, device=device)
    target, channels = model.card.target_channels(None)
    predicted = np.isin(segmentation.probabilities.argmax(0), channels)
    truth = target_mask_on_grid(label, segmentation.model_grid, model, channels)
    # the true label as channel indices on the model grid (label values 0, 1, 2, 4 -> channels 0..3)
    values = np.array([c.label for c in model.card.classes])
    on_grid = resample_to_grid(label, segmentation.model_grid, interpolation="nearest").array
    true_classes = np.searchsorted(values, on_grid)
    image = torch.from_numpy(np.ascontiguousarray(segmentation.model_grid.array))[None, None]

    collaboration: dict[str, np.ndarray] = {}
    zero_voxels: dict[str, int] = {}
    seconds: dict[str, float] = {}
    variants = [(f"k={k}, y=argmax", k, segmentation.probabilities.argmax(0)) for k in ks]
    if true_label:
        variants.append((f"k={ks[0]}, y=true label", ks[0], true_classes))
    for name, k, pseudo_label in variants:
        tick = time.perf_counter()
        collaboration[name], zero = collaboration_volume(model, image, pseudo_label, CollaborationOptions(k=k),
                                                         device)
        seconds[name] = round(time.perf_counter() - tick, 1)
        zero_voxels[name] = int(zero.sum())
    reference = references(segmentation, model, channels, device, samples)
    masks = regions(segmentation, predicted, band)

    rows = []
    for (name, array), sigma in product(collaboration.items(), SIGMAS):
        smoothed = ndimage.gaussian_filter(array, sigma) if sigma else array
        for (against, other), (region, mask) in product(reference.items(), masks.items()):
            rows.append({"collaboration": name, "sigma": sigma, "against": against, "region": region,
                         **{key: round(value, 4) for key, value in agreement(smoothed, other, mask).items()}})
    default = collaboration[f"k={ks[0]}, y=argmax"]
    levels = {f"{region} mean": round(float(default[mask].mean()), 3) for region, mask in masks.items()}
    figure(case, segmentation.model_grid.array, predicted, default, reference, masks["brain"])
    sketch = sketch_study(model, image, segmentation.probabilities.argmax(0), predicted, reference, masks, crop,
                          crop_ks) if crop else []
    return {"case": case.name, "dice": round(dice(predicted, truth), 3),
            "voxels": {region: int(mask.sum()) for region, mask in masks.items()},
            "zero_gradient_voxels": zero_voxels, "collaboration_levels": levels, "seconds": seconds,
            "total_seconds": round(time.perf_counter() - start, 1), "rows": rows, "sketch": sketch}


def sketch_study(model: sx.LoadedModel, image: torch.Tensor, pseudo_label: np.ndarray, predicted: np.ndarray,
                 reference: dict[str, np.ndarray], masks: dict[str, np.ndarray], side: int,
                 ks: list[int]) -> list[dict[str, object]]:
    """Is the sketch's noise what hides the agreement? One cube of ``side`` voxels centred on the object:
    the map with k random directions for each k, and a second seed of the smallest k (its reproducibility),
    each compared with the ensemble entropy (cropped from the whole-scan map) in the cube's brain and band."""
    centre = np.round(ndimage.center_of_mass(predicted)).astype(int) if predicted.any() else \
        np.array(predicted.shape) // 2
    low = np.clip(centre - side // 2, 0, np.maximum(np.array(predicted.shape) - side, 0))
    cube = tuple(slice(a, a + side) for a in low)
    window = image[(slice(None), slice(None), *cube)]
    label = torch.from_numpy(np.ascontiguousarray(pseudo_label[cube]))[None]
    maps = {}
    for k, seed in [*((k, 0) for k in ks), (ks[0], 1)]:
        maps[(k, seed)] = collaboration_map(model.network, window, label, k=k, seed=seed)[0][0, 0].numpy()
    rows = []
    entropy_map = reference["ensemble entropy (all classes)"][cube]
    for (k, seed), array in maps.items():
        row: dict[str, object] = {"k": k, "seed": seed, "cube": list(map(int, low)), "side": side,
                                  "pearson with seed 0 of the same k" if seed else "pearson with largest k":
                                  round(float(np.corrcoef(array.ravel(), (maps[(k, 0)] if seed
                                                                          else maps[(ks[-1], 0)]).ravel())[0, 1]), 3)}
        for region in ("brain", "band"):
            row[f"pearson with ensemble entropy, {region}"] = round(
                agreement(array, entropy_map, masks[region][cube])["pearson"], 3)
        rows.append(row)
    return rows


def figure(case: Path, image: np.ndarray, predicted: np.ndarray, collaboration: np.ndarray,
           reference: dict[str, np.ndarray], brain: np.ndarray) -> None:
    """One axial slice through the object's centre: scan, collaboration map, ensemble entropy and variance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centre = [int(round(c)) for c in ndimage.center_of_mass(predicted)] if predicted.any() else \
        [s // 2 for s in image.shape]
    panels = [("scan, predicted outline", image, None),
              ("collaboration uncertainty (1 - cos)", collaboration, (0, 2)),
              ("ensemble entropy (all classes), nats", reference["ensemble entropy (all classes)"], None),
              ("ensemble variance (whole tumour)", reference["ensemble variance (target)"], None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.2))
    for axis, (title, array, limits) in zip(axes, panels):
        section = np.where(brain, array, np.nan)[:, :, centre[2]].T if limits else array[:, :, centre[2]].T
        shown = axis.imshow(section, origin="lower", cmap="gray" if limits is None and array is image else "viridis",
                            vmin=None if limits is None else limits[0], vmax=None if limits is None else limits[1])
        axis.contour(predicted[:, :, centre[2]].T, levels=[0.5], colors="red", linewidths=0.6)
        axis.set_title(title, fontsize=9)
        axis.axis("off")
        if array is not image:
            fig.colorbar(shown, ax=axis, fraction=0.046)
    fig.tight_layout()
    fig.savefig(case / "collaboration_agreement.png", dpi=80)
    plt.close(fig)


def summarise(results: list[dict[str, object]]) -> None:
    """Mean over cases of Pearson / top-10 % Dice for each protocol, as Markdown tables."""
    table: dict[tuple, list[tuple[float, float]]] = {}
    for result in results:
        for row in result["rows"]:
            key = (row["collaboration"], row["sigma"], row["against"], row["region"])
            table.setdefault(key, []).append((row["pearson"], row["dice_top10"]))
    names = [r["case"] for r in results]
    print("cases:", ", ".join(f"{r['case']} (Dice {r['dice']}, {r['total_seconds']} s)" for r in results))

    def cells(key: tuple) -> str:
        values = table[key]
        per_case = " / ".join(f"{p:+.2f}" for p, _ in values)
        return f"{np.mean([p for p, _ in values]):+.2f} ({per_case}) | {np.mean([d for _, d in values]):.2f}"

    collaborations = list(dict.fromkeys(k[0] for k in table))  # the first is the default map (first of --ks)
    against = list(dict.fromkeys(k[2] for k in table))
    regions_ = ["grid", "brain", "band", "confident"]
    print(f"\nPearson (mean, then per case: {' / '.join(names)}) | top-10 % Dice; default map, no smoothing")
    print("| reference | " + " | ".join(regions_) + " |")
    for name in against:
        print(f"| {name} | " + " | ".join(cells((collaborations[0], 0.0, name, r)) for r in regions_) + " |")
    print("\nAgainst ensemble entropy (all classes): map variant x smoothing sigma (voxels)")
    for region in regions_:
        for name, sigma in product(collaborations, SIGMAS):
            key = (name, sigma, "ensemble entropy (all classes)", region)
            print(f"| {region} | {name} | {sigma:g} | {cells(key)} |")
    for result in results:
        for row in result.get("sketch", []):
            print(f"| {result['case']} | " + " | ".join(str(v) for key, v in row.items() if key not in ("cube", "side"))
                  + " |")
    for result in results:
        print(result["case"], "levels", result["collaboration_levels"], "zero", result["zero_gradient_voxels"],
              "seconds", result["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="colin27:20001,colin27:20002,mni152:20003",
                        help="host:seed pairs (host: colin27, mni152, or a T1 path)")
    parser.add_argument("--cases-macaque", default="", help="seeds of lesions in the macaque brain (if installed)")
    parser.add_argument("--ks", default="16", help="numbers of sketch directions; the first is also used "
                        "with the true label")
    parser.add_argument("--samples", type=int, default=4, help="TTA transforms and MC-dropout samples")
    parser.add_argument("--band", type=int, default=3, help="half-width of the band around the object, voxels")
    parser.add_argument("--true-label", action="store_true", help="also the map with the true label as y")
    parser.add_argument("--crop", type=int, default=64, help="side of the cube of the sketch study (0: none)")
    parser.add_argument("--crop-ks", default="16,64,256", help="numbers of directions in the sketch study")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("collaboration_agreement"))
    parser.add_argument("--results", default="results.json", help="file name of the numbers under --out")
    parser.add_argument("--summarise", nargs="+", type=Path, help="only print the tables of these results files")
    args = parser.parse_args()
    if args.summarise:
        summarise([r for path in args.summarise for r in json.loads(path.read_text(encoding="utf-8"))])
        return
    torch.set_num_threads(args.threads)
    pairs = [tuple(p.split(":")) for p in args.cases.split(",") if p]
    if args.cases_macaque and Path(MACAQUE).exists():
        pairs += [(MACAQUE, s) for s in args.cases_macaque.split(",")]
    model = sx.load_model("brain-lesion-eunet")
    device = select_device("cpu")
    ks = [int(k) for k in args.ks.split(",")]
    results = []
    for host, seed in pairs:
        results.append(run_case(make_case(host, int(seed), args.out), model, device, ks, args.samples, args.band,
                                args.true_label, args.crop, [int(k) for k in args.crop_ks.split(",")]))
        (args.out / args.results).write_text(json.dumps(results, indent=1), encoding="utf-8")
    summarise(results)


if __name__ == "__main__":
    main()
