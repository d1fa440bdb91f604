"""Loading models by every route (card + safetensors/.pt, TorchScript, MONAI bundle), and refusing bad files."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet
from safetensors.torch import save_file

from SegXAILib.errors import SegXAIError
from SegXAILib.models import registry
from SegXAILib.models.bundle import BundleAxes, card_from_bundle
from SegXAILib.models.card import ModelCard
from SegXAILib.models.loaders import LoadedModel, load_from_card
from SegXAILib.models.networks import build_network

SMALL = {"name": "unet", "args": {"channels": [4, 8, 16], "strides": [2, 2]}}
WIDER = {"name": "unet", "args": {"channels": [8, 16, 32], "strides": [2, 2]}}
CLASSES = [{"name": "background", "label": 0}, {"name": "core", "label": 1}, {"name": "rim", "label": 4}]


def card_dict(name="small", architecture=SMALL, weights="small.safetensors", **changes):
    data = {
        "name": name, "architecture": architecture, "input": {"channels": 1, "modality": "MRI"},
        "classes": CLASSES, "groups": {"lesion": [1, 4]}, "default_target": "lesion",
        "preprocessing": {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0], "intensity": {"kind": "zscore_foreground"}},
        "patch_size": [16, 16, 16], "weights": weights,
    }
    data.update(changes)
    return data


def write_card(folder, **kwargs):
    data = card_dict(**kwargs)
    return ModelCard.from_dict(data, root=folder).save(folder / f"{data['name']}.json")


def small_network(architecture=SMALL, seed=0):
    torch.manual_seed(seed)
    return build_network(architecture, 1, 3).eval()


def random_input(shape=(1, 1, 16, 24, 32), seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def outputs(network, x):
    with torch.no_grad():
        return network(x)


# ------------------------------------------------------------------------------------------- card routes
def test_card_with_safetensors_gives_bitwise_identical_outputs(tmp_path):
    network = small_network()
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(tmp_path / "small.safetensors"))
    model = registry.load_model(write_card(tmp_path))
    assert isinstance(model, LoadedModel) and model.route == "card" and model.supports_hooks
    assert not model.network.training
    x = random_input()
    assert torch.equal(outputs(model.network, x), outputs(network, x))


def test_card_with_pt_state_dict_gives_bitwise_identical_outputs(tmp_path):
    network = small_network(seed=3)
    torch.save(network.state_dict(), tmp_path / "small.pt")
    model = registry.load_model(str(write_card(tmp_path, weights="small.pt")))
    x = random_input()
    assert torch.equal(outputs(model.network, x), outputs(network, x))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model.0.conv.weight": _RunsCode(marker)}, tmp_path / "small.pt")
    with open(tmp_path / "plain.pt", "wb") as f:  # a bare pickle (not torch's zip format) too
        pickle.dump({"w": _RunsCode(marker)}, f, protocol=2)
    for weights in ("small.pt", "plain.pt"):
        card = write_card(tmp_path, weights=weights)
        with pytest.raises(SegXAIError, match="refusing"):
            registry.load_model(card)
    assert not marker.exists()


def test_weights_of_another_architecture_are_named_as_mismatch(tmp_path):
    network = small_network(WIDER)
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(tmp_path / "small.safetensors"))
    with pytest.raises(SegXAIError, match="does not match") as info:
        registry.load_model(write_card(tmp_path))
    assert "shape mismatch" in str(info.value) and "\n" not in str(info.value)


def test_weights_with_other_keys_are_named_as_mismatch(tmp_path):
    state = {f"extra.{k}": v for k, v in small_network().state_dict().items()}
    torch.save(state, tmp_path / "small.pt")
    with pytest.raises(SegXAIError, match="does not match.*missing"):
        registry.load_model(write_card(tmp_path, weights="small.pt"))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth"])
def test_corrupt_weights_file_is_a_user_error(tmp_path, suffix):
    # Junk bytes make torch's restricted unpickler fail in many different ways (IndexError, KeyError,
    # EOFError, ...) depending on the bytes, so try many fixed junk files, not one random one.
    card = write_card(tmp_path, weights=f"small{suffix}")
    for seed in range(64):
        (tmp_path / f"small{suffix}").write_bytes(np.random.default_rng(seed).bytes(4096))
        with pytest.raises(SegXAIError, match=str(tmp_path / f"small{suffix}").replace("\\", "\\\\")):
            registry.load_model(card)


def test_missing_weights_file_is_a_user_error(tmp_path):
    with pytest.raises(SegXAIError, match="not found"):
        registry.load_model(write_card(tmp_path, weights="absent.safetensors"))


def test_pt_holding_something_other_than_a_state_dict_is_a_user_error(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "small.pt")
    with pytest.raises(SegXAIError, match="state dict"):
        registry.load_model(write_card(tmp_path, weights="small.pt"))


# ------------------------------------------------------------------------------------------- TorchScript
@pytest.mark.parametrize("export", ["script", "trace"])
def test_torchscript_card_matches_eager_and_has_no_hooks(tmp_path, export):
    network = small_network(seed=5)
    x = random_input(seed=2)
    scripted = torch.jit.script(network) if export == "script" else torch.jit.trace(network, x)
    scripted.save(str(tmp_path / "model.ts"))
    card = write_card(tmp_path, architecture={"name": "torchscript"}, weights="model.ts")
    with pytest.raises(SegXAIError, match="--trust-model-code"):  # torch.jit.load runs the archive's code
        registry.load_model(card)
    model = registry.load_model(card, trust_model_code=True)
    assert model.route == "torchscript"
    assert model.supports_hooks is False
    assert torch.allclose(outputs(model.network, x), outputs(network, x), atol=1e-5, rtol=0)


def test_corrupt_torchscript_is_a_user_error(tmp_path):
    (tmp_path / "model.ts").write_bytes(np.random.default_rng(0).bytes(2048))
    with pytest.raises(SegXAIError, match="TorchScript"):
        registry.load_model(write_card(tmp_path, architecture={"name": "torchscript"}, weights="model.ts"))


# ------------------------------------------------------------------------------------------- MONAI bundle
NETWORK_DEF = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
               "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0}


def bundle_network(seed=7):
    torch.manual_seed(seed)
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2),
                num_res_units=0).eval()


def make_bundle(folder, roi_size=(32, 32, 32), preprocessing=None, save="pt", metadata=True):
    """A MONAI Model Zoo style bundle folder, like spleen_ct_segmentation but tiny."""
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    if preprocessing is None:
        preprocessing = {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164,
             "b_min": 0.0, "b_max": 1.0, "clip": True},
            {"_target_": "EnsureTyped", "keys": "image"}]}
    inference = {
        "imports": ["$import glob"], "bundle_root": ".", "device": "$torch.device('cpu')",
        "network_def": NETWORK_DEF, "network": "$@network_def.to(@device)",
        "preprocessing": preprocessing,
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(roi_size), "sw_batch_size": 4,
                    "overlap": 0.5},
    }
    (folder / "configs" / "inference.json").write_text(json.dumps(inference, indent=2))
    if metadata:
        meta = {"name": "Tiny spleen", "version": "0.1.0", "description": "a test bundle",
                "network_data_format": {
                    "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT",
                                         "num_channels": 1, "spatial_shape": list(roi_size)}},
                    "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 2,
                                         "channel_def": {"0": "background", "1": "spleen"}}}}}
        (folder / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2))
    network = bundle_network()
    if save == "pt":
        torch.save(network.state_dict(), folder / "models" / "model.pt")
    elif save == "ts":
        torch.jit.script(network).save(str(folder / "models" / "model.ts"))
    return folder, network


def as_monai(network, x):
    """What the bundle's network gives for SegXAI's K,J,I array: MONAI runs it on I,J,K."""
    with torch.no_grad():
        return network(x.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2)


def test_bundle_loads_with_the_directly_built_network(tmp_path):
    folder, network = make_bundle(tmp_path / "spleen")
    model = registry.load_model(folder)
    assert model.route == "bundle" and model.supports_hooks and not model.network.training
    assert isinstance(model.network, BundleAxes)
    x = random_input()  # non-cubic, so a forgotten axis transpose would show
    assert torch.equal(outputs(model.network, x), as_monai(network, x))
    assert torch.equal(outputs(model.network.network, x), outputs(network, x))
    assert next(model.network.parameters()).device.type == "cpu"


def test_bundle_card_fields_are_derived_from_the_configs(tmp_path):
    folder, _ = make_bundle(tmp_path / "spleen")
    card = registry.resolve_card(str(folder))
    assert card.name == "Tiny spleen" and card.description == "a test bundle"
    assert card.class_names == ["background", "spleen"] and [c.label for c in card.classes] == [0, 1]
    assert card.classes[0].color == (0, 0, 0) and card.classes[1].color != card.classes[0].color
    assert card.input_channels == 1 and card.modality == "CT"
    assert card.patch_size == (32, 32, 32)
    assert card.preprocessing["spacing"] == [1.5, 1.5, 2.0]
    assert card.preprocessing["orientation"] == "RAS"
    assert card.preprocessing["intensity"] == {"kind": "ct_window", "window": [-57.0, 164.0], "clip": True}
    assert card.architecture == {"name": "monai_bundle", "args": {}}
    assert card.weights == "models/model.pt" and card.weight_paths == [folder.resolve() / "models" / "model.pt"]
    assert card.extra["bundle_root"] == str(folder.resolve())
    assert card.target_channels(None) == ("spleen", [1])


def test_bundle_patch_size_is_roi_size_in_segxai_axis_order(tmp_path):
    folder, _ = make_bundle(tmp_path / "b", roi_size=(16, 24, 40))
    assert card_from_bundle(folder).patch_size == (40, 24, 16)


def test_bundle_without_spacing_keeps_native_spacing_and_reads_other_normalisations(tmp_path):
    zscore = {"_target_": "Compose", "transforms": "$@transforms"}
    folder, _ = make_bundle(tmp_path / "z", preprocessing=zscore)
    config = json.loads((folder / "configs" / "inference.json").read_text(encoding="utf-8"))
    config["transforms"] = [{"_target_": "monai.transforms.NormalizeIntensityd", "keys": "image", "nonzero": True}]
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    card = card_from_bundle(folder)
    assert card.preprocessing["spacing"] is None
    assert "orientation" not in card.preprocessing
    assert card.preprocessing["intensity"] == {"kind": "zscore_foreground"}

    folder, _ = make_bundle(tmp_path / "p", preprocessing={"_target_": "Compose", "transforms": []})
    assert card_from_bundle(folder).preprocessing["intensity"] == {"kind": "percentile", "lower": 0.5, "upper": 99.5}


def test_bundle_overrides_in_segxai_json_are_respected(tmp_path):
    folder, network = make_bundle(tmp_path / "spleen")
    overrides = {"classes": [{"name": "background", "label": 0}, {"name": "organ", "label": 1, "color": [1, 2, 3]}],
                 "groups": {"abdomen": [1]}, "default_target": "abdomen",
                 "preprocessing": {"spacing": [1.0, 1.0, 1.0]}, "patch_size": [16, 16, 16]}
    (folder / "configs" / "segxai.json").write_text(json.dumps(overrides))
    model = registry.load_model(folder)
    card = model.card
    assert card.class_names == ["background", "organ"] and card.classes[1].color == (1, 2, 3)
    assert card.target_channels(None) == ("abdomen", [1])
    assert card.preprocessing["spacing"] == [1.0, 1.0, 1.0]
    assert card.preprocessing["intensity"]["kind"] == "ct_window"  # merged, not replaced
    assert card.patch_size == (16, 16, 16)
    assert model.route == "bundle"
    x = random_input()
    assert torch.equal(outputs(model.network, x), as_monai(network, x))


def test_bundle_with_invalid_overrides_is_a_user_error(tmp_path):
    folder, _ = make_bundle(tmp_path / "spleen")
    (folder / "configs" / "segxai.json").write_text('{"default_target": ')
    with pytest.raises(SegXAIError, match="segxai.json"):
        card_from_bundle(folder)
    (folder / "configs" / "segxai.json").write_text('{"preprocessing": {"intensity": {"kind": "magic"}}}')
    with pytest.raises(SegXAIError, match="unknown intensity"):
        card_from_bundle(folder)


def test_bundle_with_only_torchscript_loads_it(tmp_path):
    folder, network = make_bundle(tmp_path / "ts", save="ts")
    with pytest.raises(SegXAIError, match="--trust-model-code"):
        registry.load_model(folder)
    model = registry.load_model(folder, trust_model_code=True)
    assert model.card.weights == "models/model.ts"
    assert model.supports_hooks is False
    x = random_input()
    assert torch.allclose(outputs(model.network, x), as_monai(network, x), atol=1e-5, rtol=0)


def test_bundle_refuses_a_malicious_model_pt(tmp_path):
    folder, _ = make_bundle(tmp_path / "evil", save=None)
    marker = tmp_path / "pwned"
    torch.save({"model.0.conv.weight": _RunsCode(marker)}, folder / "models" / "model.pt")
    with pytest.raises(SegXAIError, match="refusing"):
        registry.load_model(folder)
    assert not marker.exists()


def test_bundle_weights_not_matching_network_def(tmp_path):
    folder, _ = make_bundle(tmp_path / "b", save=None)
    torch.save(UNet(3, 1, 2, (8, 16, 32), (2, 2)).state_dict(), folder / "models" / "model.pt")
    with pytest.raises(SegXAIError, match="does not match"):
        registry.load_model(folder)


def test_bundle_without_weights_is_a_user_error(tmp_path):
    folder, _ = make_bundle(tmp_path / "b", save=None)
    with pytest.raises(SegXAIError, match="model.pt"):
        registry.load_model(folder)


def test_bundle_with_unbuildable_network_def_is_a_user_error(tmp_path):
    folder, _ = make_bundle(tmp_path / "b")
    config = json.loads((folder / "configs" / "inference.json").read_text(encoding="utf-8"))
    config["network_def"]["_target_"] = "NoSuchNetworkAnywhere"
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(SegXAIError, match="network_def"):
        registry.load_model(folder)


def test_folder_without_inference_config_is_not_a_bundle(tmp_path):
    (tmp_path / "notabundle" / "models").mkdir(parents=True)
    with pytest.raises(SegXAIError, match="not a MONAI bundle.*configs/inference.json"):
        registry.load_model(tmp_path / "notabundle")


def test_bundle_without_metadata_falls_back_to_network_def(tmp_path):
    folder, _ = make_bundle(tmp_path / "b", metadata=False)
    card = card_from_bundle(folder)
    assert card.name == "b" and card.class_names == ["background", "class 1"] and card.input_channels == 1


# ------------------------------------------------------------------------------------------- registry
def test_unknown_model_name_lists_the_available_ones(tmp_path, monkeypatch):
    network = small_network()
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(tmp_path / "small.safetensors"))
    write_card(tmp_path, name="my-own-model")
    monkeypatch.setenv("SEGXAI_MODEL_PATH", str(tmp_path))
    with pytest.raises(SegXAIError, match="unknown model 'no-such-model'; available: .*my-own-model"):
        registry.load_model("no-such-model")


def test_model_path_env_makes_cards_findable_by_name(tmp_path, monkeypatch):
    network = small_network(seed=11)
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(tmp_path / "small.safetensors"))
    card_path = write_card(tmp_path, name="my-own-model")
    (tmp_path / "notes.json").write_text('{"not": "a card"}')  # skipped, not an error
    monkeypatch.setenv("SEGXAI_MODEL_PATH", os.pathsep.join([str(tmp_path / "missing"), str(tmp_path)]))
    assert registry.available_cards()["my-own-model"] == card_path
    model = registry.load_model("my-own-model")
    x = random_input()
    assert torch.equal(outputs(model.network, x), outputs(network, x))
    monkeypatch.delenv("SEGXAI_MODEL_PATH")
    assert "my-own-model" not in registry.available_cards()


def test_missing_card_path_is_a_user_error(tmp_path):
    with pytest.raises(SegXAIError, match="model not found"):
        registry.load_model(str(tmp_path / "absent.json"))


# ------------------------------------------------------------------------------------------- card validation
def test_unknown_intensity_kind_is_refused():
    data = card_dict(preprocessing={"intensity": {"kind": "minmax"}})
    with pytest.raises(SegXAIError, match="unknown intensity normalisation 'minmax'"):
        ModelCard.from_dict(data)


@pytest.mark.parametrize("patch", [[16, 16], [16, 0, 16], [16, 16, 16, 16], "big"])
def test_bad_patch_size_is_refused(patch):
    with pytest.raises(SegXAIError, match="patch_size|invalid field"):
        ModelCard.from_dict(card_dict(patch_size=patch))


def test_missing_field_and_bad_json_are_user_errors(tmp_path):
    data = card_dict()
    del data["classes"]
    with pytest.raises(SegXAIError, match="missing or has an invalid field"):
        ModelCard.from_dict(data)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SegXAIError, match="not valid JSON"):
        ModelCard.load(tmp_path / "bad.json")


def test_groups_must_name_known_labels_and_labels_must_be_distinct():
    with pytest.raises(SegXAIError, match="group 'lesion'.*\\[7\\]"):
        ModelCard.from_dict(card_dict(groups={"lesion": [1, 7]}))
    with pytest.raises(SegXAIError, match="distinct labels"):
        ModelCard.from_dict(card_dict(classes=[{"name": "a", "label": 0}, {"name": "b", "label": 0}]))


def test_target_channels_resolves_classes_groups_and_labels():
    card = ModelCard.from_dict(card_dict())
    assert card.target_channels("lesion") == ("lesion", [1, 2])
    assert card.target_channels("Rim") == ("rim", [2])
    assert card.target_channels("4") == ("rim", [2])  # a label value, not a channel index
    assert card.target_channels(None) == ("lesion", [1, 2])
    with pytest.raises(SegXAIError, match="unknown class 'edema'.*core, rim, lesion"):
        card.target_channels("edema")


def test_card_round_trips_through_json(tmp_path):
    card = ModelCard.from_dict(card_dict(), root=tmp_path)
    again = ModelCard.load(card.save(tmp_path / "card.json"))
    assert again.to_dict() == card.to_dict() and again.root == tmp_path


def test_ensemble_card_loads_each_member(tmp_path):
    nets = [small_network(seed=s) for s in (0, 1)]
    for n, net in enumerate(nets):
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / f"m{n}.safetensors"))
    card = ModelCard.load(write_card(tmp_path, weights=["m0.safetensors", "m1.safetensors"]))
    x = random_input()
    for n, net in enumerate(nets):
        assert torch.equal(outputs(load_from_card(card, n).network, x), outputs(net, x))
