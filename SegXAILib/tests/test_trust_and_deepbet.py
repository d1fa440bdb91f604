"""Trusting a model's code (TorchScript only with --trust-model-code), eager copies of TorchScript networks read
without running their code, model cards that say what a model is for, and deepbet as a SegXAI model.

The deepbet tests need the ``deepbet`` package (``pip install 'segxai[models]'``) and are skipped without it; they
compare with deepbet's own ``run_bet``, which runs the package's TorchScript (trusted: the test's reference).
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from SegXAILib.cli import build_parser
from SegXAILib.cli import main as segxai
from SegXAILib.errors import SegXAIError
from SegXAILib.models import registry
from SegXAILib.models.archive import is_torchscript_archive, read_archive_state_dict
from SegXAILib.models.card import ModelCard
from SegXAILib.models.linknet import LinkNet3d
from SegXAILib.models.networks import build_network
from SegXAILib.postprocessing import postprocess, validate_postprocessing
from SegXAILib.preprocessing import BrainMask
from SegXAILib.tests.conftest import oblique_scan
from SegXAILib.volume import Volume, read_volume, write_volume

CLASSES = [{"name": "background", "label": 0}, {"name": "lesion", "label": 1}]


# ------------------------------------------------------------------ an archive that writes a file while loading
class Marker(torch.nn.Module):
    """Writes (creates) the file ``path`` when ``torch.jit.load`` restores it: its ``__setstate__`` runs then."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.touched = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:
        self.path = state[0]
        self.training = state[1]
        # a shared mapping of a file that does not exist creates it: code of the archive writing a file
        self.touched = int(torch.from_file(self.path, True, 4, dtype=torch.uint8).numel())


class MarkedNet(torch.nn.Module):
    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = Marker(marker)
        self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.marker(x))


def marked_model(folder: Path) -> tuple[Path, Path]:
    """A TorchScript card whose archive writes ``folder/marker`` when opened; (card, marker)."""
    marker = folder / "marker"
    torch.manual_seed(0)
    torch.jit.script(MarkedNet(str(marker))).save(str(folder / "marked.pt"))
    assert not marker.exists()  # saving it ran nothing
    card = ModelCard.from_dict({"name": "marked", "architecture": {"name": "torchscript"}, "classes": CLASSES,
                                "preprocessing": {"spacing": None}, "patch_size": [16, 16, 16],
                                "weights": "marked.pt"}, root=folder)
    return card.save(folder / "marked.json"), marker


@pytest.fixture
def marked(tmp_path):
    return marked_model(tmp_path)


@pytest.fixture
def small_scan(tmp_path):
    return write_volume(oblique_scan((16, 16, 16)), tmp_path / "scan.nii.gz")


def test_the_marked_archive_does_write_its_file_when_torch_opens_it(marked):
    _, marker = marked
    torch.jit.load(str(marker.parent / "marked.pt"))
    assert marker.exists()  # so its absence below means the archive was never opened


