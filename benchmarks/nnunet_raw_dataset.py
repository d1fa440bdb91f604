"""Lay out ``segxai synth-dataset`` cases as an nnU-Net v2 raw dataset, to train the small nnU-Net model
SegXAI's tests explain (SegXAILib/models/weights/nnunet-lesion-tiny; commands in docs/nnunet.md).

Each case's T1 image is resampled to a coarse isotropic grid (linear) and its tumour labels (1, 2, 4) to
one "lesion" label (nearest neighbour), so that nnU-Net plans a small network that trains on a CPU in
minutes. Writes ``imagesTr/<case>_0000.nii.gz``, ``labelsTr/<case>.nii.gz`` and ``dataset.json``.

    python benchmarks/nnunet_raw_dataset.py CASES_FOLDER nnUNet_raw/Dataset901_SegXAILesion --spacing 3

``--tiny-plans PLANS_JSON`` instead writes, beside nnU-Net's own plans (``nnUNetPlans.json``), a copy
``nnUNetPlans_tiny.json`` whose 3d_fullres U-Net has 8 to 64 features per stage (nnU-Net plans 32 to 320)
and a patch of 48 voxels per axis, so that the checkpoint is a few MB and a scan takes several
sliding-window tiles, and whose 2d U-Net has 8 to 64 features per stage too (nnU-Net plans 32 to 512; its
patch and batch are nnU-Net's); preprocessing is unchanged (same data identifiers), as nnU-Net's
documentation on editing plans files describes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import SimpleITK as sitk


def resample_isotropic(image: sitk.Image, spacing_mm: float, interpolator: int) -> sitk.Image:
    """``image`` on a grid of ``spacing_mm`` voxels covering the same field of view (same origin, direction)."""
    size = [max(1, round(n * s / spacing_mm)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), (spacing_mm,) * 3,
                         image.GetDirection(), 0, image.GetPixelID())


def write_raw_dataset(cases: Path, out: Path, spacing_mm: float) -> int:
    """Write every case folder under ``cases`` (image.nii.gz, label.nii.gz) into ``out``; returns the count."""
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(exist_ok=True)
    folders = sorted(p for p in cases.iterdir() if (p / "image.nii.gz").is_file())
    for folder in folders:
        image = sitk.Cast(sitk.ReadImage(str(folder / "image.nii.gz")), sitk.sitkFloat32)
        sitk.WriteImage(resample_isotropic(image, spacing_mm, sitk.sitkLinear),
                        str(out / "imagesTr" / f"{folder.name}_0000.nii.gz"))
        lesion = sitk.Cast(sitk.ReadImage(str(folder / "label.nii.gz")) > 0, sitk.sitkUInt8)
        sitk.WriteImage(resample_isotropic(lesion, spacing_mm, sitk.sitkNearestNeighbor),
                        str(out / "labelsTr" / f"{folder.name}.nii.gz"))
    dataset = {"channel_names": {"0": "T1"}, "labels": {"background": 0, "lesion": 1},
               "numTraining": len(folders), "file_ending": ".nii.gz",
               "name": "SegXAILesion", "description": "synthetic brain tumours (segxai synth-dataset), "
               "all tumour labels merged into one lesion label"}
    (out / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    return len(folders)


def narrow_unet(config: dict, features: tuple[int, ...]) -> None:
    """Set the U-Net of a plans configuration to ``features`` per stage (one per stage nnU-Net planned)."""
    arch = config["architecture"]["arch_kwargs"]
    if len(features) != arch["n_stages"]:
        raise SystemExit(f"nnU-Net planned {arch['n_stages']} stages; give as many feature counts")
    arch["features_per_stage"] = list(features)


def write_tiny_plans(plans_json: Path, features: tuple[int, ...] = (8, 16, 32, 64, 64),
                     patch_size: int = 48, features_2d: tuple[int, ...] = (8, 16, 32, 64, 64)) -> Path:
    """Write ``nnUNetPlans_tiny.json`` beside ``plans_json``: its 3d_fullres U-Net narrowed to ``features``
    per stage and its patch to ``patch_size`` voxels per axis; its 2d U-Net (where planned) narrowed to
    ``features_2d``, patch and batch left as nnU-Net planned them."""
    plans = json.loads(plans_json.read_text())
    plans["plans_name"] = "nnUNetPlans_tiny"
    config = plans["configurations"]["3d_fullres"]
    narrow_unet(config, features)
    config["patch_size"] = [patch_size] * 3
    if "2d" in plans["configurations"]:
        narrow_unet(plans["configurations"]["2d"], features_2d)
    out = plans_json.with_name("nnUNetPlans_tiny.json")
    out.write_text(json.dumps(plans, indent=2) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", type=Path, nargs="?", help="a segxai synth-dataset output folder")
    parser.add_argument("out", type=Path, nargs="?", help="nnUNet_raw/DatasetXXX_Name")
    parser.add_argument("--spacing", type=float, default=3.0, help="isotropic voxel size in mm (default 3)")
    parser.add_argument("--tiny-plans", type=Path, metavar="PLANS_JSON",
                        help="nnUNet_preprocessed/DatasetXXX_Name/nnUNetPlans.json: write nnUNetPlans_tiny.json")
    args = parser.parse_args()
    if args.tiny_plans is not None:
        print(f"wrote {write_tiny_plans(args.tiny_plans)}")
    else:
        print(f"wrote {write_raw_dataset(args.cases, args.out, args.spacing)} cases to {args.out}")


if __name__ == "__main__":
    main()
