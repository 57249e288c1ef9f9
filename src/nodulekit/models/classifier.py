"""False-positive reduction classifier: dlwpt-code's ``LunaModel`` (3D CNN on 32x48x48 crops).

BatchNorm3d(1), then 4 blocks of [Conv3d 3x3x3 + ReLU, Conv3d 3x3x3 + ReLU, MaxPool3d 2] with
8/16/32/64 channels, then Linear(1152, 2). Names match dlwpt (``tail_batchnorm``, ``block1.conv1``,
``head_linear``) so its checkpoints load unchanged. ``forward`` returns ``(logits, probabilities)``
as dlwpt's does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nodulekit import CLS_CROP


class LunaBlock(nn.Module):
    """[Conv3d + ReLU] x 2, then MaxPool3d 2; ``norm`` puts a BatchNorm3d after each convolution
    (``bn1``, ``bn2``), for training only: :meth:`LunaModel.folded` merges them into the convolutions."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, norm: bool = False):
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, mid_ch, kernel_size=3, padding=1, bias=True)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(mid_ch, out_ch, kernel_size=3, padding=1, bias=True)
        self.relu2 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(2, 2)
        if norm:
            self.bn1, self.bn2 = nn.BatchNorm3d(mid_ch), nn.BatchNorm3d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if hasattr(self, "bn1"):
            x = self.bn1(x)
        x = self.conv2(self.relu1(x))
        if hasattr(self, "bn2"):
            x = self.bn2(x)
        return self.maxpool(self.relu2(x))


class LunaModel(nn.Module):
    """3D nodule classifier; input ``(N, C, 32, 48, 48)`` HU clipped to [-1000, 1000], C = 1 (dlwpt)
    or 2 with a context channel.

    Args:
        widths: ``(conv1, conv2)`` output channels of each of the 4 blocks; default 8/16/32/64.
        crop: input crop (index, row, col); each side must be divisible by 16.
        crop_spacing: mm per crop voxel (index, row, col) the model was trained on, or ``None`` for
            native voxels (dlwpt); not used by ``forward``, it tells callers how to cut the crops
            (:func:`nodulekit.data.crops.cls_crop`).
        norm: batch norm after every convolution, a training aid: without it the 8 plain
            convolutions can sit at chance for the first hundred steps or more, longer at some seeds
            than others. :meth:`folded` returns the dlwpt layout with the same outputs in eval mode.
        context: ``None`` (one channel, dlwpt) or the field-of-view factor of a second input channel:
            the candidate cut with ``context`` times ``crop_spacing``
            (:func:`nodulekit.data.crops.cls_input`). The input batch norm and the first
            convolution take both channels; the rest of the network is unchanged.
    """

    def __init__(self, widths=None, crop: tuple[int, int, int] = CLS_CROP, n_classes: int = 2,
                 crop_spacing=None, norm: bool = False, context: float | None = None):
        from nodulekit.data.crops import check_context

        super().__init__()
        self.norm = bool(norm)
        widths = widths or [(8, 8), (16, 16), (32, 32), (64, 64)]
        self.widths = [tuple(int(c) for c in w) for w in widths]
        self.crop = tuple(crop)
        self.crop_spacing = None if crop_spacing is None else tuple(float(v) for v in crop_spacing)
        if any(s % 16 for s in self.crop):
            raise ValueError(f"classifier crop {self.crop} must be divisible by 16 on every axis")
        self.context = check_context(context)
        self.in_channels = 1 if self.context is None else 2
        self.tail_batchnorm = nn.BatchNorm3d(self.in_channels)
        prev = self.in_channels
        for i, (mid, out) in enumerate(self.widths, start=1):
            setattr(self, f"block{i}", LunaBlock(prev, mid, out, norm=self.norm))
            prev = out
        flat = prev * math.prod(s // 16 for s in self.crop)
        self.head_linear = nn.Linear(flat, n_classes)
        self.head_softmax = nn.Softmax(dim=1)
        self._init_weights()

    def _init_weights(self):
        # dlwpt's init: kaiming-normal fan-out with a small bias. dlwpt draws the bias with
        # normal_(b, -bound, bound), i.e. mean -bound: every ReLU starts biased towards zero output
        # and training sits at chance for hundreds of steps; uniform(-bound, bound) is what it means.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight.data, a=0, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    _, fan_out = nn.init._calculate_fan_in_and_fan_out(m.weight.data)
                    bound = 1 / math.sqrt(fan_out)
                    nn.init.uniform_(m.bias, -bound, bound)
        nn.init.zeros_(self.head_linear.weight)
        nn.init.zeros_(self.head_linear.bias)

    def folded(self) -> "LunaModel":
        """This model in the dlwpt layout: a copy with each batch norm merged into the convolution
        before it (``torch.nn.utils.fuse_conv_bn_weights``, eval-mode statistics); ``self`` when
        there are none."""
        from torch.nn.utils import fuse_conv_bn_weights

        if not self.norm:
            return self
        plain = LunaModel(widths=self.widths, crop=self.crop, n_classes=self.head_linear.out_features,
                          crop_spacing=self.crop_spacing, context=self.context)
        state = {k: v for k, v in self.state_dict().items() if ".bn" not in k}
        for i in range(1, len(self.widths) + 1):
            block = getattr(self, f"block{i}")
            for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
                c, b = getattr(block, conv), getattr(block, bn)
                w, bias = fuse_conv_bn_weights(c.weight, c.bias, b.running_mean, b.running_var, b.eps,
                                               b.weight, b.bias)
                state[f"block{i}.{conv}.weight"], state[f"block{i}.{conv}.bias"] = w.detach(), bias.detach()
        plain.load_state_dict(state)
        return plain.to(next(self.parameters()).device).eval()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tail_batchnorm(x)
        for i in range(1, len(self.widths) + 1):
            x = getattr(self, f"block{i}")(x)
        return x.flatten(1)

    def forward(self, x: torch.Tensor):
        logits = self.head_linear(self.features(x))
        return logits, self.head_softmax(logits)


def classifier_widths_from_state_dict(state: dict) -> list[tuple[int, int]]:
    widths, i = [], 1
    while f"block{i}.conv1.weight" in state:
        widths.append((state[f"block{i}.conv1.weight"].shape[0], state[f"block{i}.conv2.weight"].shape[0]))
        i += 1
    if not widths:
        raise KeyError("no 'block1.conv1.weight' in the state dict")
    return [(int(a), int(b)) for a, b in widths]