def test_an_untrusted_torchscript_is_not_opened_one_line_exit_2(marked, small_scan, tmp_path, capsys):
    card, marker = marked
    for command in (["segment", str(small_scan)], ["explain", str(small_scan), "--methods", "occlusion"]):
        assert segxai([*command, "--model", str(card), "--out", str(tmp_path / "out"), "--progress", "none"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: refusing to open the TorchScript model"), err
        assert "--trust-model-code" in err[0] and "runs code" in err[0]
        assert not marker.exists() and not (tmp_path / "out" / "summary.json").exists()
    with pytest.raises(SegXAIError, match="trust_model_code=True"):
        registry.load_model(card)
    assert not marker.exists()


def test_an_audit_refuses_it_once_before_any_case(marked, small_scan, tmp_path, capsys):
    card, marker = marked
    assert segxai(["audit", str(small_scan.parent), "--model", str(card), "--methods", "occlusion",
                   "--out", str(tmp_path / "audit"), "--progress", "none"]) == 2
    assert "--trust-model-code" in capsys.readouterr().err and not marker.exists()
    assert not (tmp_path / "audit" / "cases").exists()


def test_trusted_it_loads_and_runs_its_code(marked, small_scan, tmp_path):
    card, marker = marked
    assert segxai(["segment", str(small_scan), "--model", str(card), "--out", str(tmp_path / "out"),
                   "--progress", "none", "--trust-model-code"]) == 0
    assert marker.exists() and (tmp_path / "out" / "summary.json").is_file()
    marker.unlink()
    model = registry.load_model(card, trust_model_code=True)
    assert model.route == "torchscript" and marker.exists()


def test_every_command_that_loads_a_model_takes_the_flag():
    parser = build_parser()
    for argv in (["segment", "s", "--out", "o"], ["explain", "s", "--out", "o"], ["evaluate-maps", "f"],
                 ["audit", "c", "--out", "o"], ["train-reliability", "c"]):
        assert parser.parse_args([*argv, "--trust-model-code"]).trust_model_code is True
        assert parser.parse_args(argv).trust_model_code is False


def test_listing_models_never_opens_one(marked, monkeypatch, capsys):
    card, marker = marked
    monkeypatch.setenv("SEGXAI_MODEL_PATH", str(card.parent))
    assert segxai(["models"]) == 0
    assert "marked" in capsys.readouterr().out
    assert registry.code_files(registry.resolve_card("marked")) == [card.parent / "marked.pt"]
    assert not marker.exists()


def test_reading_the_archives_tensors_runs_none_of_its_code(marked):
    card, marker = marked
    archive = card.parent / "marked.pt"
    assert is_torchscript_archive(archive) and not is_torchscript_archive(card)
    state = read_archive_state_dict(archive)
    assert sorted(state) == ["conv.bias", "conv.weight"] and not marker.exists()
    reference = torch.jit.load(str(archive)).state_dict()  # trusted here, to compare
    assert all(torch.equal(state[k], reference[k]) for k in state)


class _RunsCode:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_an_archive_whose_pickle_calls_anything_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"weight": _RunsCode(marker)}, protocol=2))
        archive.writestr("evil/constants.pkl", pickle.dumps(()))
        archive.writestr("evil/code/__torch__.py", "")
    with pytest.raises(SegXAIError, match="without running its code"):
        read_archive_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize("export", ["script", "trace"])
def test_a_torchscript_of_an_architecture_we_build_loads_eagerly_untrusted(tmp_path, export):
    architecture = {"name": "unet", "args": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}}
    torch.manual_seed(3)
    network = build_network(architecture, 1, 2).eval()
    x = torch.randn(1, 1, 16, 24, 32)
    scripted = torch.jit.script(network) if export == "script" else torch.jit.trace(network, x)
    scripted.save(str(tmp_path / "model.ts"))
    card = ModelCard.from_dict({"name": "eager", "architecture": architecture, "classes": CLASSES,
                                "patch_size": [16, 16, 16], "weights": "model.ts"}, root=tmp_path)
    model = registry.load_model(card.save(tmp_path / "eager.json"))  # no trust needed: no code runs
    assert model.route == "card" and model.supports_hooks
    reference = registry.load_model(ModelCard.from_dict({**card.to_dict(), "architecture": {"name": "torchscript"}},
                                                        root=tmp_path).save(tmp_path / "ts.json"),
                                    trust_model_code=True).network
    with torch.no_grad():
        assert torch.equal(model.network(x), reference(x))


