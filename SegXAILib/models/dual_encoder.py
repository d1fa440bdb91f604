"""Dual-encoder U-Net: a residual CNN and a Swin transformer in parallel, fused by attention gates (paper 004).

Both encoders read the input. At every fused skip level their features are projected by 1x1x1
convolutions to the level's width and combined by a :class:`FusionGate`::

    psi   = sigmoid(Conv(ReLU(BN(Conv(g)) + BN(Conv(x)))))      one channel, in [0, 1]
    fused = psi * x + (1 - psi) * g

``fusion`` chooses the wiring (METHODS.md section 5):

- ``"swin_guided"`` (default, the paper's best): g = Swin features (gating signal), x = CNN features;
  psi is the share of the local CNN path, 1 - psi that of the global transformer path.
- ``"cnn_guided"``: roles swapped, g = CNN, x = Swin; psi is then the share of the Swin path.
- ``"none"``: no gates, ``fused = (x + g) / 2``: the gated fusion with psi fixed at 1/2. Chosen over the
  paper's concatenation + 1x1x1 conv so that the three variants have the same decoder and differ
  exactly by the gate modules (same widths, same state-dict keys apart from ``gates.*``).

Levels, for ``n = len(depths)`` Swin stages (the default n = 3), on an input of side S:

=========== ========================== ========================================= =====
grid        CNN (``ResidualEncoder``)  Swin (patch 2, ``SwinStages``)            skip
=========== ========================== ========================================= =====
S           stem, f channels           -                                         CNN
S/2         stage 1, 2f                patch embedding only (no attention), e    CNN
S/4         stage 2, 4f                stage 1 blocks, then merging, 2e          fused
...         ...                        ...                                       fused
S/2^(n+1)   stage n+1, 2^(n+1) f       stage n blocks, then merging, 2^n e       fused
=========== ========================== ========================================= =====

The S/2 level is not fused: there MONAI's Swin output is the patch embedding, a strided convolution
that has not passed through any self-attention, so calling it the "global" path would mislabel the
fusion maps. The network therefore downsamples by 2^(n+1) and every side of its input must be a
multiple of that (16 by default: patches of 48, 64 and 96 work; 4 Swin stages would need 32).
Widths double at every level, as in U-Nets; the Swin embedding width e defaults to 2f, so that both
encoders are equally wide at every fused level (the projections are learned all the same). The
default (f = 8, 1.7 M parameters) is sized for CPU inference: the full-resolution level is the
costliest, and the stem and last decoder block there are only 8 wide.

The decoder is SwinUNETR's: one MONAI ``UnetrUpBlock`` per level (transposed conv, concatenation with
the skip, residual conv block), then a 1x1x1 conv to the classes. The CNN stages are ResNet
BasicBlocks (MONAI ``UnetResBlock``: conv-norm-act-conv-norm plus a 1x1x1 shortcut when the shape
changes, leaky ReLU), the first of each stage strided, as in ResNet; ``blocks=(3, 4, 6, 3)`` gives
ResNet-34's depths, the default (1, 1, 1, 1) a small CPU demo. The stem keeps the full resolution for
the top skip, as in U-Nets, instead of ResNet's strided 7x7 conv and max pooling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.blocks import UnetOutBlock, UnetResBlock, UnetrUpBlock
from monai.networks.nets.swin_unetr import SwinTransformer
from monai.utils import ensure_tuple_rep
from torch import nn

from ..errors import SegXAIError

FUSIONS = ("swin_guided", "cnn_guided", "none")
MAX_SWIN_STAGES = 4  # MONAI's SwinTransformer has four stage slots (layers1 ... layers4)


class FusionCoefficient(nn.Module):
    """psi = sigmoid(Conv1x1(ReLU(s))) from the summed gate projections s, or a constant when forced.

    A module of its own so that a forward hook reads exactly the psi the gate uses (forced or not).

    Attributes:
        force: ``None`` (learned psi) or the value psi is fixed to, e.g. 1 to pass x only.
    """

    def __init__(self, inter_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(inter_channels, 1, kernel_size=1)
        self.force: float | None = None

    def forward(self, summed: torch.Tensor) -> torch.Tensor:
        """(N, C_int, D, H, W) -> psi (N, 1, D, H, W) in [0, 1]."""
        psi = torch.sigmoid(self.conv(torch.relu(summed)))
        return psi if self.force is None else torch.full_like(psi, self.force)


class FusionGate(nn.Module):
    """Attention-gated fusion of two feature maps of equal shape: ``psi * x + (1 - psi) * g``.

    Unlike an Attention U-Net gate (which scales x alone and has a ``psi`` Sequential that
    :func:`SegXAILib.explain.attention.attention_gates` finds), this gate splits the output between two
    paths; its psi lives in :attr:`coefficient` and is read by the ``fusion`` explainer instead.

    Args:
        channels: C of x and g.
        x_path: which encoder x comes from (``"cnn"`` or ``"swin"``): psi is that path's share.
        inter_channels: width of the projections W_g and W_x (default C // 2, as MONAI's AttentionUnet).
    """

    def __init__(self, channels: int, x_path: str, inter_channels: int | None = None) -> None:
        super().__init__()
        inter_channels = inter_channels or max(1, channels // 2)
        self.x_path = x_path
        self.w_g = nn.Sequential(nn.Conv3d(channels, inter_channels, kernel_size=1), nn.BatchNorm3d(inter_channels))
        self.w_x = nn.Sequential(nn.Conv3d(channels, inter_channels, kernel_size=1), nn.BatchNorm3d(inter_channels))
        self.coefficient = FusionCoefficient(inter_channels)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gating signal g and features x, both (N, C, D, H, W) -> fused (N, C, D, H, W)."""
        psi = self.coefficient(self.w_g(g) + self.w_x(x))
        return psi * x + (1 - psi) * g


class ResidualEncoder(nn.Module):
    """ResNet-like 3D encoder: a full-resolution residual stem, then stages of BasicBlocks.

    Args:
        in_channels: input channels.
        channels: widths of the stem and of every stage, ``len(blocks) + 1`` values.
        blocks: residual units per stage; the first unit of each stage halves the grid.
        norm: MONAI norm name (``"instance"``, ``"batch"``).
    """

    def __init__(self, in_channels: int, channels: Sequence[int], blocks: Sequence[int], norm: str) -> None:
        super().__init__()
        self.stem = UnetResBlock(3, in_channels, channels[0], kernel_size=3, stride=1, norm_name=norm)
        self.stages = nn.ModuleList(
            nn.Sequential(*(UnetResBlock(3, channels[k] if i == 0 else channels[k + 1], channels[k + 1],
                                         kernel_size=3, stride=2 if i == 0 else 1, norm_name=norm)
                            for i in range(count)))
            for k, count in enumerate(blocks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, C_in, *S) -> [stem (N, channels[0], *S), stage k (N, channels[k], *S / 2^k) for k = 1..K]."""
        features = [self.stem(x)]
        for stage in self.stages:
            features.append(stage(features[-1]))
        return features


class SwinStages(SwinTransformer):
    """MONAI's 3D ``SwinTransformer`` (patch size 2) returning the output of every stage it has.

    MONAI's own ``forward`` always runs four stages and also returns the patch embedding; this one runs
    ``len(depths)`` (1 to 4) stages, so fewer stages cost no unused parameters. The traversal and the
    channel-wise layer norm of each output (``proj_out(normalize=True)``) are those of MONAI's forward;
    the state-dict keys are MONAI's.
    """

    def __init__(self, in_channels: int, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int],
                 window_size: int | Sequence[int]) -> None:
        super().__init__(in_chans=in_channels, embed_dim=embed_dim, window_size=ensure_tuple_rep(window_size, 3),
                         patch_size=(2, 2, 2), depths=tuple(depths), num_heads=tuple(num_heads), spatial_dims=3)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        """(N, C_in, *S) -> [stage k output (N, 2^k e, *S / 2^(k+1)) for k = 1..n]."""
        h = self.pos_drop(self.patch_embed(x))
        features = []
        for stage in (self.layers1, self.layers2, self.layers3, self.layers4)[:self.num_layers]:
            h = stage[0](h.contiguous())  # the stage's transformer blocks, then patch merging
            features.append(self.proj_out(h, normalize=True))
        return features


class DualEncoderUNet(nn.Module):
    """CNN + Swin dual-encoder U-Net with gated fusion at every transformer level (see the module doc).

    Args:
        in_channels: input channels.
        out_channels: classes (logits).
        feature_size: f, CNN and decoder width at full resolution, doubling at every coarser level.
        swin_feature_size: e, Swin embedding width (default 2f, the CNN's width on the same grid).
        blocks: residual units of each CNN stage, ``len(depths) + 1`` values.
        depths: transformer blocks of each Swin stage; its length n (1 to 4) sets the depth of the
            network (downsampling 2^(n+1)).
        num_heads: attention heads per Swin stage (default: 8 channels per head).
        window_size: Swin attention window, in voxels of each stage's grid.
        fusion: ``"swin_guided"``, ``"cnn_guided"`` or ``"none"``.
        norm: MONAI norm name of the CNN encoder and the decoder (the gates use batch norm, as in the paper).
    """

    def __init__(self, in_channels: int, out_channels: int, feature_size: int = 8, swin_feature_size: int | None = None,
                 blocks: Sequence[int] = (1, 1, 1, 1), depths: Sequence[int] = (1, 1, 1),
                 num_heads: Sequence[int] | None = None, window_size: int | Sequence[int] = 4,
                 fusion: str = "swin_guided", norm: str = "instance") -> None:
        super().__init__()
        n = len(depths)
        embed = swin_feature_size or 2 * feature_size
        if fusion not in FUSIONS:
            raise SegXAIError(f"unknown dual-encoder fusion {fusion!r}; use one of {', '.join(FUSIONS)}")
        if not 1 <= n <= MAX_SWIN_STAGES:
            raise SegXAIError(f"depths lists {n} Swin stages; MONAI's SwinTransformer has 1 to {MAX_SWIN_STAGES}")
        if len(blocks) != n + 1 or min(blocks) < 1:
            raise SegXAIError(f"blocks must give at least one residual unit for each of the {n + 1} CNN stages "
                              f"(one more than the {n} Swin stages), got {list(blocks)}")
        widths = [embed * 2**k for k in range(n)]
        num_heads = tuple(num_heads or (max(1, w // 8) for w in widths))
        if len(num_heads) != n or any(w % h for w, h in zip(widths, num_heads)):
            raise SegXAIError(f"num_heads {list(num_heads)} must have one entry per Swin stage, each dividing the "
                              f"stage's width {widths}")
        self.fusion = fusion
        self.downsampling = 2 ** (n + 1)
        self._force_psi: float | None = None
        channels = [feature_size * 2**k for k in range(n + 2)]  # grids S, S/2, ..., S/2^(n+1)
        fused = channels[2:]
        self.cnn = ResidualEncoder(in_channels, channels, blocks, norm)
        self.swin = SwinStages(in_channels, embed, depths, num_heads, window_size)
        # both projected, so that the two encoders' widths can be chosen independently
        self.cnn_projections = nn.ModuleList(nn.Conv3d(c, c, kernel_size=1) for c in fused)
        self.swin_projections = nn.ModuleList(nn.Conv3d(embed * 2**k, c, kernel_size=1)
                                              for k, c in enumerate(fused, start=1))
        x_path = "cnn" if fusion == "swin_guided" else "swin"
        self.gates = nn.ModuleList(FusionGate(c, x_path) for c in fused) if fusion != "none" else nn.ModuleList()
        self.decoder = nn.ModuleList(  # coarse to fine
            UnetrUpBlock(3, channels[k + 1], channels[k], kernel_size=3, upsample_kernel_size=2, norm_name=norm,
                         res_block=True)
            for k in reversed(range(n + 1)))
        self.head = UnetOutBlock(3, channels[0], out_channels)

    @property
    def force_psi(self) -> float | None:
        """The value every gate's psi is fixed to (1: fused = x, the path psi weighs), or ``None`` (learned)."""
        return self._force_psi

    @force_psi.setter
    def force_psi(self, value: float | None) -> None:
        if not self.gates:
            raise SegXAIError("this dual encoder was built with fusion='none' and has no psi to force")
        self._force_psi = value
        for gate in self.gates:
            gate.coefficient.force = value

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """(N, C_in, *S) -> CNN-only skips (grids S, S/2), then the projected CNN and Swin features of every
        fused level (grids S/4, ..., S/2^(n+1)), fine to coarse, each level's two of equal shape."""
        if any(side % self.downsampling for side in x.shape[2:]):
            raise SegXAIError(f"the dual encoder downsamples by {self.downsampling}: every side of its input must be "
                              f"a multiple of {self.downsampling}, got {'x'.join(map(str, x.shape[2:]))}; use a "
                              f"patch size such as {3 * self.downsampling} or {6 * self.downsampling}")
        cnn = self.cnn(x)
        swin = self.swin(x)
        return (cnn[:2], [p(c) for p, c in zip(self.cnn_projections, cnn[2:])],
                [p(s) for p, s in zip(self.swin_projections, swin)])

    def fuse(self, level: int, cnn: torch.Tensor, swin: torch.Tensor) -> torch.Tensor:
        """Fused features of fused level ``level`` (0 = finest) from its projected CNN and Swin features."""
        if self.fusion == "none":
            return (cnn + swin) / 2
        if self.fusion == "swin_guided":
            return self.gates[level](g=swin, x=cnn)
        return self.gates[level](g=cnn, x=swin)

    def decode(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Skips of every grid, fine to coarse (the coarsest is the bottleneck) -> logits (N, out, *S)."""
        h = levels[-1]
        for block, skip in zip(self.decoder, levels[-2::-1]):
            h = block(h, skip)
        return self.head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, D, H, W), sides multiples of :attr:`downsampling` -> logits (N, out_channels, D, H, W)."""
        skips, cnn, swin = self.encode(x)
        return self.decode(skips + [self.fuse(k, c, s) for k, (c, s) in enumerate(zip(cnn, swin))])

    def single_path_forward(self, x: torch.Tensor, path: str) -> torch.Tensor:
        """Logits with every fused level taking only ``path``'s (``"cnn"`` or ``"swin"``) projected features;
        the CNN-only skips of grids S and S/2 stay. Equals ``forward`` with psi forced to 1 on the path the
        gates weigh with psi (the CNN for ``swin_guided``). For ablations: how much each encoder carries."""
        if path not in ("cnn", "swin"):
            raise SegXAIError(f"unknown encoder path {path!r}; use 'cnn' or 'swin'")
        skips, cnn, swin = self.encode(x)
        return self.decode(skips + (cnn if path == "cnn" else swin))


def build_dual_encoder(in_channels: int, out_channels: int, **args: Any) -> DualEncoderUNet:
    """The dual-encoder U-Net of paper 004 (3D), built like the networks of :mod:`.networks`."""
    return DualEncoderUNet(in_channels, out_channels, **args)
