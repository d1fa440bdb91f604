"""Finding a network's layers by role, and capturing what they output (:class:`LayerCapture` within one
forward pass, :func:`stitched_outputs` over the scan's sliding windows).

Explainers name layers by role or by module name:

- ``last_decoder`` (default of Grad-CAM, as in paper 001): the last feature block before the
  output layer, i.e. the last decoder conv block of a U-Net;
- ``bottleneck``: the last block at the coarsest resolution;
- ``decoder_all``: the last block of every decoder resolution level, coarse to fine;
- any name from ``network.named_modules()``.

Roles are found the same way for every network, with one probe forward pass (no gradients,
eval mode; on an example input, e.g. a window of the scan, or else zeros of 16^3, 32^3, ... with
the first conv's channels) that records which modules ran, in which order, and what they returned:

1. *conv leaves* are the ``Conv``/``ConvTranspose`` modules (1D/2D/3D) that ran; the last one to
   run is the *output layer*.
2. every other conv leaf is lifted to its *block*: its outermost ancestor that returns a tensor of
   the conv's output shape (so the norm and activation after the conv, and a residual addition,
   are included, but a skip concatenation is not), whose conv leaves all output that resolution
   (so a whole encoder level is not taken as one block) and which does not contain the output
   layer.
3. blocks in the order they finished are the network's feature layers (:func:`conv_layers`);
   ``last_decoder`` is the last of them, ``bottleneck`` the last one at the smallest spatial size,
   and ``decoder_all`` the last block of each run of equal resolution after the bottleneck. A
   network without a decoder (nothing after the bottleneck) gets ``[last_decoder]``.

On MONAI's ``UNet`` this gives ``model.1.submodule.2`` as last decoder with
``num_res_units=0`` (the top ``up`` layer is the output conv itself; it reads the skip
concatenation of ``model.0`` and that block) and ``model.2.0`` with ``num_res_units>0`` (the
transposed-conv block before the final one-subunit residual conv); on ``AttentionUnet`` the
top merge conv ``model.1.merge``. Networks whose output layer is not the last conv to run (heads
after the final conv, e.g. deep-supervision outputs computed last) should name their layer.

Readers meet layers by role and grid, not module name (:func:`layer_names`): blocks before the bottleneck are
encoder stages, the blocks ``decoder_all`` takes decoder stages (the others decoder blocks), the last one the
last decoder stage; the grid is the model grid's spacing times the layer's downsampling ("last decoder stage,
3 mm grid" is ``model.1.submodule.2`` of the bundled U-Net on its 1.5 mm model grid).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..errors import SegXAIError
from ..inference import sliding_window_predict
from ..upsampling import upsample_to
from .base import ExplainContext

LAYER_ROLES = ("last_decoder", "bottleneck", "decoder_all")
DEFAULT_LAYER = "last_decoder"
PROBE_SIZES = (16, 32, 64, 128)
"""Edge lengths tried for the automatic probe input (the first one the network accepts is used)."""


@dataclass(frozen=True)
class _Call:
    """One module call seen by the probe: its name and output shape, in the order calls finished."""

    name: str
    shape: tuple[int, ...]


def _is_within(name: str, ancestor: str) -> bool:
    """``name`` is ``ancestor`` or one of its descendants (``""`` is the root)."""
    return ancestor == "" or name == ancestor or name.startswith(ancestor + ".")


def _ancestors(name: str) -> list[str]:
    """Proper ancestors of a module name below the root, outermost first: ``a.b.c`` -> ``[a, a.b]``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@contextmanager
def _eval_mode(network: nn.Module) -> Iterator[None]:
    """Eval mode for the duration (a probe must not update batch-norm statistics), then restore."""
    modes = {m: m.training for m in network.modules()}
    network.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def _probe_input(network: nn.Module) -> Iterator[torch.Tensor]:
    """Candidate probe inputs: channels and dimensionality of the first conv, edge lengths :data:`PROBE_SIZES`."""
    first = next((m for m in network.modules() if isinstance(m, _ConvNd)), None)
    if first is None:
        raise SegXAIError("the network has no convolution layers; name the layer to explain explicitly")
    parameter = next(network.parameters())
    spatial_dims = len(first.kernel_size)
    for size in PROBE_SIZES:
        yield torch.zeros((1, first.in_channels, *(size,) * spatial_dims), dtype=parameter.dtype,
                          device=parameter.device)