# ------------------------------------------------------------------ model cards say what a model is for
def test_cards_carry_intended_use_and_limitations(tmp_path, capsys):
    data = {"name": "purposeful", "architecture": {"name": "unet"}, "classes": CLASSES, "patch_size": [16, 16, 16],
            "intended_use": "for tests", "limitations": "none known", "output": "probabilities"}
    card = ModelCard.from_dict(data)
    assert (card.intended_use, card.limitations, card.output) == ("for tests", "none known", "probabilities")
    again = ModelCard.from_dict(card.to_dict())
    assert (again.intended_use, again.limitations, again.output) == ("for tests", "none known", "probabilities")
    assert "intended_use" not in ModelCard.from_dict({**data, "intended_use": ""}).to_dict()
    for name in ("brain-lesion-unet", "brain-lesion-eunet", "brain-lesion-dual-encoder"):
        card = registry.resolve_card(name)
        assert "synthetic" in card.intended_use and "NOT validated on real tumours" in card.limitations
        assert "0.12 and 0.00" in card.limitations
    assert segxai(["models"]) == 0
    out = capsys.readouterr().out
    assert "intended use: Research and teaching" in out and "limitations: NOT validated on real tumours" in out


def test_summary_json_records_what_the_model_is_for(tmp_path, small_scan):
    torch.manual_seed(0)
    architecture = {"name": "unet", "args": {"channels": [4, 8, 16], "strides": [2, 2]}}
    network = build_network(architecture, 1, 2)
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(tmp_path / "w.safetensors"))
    card = ModelCard.from_dict({"name": "purposeful", "architecture": architecture, "classes": CLASSES,
                                "preprocessing": {"spacing": None}, "patch_size": [16, 16, 16],
                                "weights": "w.safetensors", "intended_use": "for tests",
                                "limitations": "none known"}, root=tmp_path).save(tmp_path / "card.json")
    assert segxai(["segment", str(small_scan), "--model", str(card), "--out", str(tmp_path / "out"),
                   "--progress", "none"]) == 0
    model = json.loads((tmp_path / "out" / "summary.json").read_text())["model"]
    assert model["intended_use"] == "for tests" and model["limitations"] == "none known"


# ------------------------------------------------------------------ postprocessing: deepbet's
def test_largest_component_and_filled_holes():
    validate_postprocessing({"largest_component": True, "fill_holes": False}, [0, 1])
    with pytest.raises(SegXAIError, match="true or false"):
        validate_postprocessing({"largest_component": 1}, [0, 1])
    foreground = np.zeros((12, 12, 12), bool)
    foreground[2:9, 2:9, 2:9] = True
    foreground[4:7, 4:7, 4:7] = False  # a hole
    foreground[10:12, 10:12, 10:12] = True  # a second, smaller piece
    p = np.stack([np.where(foreground, 0.2, 0.9), np.where(foreground, 0.8, 0.1)]).astype(np.float32)
    grid = Volume(np.zeros((12, 12, 12), np.float32))
    postprocess(p, grid, {"largest_component": True, "fill_holes": True}, [0, 1], BrainMask(grid))
    expected = np.zeros_like(foreground)
    expected[2:9, 2:9, 2:9] = True
    assert np.array_equal(p.argmax(0) == 1, expected)
    np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-6)


# ------------------------------------------------------------------ deepbet
def test_a_packaged_model_whose_package_is_absent_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(registry, "installed_version", lambda name: None)
    assert "deepbet" not in registry.available_cards()
    with pytest.raises(SegXAIError, match=r"needs the Python package deepbet.*pip install 'segxai\[models\]'"):
        registry.resolve_card("deepbet")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def deepbet_files():
    pytest.importorskip("deepbet")
    from deepbet.utils import DATA_PATH

    return Path(DATA_PATH) / "models" / "model.pt", Path(DATA_PATH) / "models" / "bbox_model.pt"


@pytest.mark.slow
def test_deepbets_networks_rebuilt_eagerly_equal_its_torchscript(deepbet_files):
    x = torch.randn(1, 1, 64, 96, 64, generator=torch.Generator().manual_seed(0))
    for path in deepbet_files:
        eager = LinkNet3d().eval()
        eager.load_state_dict(read_archive_state_dict(path), strict=True)
        with torch.no_grad():
            assert torch.equal(eager(x), torch.jit.load(str(path)).eval()(x))  # the reference: trusted here


