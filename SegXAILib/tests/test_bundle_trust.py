"""A MONAI bundle's config is read as data: code in the keys SegXAI needs (``$`` expressions, ``_target_``s off the
allowlist) is refused before anything runs unless the user trusts the bundle; other keys are never looked at.

Every bundle here is a Model Zoo style folder (:func:`make_bundle`, a tiny spleen UNet) whose code, if it ran,
would write a marker file: its absence is the proof that nothing was evaluated."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from SegXAILib.cli import main
from SegXAILib.errors import SegXAIError
from SegXAILib.models import registry
from SegXAILib.models.bundle import card_from_bundle, code_in_bundle
from SegXAILib.tests.conftest import oblique_scan
from SegXAILib.tests.test_model_loading import as_monai, make_bundle, outputs, random_input
from SegXAILib.volume import write_volume


def edit_config(folder, change):
    """Rewrite the bundle's configs/inference.json with ``change(config)`` applied."""
    path = folder / "configs" / "inference.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    change(config)
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def system_call(marker):
    """A ``$`` expression that writes ``marker`` when evaluated."""
    return f"$__import__('os').system('touch {marker}') or 2"


def subprocess_target(marker):
    """A ``_target_`` entry that writes ``marker`` when instantiated."""
    return {"_target_": "subprocess.run", "args": [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]}


def expression_in_network_def(config, marker):
    config["network_def"]["out_channels"] = system_call(marker)


def subprocess_as_network_def(config, marker):
    config["network_def"] = subprocess_target(marker)


def subprocess_behind_a_reference(config, marker):
    config["preprocessing"]["transforms"].append("@my_transform")
    config["my_transform"] = subprocess_target(marker)