def _trace(network: nn.Module, example: torch.Tensor | None) -> list[_Call]:
    """Run one forward pass and list the module calls that returned a tensor, in the order they finished."""
    calls: list[_Call] = []
    names = {module: name for name, module in network.named_modules()}

    def record(module: nn.Module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor) and module in names:
            calls.append(_Call(names[module], tuple(output.shape)))

    examples = [example] if example is not None else _probe_input(network)
    handles = [m.register_forward_hook(record) for m in names]
    error: Exception | None = None
    try:
        with torch.no_grad(), _eval_mode(network):
            for x in examples:
                calls.clear()
                try:
                    network(x)
                    return calls
                except (RuntimeError, ValueError) as exc:  # a size the network cannot take: try the next
                    error = exc
    finally:
        for handle in handles:
            handle.remove()
    raise SegXAIError(f"could not run the network on a probe input to find its layers ({str(error)[:200]}); "
                      "name the layer to explain explicitly") from None


def _blocks(network: nn.Module, example: torch.Tensor | None) -> list[_Call]:
    """Feature blocks (see the module docstring) in the order they finished; the output layer excluded."""
    return _blocks_in(network, _trace(network, example))


def _blocks_in(network: nn.Module, calls: list[_Call]) -> list[_Call]:
    """The feature blocks among the module calls of one traced forward pass (:func:`_blocks`)."""
    modules = dict(network.named_modules())
    convs = [c for c in calls if isinstance(modules[c.name], _ConvNd) and len(c.shape) > 2]
    if len(convs) < 2:
        raise SegXAIError("the network has fewer than two convolution layers; name the layer to explain explicitly")
    output = convs[-1].name
    finished = {c.name: (i, c) for i, c in enumerate(calls)}  # last call of each module
    blocks: dict[str, int] = {}
    for conv in convs[:-1]:
        block = conv.name
        for ancestor in _ancestors(conv.name):
            if ancestor not in finished or _is_within(output, ancestor):
                continue
            same_resolution = all(c.shape[2:] == conv.shape[2:] for c in convs if _is_within(c.name, ancestor))
            if finished[ancestor][1].shape == conv.shape and same_resolution:
                block = ancestor
                break
        blocks[block] = finished[block][0]
    return [finished[name][1] for name in sorted(blocks, key=blocks.get)]


def _size(call: _Call) -> int:
    return math.prod(call.shape[2:])


def _bottleneck_index(blocks: list[_Call]) -> int:
    """Index of the bottleneck: the last block at the smallest spatial size."""
    smallest = min(_size(b) for b in blocks)
    return max(i for i, b in enumerate(blocks) if _size(b) == smallest)


def _role(blocks: list[_Call], role: str) -> list[_Call]:
    """The blocks playing ``role`` (one of :data:`LAYER_ROLES`)."""
    if role == "last_decoder":
        return [blocks[-1]]
    bottleneck = _bottleneck_index(blocks)
    if role == "bottleneck":
        return [blocks[bottleneck]]
    decoder = blocks[bottleneck + 1:]
    # the last block of each run of equal resolution is what the next level (or the output) reads
    stages = [b for b, after in zip(decoder, decoder[1:] + [None]) if after is None or after.shape[2:] != b.shape[2:]]
    return stages or [blocks[-1]]