def run_bet_mask(path: str) -> np.ndarray:
    """deepbet's own mask (its code and TorchScript), on the scan's grid as SegXAI reads it."""
    from deepbet import run_bet

    out = Path(path).parent / "run_bet_mask.nii.gz"
    run_bet([path], mask_paths=[str(out)], threshold=0.5, n_dilate=0, no_gpu=True)
    return read_volume(out).array > 0


@pytest.fixture(scope="module")
def deepbet_explained(deepbet_files, tmp_path_factory):
    """``segxai explain`` of MNI152 with deepbet and Grad-CAM, with torch.jit.load unusable (deepbet must run
    without opening its archives), and run_bet's mask of the same file."""
    from SegXAILib.data.samples import mni152_t1

    folder = tmp_path_factory.mktemp("deepbet")
    head = write_volume(mni152_t1(), folder / "mni152.nii.gz")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load was called")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.jit, "load", refuse)
        assert segxai(["explain", str(head), "--model", "deepbet", "--methods", "gradcam", "--out",
                       str(folder / "out"), "--progress", "none"]) == 0
    return folder / "out", run_bet_mask(str(head))


@pytest.mark.slow
def test_deepbet_gives_run_bets_mask_untrusted(deepbet_explained):
    out, reference = deepbet_explained
    ours = read_volume(out / "segmentation.nii.gz").array > 0
    assert dice(ours, reference) >= 0.99


@pytest.mark.slow
def test_deepbet_gives_run_bets_mask_on_colin27(deepbet_files, tmp_path):
    from SegXAILib.data.samples import MRICRON_TEMPLATES

    head = MRICRON_TEMPLATES / "ch2.nii.gz"
    if not head.is_file():
        pytest.skip("Colin27 (mricron-data) is not installed")
    scan = write_volume(read_volume(head), tmp_path / "ch2.nii.gz")
    assert segxai(["segment", str(scan), "--model", "deepbet", "--out", str(tmp_path / "out"),
                   "--progress", "none"]) == 0
    ours = read_volume(tmp_path / "out" / "segmentation.nii.gz").array > 0
    assert dice(ours, run_bet_mask(str(scan))) >= 0.99


@pytest.mark.slow
def test_deepbets_gradcam_of_the_brain_peaks_inside_the_brain(deepbet_explained):
    out, reference = deepbet_explained
    summary = json.loads((out / "summary.json").read_text())
    cam = read_volume(out / next(m["file"] for m in summary["maps"] if m["method"] == "gradcam")).array
    assert reference[np.unravel_index(np.argmax(cam), cam.shape)]
    top = cam >= np.quantile(cam, 0.99)
    assert (top & reference).sum() >= 0.95 * top.sum()
    assert cam[reference].mean() > 10 * cam[~reference].mean()


@pytest.mark.slow
def test_deepbets_card_says_what_it_is_for(deepbet_explained, capsys):
    out, _ = deepbet_explained
    model = json.loads((out / "summary.json").read_text())["model"]
    assert model["name"] == "deepbet" and "T1-weighted" in model["intended_use"]
    assert "Not a lesion model" in model["limitations"]
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "What this model is for" in report and "Not a lesion model" in report
    assert segxai(["models"]) == 0
    listing = capsys.readouterr().out
    assert "deepbet" in listing and "intended use: Brain masks of T1-weighted" in listing


def test_deepbet_archive_in_memory_reader_rejects_truncated_storages(deepbet_files, tmp_path):
    """A storage shorter than its tensors says so instead of reading past it."""
    path, _ = deepbet_files
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(tmp_path / "cut.pt", "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith("/data/0"):
                data = data[:64]
            target.writestr(item, data)
    with pytest.raises(SegXAIError, match="shorter"):
        read_archive_state_dict(tmp_path / "cut.pt")
