"""A MONAI bundle segments in SegXAI exactly as MONAI runs it.

Each test bundle is a complete inference config in the form of a Model Zoo segmentation bundle (dataset,
dataloader, evaluator, checkpoint loader, ``SaveImaged``), small enough for a test: the networks are narrow and
the prostate form resamples to 1 mm instead of 0.5 mm. The reference is MONAI's own ``SupervisedEvaluator``,
run by ``monai.bundle.run`` from the config file on the scan file, saving its labels with ``SaveImaged``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from SegXAILib.cli import main
from SegXAILib.errors import SegXAIError
from SegXAILib.inference import segment
from SegXAILib.models import registry
from SegXAILib.volume import Volume, read_volume, write_volume

SPLEEN = {
    "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                    "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 2, "norm": "batch"},
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "@image_key"},
        {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
        {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "@image_key", "pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": -57, "a_max": 164, "b_min": 0,
         "b_max": 1, "clip": True},
        {"_target_": "EnsureTyped", "keys": "@image_key"}]},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "sw_batch_size": 4, "overlap": 0.5},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "@image_key",
         "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_ext": ".nii.gz",
         "output_dtype": "$numpy.float32", "output_postfix": "trans", "separate_folder": True}]},
    "channel_def": {"0": "background", "1": "spleen"},
}
"""spleen_ct_segmentation: UNet, RAS, 1.5 x 1.5 x 2 mm, CT window, constant blending, softmax, Invertd bilinear."""

WHOLE_BODY_CLASSES = 105
WHOLE_BODY = {
    "displayable_configs": {"highres": True, "sw_overlap": 0.25, "sw_batch_size": 1},
    "pixdim": "$[1.5, 1.5, 1.5] if @displayable_configs#highres else [3.0, 3.0, 3.0]",
    "network_def": {"_target_": "SegResNet", "spatial_dims": 3, "in_channels": 1,
                    "out_channels": WHOLE_BODY_CLASSES, "init_filters": 8, "blocks_down": [1, 2, 2, 4],
                    "blocks_up": [1, 1, 1], "dropout_prob": 0.2},
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "@image_key"},
        {"_target_": "EnsureTyped", "keys": "@image_key"},
        {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
        {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "@image_key", "pixdim": "@pixdim", "mode": "bilinear"},
        {"_target_": "NormalizeIntensityd", "keys": "@image_key", "nonzero": True},
        {"_target_": "ScaleIntensityd", "keys": "@image_key", "minv": -1.0, "maxv": 1.0}]},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32],
                "sw_batch_size": "@displayable_configs#sw_batch_size", "overlap": "@displayable_configs#sw_overlap",
                "padding_mode": "replicate", "mode": "gaussian",
                "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')"},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "@image_key",
         "nearest_interp": True, "to_tensor": True},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_ext": ".nii.gz",
         "output_dtype": "$numpy.float32", "output_postfix": "trans", "separate_folder": True}]},
    "channel_def": {str(n): "background" if n == 0 else f"organ {n}" for n in range(WHOLE_BODY_CLASSES)},
}
"""wholeBody_ct_segmentation: SegResNet, 105 classes, its pixdim an expression (trust needed), z-score then
-1..1, Gaussian blending with replicate padding, the inferer's device an expression (SegXAI's choice: no trust
needed for it), argmax before Invertd with nearest interpolation."""

PROSTATE = {
    "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                    "channels": [4, 8, 16, 32], "strides": [2, 2, 2], "num_res_units": 4, "norm": "batch",
                    "act": "prelu", "dropout": 0.15},
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": [1.0, 1.0, 1.0], "mode": "bilinear"},
        {"_target_": "ScaleIntensityd", "keys": "image", "minv": 0, "maxv": 1},
        {"_target_": "NormalizeIntensityd", "keys": "image"},
        {"_target_": "EnsureTyped", "keys": "image"}]},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "sw_batch_size": 4, "overlap": 0.5},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {"_target_": "KeepLargestConnectedComponentd", "keys": "pred", "applied_labels": [1, 2]},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "meta_key_postfix": "meta_dict", "nearest_interp": False, "to_tensor": True},
        {"_target_": "SaveImaged", "keys": "pred", "resample": False, "meta_keys": "pred_meta_dict",
         "output_dir": "@output_dir"}]},
    "channel_def": {"0": "background", "1": "central gland", "2": "peripheral zone"},
}
"""prostate_mri_anatomy: UNet with PReLU and dropout, intensities to 0..1 then z-scored, argmax, the largest
connected piece of each class, Invertd."""

BRATS_SEQUENCES = {"0": "T1c", "1": "T1", "2": "T2", "3": "FLAIR"}
BRATS = {
    "network_def": {"_target_": "SegResNet", "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1], "init_filters": 8,
                    "in_channels": 4, "out_channels": 3, "dropout_prob": 0.2},
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "@image_key", "image_only": False},
        {"_target_": "NormalizeIntensityd", "keys": "@image_key", "nonzero": True, "channel_wise": True}]},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "sw_batch_size": 1, "overlap": 0.5},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "@image_key",
         "meta_keys": "pred_meta_dict", "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
        {"_target_": "Lambdad", "keys": "pred", "func": "$lambda x: torch.where(x[[2]] > 0, 4, torch.where(x[[0]] > 0, "
                                                        "1, torch.where(x[[1]] > 0, 2, 0)))"},
        {"_target_": "SaveImaged", "keys": "pred", "meta_keys": "pred_meta_dict", "output_dir": "@output_dir",
         "output_ext": ".nii.gz", "output_dtype": "uint8", "output_postfix": "seg", "separate_folder": True,
         "resample": False, "squeeze_end_dims": True}]},
    "channel_def": {"0": "Tumor core", "1": "Whole tumor", "2": "Enhancing tumor"},
    "sequences": BRATS_SEQUENCES,
}
"""brats_mri_segmentation: four sequences stacked by LoadImaged, no resampling, z-scored per channel inside the
head, sigmoid outputs of overlapping classes, Invertd, a threshold, and a Lambdad (code: trust needed) mapping them
to the labels 1, 2, 4."""

FORMS = {"spleen": SPLEEN, "whole_body": WHOLE_BODY, "prostate": PROSTATE}


def zoo_bundle(folder: Path, form: dict, scan: Path | list[Path] | None = None, seed: int = 0) -> Path:
    """A bundle folder of ``form``: configs/inference.json as the Model Zoo writes them, metadata.json, and
    random weights (models/model.pt, a state dict), balanced on ``scan`` (:func:`balance_classes`)."""
    from monai.bundle import ConfigParser

    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    inference = {
        "imports": ["$import glob", "$import numpy", "$import os"],
        "bundle_root": ".", "image_key": "image", "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data", "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        **{key: value for key, value in form.items() if key not in ("channel_def", "sequences")},
        "network": "$@network_def.to(@device)",
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": True},
        "checkpointloader": {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                             "load_dict": {"model": "@network"}},
        "initialize": ["$monai.utils.set_determinism(seed=123)", "$@checkpointloader(@evaluator)"],
        "run": ["$@evaluator.run()"],
    }
    (folder / "configs" / "inference.json").write_text(json.dumps(inference, indent=2))
    channels = form["channel_def"]
    meta = {"name": folder.name, "version": "0.1.0", "description": "a test bundle in a Model Zoo form",
            "network_data_format": {
                "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "CT",
                                     "num_channels": len(form.get("sequences", {"0": "CT"})),
                                     **({"channel_def": form["sequences"]} if "sequences" in form else {})}},
                "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": len(channels),
                                     "channel_def": channels}}}}
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2))
    torch.manual_seed(seed)
    parser = ConfigParser({**inference, "bundle_root": str(folder)})
    network = parser.get_parsed_content("network_def").eval()
    if scan is not None:
        files = str(scan) if isinstance(scan, Path) else [str(f) for f in scan]
        balance_classes(network, parser.get_parsed_content("preprocessing")({"image": files})["image"])
    torch.save(network.state_dict(), folder / "models" / "model.pt")
    return folder


def balance_classes(network: torch.nn.Module, image: torch.Tensor) -> None:
    """Shift the bias of the network's last convolution so that every class's logit has median 0 on ``image``
    (C, I, J, K): random weights then segment many classes, not one, and an equality of labels means something."""
    last = [m for m in network.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))][-1]
    crop = tuple(slice(0, n // 8 * 8) for n in image.shape[1:])  # a size every network here accepts
    with torch.no_grad():
        logits = network(torch.as_tensor(image)[(None, slice(None), *crop)])
        last.bias.sub_(logits[0].flatten(1).median(1).values)


def phantom_ct(shape=(44, 40, 36)) -> Volume:
    """A body-like CT (HU) on an oblique, anisotropic grid: air, a soft-tissue body, two organs, a bone."""
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(3)
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    hu = np.full(shape, -1000.0)
    hu[(k / 0.9) ** 2 + (j / 0.8) ** 2 + (i / 0.85) ** 2 < 1] = 40.0
    hu[(k - 0.2) ** 2 + (j + 0.3) ** 2 + (i - 0.1) ** 2 < 0.12] = 110.0
    hu[(k + 0.35) ** 2 + (j - 0.25) ** 2 + (i + 0.2) ** 2 < 0.06] = -20.0
    hu[(j - 0.45) ** 2 + (i + 0.45) ** 2 < 0.02] = 500.0
    hu += 12 * rng.standard_normal(shape)
    return Volume(hu.astype(np.float32), spacing=(1.3, 1.6, 2.1), origin=(-30.0, 12.5, 7.0),
                  direction=Rotation.from_euler("xyz", [10, -20, 165], degrees=True).as_matrix())


def monai_labels(folder: Path, scan: Path | list[Path], out: Path) -> np.ndarray:
    """The labels MONAI's own evaluator saves for ``scan`` (the bundle run from its config file), (K, J, I),
    rounded to the nearest label: the prostate form inverts its labels with bilinear interpolation and saves
    the fractions (float32), which a labelmap cannot hold."""
    from monai.bundle import run

    (out / "data").mkdir(parents=True)
    for file in [scan] if isinstance(scan, Path) else scan:
        (out / "data" / file.name).symlink_to(file)
    run(run_id="run", init_id="initialize", config_file=str(folder / "configs" / "inference.json"),
        meta_file=str(folder / "configs" / "metadata.json"), bundle_root=str(folder),
        dataset_dir=str(out / "data"), output_dir=str(out / "eval"))
    (saved,) = sorted((out / "eval").rglob("*.nii.gz"))
    return np.rint(read_volume(saved).array)


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory) -> Path:
    return write_volume(phantom_ct(), tmp_path_factory.mktemp("scan") / "case.nii.gz")


@pytest.mark.parametrize("name", list(FORMS))
def test_segxai_labels_equal_monai_running_the_bundle(name, tmp_path, scan_file):
    folder = zoo_bundle(tmp_path / name, FORMS[name], scan_file)
    trusted = name == "whole_body"  # its pixdim is a Python expression
    model = registry.load_model(folder, trust_model_code=trusted)
    scan = read_volume(scan_file)
    result = segment(scan, model, device="cpu")
    expected = monai_labels(folder, scan_file, tmp_path / "monai")

    assert result.labels.same_grid(scan) and result.labels.shape == expected.shape
    assert model.card.class_names == list(FORMS[name]["channel_def"].values())
    agreement = float((result.labels.array == expected).mean())
    assert agreement >= 0.999, f"{name}: {agreement:.4%} of voxels equal"
    present = np.bincount(expected.ravel().astype(np.int64)) / expected.size
    assert (present > 0.01).sum() >= 2, f"{name}: a trivial segmentation tests nothing ({present})"
    # the probabilities the explanations start from are the network's on the bundle's own grid
    assert result.probabilities.shape == (model.card.n_classes, *result.model_grid.shape)
    assert np.allclose(result.probabilities.sum(0), 1, atol=1e-4)


def test_a_scan_monai_cannot_read_is_handed_over_as_segxai_read_it(tmp_path, scan_file):
    """NRRD needs pynrrd or itk in MONAI (neither installed here), and a volume made in memory has no file: both
    reach the transforms as LoadImaged would give them, and segment as MONAI does from the NIfTI."""
    folder = zoo_bundle(tmp_path / "spleen", SPLEEN, scan_file)
    model = registry.load_model(folder)
    nifti = read_volume(scan_file)
    nrrd = read_volume(write_volume(nifti, tmp_path / "case.nrrd"))
    in_memory = Volume(nifti.array, nifti.spacing, nifti.origin, nifti.direction)
    assert in_memory.source is None and nifti.with_array(nifti.array).source is None
    assert model.pipeline.preprocess([nifti]).read_by == "LoadImaged"
    expected = monai_labels(folder, scan_file, tmp_path / "monai")
    for scan in (nrrd, in_memory):
        assert model.pipeline.preprocess([scan]).read_by == "SegXAI"
        assert float((segment(scan, model, device="cpu").labels.array == expected).mean()) >= 0.999


def test_the_windows_are_the_inferers(tmp_path):
    spleen = registry.load_model(zoo_bundle(tmp_path / "spleen", SPLEEN)).card.windows
    assert (spleen.size, spleen.overlap, spleen.blend, spleen.padding_mode, spleen.cval) == (
        (32, 32, 32), 0.5, "constant", "constant", 0.0)
    whole = registry.load_model(zoo_bundle(tmp_path / "body", WHOLE_BODY), trust_model_code=True).card.windows
    assert (whole.overlap, whole.blend, whole.padding_mode) == (0.25, "gaussian", "replicate")


def test_an_expression_in_a_needed_key_is_refused_but_the_inferers_device_is_segxais_choice(tmp_path, capsys):
    folder = zoo_bundle(tmp_path / "body", WHOLE_BODY)
    with pytest.raises(SegXAIError, match=r"its config key pixdim would run the Python expression \[1.5"):
        registry.load_model(folder)
    del_pixdim = json.loads((folder / "configs" / "inference.json").read_text())
    del_pixdim["pixdim"] = [1.5, 1.5, 1.5]
    (folder / "configs" / "inference.json").write_text(json.dumps(del_pixdim))
    assert registry.load_model(folder).card.windows.padding_mode == "replicate"  # loads with no trust


def test_explain_gives_maps_on_the_scans_grid_for_a_bundle(tmp_path, scan_file):
    folder = zoo_bundle(tmp_path / "spleen", SPLEEN, scan_file)
    out = tmp_path / "out"
    assert main(["explain", str(scan_file), "--model", str(folder), "--methods", "gradcam,occlusion",
                 "--out", str(out), "--no-report"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    scan = read_volume(scan_file)
    labels = read_volume(out / summary["files"]["segmentation"])
    assert labels.same_grid(scan)
    for entry in summary["maps"]:
        assert read_volume(out / entry["file"]).same_grid(scan, atol=1e-4)
    model = registry.load_model(folder)
    assert np.array_equal(labels.array, segment(scan, model, device="cpu").labels.array)


@pytest.fixture(scope="module")
def sequence_files(tmp_path_factory) -> list[Path]:
    return write_sequences(tmp_path_factory.mktemp("sequences"))


def write_sequences(folder: Path) -> list[Path]:
    """Four co-registered "sequences" of one head-like phantom (different contrasts), named so that sorting them
    gives the BraTS order T1c, T1, T2, FLAIR, as the form's datalist reads them."""
    ct = phantom_ct()
    body = ct.array > -500
    files = []
    for n, (name, gain) in enumerate(zip(BRATS_SEQUENCES.values(), (1.0, 0.6, -0.8, 0.3))):
        contrast = np.where(body, 300 + gain * ct.array + 15 * n, 0).astype(np.float32)
        files.append(write_volume(ct.with_array(contrast), folder / f"{n}_{name}.nii.gz"))
    return files


