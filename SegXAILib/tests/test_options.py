"""Typed method options: --option pairs, names, types, ranges, aliases and defaults (explain/options.py)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

from SegXAILib.errors import SegXAIError
from SegXAILib.explain.base import ExplainContext
from SegXAILib.explain.gradcam import SegGradCAM, SegGradCAMPlusPlus
from SegXAILib.methods import EXPLAINERS, MethodOptions, check_options, explainer_class, parse_option_pairs
from SegXAILib.models.card import Windows
from SegXAILib.models.registry import load_model


def error_of(raw, methods=None) -> str:
    with pytest.raises(SegXAIError) as caught:
        check_options(raw, methods)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_pairs_are_json_decoded_where_json_else_text():
    pairs = ["gradcam.layer=bottleneck", "tta.transforms=4", "tta.plane=[0, 1]", "misure.margin=null",
             "misure.lambda=0.02", "misure.baseline=min", "gradcam.layer=a=b", "gradcam.box=0,4,0,4,0,4"]
    assert parse_option_pairs(pairs) == {
        "gradcam": {"layer": "a=b", "box": "0,4,0,4,0,4"}, "tta": {"transforms": 4, "plane": [0, 1]},
        "misure": {"margin": None, "lambda": 0.02, "baseline": "min"}}
    assert parse_option_pairs([]) == {}


@pytest.mark.parametrize("pair", ["gradcam=1", "layer=bottleneck", "gradcam.layer", "bottleneck"])
def test_a_pair_not_method_name_value_is_an_error(pair):
    with pytest.raises(SegXAIError) as caught:
        parse_option_pairs(["tta.transforms=4", pair])
    assert str(caught.value) == f"bad --option {pair!r}; write METHOD.NAME=VALUE, e.g. gradcam.layer=bottleneck"


def test_a_misspelt_name_is_an_error_naming_the_valid_ones():
    assert error_of({"protoseg": {"layer": "bottleneck"}}) == (
        "unknown option protoseg.layer; the options of protoseg are: resolution, layers, max_voxels")
    assert error_of({"attention": {"layer": "x"}}) == "unknown option attention.layer; attention takes no options"


def test_an_unknown_method_is_an_error_naming_the_valid_ones():
    message = error_of({"protosg": {"layers": "bottleneck"}})
    assert "'protosg'" in message and ", ".join(EXPLAINERS) in message


@pytest.mark.parametrize("raw, message", [
    ({"tta": {"transforms": 1}}, "option tta.transforms must be an integer from 2 to 16, got 1"),
    ({"tta": {"transforms": 17}}, "option tta.transforms must be an integer from 2 to 16, got 17"),
    ({"tta": {"transforms": "abc"}}, "option tta.transforms must be an integer from 2 to 16, got 'abc'"),
    ({"tta": {"plane": "1,1"}},
     "option tta.plane must be two different spatial axes among 0, 1, 2, e.g. 1,2, got '1,1'"),
    ({"mcdropout": {"samples": 1}}, "option mcdropout.samples must be an integer >= 2, got 1"),
    ({"ensemble": {"margin": -1}}, "option ensemble.margin must be an integer >= 0, got -1"),
    ({"mhex-uncertainty": {"route": "bogus"}},
     "option mhex-uncertainty.route must be one of sketch, exact, got 'bogus'"),
    ({"protoseg": {"max_voxels": 1.5}}, "option protoseg.max_voxels must be an integer >= 1, got 1.5"),
    ({"protoseg": {"resolution": "full"}}, "option protoseg.resolution must be one of input, feature, got 'full'"),
    ({"misure": {"tau": 0}}, "option misure.tau must be a number in (0, 1], got 0"),
    ({"misure": {"radius": True}}, "option misure.radius must be an integer >= 1, got True"),
    ({"misure": {"margin": -1}}, "option misure.margin must be an integer >= 0 or null, got -1"),
    ({"misure": {"baseline": "max"}},
     "option misure.baseline must be a number or 'min' (the scan's minimum), got 'max'"),
    ({"gradcam": {"overlap": 1}},
     "option gradcam.overlap must be a number in [0, 1), or null: the model's own windows, got 1"),
    ({"gradcampp": {"box": [0, 4]}}, "option gradcampp.box must be [k0, k1, j0, j1, i0, i1] (six integers) or null, "
                                     "got [0, 4]"),
])
def test_a_bad_value_is_an_error(raw, message):
    assert error_of(raw) == message


def test_values_are_converted_to_the_declared_types():
    parsed = check_options(parse_option_pairs(
        ["gradcam.layer=decoder_all,bottleneck,decoder_all", "gradcam.box=0,4,0,4,0,4", "tta.plane=0 2",
         "tta.transforms=4.0", "misure.steps=12", "misure.lr=1", "misure.margin=null", "misure.baseline=min",
         "mhex-uncertainty.k=\"8\""]))
    assert parsed["gradcam"].layer == ("decoder_all", "bottleneck") and parsed["gradcam"].box == (0, 4, 0, 4, 0, 4)
    assert parsed["tta"].plane == (0, 2) and parsed["tta"].transforms == 4
    misure = parsed["misure"]
    assert (misure.steps, misure.lr, misure.margin, misure.baseline) == (12, 1.0, None, "min")
    assert isinstance(misure.lr, float) and parsed["mhex-uncertainty"].k == 8
    assert check_options({"tta": {"plane": [2, 0]}})["tta"].plane == (2, 0)


def test_lambda_is_the_alias_of_lam_and_lam_is_not_an_option():
    assert check_options(parse_option_pairs(["misure.lambda=0.02"]))["misure"].lam == 0.02
    message = error_of({"misure": {"lam": 0.02}})
    assert message.startswith("unknown option misure.lam;") and "lambda" in message


def test_defaults_are_the_previous_hard_coded_values(tiny_card):
    defaults = {name: asdict(options) for name, options in check_options({}, list(EXPLAINERS)).items()}
    # overlap None: the model's own windows, for SegXAI's cards the previous 0.25 with Gaussian blending
    assert load_model(tiny_card).card.windows == Windows((16, 16, 16), 0.25, "gaussian", 0.125, "constant", None)
    grad_cam = {"layer": ("last_decoder",), "region": None, "box": None, "mask": None, "overlap": None,
                "window": "model"}
    assert defaults == {
        "gradcam": grad_cam, "gradcampp": grad_cam,
        "protoseg": {"resolution": "input", "layers": ("last_decoder",), "max_voxels": 160**3},
        "attention": {}, "fusion": {}, "mhex": {},
        "misure": {"radius": 3, "tau": 0.9, "max_dilations": 20, "baseline": None, "coarse": 4, "steps": 100,
                   "lr": 0.1, "lam": 0.01, "gamma": 0.0, "tv_beta": 1.0, "alpha_background": 1.0,
                   "alpha_target": 2.0, "margin": 16, "max_voxels": None},
        "occlusion": {"margin": 16, "overlap": None, "window": "model", "cube": 16, "stride": 8, "baseline": None,
                      "reach": 0, "max_cubes": 27, "batch": 4},
        "saliency": {"margin": 16, "overlap": None, "window": "model"},
        "smoothgrad": {"margin": 16, "overlap": None, "window": "model", "samples": 8, "noise": 0.1, "seed": 0,
                       "batch": 4},
        "integrated-gradients": {"margin": 16, "overlap": None, "window": "model", "steps": 16, "method": "quadratic",
                                 "baseline": None, "batch": 4},
        "sequences": {"margin": 16, "overlap": None, "window": "model", "steps": 16, "batch": 4},
        "mhex-uncertainty": {"route": "sketch", "k": 64, "chunk": 2, "seed": 0},
        "mcdropout": {"margin": 3, "samples": 8, "seed": 0},
        "tta": {"margin": 3, "transforms": None, "plane": (1, 2)},  # None: nnU-Net's own mirroring, else 8
        "ensemble": {"margin": 3}}


@pytest.mark.parametrize("method", list(EXPLAINERS))
def test_every_method_declares_typed_options(method):
    options = explainer_class(method).Options
    assert issubclass(options, MethodOptions) and options is not MethodOptions
    assert error_of({method: {"nonsense": 1}}).startswith(f"unknown option {method}.nonsense;")


def test_check_options_returns_given_and_default_options():
    given = SegGradCAM.Options(overlap=0.5)
    parsed = check_options({"gradcam": given, "tta": {"transforms": 4}}, ["tta", "misure"])
    assert parsed["gradcam"] is given and parsed["tta"].transforms == 4
    assert parsed["misure"] == explainer_class("misure").Options() and set(parsed) == {"gradcam", "tta", "misure"}
    assert "'nope'" in error_of({}, ["nope"])


def test_check_options_imports_only_the_methods_named():
    code = ("import sys; from SegXAILib.methods import check_options; check_options({'tta': {}}, ['mhex']); "
            "print(sorted(m for m in sys.modules if m.startswith('SegXAILib.explain.') "
            "or m.startswith('SegXAILib.uncertainty.')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for module in ("gradcam", "protoseg", "misure", "attention", "fusion", "collaboration"):
        assert module not in loaded
    assert "sampling" in loaded and "mhex" in loaded


def context_with(options) -> ExplainContext:
    return ExplainContext(model=None, image=torch.zeros(1, 1, 2, 2, 2), target="t", channels=[1],
                          probabilities=np.zeros((2, 2, 2, 2), np.float32), options=options)


def test_the_context_parses_raw_options_and_keeps_parsed_ones():
    mask = np.zeros((2, 2, 2), bool)
    mask[0] = True
    context = context_with({"gradcam": {"mask": mask, "layer": "bottleneck"},
                            "gradcampp": SegGradCAM.Options(overlap=0.5)})
    gradcam = context.options_for(SegGradCAM())
    assert gradcam.layer == ("bottleneck",) and gradcam.mask.dtype == bool and np.array_equal(gradcam.mask, mask)
    assert context.options_for(SegGradCAMPlusPlus()).overlap == 0.5
    assert context_with({}).options_for(SegGradCAM()).overlap is None
    with pytest.raises(SegXAIError, match="unknown option gradcam.layers; the options of gradcam are: layer, "):
        context_with({"gradcam": {"layers": "bottleneck"}}).options_for(SegGradCAM())