@pytest.mark.parametrize("plant, key, runs", [
    (expression_in_network_def, "network_def.out_channels", "__import__('os').system('touch"),
    (subprocess_as_network_def, "network_def._target_", "subprocess.run"),
    (subprocess_behind_a_reference, "my_transform._target_", "subprocess.run"),
])
def test_segment_refuses_code_in_a_needed_key_with_one_line_and_runs_nothing(tmp_path, capsys, plant, key, runs):
    folder, _ = make_bundle(tmp_path / "bundle")
    marker = tmp_path / "MARKER"
    edit_config(folder, lambda config: plant(config, marker))
    scan = write_volume(oblique_scan((16, 16, 16)), tmp_path / "scan.nii.gz")
    code = main(["segment", str(scan), "--model", str(folder), "--out", str(tmp_path / "out"), "--device", "cpu"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("error: refusing to open the MONAI bundle") and "--trust-model-code" in lines[0]
    assert f"config key {key} would run " in lines[0] and runs in lines[0]
    assert not marker.exists() and not (tmp_path / "out" / "summary.json").exists()


def test_an_allowed_network_that_would_download_pretrained_weights_needs_trust(tmp_path):
    folder, _ = make_bundle(tmp_path / "bundle")
    edit_config(folder, lambda config: config["network_def"].update(pretrained=True))
    assert code_in_bundle(folder) == [("network_def.pretrained", "a download of pretrained weights")]
    edit_config(folder, lambda config: config["network_def"].update(pretrained=False))
    assert code_in_bundle(folder) == []


def test_audit_refuses_the_bundle_before_any_case(tmp_path, capsys):
    folder, _ = make_bundle(tmp_path / "bundle")
    marker = tmp_path / "MARKER"
    edit_config(folder, lambda config: subprocess_as_network_def(config, marker))
    (tmp_path / "cases").mkdir()
    write_volume(oblique_scan((16, 16, 16)), tmp_path / "cases" / "case1.nii.gz")
    code = main(["audit", str(tmp_path / "cases"), "--model", str(folder), "--out", str(tmp_path / "out"),
                 "--methods", "saliency", "--device", "cpu"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "network_def._target_ would run subprocess.run" in lines[0]
    assert not marker.exists() and not (tmp_path / "out" / "cases").exists()


def test_the_planted_code_does_run_when_the_bundle_is_trusted(tmp_path):
    """So the marker's absence above means nothing was evaluated: trusted, MONAI's ConfigParser runs both."""
    folder, network = make_bundle(tmp_path / "expression")
    edit_config(folder, lambda config: expression_in_network_def(config, tmp_path / "first"))
    model = registry.load_model(folder, trust_model_code=True)  # os.system returns 0: out_channels = 0 or 2
    x = random_input()
    assert (tmp_path / "first").exists() and torch.equal(outputs(model.network, x), as_monai(network, x))
    folder, _ = make_bundle(tmp_path / "target")
    edit_config(folder, lambda config: subprocess_as_network_def(config, tmp_path / "second"))
    with pytest.raises(SegXAIError, match="network_def builds a CompletedProcess, not a torch module"):
        registry.load_model(folder, trust_model_code=True)
    assert (tmp_path / "second").exists()


def test_the_card_is_derived_without_evaluating_a_value(tmp_path):
    """An expression in the inferer's roi_size is not evaluated for the card (its default patch is used); loading
    refuses it by name."""
    folder, _ = make_bundle(tmp_path / "bundle")
    marker = tmp_path / "MARKER"
    edit_config(folder, lambda config: config["inferer"].update(roi_size=system_call(marker)))
    assert card_from_bundle(folder).patch_size == (96, 96, 96)
    with pytest.raises(SegXAIError, match=r"inferer\.roi_size would run the Python expression __import__"):
        registry.load_model(folder)
    assert not marker.exists()


def test_a_trusted_expression_is_evaluated_and_the_network_is_the_bundles(tmp_path, capsys):
    folder, network = make_bundle(tmp_path / "bundle")
    edit_config(folder, lambda config: config["network_def"].update(channels=[4, "$int(2)*4", 16]))
    assert code_in_bundle(folder) == [("network_def.channels.1", "the Python expression int(2)*4")]
    with pytest.raises(SegXAIError, match=r"network_def\.channels\.1 would run the Python expression int\(2\)\*4"):
        registry.load_model(folder)
    model = registry.load_model(folder, trust_model_code=True)
    x = random_input()
    assert torch.equal(outputs(model.network, x), as_monai(network, x))
    scan = write_volume(oblique_scan((16, 16, 16)), tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    assert main(["segment", str(scan), "--model", str(folder), "--out", str(out), "--device", "cpu",
                 "--trust-model-code"]) == 0, capsys.readouterr().err
    assert (out / "summary.json").is_file()


def test_keys_segxai_does_not_need_are_never_evaluated(tmp_path):
    folder, network = make_bundle(tmp_path / "bundle")
    marker = tmp_path / "MARKER"

    def plant(config):
        config["imports"] = [f"$__import__('os').system('touch {marker}')"]
        config["datalist"] = system_call(marker)
        config["handlers"] = [subprocess_target(marker)]
        config["evaluator"] = subprocess_target(marker)

    edit_config(folder, plant)
    assert code_in_bundle(folder) == []
    model = registry.load_model(folder)  # no trust needed: the network is built as data
    x = random_input()
    assert torch.equal(outputs(model.network, x), as_monai(network, x))
    assert not marker.exists()


def test_allowlisted_dotted_targets_and_plain_references_need_no_trust(tmp_path):
    folder, network = make_bundle(tmp_path / "bundle")

    def plant(config):
        config["network_def"]["_target_"] = "monai.networks.nets.UNet"
        config["network_def"]["channels"] = "$@widths"
        config["network_def"]["strides"] = "@strides"
        config.update(widths=[4, 8, 16], strides=[2, 2])

    edit_config(folder, plant)
    assert code_in_bundle(folder) == []
    x = random_input()
    assert torch.equal(outputs(registry.load_model(folder).network, x), as_monai(network, x))


@pytest.mark.parametrize("target", ["monai.bundle.scripts.run", "torch.load", "builtins.eval", "UNet.__init__"])
def test_targets_outside_monai_networks_transforms_inferers_and_torch_nn_are_refused(tmp_path, target):
    folder, _ = make_bundle(tmp_path / "bundle")
    edit_config(folder, lambda config: config["network_def"].update(_target_=target))
    assert code_in_bundle(folder) == [("network_def._target_", target)]
    with pytest.raises(SegXAIError, match=r"network_def\._target_ would run "):
        registry.load_model(folder)


def test_segxai_models_lists_a_bundle_without_evaluating_it(tmp_path, capsys, monkeypatch):
    models = tmp_path / "models"
    folder, _ = make_bundle(models / "my_spleen")
    marker = tmp_path / "MARKER"
    edit_config(folder, lambda config: (expression_in_network_def(config, marker),
                                        subprocess_as_network_def(config, marker)))
    monkeypatch.setenv("SEGXAI_MODEL_PATH", str(models))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "Tiny spleen" in out and str(folder) in out and "classes: spleen" in out
    assert registry.available_cards()["Tiny spleen"] == folder
    assert not marker.exists()
