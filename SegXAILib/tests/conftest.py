"""Shared fixtures: small real models and scans written to real files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from SegXAILib.models.card import ModelCard
from SegXAILib.models.networks import build_network
from SegXAILib.volume import Volume, write_volume


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` inside the block, and back to what they were after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests use tiny tensors: one thread avoids oversubscribing small CI machines (10x slower)."""
    with torch_threads(1):
        yield


@pytest.fixture
def every_core():
    """For a test that runs real-size scans in this process (and compares with nothing computed in another
    process): torch threads on every core, as a user's run has them (autouse fixtures run first, so this
    overrides :func:`one_torch_thread` and is undone before it)."""
    with torch_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1):
        yield


TINY_ARCH = {"name": "unet", "args": {"channels": [4, 8, 16], "strides": [2, 2]}}


def make_card(folder, name="tiny", input_channels=1, architecture=TINY_ARCH, weights_from=None,
              spacing=(2.0, 2.0, 2.0)):
    """Write a card and matching random weights (or weights of ``weights_from`` architecture)."""
    torch.manual_seed(0)
    network = build_network(weights_from or architecture, input_channels, 3)
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(folder / f"{name}.safetensors"))
    card = ModelCard.from_dict({
        "name": name, "architecture": architecture, "input": {"channels": input_channels, "modality": "MRI"},
        "classes": [{"name": "background", "label": 0}, {"name": "core", "label": 1}, {"name": "rim", "label": 4}],
        "groups": {"lesion": [1, 4]}, "default_target": "lesion",
        "preprocessing": {"orientation": "RAS", "spacing": list(spacing), "intensity": {"kind": "zscore_foreground"}},
        "patch_size": [16, 16, 16], "weights": f"{name}.safetensors"}, root=folder)
    return card.save(folder / f"{name}.json")


@pytest.fixture
def tiny_card(tmp_path):
    return make_card(tmp_path)


def oblique_scan(shape=(20, 24, 28), seed=0) -> Volume:
    """A blob in noise on an oblique, anisotropic grid."""
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    array = (100 * (k**2 + j**2 + i**2 < 0.4) + 20 + 5 * rng.standard_normal(shape)).astype(np.float32)
    return Volume(array, spacing=(1.1, 1.7, 2.3), origin=(-12.5, 30.25, 7.0),
                  direction=Rotation.from_euler("xyz", [12, -25, 160], degrees=True).as_matrix())


@pytest.fixture
def scan_file(tmp_path):
    return write_volume(oblique_scan(), tmp_path / "scan.nii.gz")


def explain_context(network, image, channels=(1,), patch=None, options=None, architecture="unet"):
    """An ExplainContext for ``network`` on ``image`` (1, C, *S): a card with ``patch`` (default: the
    image, i.e. one window) and the network's own softmax as the probabilities."""
    from SegXAILib.explain.base import ExplainContext
    from SegXAILib.models.loaders import LoadedModel

    with torch.no_grad():
        logits = network(image)
    card = ModelCard.from_dict({
        "name": "test", "architecture": {"name": architecture},
        "classes": [{"name": f"class{c}", "label": c} for c in range(logits.shape[1])],
        "patch_size": list(patch or image.shape[2:])})
    return ExplainContext(LoadedModel(card, network, "card"), image, "target", list(channels),
                          torch.softmax(logits, 1)[0].numpy(), options=options or {})