def brats_labels(folder: Path, files: list[Path], out: Path) -> np.ndarray:
    """MONAI's evaluator on the BraTS form: its datalist is one case, the list of the four files."""
    config = json.loads((folder / "configs" / "inference.json").read_text())
    config["datalist"] = "$[sorted(glob.glob(@dataset_dir + '/*.nii.gz'))]"
    (folder / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    return monai_labels(folder, files, out)


def test_a_multilabel_multisequence_bundle_segments_as_monai_with_overlapping_classes(tmp_path, sequence_files):
    folder = zoo_bundle(tmp_path / "brats", BRATS, sequence_files)
    with pytest.raises(SegXAIError, match=r"postprocessing\.transforms\.3\.func would run the Python expression la"):
        registry.load_model(folder)
    model = registry.load_model(folder, trust_model_code=True)
    assert model.card.multilabel and model.card.sequence_names == list(BRATS_SEQUENCES.values())
    assert model.card.class_names == list(BRATS["channel_def"].values())
    scans = [read_volume(f) for f in sequence_files]
    result = segment(scans, model, device="cpu")
    expected = brats_labels(folder, sequence_files, tmp_path / "monai")

    assert result.labels.same_grid(scans[0])
    assert float((result.labels.array == expected).mean()) >= 0.999
    assert set(np.unique(expected)) <= {0, 1, 2, 4} and len(np.unique(expected)) >= 3
    # the classes overlap, and each one's mask is the thresholded channel the label map was made from
    tumour_core, whole, enhancing = (m.array.astype(bool) for m in result.masks)
    assert (tumour_core & whole).any() and (whole & enhancing).any()
    assert np.array_equal(expected == 4, enhancing)
    assert np.array_equal((expected == 1), tumour_core & ~enhancing)
    # the order of the sequences is the model's: swapped scans give another segmentation (T1 and T2 here: T1c
    # and T1 are the same contrast up to a linear change, which the per-channel z-score removes)
    swapped = segment([scans[0], scans[2], scans[1], scans[3]], model, device="cpu")
    assert float((swapped.labels.array == result.labels.array).mean()) < 0.99


def test_a_wrong_number_of_scans_is_one_line_naming_the_sequences(tmp_path, sequence_files, capsys):
    folder = zoo_bundle(tmp_path / "brats", BRATS)
    with pytest.raises(SegXAIError, match=r"takes 4 scan\(s\), in this order: T1c, T1, T2, FLAIR; 2 given"):
        segment([read_volume(f) for f in sequence_files[:2]], registry.load_model(folder, trust_model_code=True))


@pytest.mark.slow
def test_explain_a_multilabel_class_from_four_scans(tmp_path, sequence_files, every_core):
    """One class of a multi-label model is explained as its own two-class model: the maps are on the first scan's
    grid, the per-class files overlap, the label map is the bundle's, and the report shows which scan drove it."""
    folder = zoo_bundle(tmp_path / "brats", BRATS, sequence_files)
    out = tmp_path / "out"
    assert main(["explain", *map(str, sequence_files), "--model", str(folder), "--trust-model-code",
                 "--methods", "gradcam,occlusion,tta,sequences", "--option", "tta.transforms=2",
                 "--option", "sequences.steps=4", "--target", "Whole tumor", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    first = read_volume(sequence_files[0])
    assert summary["input"] == [str(f) for f in sequence_files] and summary["sequences"] == ["T1c", "T1", "T2", "FLAIR"]
    assert {m["method"] for m in summary["maps"]} >= {"gradcam", "occlusion", "tta"}
    for entry in summary["maps"]:
        assert read_volume(out / entry["file"]).same_grid(first, atol=1e-4)
    masks = {c["name"]: read_volume(out / c["file"]).array.astype(bool) for c in summary["classes"]}
    assert (masks["Tumor core"] & masks["Whole tumor"]).any()
    whole_ml = masks["Whole tumor"].sum() * float(np.prod(first.spacing)) / 1000
    assert summary["scores"]["object_volume_ml"] == pytest.approx(whole_ml, abs=1e-3)
    assert {v["value"] for v in summary["labelmap"]["values"]} <= {1, 2, 4}
    # the report: the label map's values, the target's own class file, and the bar chart of the sequences
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Which scan drove the segmentation" in page and (out / "report" / "sequences.png").is_file()
    shares = next(e for e in summary["explanations"] if e["method"] == "sequences")["scalars"]
    assert sum(shares[f"ig_share.{name}"] for name in summary["sequences"]) == pytest.approx(1.0, abs=1e-6)
    for name in summary["sequences"]:
        assert f"<td>{name}</td><td class=\"num\">{shares[f'occlusion_logit_drop.{name}']:.2f}</td>" in page
