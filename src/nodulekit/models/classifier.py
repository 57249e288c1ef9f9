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
    def __init__(self, in_ch: int, mid_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, mid_ch, kernel_size=3, padding=1, bias=True)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(mid_ch, out_ch, kernel_size=3, padding=1, bias=True)
        self.relu2 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu2(self.conv2(self.relu1(self.conv1(x)))))


class LunaModel(nn.Module):
    """3D nodule classifier; input ``(N, 1, 32, 48, 48)`` HU clipped to [-1000, 1000].

    Args:
        widths: ``(conv1, conv2)`` output channels of each of the 4 blocks; default 8/16/32/64.
        crop: input crop (index, row, col); each side must be divisible by 16.
        crop_spacing: mm per crop voxel (index, row, col) the model was trained on, or ``None`` for
            native voxels (dlwpt); not used by ``forward``, it tells callers how to cut the crops
            (:func:`nodulekit.data.crops.cls_crop`).
    """

    def __init__(self, widths=None, crop: tuple[int, int, int] = CLS_CROP, n_classes: int = 2,
                 crop_spacing=None):
        super().__init__()
        widths = widths or [(8, 8), (16, 16), (32, 32), (64, 64)]
        self.widths = [tuple(int(c) for c in w) for w in widths]
        self.crop = tuple(crop)
        self.crop_spacing = None if crop_spacing is None else tuple(float(v) for v in crop_spacing)
        if any(s % 16 for s in self.crop):
            raise ValueError(f"classifier crop {self.crop} must be divisible by 16 on every axis")
        self.tail_batchnorm = nn.BatchNorm3d(1)
        prev = 1
        for i, (mid, out) in enumerate(self.widths, start=1):
            setattr(self, f"block{i}", LunaBlock(prev, mid, out))
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
