"""The nodule classifier rewritten with 2D operators, for NPUs without Conv3d.

The RK3588 NPU runs Conv2d, ReLU, Add, MaxPool2d and Gemm; Conv3d and MaxPool3d fall back to its
CPU. :func:`to_conv2d` turns a trained :class:`~nodulekit.models.classifier.LunaModel` into a network of
those operators that computes the same function:

- depth is folded into channels: a feature map ``(N, C, D, H, W)`` becomes ``(N, D*C, H, W)`` with
  channel ``d*C + c``;
- a Conv3d 3x3x3 (padding 1) becomes a Conv2d 3x3 from ``D*Cin`` to ``D*Cout`` channels whose weight is
  block-banded (block-Toeplitz) in depth: output slice ``d`` sees input slices ``d-1, d, d+1``. The
  depth padding is the missing blocks at the band edges;
- MaxPool3d 2 is MaxPool2d 2 in-plane, then a max over depth pairs, ``relu(a - b) + b`` with grouped
  1x1 convs (the second conv's output channels are reordered so that pairs are neighbours);
- BatchNorm3d(1) is a scalar affine on the input (folding it into the first conv's bias would be wrong
  at the zero-padded borders);
- a classifier with a context channel takes ``(N, 2, D, H, W)``: the input is folded channel-major
  (``c*D + d``, a plain reshape) and the first conv's columns are permuted to match; the input
  affine is then per channel, a constant ``(1, 2*D, 1, 1)`` Mul and Add;
- the head's Linear becomes a Conv2d whose kernel covers the whole last map (its weight permuted to
  the folded (depth, channel) channel order), so the outputs are ``(N, 2, 1, 1)``: the NPU runs that
  conv, while a Linear on a flattened map ends in Reshapes that it leaves to its CPU. ``forward``
  returns ``(N, 2)`` as :class:`LunaModel` does; ``spatial_outputs = True`` (set for the NPU export)
  keeps them 4D.

The band multiplies conv weights and MACs by about ``D/3`` (the first blocks see 32 and 16 slices).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nodulekit import CLS_CROP
from nodulekit.models.classifier import LunaModel


class DepthPairMax(nn.Module):
    """Max over depth pairs of a depth-folded map ``(N, D*C, H, W) -> (N, D/2*C, H, W)``.

    The input's channels must be in pair order ``(d//2, c, d%2)`` (the preceding conv's rows are
    permuted so). ``max(a, b) = relu(a - b) + b`` with two grouped 1x1 convs, because the NPU runs
    Conv, Relu and Add but moves the Reshape of a reshape-and-pool formulation to its CPU.
    """

    def __init__(self, depth: int, channels: int):
        super().__init__()
        if depth % 2:
            raise ValueError(f"depth {depth} must be even to pool depth pairs")
        groups = depth // 2 * channels
        self.diff = nn.Conv2d(2 * groups, groups, 1, groups=groups, bias=False)
        self.pick = nn.Conv2d(2 * groups, groups, 1, groups=groups, bias=False)
        with torch.no_grad():
            self.diff.weight.copy_(torch.tensor([1.0, -1.0]).view(1, 2, 1, 1).expand(groups, 2, 1, 1))
            self.pick.weight.copy_(torch.tensor([0.0, 1.0]).view(1, 2, 1, 1).expand(groups, 2, 1, 1))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.diff(x)) + self.pick(x)


def _pair_order(depth: int, channels: int) -> torch.Tensor:
    """Row permutation from ``d*C + c`` to ``(d//2)*2C + 2c + d%2``."""
    idx = torch.arange(depth * channels).view(depth // 2, 2, channels)  # [d2, parity, c] -> d*C + c
    return idx.permute(0, 2, 1).reshape(-1)


class Conv2dLunaBlock(nn.Module):
    """Depth-folded counterpart of :class:`~nodulekit.models.classifier.LunaBlock`."""

    def __init__(self, conv1: nn.Conv2d, conv2: nn.Conv2d, depth: int, out_ch: int):
        super().__init__()
        self.conv1, self.relu1 = conv1, nn.ReLU()
        self.conv2, self.relu2 = conv2, nn.ReLU()
        self.pool_hw = nn.MaxPool2d(2, 2)
        self.pool_d = DepthPairMax(depth, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool_d(self.pool_hw(self.relu2(self.conv2(self.relu1(self.conv1(x))))))


class Conv2dLunaModel(nn.Module):
    """Output of :func:`to_conv2d`; input ``(N, C, D, H, W)`` as the 3D model, returns ``(logits, probs)``
    of shape ``(N, 2)``, or ``(N, 2, 1, 1)`` with ``spatial_outputs``.

    ``scale`` and ``shift`` are the input affine: floats for one channel, else one value per channel."""

    def __init__(self, scale, shift, blocks: list[Conv2dLunaBlock], head: nn.Conv2d, crop, context=None):
        super().__init__()
        self.crop = tuple(crop)
        self.crop_spacing = None  # the source model's (see LunaModel), set by to_conv2d
        self.context = context
        self.in_channels = 1 if context is None else 2
        self.spatial_outputs = False
        if self.in_channels == 1:
            self.register_buffer("in_scale", torch.tensor(float(scale)))
            self.register_buffer("in_shift", torch.tensor(float(shift)))
        else:  # one value per folded channel c*D + d
            depth = self.crop[0]
            for name, values in (("in_scale", scale), ("in_shift", shift)):
                self.register_buffer(name, torch.tensor(values, dtype=torch.float32)
                                     .repeat_interleave(depth).view(1, -1, 1, 1))
        self.blocks = nn.Sequential(*blocks)
        self.head_conv = head
        self.head_softmax = nn.Softmax(dim=1)

    def forward(self, x: torch.Tensor):
        d, h, w = self.crop
        x = x.reshape(-1, self.in_channels * d, h, w) * self.in_scale + self.in_shift
        logits = self.head_conv(self.blocks(x))
        probs = self.head_softmax(logits)
        if self.spatial_outputs:
            return logits, probs
        return logits.flatten(1), probs.flatten(1)


def banded_conv2d(conv: nn.Conv3d, depth: int) -> nn.Conv2d:
    """Conv2d on depth-folded maps equal to a 3x3x3, padding-1, stride-1 Conv3d on ``depth`` slices."""
    if conv.kernel_size != (3, 3, 3) or conv.padding != (1, 1, 1) or conv.stride != (1, 1, 1):
        raise ValueError(f"only 3x3x3 convs with padding 1 and stride 1 are folded, got {conv}")
    w3 = conv.weight.detach()  # (Cout, Cin, kd, kh, kw)
    cout, cin = w3.shape[:2]
    w2 = torch.zeros(depth * cout, depth * cin, 3, 3, dtype=w3.dtype)
    for d_out in range(depth):
        for kd in range(3):
            d_in = d_out + kd - 1
            if 0 <= d_in < depth:
                w2[d_out * cout:(d_out + 1) * cout, d_in * cin:(d_in + 1) * cin] = w3[:, :, kd]
    out = nn.Conv2d(depth * cin, depth * cout, kernel_size=3, padding=1, bias=conv.bias is not None)
    out.weight.data.copy_(w2)
    if conv.bias is not None:
        out.bias.data.copy_(conv.bias.detach().repeat(depth))
    return out


def _bn_affine(bn: nn.BatchNorm3d) -> tuple[list[float], list[float]]:
    """Per-channel ``(scale, shift)`` of an eval-mode batch norm."""
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    return (gamma / std).tolist(), (beta - bn.running_mean * gamma / std).tolist()


def _channel_major(conv: nn.Conv2d, depth: int, channels: int) -> nn.Conv2d:
    """``conv`` (input channels ``d*C + c``) taking its input channel-major (``c*D + d``) instead."""
    if channels > 1:
        # new column c*D + d reads the old column d*C + c
        order = torch.arange(depth * channels).view(depth, channels).t().reshape(-1)
        conv.weight.data = conv.weight.data[:, order].contiguous()
    return conv


@torch.no_grad()
def to_conv2d(model: LunaModel) -> Conv2dLunaModel:
    """Rewrite a :class:`LunaModel` (eval-mode semantics) with Conv2d, ReLU, Add, MaxPool2d and Gemm only.

    Args:
        model: the 3D classifier; its batch norm's running statistics are used.

    Returns:
        A :class:`Conv2dLunaModel` in eval mode with the same input and outputs.
    """
    depth = model.crop[0]
    channels = model.tail_batchnorm.num_features
    blocks, prev = [], channels
    for i, (mid, out) in enumerate(model.widths, start=1):
        block = getattr(model, f"block{i}")
        conv2 = banded_conv2d(block.conv2, depth)
        order = _pair_order(depth, out)
        conv2.weight.data = conv2.weight.data[order].contiguous()
        conv2.bias.data = conv2.bias.data[order].contiguous()
        conv1 = banded_conv2d(block.conv1, depth)
        if i == 1:
            conv1 = _channel_major(conv1, depth, channels)
        blocks.append(Conv2dLunaBlock(conv1, conv2, depth, out))
        depth //= 2
        prev = out
    # the 3D flatten order is (C, D, H, W); the folded one is (D, C, H, W)
    hw = math.prod(s // 16 for s in model.crop[1:])
    lin = model.head_linear
    n_cls = lin.out_features
    map_hw = tuple(s // 16 for s in model.crop[1:])
    w = lin.weight.detach().reshape(n_cls, prev, depth, hw).permute(0, 2, 1, 3).reshape(n_cls, depth * prev, *map_hw)
    head = nn.Conv2d(depth * prev, n_cls, kernel_size=map_hw)
    head.weight.data.copy_(w)
    head.bias.data.copy_(lin.bias.detach())
    scale, shift = _bn_affine(model.tail_batchnorm)
    context = getattr(model, "context", None)
    if context is None:
        scale, shift = scale[0], shift[0]
    out = Conv2dLunaModel(scale, shift, blocks, head, model.crop, context).eval()
    out.crop_spacing = getattr(model, "crop_spacing", None)
    return out


def conv_macs(model: nn.Module, input_shape=(1, 1, *CLS_CROP)) -> int:
    """Multiply-accumulates of the conv and linear layers for one input (hooks on a dry run)."""
    total = 0

    def hook(mod, _inp, out):
        nonlocal total
        if isinstance(mod, (nn.Conv2d, nn.Conv3d)):
            k = math.prod(mod.kernel_size) * mod.in_channels // mod.groups
            total += out.numel() // out.shape[0] * k
        elif isinstance(mod, nn.Linear):
            total += mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(input_shape))
    finally:
        for h in handles:
            h.remove()
    return total
