"""One class of a multi-label model, seen as a two-class softmax model: how every method explains it.

A multi-label (sigmoid) model's target is one output channel c with logit z_c. Its probability is
``sigmoid(z_c) = softmax([0, z_c])[1]``, so the network that returns ``[0, z_c]`` is an ordinary two-class model
(background, c) with the same probability, the same log-odds ``z_c`` (:mod:`SegXAILib.explain.targets`) and the
binary entropy as its entropy. Every explainer and uncertainty measure written for softmax models therefore
explains class c of a multi-label model unchanged, overlapping classes never entering one another's target.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .card import ClassInfo
from .loaders import LoadedModel


class ChannelAsBinary(nn.Module):
    """(N, C, *S) logits of independent classes -> (N, 2, *S) logits ``[0, z_channel]``; the network is
    ``self.network``."""

    def __init__(self, network: nn.Module, channel: int) -> None:
        super().__init__()
        self.network = network
        self.channel = channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.network(x)[:, self.channel:self.channel + 1]
        return torch.cat([torch.zeros_like(z), z], dim=1)


def binary_view(model: LoadedModel, channel: int) -> LoadedModel:
    """Class ``channel`` of a multi-label ``model`` as a two-class model (module docstring); a TorchScript network
    stays TorchScript (no hooks), an eager one eager (its layers are the model's own)."""
    wrapped: nn.Module = ChannelAsBinary(model.network, channel).eval()
    if isinstance(model.network, torch.jit.ScriptModule):
        wrapped = torch.jit.script(wrapped)
    target = model.card.classes[channel]
    card = dataclasses.replace(model.card, classes=[ClassInfo("background", 0, (0, 0, 0)), target], output="logits",
                               groups={}, default_target=target.name, labelmap={})
    return LoadedModel(card, wrapped, model.route, model.pipeline)
