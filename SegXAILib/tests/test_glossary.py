"""Reader words: numbers rounded for reading, methods and maps by their reader names, the glossary's choice."""

from __future__ import annotations

import pytest

from SegXAILib.glossary import map_title, readable, readable_range, terms_used
from SegXAILib.methods import EXPLAINERS


@pytest.mark.parametrize("value, text", [
    (2.81e-18, "0"),  # a map's floor: no information, no exponent
    (0.08733427710197218, "0.0873"),
    (0.0036485, "0.0036"),  # at most 4 decimals
    (0.639, "0.639"),
    (0.5, "0.5"),  # no trailing zeros
    (52.013, "52"),
    (7057.124, "7,060"),
    (-4523.1, "-4,520"),
    (float("nan"), "nan"),
])
def test_numbers_are_rounded_to_three_significant_digits(value, text):
    assert readable(value) == text


@pytest.mark.parametrize("low, high, text", [
    (2.81e-18, 0.17, "0 to 0.17"),  # the floor read with the decimals of the top
    (1.3e-11, 1.0, "0 to 1"),
    (-4520.4, 4840.2, "-4,520 to 4,840"),
    (-339.0, 200.0, "-339 to 200"),
    (1e-6, 5e-5, "0.000001 to 0.00005"),  # a range that is small everywhere keeps its digits
])
def test_a_range_reads_both_ends_at_the_precision_of_the_larger(low, high, text):
    assert readable_range(low, high) == text


def test_every_method_and_known_map_has_a_reader_name():
    titles = {method: map_title(method, None) for method in EXPLAINERS}
    assert all(title != method or method in ("occlusion", "saliency") for method, title in titles.items())
    assert map_title("mcdropout", "mutual_information") == "Monte Carlo dropout: mutual information (model uncertainty)"
    assert map_title("mhex", "stage2") == "MHEX+ heads: stage 2"
    assert map_title("protoseg", "layer-model_1_submodule_2") == "ProtoSeg: one layer's map"  # no module path


def test_the_glossary_explains_only_the_words_a_page_uses():
    terms = [t.term for t in terms_used("Uncertainty (entropy, nats) of 2.1 mL; BALD")]
    assert terms == ["mL", "nats", "entropy", "mutual information (BALD)"]
    assert terms_used("a picture without units") == []
