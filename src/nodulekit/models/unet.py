"""Candidate-segmentation U-Net: BatchNorm2d(7) -> U-Net -> Sigmoid.

Module and parameter names follow dlwpt-code's ``UNetWrapper`` (``input_batchnorm``,
``unet.down_path.<i>.block.<j>``, ``unet.up_path.<i>.up``, ``unet.last``), so its checkpoints load
unchanged. Every conv width is data (:class:`UNetWidths`): a channel-pruned network is the same
class with other numbers, and the widths travel in the checkpoint or are read off tensor shapes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nodulekit import SEG_CHANNELS


@dataclass(frozen=True)
class UNetWidths:
    """Output widths of every conv.

    Attributes:
        down: per encoder level, top to bottom, ``(conv1, conv2)``.
        up: per decoder block, in forward order (deepest first), ``(upconv, conv1, conv2)``.
        in_channels: input channels (7 for 3 + 1 + 3 slices).
        n_classes: output channels of the final 1x1 conv.
    """

    down: tuple[tuple[int, int], ...]
    up: tuple[tuple[int, int, int], ...]
    in_channels: int = SEG_CHANNELS
    n_classes: int = 1

    @classmethod
    def default(cls, depth: int = 3, wf: int = 4, in_channels: int = SEG_CHANNELS, n_classes: int = 1):
        """dlwpt's layout: widths ``2**(wf+i)`` per level (16/32/64 for depth 3, wf 4)."""
        down = tuple((2 ** (wf + i), 2 ** (wf + i)) for i in range(depth))
        up = tuple((2 ** (wf + i),) * 3 for i in reversed(range(depth - 1)))
        return cls(down=down, up=up, in_channels=in_channels, n_classes=n_classes)

    @property
    def depth(self) -> int:
        return len(self.down)

    def to_dict(self) -> dict:
        return {k: [list(v) for v in val] if isinstance(val, tuple) else val for k, val in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "UNetWidths":
        return cls(
            down=tuple(tuple(int(c) for c in v) for v in d["down"]),
            up=tuple(tuple(int(c) for c in v) for v in d["up"]),
            in_channels=int(d.get("in_channels", SEG_CHANNELS)),
            n_classes=int(d.get("n_classes", 1)),
        )

    def __post_init__(self):
        if len(self.down) < 1 or len(self.up) != len(self.down) - 1:
            raise ValueError(f"U-Net widths need depth-1 up blocks: down={self.down} up={self.up}")
        if any(c < 1 for level in (*self.down, *self.up) for c in level):
            raise ValueError(f"every U-Net width must be >= 1: down={self.down} up={self.up}")


class UNetConvBlock(nn.Module):
    """Two padded 3x3 convs, each followed by ReLU then BatchNorm (dlwpt's order)."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_ch, mid_ch, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.BatchNorm2d(mid_ch),
            nn.Conv2d(mid_ch, out_ch, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.BatchNorm2d(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class UNetUpBlock(nn.Module):
    """2x2 stride-2 transposed conv, concatenation with the skip, then a conv block."""

    def __init__(self, in_ch: int, skip_ch: int, up_ch: int, mid_ch: int, out_ch: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, up_ch, kernel_size=2, stride=2)
        self.conv_block = UNetConvBlock(up_ch + skip_ch, mid_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv_block(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    """Padded U-Net with batch norm, 2x2 average-pool down and transposed-conv up."""

    def __init__(self, widths: UNetWidths):
        super().__init__()
        self.widths = widths
        self.down_path = nn.ModuleList()
        prev = widths.in_channels
        for mid, out in widths.down:
            self.down_path.append(UNetConvBlock(prev, mid, out))
            prev = out
        skips = [out for _, out in widths.down[:-1]]
        self.up_path = nn.ModuleList()
        for (up_ch, mid, out), skip in zip(widths.up, reversed(skips)):
            self.up_path.append(UNetUpBlock(prev, skip, up_ch, mid, out))
            prev = out
        self.last = nn.Conv2d(prev, widths.n_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, down in enumerate(self.down_path):
            x = down(x)
            if i != len(self.down_path) - 1:
                skips.append(x)
                x = F.avg_pool2d(x, 2)
        for i, up in enumerate(self.up_path):
            x = up(x, skips[-i - 1])
        return self.last(x)


class SegModel(nn.Module):
    """BatchNorm2d(7) -> U-Net -> Sigmoid; input ``(N, 7, H, W)`` HU clipped to [-1000, 1000].

    H and W must be multiples of ``2**(depth-1)``. Output: ``(N, 1, H, W)`` nodule probability.
    """

    def __init__(self, widths: UNetWidths | None = None):
        super().__init__()
        self.widths = widths or UNetWidths.default()
        self.input_batchnorm = nn.BatchNorm2d(self.widths.in_channels)
        self.unet = UNet(self.widths)
        self.final = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final(self.unet(self.input_batchnorm(x)))

    def current_widths(self) -> UNetWidths:
        """Widths read off the modules (they change in place when a pruner edits the layers)."""
        return widths_from_state_dict(self.state_dict())


def widths_from_state_dict(state: dict) -> UNetWidths:
    """Infer :class:`UNetWidths` from a dlwpt/nodulekit state dict's tensor shapes.

    Raises:
        KeyError: the state dict is not a U-Net of this layout.
    """
    prefix = "unet." if any(k.startswith("unet.") for k in state) else ""
    down, level = [], 0
    while f"{prefix}down_path.{level}.block.0.weight" in state:
        p = f"{prefix}down_path.{level}.block"
        down.append((state[f"{p}.0.weight"].shape[0], state[f"{p}.3.weight"].shape[0]))
        level += 1
    up, block = [], 0
    while f"{prefix}up_path.{block}.up.weight" in state:
        p = f"{prefix}up_path.{block}"
        up.append(
            (
                state[f"{p}.up.weight"].shape[1],  # ConvTranspose2d weight is (in, out, kH, kW)
                state[f"{p}.conv_block.block.0.weight"].shape[0],
                state[f"{p}.conv_block.block.3.weight"].shape[0],
            )
        )
        block += 1
    if not down:
        raise KeyError(f"no '{prefix}down_path.0.block.0.weight' in the state dict")
    last = state[f"{prefix}last.weight"]
    first = state[f"{prefix}down_path.0.block.0.weight"]
    return UNetWidths(
        down=tuple((int(a), int(b)) for a, b in down),
        up=tuple(tuple(int(c) for c in u) for u in up),
        in_channels=int(first.shape[1]),
        n_classes=int(last.shape[0]),
    )
