"""EU-Nets: U-Nets with residual decoder blocks and one MHEX+ head per decoder stage (paper 000).

An MHEX+ head on decoder features X_s (C_s channels) of stage s (stages run coarse to fine)::

    Y_s     = ReLU(Conv1_s(X_s))        1x1x1, no bias, H_s channels
    Y_att_s = sigmoid(Y_s) * Y_s
    P_s     = Conv2_s(Y_s)              1x1x1, no bias, n_classes channels (deep prediction, logits)

Where ``Y_att`` goes is not stated in the paper; ``feed`` chooses (METHODS.md section 2):

- ``"decoder"`` (default): ``X_s + Proj_s(Y_att_s)`` continues to stage s+1, ``Proj_s`` a bias-free
  1x1x1 conv back to C_s channels when H_s != C_s (identity otherwise). Head s+1's prediction then
  depends on head s's Conv1 weight, which the collaboration-gradient uncertainty needs.
- ``"head"``: a side branch; the decoder stream, hence the final output, is the base network's.

The wrapper re-implements the decoder traversal of the base network (:class:`MonaiUNetBackbone`,
:class:`AttentionUNetBackbone`) rather than hooking it, because with ``feed="decoder"`` a head must
change the tensor that flows on. Where the heads sit:

- MONAI ``UNet`` (``base="unet"``, ``"residual_unet"``): on the output of every up layer except the
  top one, which maps straight to the classes. Channels (16, 32, 64, 128) with strides (2, 2, 2) give two
  stages, 32 channels at 1/4 and 16 channels at 1/2 resolution.
- MONAI ``AttentionUnet``: on the output of every attention layer (after its merge conv), followed by
  the 1x1x1 class projection: (64 @ 1/4, 32 @ 1/2, 16 @ 1/1) for the same channels.

"Residual decoder blocks" (the paper builds residual connections into every decoder double conv):

- ``unet``: MONAI's plain UNet has a single transposed conv per up layer, so there is no double conv to
  make residual. :class:`ResidualDecoderUNet` appends to every headed up layer the ``ResidualUnit``
  (one conv + identity shortcut) that MONAI's own residual UNet puts there, making each decoder stage
  a (transposed conv, residual conv) pair; the encoder and the output layer stay plain. This costs
  about 35k parameters at the demo size (channels (16, 32, 64, 128), 4 classes).
- ``residual_unet``: its up layers already are transposed conv + ``ResidualUnit``; unchanged.
- ``attention_unet``: the merge conv gets an identity shortcut from the upsampled features
  (``merge(cat(gated skip, up)) + up``; same channel count, no parameters).

Training contract: in ``train()`` mode ``forward`` returns ``(final_logits, [P_s, ...])`` with each P_s
on its own (coarser) grid, coarse to fine; :func:`deep_supervision_loss` upsamples them. In ``eval()``
mode it returns the final logits only, so inference, sliding windows and every other explainer see an
ordinary segmentation network. :meth:`EUNet.forward_with_heads` gives explainers X_s, Y_s and P_s of
every stage from one forward pass; :meth:`EUNet.stage_outputs` gives them without the final stage.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from monai.networks.blocks import ResidualUnit
from monai.networks.layers import Conv
from monai.networks.layers.simplelayers import SkipConnection
from monai.networks.nets import AttentionUnet, UNet
from monai.networks.nets.attentionunet import AttentionLayer
from torch import nn

from ..errors import SegXAIError
from ..upsampling import upsample_to
from .tangent import LinearMap, jvp_map, linearize, linearize_from_channel

FEEDS = ("decoder", "head")
BASES = ("unet", "residual_unet", "attention_unet")


class ResidualDecoderUNet(UNet):
    """MONAI ``UNet`` whose decoder up layers end in a ``ResidualUnit`` also when ``num_res_units=0``.

    With ``num_res_units > 0`` MONAI already builds up layers as transposed conv + ``ResidualUnit``
    and this class changes nothing. With 0 it adds exactly that unit (subunits=1) to every up layer
    but the top one, which is the output layer (a bare transposed conv to the classes, no head), and
    keeps the plain encoder: the EU-Net of our U-Net differs from it only in its headed decoder stages.
    """

    def _get_up_layer(self, in_channels: int, out_channels: int, strides: int, is_top: bool) -> nn.Module:
        up = super()._get_up_layer(in_channels, out_channels, strides, is_top)
        if self.num_res_units > 0 or is_top:
            return up
        residual = ResidualUnit(self.dimensions, out_channels, out_channels, strides=1, kernel_size=self.kernel_size,
                                subunits=1, act=self.act, norm=self.norm, dropout=self.dropout, bias=self.bias,
                                adn_ordering=self.adn_ordering)
        return nn.Sequential(up, residual)


class DecoderTraversal(nn.Module, ABC):
    """A U-Net cut into ``encode``, one ``decode`` per decoder stage and ``finish``, so that heads can sit
    between the stages. ``forward`` is the network without heads.

    Subclasses wrap a MONAI network as ``net`` (its modules registered there once, with MONAI's
    state-dict keys) and set ``spatial_dims`` and ``stage_channels`` (C_s of the headed stages, coarse
    to fine).
    """

    net: nn.Module
    spatial_dims: int
    stage_channels: tuple[int, ...]

    @abstractmethod
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Bottleneck output and the skip of every decoder step (stages, then ``finish``), coarse to fine."""

    @abstractmethod
    def decode(self, stage: int, h: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        """Decoder features X_s of stage ``stage`` from the stream ``h`` coming up from below."""

    @abstractmethod
    def finish(self, h: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        """Logits from the stream leaving the last stage."""

    def decode_linearized(self, stage: int, h: torch.Tensor, skip: torch.Tensor | None
                          ) -> tuple[torch.Tensor, LinearMap]:
        """:meth:`decode` and its derivative in ``h`` (the skip fixed); ``torch.func.jvp`` unless overridden."""
        return self.decode(stage, h, skip), jvp_map(lambda stream: self.decode(stage, stream, skip), h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, skips = self.encode(x)
        for stage in range(len(self.stage_channels)):
            h = self.decode(stage, h, skips[stage])
        return self.finish(h, skips[-1])


class MonaiUNetBackbone(DecoderTraversal):
    """Traversal of a MONAI ``UNet`` (nested ``Sequential(down, SkipConnection, up)``).

    Decoder step s (coarse to fine) is ``up(cat(skip_s, h))``; the steps before the top one are the
    headed stages, the top one (:meth:`finish`) gives the logits. ``forward`` equals ``net(x)``.
    """

    def __init__(self, net: UNet) -> None:
        super().__init__()
        self.net = net
        downs, ups, block = [], [], net.model
        while isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[1], SkipConnection):
            downs.append(block[0])
            ups.append(block[2])
            block = block[1].submodule
        # plain lists (not registered): the modules stay registered once, under ``net``, with MONAI's keys
        self._encoder, self._ups = downs + [block], ups[::-1]  # downs then the bottom; ups coarse to fine
        self.spatial_dims = net.dimensions
        self.stage_channels = tuple(net.channels[i - 1] for i in range(len(downs) - 1, 0, -1))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        skips: list[torch.Tensor | None] = []
        for down in self._encoder[:-1]:
            x = down(x)
            skips.append(x)
        return self._encoder[-1](x), skips[::-1]

    def decode(self, stage: int, h: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        return self._ups[stage](torch.cat([skip, h], dim=1))

    def decode_linearized(self, stage: int, h: torch.Tensor, skip: torch.Tensor | None
                          ) -> tuple[torch.Tensor, LinearMap]:
        # the skip does not move: tangents live in the stream's channels only
        return linearize_from_channel(self._ups[stage], torch.cat([skip, h], dim=1), skip.shape[1])

    def finish(self, h: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        return self._ups[-1](torch.cat([skip, h], dim=1))


class AttentionUNetBackbone(DecoderTraversal):
    """Traversal of a MONAI ``AttentionUnet`` with residual merges; every attention layer is a stage.

    ``forward`` is MONAI's AttentionUnet plus the residual merges.
    """

    def __init__(self, net: AttentionUnet) -> None:
        super().__init__()
        self.net = net
        layer = net.model[1]  # net.model = (stem, nested attention layers, class projection)
        layers, encoders = [], []
        while True:
            layers.append(layer)
            sub = layer.submodule
            if isinstance(sub, nn.Sequential) and len(sub) == 2 and isinstance(sub[1], AttentionLayer):
                encoders.append(sub[0])
                layer = sub[1]
            else:  # the bottom layer: its submodule is the last encoder block
                encoders.append(sub)
                break
        self._encoders, self._layers = encoders, layers[::-1]  # plain lists, as in MonaiUNetBackbone
        self.spatial_dims = net.dimensions
        self.stage_channels = tuple(net.channels[i] for i in range(len(layers) - 1, -1, -1))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        skips: list[torch.Tensor | None] = []
        x = self.net.model[0](x)
        for encoder in self._encoders:
            skips.append(x)
            x = encoder(x)
        return x, skips[::-1] + [None]

    def decode(self, stage: int, h: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        layer = self._layers[stage]
        up = layer.upconv(h)
        gated = layer.attention(g=up, x=skip)
        return layer.merge(torch.cat((gated, up), dim=1)) + up  # the residual merge of the EU-Net

    def finish(self, h: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        return self.net.model[2](h)


class MHEXHead(nn.Module):
    """One MHEX+ head: ``Y = ReLU(Conv1 X)``, ``P = Conv2 Y``, and what it feeds back (see module doc).

    Args:
        in_channels: C_s, channels of the decoder features it reads.
        n_classes: channels of the deep prediction.
        hidden_channels: H_s, width of Conv1.
        feed: ``"decoder"`` or ``"head"``.
        spatial_dims: 2 or 3.
    """

    def __init__(self, in_channels: int, n_classes: int, hidden_channels: int, feed: str = "decoder",
                 spatial_dims: int = 3) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.feed = feed
        self.conv1 = conv(in_channels, hidden_channels, kernel_size=1, bias=False)
        self.conv2 = conv(hidden_channels, n_classes, kernel_size=1, bias=False)
        self.project = (conv(hidden_channels, in_channels, kernel_size=1, bias=False)
                        if feed == "decoder" and hidden_channels != in_channels else nn.Identity())

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C_s, *grid) -> hidden Y (N, H_s, *grid), deep prediction P (N, n_classes, *grid)."""
        hidden = torch.relu(self.conv1(features))
        return hidden, self.conv2(hidden)

    def stream(self, features: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder stream continuing to the next stage: ``X + Proj(sigmoid(Y) * Y)`` or ``X``."""
        if self.feed == "head":
            return features
        return features + self.project(torch.sigmoid(hidden) * hidden)

    def stream_linearized(self, features: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, LinearMap]:
        """:meth:`stream` and its derivative in Y (X fixed): ``Proj((s + Y s (1 - s)) dY)``, s = sigmoid(Y)."""
        if self.feed == "head":
            return features, lambda d_hidden: d_hidden.new_zeros(*d_hidden.shape[:2], *features.shape[1:])
        gate = torch.sigmoid(hidden)
        projected, d_project = linearize(self.project, gate * hidden)
        slope = gate * (1 + hidden * (1 - gate))
        return features + projected, lambda d_hidden: d_project(d_hidden * slope)

    def prediction_linearized(self, features: torch.Tensor) -> tuple[torch.Tensor, LinearMap]:
        """The deep prediction P and its derivative in X: ``Conv2(1(Y > 0) Conv1 dX)``."""
        pre, d_conv1 = linearize(self.conv1, features)
        prediction, d_conv2 = linearize(self.conv2, torch.relu(pre))
        active = pre > 0
        return prediction, lambda d_features: d_conv2(d_conv1(d_features) * active)


class StageOutput(NamedTuple):
    """What one decoder stage and its head computed in a forward pass.

    Attributes:
        features: X_s, (N, C_s, *grid_s), the decoder features the head reads.
        hidden: Y_s = ReLU(Conv1_s X_s), (N, H_s, *grid_s).
        prediction: P_s = Conv2_s Y_s, (N, n_classes, *grid_s), logits on the stage's grid.
        skip: the encoder features stage s consumed besides the stream (to re-run the stage), or None.
    """

    features: torch.Tensor
    hidden: torch.Tensor
    prediction: torch.Tensor
    skip: torch.Tensor | None


class EUNet(nn.Module):
    """A U-Net-like backbone with one :class:`MHEXHead` per decoder stage.

    Args:
        backbone: the base network, cut into its decoder stages.
        n_classes: output channels.
        head_channels: H_s for every stage (int), one per stage (sequence), or ``None`` for H_s = C_s
            (then ``feed="decoder"`` needs no projection).
        feed: ``"decoder"`` or ``"head"``.
    """

    def __init__(self, backbone: DecoderTraversal, n_classes: int,
                 head_channels: int | Sequence[int] | None = None, feed: str = "decoder") -> None:
        super().__init__()
        if feed not in FEEDS:
            raise SegXAIError(f"unknown MHEX+ feed {feed!r}; use one of {', '.join(FEEDS)}")
        stage_channels = backbone.stage_channels
        if not stage_channels:
            raise SegXAIError("the network has no decoder stage below the output to carry an MHEX+ head; "
                              "use at least three channel levels")
        if head_channels is None:
            widths = list(stage_channels)
        elif isinstance(head_channels, int):
            widths = [head_channels] * len(stage_channels)
        else:
            widths = list(head_channels)
        if len(widths) != len(stage_channels):
            raise SegXAIError(f"head_channels lists {len(widths)} widths but the network has "
                              f"{len(stage_channels)} decoder stages")
        self.backbone = backbone
        self.feed = feed
        self.n_classes = n_classes
        self.heads = nn.ModuleList(MHEXHead(c, n_classes, h, feed, backbone.spatial_dims)
                                   for c, h in zip(stage_channels, widths))

    def forward_with_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, list[StageOutput]]:
        """Final logits (N, n_classes, *grid) and every stage's X, Y, P (coarse to fine)."""
        h, stages, skips = self._through_heads(x)
        return self.backbone.finish(h, skips[-1]), stages

    def stage_outputs(self, x: torch.Tensor) -> list[StageOutput]:
        """Every stage's X, Y, P (coarse to fine) without the final full-resolution stage, the
        costliest part of a forward pass, which no head reads."""
        return self._through_heads(x)[1]

    def _through_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, list[StageOutput], list[torch.Tensor]]:
        """The stream leaving the last head, every stage's outputs, and the encoder's skips."""
        h, skips = self.backbone.encode(x)
        stages = []
        for index, head in enumerate(self.heads):
            features = self.backbone.decode(index, h, skips[index])
            hidden, prediction = head(features)
            stages.append(StageOutput(features, hidden, prediction, skips[index]))
            h = head.stream(features, hidden)
        return h, stages, skips

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Training: ``(final_logits, [P_s, ...])``; evaluation: final logits only."""
        final, stages = self.forward_with_heads(x)
        if self.training:
            return final, [stage.prediction for stage in stages]
        return final


def deep_supervision_loss(outputs: tuple[torch.Tensor, Sequence[torch.Tensor]], target: torch.Tensor,
                          loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                          weights: Sequence[float] | None = None) -> torch.Tensor:
    """``sum_s w_s * loss_fn(upsample(P_s), target) + loss_fn(final, target)``.

    Args:
        outputs: the train-mode output ``(final, [P_s coarse to fine])``.
        target: what ``loss_fn`` takes as target, on the final output's grid (e.g. (N, 1, D, H, W) labels).
        loss_fn: e.g. MONAI ``DiceCELoss(to_onehot_y=True, softmax=True)``.
        weights: w_s, coarse to fine; default halves per coarser stage: the finest head 1/2, the next
            1/4, ... (coarse predictions are blurrier after upsampling, so they weigh less).
    """
    final, predictions = outputs
    if weights is None:
        weights = [0.5 ** (len(predictions) - s) for s in range(len(predictions))]
    if len(weights) != len(predictions):
        raise SegXAIError(f"{len(weights)} deep-supervision weights for {len(predictions)} heads")
    loss = loss_fn(final, target)
    for weight, prediction in zip(weights, predictions):
        loss = loss + weight * loss_fn(upsample_to(prediction, final.shape[2:]), target)
    return loss


def build_eunet(in_channels: int, out_channels: int, base: str = "unet", channels: Sequence[int] = (16, 32, 64, 128),
                strides: Sequence[int] = (2, 2, 2), head_channels: int | Sequence[int] | None = None,
                feed: str = "decoder", dropout: float = 0.0, **kwargs: Any) -> EUNet:
    """EU-Net of a MONAI base network (3D), built like the plain networks of :mod:`.networks`.

    Args:
        base: ``unet`` (plain encoder, residual decoder), ``residual_unet`` (``num_res_units=2`` unless
            given) or ``attention_unet``.
        channels, strides, dropout: as for the base network.
        head_channels: H_s of the heads (see :class:`EUNet`).
        feed: ``decoder`` or ``head``.
        **kwargs: further arguments of the base network (``norm``, ``kernel_size``, ...).
    """
    if base not in BASES:
        raise SegXAIError(f"unknown EU-Net base {base!r}; choose from: {', '.join(BASES)}")
    if base == "attention_unet":
        net = AttentionUnet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                            channels=tuple(channels), strides=tuple(strides), dropout=dropout, **kwargs)
        return EUNet(AttentionUNetBackbone(net), out_channels, head_channels, feed)
    kwargs.setdefault("num_res_units", 2 if base == "residual_unet" else 0)
    kwargs.setdefault("norm", "INSTANCE")
    net = ResidualDecoderUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                              channels=tuple(channels), strides=tuple(strides), dropout=dropout, **kwargs)
    return EUNet(MonaiUNetBackbone(net), out_channels, head_channels, feed)
