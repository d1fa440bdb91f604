"""The deep-supervision heads of an nnU-Net-style U-Net, read from one forward pass (METHODS.md section 10).

nnU-Net's networks (``dynamic_network_architectures``: ``PlainConvUNet``, ``ResidualEncoderUNet``, ``ResidualUNet``)
have an ``encoder`` that returns its skips (the bottleneck last) and a ``decoder`` whose stage s (coarse to fine)
runs::

    X_s = stages[s](cat(transpconvs[s](X_s-1), skip_s))      X_-1 = the bottleneck
    P_s = seg_layers[s](X_s)                                   1x1x1 convolution with bias: head s's logits

nnU-Net trains every head (deep supervision) and builds all of them even when ``deep_supervision=False``, so
that its checkpoints load: an inference network holds the trained weights of every head but runs only the last.
:func:`head_outputs` runs the decoder's own loop above (``UNetDecoder.forward`` and ``UNetResDecoder.forward``
are that loop) on the unchanged network and returns every X_s and P_s; nothing is hooked, no flag is flipped.
Networks are recognised by those attributes (:func:`is_deep_supervised_unet`), not by class.

Not every head was trained: nnU-Net's trainer gives the coarsest output a loss weight of 0
(``nnUNetTrainer._build_loss``: "weights[-1] = 0"), so its head keeps its initial weights, and nnU-Net initialises
every bias to 0 (``InitWeights_He``). A head whose bias is still exactly 0 in every class was never moved by the
optimiser (a trained head's bias gets the gradient sum of softmax - one-hot, never exactly 0): :func:`trained_heads`
leaves it out. The committed ``nnunet-lesion-tiny`` has heads 1-3 of 0-3 trained.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SHORTCUT = "skip"
"""The name ``dynamic_network_architectures`` gives a residual block's shortcut (a projection convolution)."""


class HeadOutput(NamedTuple):
    """One decoder stage and its head from a forward pass.

    Attributes:
        below: what the stage's transposed convolution upsampled (the previous stage's X, or the bottleneck).
        skip: the encoder features concatenated to it.
        features: X_s, (N, C_s, *grid_s).
        logits: P_s = seg_layers[s](X_s), (N, n_classes, *grid_s).
    """

    below: torch.Tensor
    skip: torch.Tensor
    features: torch.Tensor
    logits: torch.Tensor


def is_deep_supervised_unet(network: nn.Module) -> bool:
    """Whether ``network`` has an encoder and a decoder with one stage, transposed convolution and head per
    decoder stage (the structure :func:`head_outputs` runs), at least one of them."""
    decoder = getattr(network, "decoder", None)
    parts = [getattr(decoder, name, None) for name in ("stages", "transpconvs", "seg_layers")]
    return (isinstance(getattr(network, "encoder", None), nn.Module)
            and all(isinstance(part, nn.ModuleList) for part in parts)
            and len({len(part) for part in parts}) == 1 and len(parts[0]) > 0)


def trained_heads(network: nn.Module) -> list[int]:
    """The indices s (coarse to fine) of the heads ``decoder.seg_layers[s]`` that were trained: all but those whose
    bias is exactly zero in every class (a head without a bias counts as trained)."""
    return [s for s, head in enumerate(network.decoder.seg_layers)
            if head.bias is None or bool(head.bias.detach().ne(0).any())]


def decoder_stage(network: nn.Module, s: int, below: torch.Tensor, skip: torch.Tensor,
                  weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """X_s from the tensor below and the skip; ``weights`` replace parameters of ``decoder.stages[s]`` by name
    (to differentiate with respect to one of them; the module is not changed)."""
    decoder = network.decoder
    stage_input = torch.cat((decoder.transpconvs[s](below), skip), 1)
    if weights is None:
        return decoder.stages[s](stage_input)
    # tie_weights=False: nnU-Net's blocks reach each convolution under two names (``conv`` and ``all_modules.0``);
    # swapping it under both would restore the second name to the swapped tensor, leaving it in the network
    return functional_call(decoder.stages[s], weights, (stage_input,), tie_weights=False)


def head_outputs(network: nn.Module, image: torch.Tensor) -> list[HeadOutput]:
    """Every decoder stage's features and head logits, coarse to fine, from one forward pass of (N, C, *grid)
    ``image`` (the finest head's logits are the network's output)."""
    skips = network.encoder(image)
    below, outputs = skips[-1], []
    for s, head in enumerate(network.decoder.seg_layers):
        skip = skips[-(s + 2)]
        features = decoder_stage(network, s, below, skip)
        outputs.append(HeadOutput(below, skip, features, head(features)))
        below = features
    return outputs


def last_convolution(network: nn.Module, s: int) -> tuple[str, nn.Module]:
    """The convolution that produces decoder stage s's features, before its normalisation and nonlinearity: the
    last one of the stage's main path (a residual block's shortcut projection excluded). Its name within
    ``decoder.stages[s]`` and the module."""
    found = [(name, module) for name, module in network.decoder.stages[s].named_modules()
             if isinstance(module, _CONVOLUTIONS) and _SHORTCUT not in name.split(".")]
    if not found:
        raise ValueError(f"decoder stage {s} has no convolution")
    return found[-1]


def pair_logits(network: nn.Module, heads: list[HeadOutput], s: int, name: str, weight: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Heads s and s+1's logits with ``decoder.stages[s]``'s parameter ``name`` replaced by ``weight``, the rest
    as in ``heads`` (:func:`head_outputs`): both heads' dependence on that parameter, for forward- or
    reverse-mode differentiation. Shapes (N, n_classes, *grid_s) and (N, n_classes, *grid_s+1)."""
    here, below = heads[s], heads[s + 1]
    features = decoder_stage(network, s, here.below, here.skip, {name: weight})
    next_features = decoder_stage(network, s + 1, features, below.skip)
    seg_layers = network.decoder.seg_layers
    return seg_layers[s](features), seg_layers[s + 1](next_features)