def parse_layer_specs(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """A layer option (``"a,b"`` or ``["a", "b"]``; module names have dots, never commas; a number, as JSON
    gives ``5``, is a name) -> specs.

    Duplicates are dropped; an empty value means :data:`DEFAULT_LAYER`.
    """
    if value is None:
        return (DEFAULT_LAYER,)
    specs = [str(s).strip() for s in (value if isinstance(value, (list, tuple)) else str(value).split(","))]
    return tuple(dict.fromkeys(spec for spec in specs if spec)) or (DEFAULT_LAYER,)


def conv_layers(network: nn.Module, example: torch.Tensor | None = None) -> list[tuple[str, nn.Module]]:
    """Every conv block of ``network`` in forward order, the output layer excluded.

    Args:
        network: an eager module mapping (N, C, *spatial) to logits.
        example: an input the network accepts, (1, C, *spatial); ``None``: zeros of 16^3, 32^3, ... (the
            first size that runs), with the channels of the first conv.

    Returns:
        ``(name, module)`` pairs; a block's output is post-normalisation/activation (see the module docstring).
    """
    modules = dict(network.named_modules())
    return [(b.name, modules[b.name]) for b in _blocks(network, example)]


def resolve_layers(network: nn.Module, spec: str,
                   example: torch.Tensor | None = None) -> list[tuple[str, nn.Module]]:
    """The module(s) a layer spec names: a role from :data:`LAYER_ROLES` or a name from ``named_modules()``.

    Raises:
        SegXAIError: unknown name (the message lists close matches and the network's conv blocks).
    """
    modules = dict(network.named_modules())
    if spec in LAYER_ROLES:
        return [(b.name, modules[b.name]) for b in _role(_blocks(network, example), spec)]
    if spec in modules and spec != "":
        return [(spec, modules[spec])]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(spec, names, n=5)
    try:
        blocks = [name for name, _ in conv_layers(network, example)]
    except SegXAIError:
        blocks = names
    suggestions = close or blocks[-5:]
    raise SegXAIError(f"the network has no layer {spec!r}; use one of {', '.join(LAYER_ROLES)} or a module name, "
                      f"e.g. {', '.join(suggestions)} ({len(names)} modules in network.named_modules())")


@dataclass(frozen=True)
class LayerName:
    """One layer as a reader and as an expert name it.

    Attributes:
        module: its name in ``network.named_modules()``, for experts (``model.1.submodule.2``).
        role: its place in the network (``last decoder stage``, ``bottleneck``, ``encoder stage``, ``decoder
            stage``; ``part of the ...`` for a module inside a block).
        grid: the size of its voxels: the model grid's spacing times the layer's downsampling
            (``1.5 mm grid``; ``4x coarser grid`` when the spacing is not known).
        slug: file-safe and unique among the network's layers (``last-decoder-stage``, ``encoder-stage-3mm``).
    """

    module: str
    role: str
    grid: str
    slug: str

    @property
    def words(self) -> str:
        """``last decoder stage, 1.5 mm grid``."""
        return f"{self.role}, {self.grid}" if self.grid else self.role


def _grid_words(downsampling: Sequence[float], spacing: Sequence[float] | None) -> str:
    """``1.5 mm grid`` (``1.5 x 1.5 x 3 mm grid`` when anisotropic) from the layer's downsampling per axis and the
    model grid's spacing (mm, same axes); ``full-resolution grid`` / ``4x coarser grid`` without a spacing."""
    if spacing is None:
        factors = sorted({f"{f:.2g}" for f in downsampling})
        return "full-resolution grid" if factors == ["1"] else f"{' x '.join(factors)}x coarser grid"
    sizes = [f"{s * f:.2g}" for s, f in zip(spacing, downsampling)]
    return f"{sizes[0] if len(set(sizes)) == 1 else ' x '.join(sizes)} mm grid"


def _slug(words: str) -> str:
    """``encoder stage 1.5 mm`` -> ``encoder-stage-1_5mm``, ``1 x 1 x 3 mm`` -> ``1x1x3mm`` (letters, digits, ``-``
    and ``_`` only)."""
    words = words.replace(" mm", "mm").replace(" x ", "x").replace(".", "_")
    return re.sub(r"[^A-Za-z0-9_]+", "-", words).strip("-")


def _block_roles(blocks: list[_Call]) -> list[str]:
    """The role of each block (:class:`LayerName`): before the bottleneck the encoder; after it the decoder, whose
    stages are the blocks ``decoder_all`` takes (the last of each resolution), the others its blocks."""
    bottleneck = _bottleneck_index(blocks)
    stages = {b.name for b in _role(blocks, "decoder_all")}

    def role(i: int, block: _Call) -> str:
        if i == len(blocks) - 1:
            return "last decoder stage" if bottleneck < i else "last feature layer"
        if i <= bottleneck:
            return "bottleneck" if i == bottleneck else "encoder stage"
        return "decoder stage" if block.name in stages else "decoder block"
    return [role(i, block) for i, block in enumerate(blocks)]


def layer_names(network: nn.Module, modules: Sequence[str], example: torch.Tensor | None = None,
                spacing: Sequence[float] | None = None) -> dict[str, LayerName]:
    """Readers' names of ``modules`` (names from ``network.named_modules()``), from one probe pass.

    Args:
        example: an input the network accepts, as for :func:`conv_layers` (``None``: zeros of 16^3, ...).
        spacing: the model grid's voxel size in mm along the array's axes; ``None``: grids named by downsampling.

    Returns:
        module name -> :class:`LayerName`, for every conv block (:func:`conv_layers`) and every one of ``modules``.
        Blocks of one role on one grid are numbered (``decoder stage 1 of 2``); a slug gets the grid only
        where its role alone would not be unique.
    """
    calls = _trace(network, example)
    shapes = {c.name: c.shape[2:] for c in calls}
    model_grid = shapes[""] if "" in shapes else calls[-1].shape[2:]  # the network's output: the model grid
    blocks = _blocks_in(network, calls)
    roles = dict(zip((b.name for b in blocks), _block_roles(blocks)))
    for name in modules:
        if name not in roles:
            inside = [block for block in roles if _is_within(name, block)]
            roles[name] = f"part of the {roles[inside[0]]}" if inside else f"layer {name}"
    grids = {name: _grid_words([m / n for m, n in zip(model_grid, shapes[name])], spacing) if name in shapes else ""
             for name in roles}
    numbered: dict[str, str] = {}
    for name, role in roles.items():
        twins = [other for other in roles if roles[other] == role and grids[other] == grids[name]]
        numbered[name] = role if len(twins) == 1 else f"{role} {twins.index(name) + 1} of {len(twins)}"
    slugs: dict[str, str] = {}
    for name, role in numbered.items():
        alone = sum(r == role for r in numbered.values()) == 1
        slugs[name] = _slug(role if alone else f"{role} {grids[name].removesuffix(' grid')}")
    return {name: LayerName(name, numbered[name], grids[name], slugs[name]) for name in numbered}


class LayerCapture:
    """Context manager recording the outputs of ``modules`` in forward passes; hooks removed on exit.

    With ``leaf=True``, an output that does not already require grad (the first hooked layer to run, when the
    parameters and the input do not require grad) is replaced in the forward pass by a detached copy that does
    (``act.detach().requires_grad_()``); later hooked layers computed from it stay in its graph. Then
    ``torch.autograd.grad(score, capture.outputs)`` gives every layer's gradient while autograd keeps only the
    graph from the first hooked layer to the output. Only a module's first call per forward pass is recorded.

    Attributes:
        outputs: the recorded tensors, in the order of ``modules``, after a forward pass.
    """

    def __init__(self, modules: Sequence[nn.Module], leaf: bool = False) -> None:
        self.modules = list(modules)
        self.leaf = leaf
        self._outputs: dict[int, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, index: int):
        def hook(module: nn.Module, _inputs, output):
            if index in self._outputs:
                return None
            if not isinstance(output, torch.Tensor):
                raise SegXAIError(f"layer {type(module).__name__} returns {type(output).__name__}, not a tensor; "
                                  "choose a module that returns a feature map")
            if self.leaf and not output.requires_grad:
                output = output.detach().requires_grad_()
            self._outputs[index] = output
            return output
        return hook

    def __enter__(self) -> LayerCapture:
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        """Forget recorded outputs (call between forward passes, e.g. sliding windows)."""
        self._outputs = {}

    @property
    def outputs(self) -> list[torch.Tensor]:
        missing = [i for i in range(len(self.modules)) if i not in self._outputs]
        if missing:
            raise SegXAIError(f"layer {type(self.modules[missing[0]]).__name__} did not run in the forward pass; "
                              "choose a layer on the path from input to output")
        return [self._outputs[i] for i in range(len(self.modules))]


@contextmanager
def frozen_parameters(network: nn.Module) -> Iterator[None]:
    """Parameters do not require grad for the duration (no weight gradients, no graph through them); restored."""
    flags = [(p, p.requires_grad) for p in network.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def stitched_outputs(modules: Sequence[nn.Module], context: ExplainContext,
                     stage: str) -> tuple[list[np.ndarray], list[tuple[int, ...]]]:
    """Run the network over the scan in the card's sliding windows and stitch what ``modules`` output.

    Each module must output one map (1, 1, *grid) per window, on any grid; it is upsampled to the window
    (:func:`~SegXAILib.upsampling.upsample_to`) and blended like the segmentation.

    Returns:
        one float32 (D, H, W) map on the model grid per module, and each module's native grid.
    """
    outputs: list[torch.Tensor | None] = [None] * len(modules)
    native: list[tuple[int, ...]] = [()] * len(modules)

    def keep(index: int):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            outputs[index] = output
        return hook

    def window_maps(window: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(1, C, *patch) window -> one (1, 1, *patch) upsampled output per module."""
        context.model.network(window)
        native[:] = [tuple(o.shape[2:]) for o in outputs]
        return tuple(upsample_to(o.float(), window.shape[2:]) for o in outputs)

    handles = [module.register_forward_hook(keep(i)) for i, module in enumerate(modules)]
    try:
        with torch.inference_mode():
            stitched = sliding_window_predict(window_maps, context.image, context.model.card.windows,
                                              context.device, progress=context.progress, stage=stage)
    finally:
        for handle in handles:
            handle.remove()
    if isinstance(stitched, torch.Tensor):
        stitched = (stitched,)
    return [s[0, 0].numpy().astype(np.float32) for s in stitched], native
