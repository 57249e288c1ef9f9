"""L1-norm structured channel pruning of the segmentation U-Net with torch-pruning.

Every encoder and decoder conv (and the decoder's transposed convs) loses its output channels of
smallest L1 norm; torch-pruning's dependency graph removes the matching input channels downstream,
through the BatchNorms and across the skip concatenations, so ``cat([up, skip])`` stays consistent.
The input BatchNorm2d(7) has no producing conv and the final 1x1 conv is ignored, so input and
output are unchanged. The result is still a :class:`SegModel`: its widths are read off its modules
and it is saved with :func:`save_seg_checkpoint`.

Why Torch-Pruning and not NNCF's pruning: the result must be a smaller plain ``SegModel`` that every
exporter takes as it is (ONNX Runtime, OpenVINO, TorchScript, and the RKNN compiler, which wants
widths in multiples of 8); Torch-Pruning edits the modules in place along the dependency graph, while
NNCF's filter pruning works on its own wrapped graph aimed at OpenVINO.

Ratios count channels, so parameters fall by about ``1 - (1 - r)**2``. A ratio spec is either one
number (``"0.5"``, every block) or comma-separated ``block=ratio`` pairs naming U-Net blocks
(``"down_path.0=0.3,up_path.1=0.6"``), optionally led by a default (``"0.5,down_path.0=0.25"``).
"""

from __future__ import annotations

import copy

import torch

from nodulekit.log import get_logger
from nodulekit.models.unet import SegModel

log = get_logger("optimize")


def parse_ratio(spec: str | float | dict | None) -> tuple[float, dict[str, float]]:
    """Parse a ratio spec into ``(default, {block: ratio})``.

    Raises:
        ValueError: a ratio outside [0, 1) or a malformed pair.
    """
    if spec is None:
        return 0.0, {}
    if isinstance(spec, (int, float)):
        default, per_block = float(spec), {}
    elif isinstance(spec, dict):
        default, per_block = float(spec.get("*", 0.0)), {k: float(v) for k, v in spec.items() if k != "*"}
    else:
        default, per_block = 0.0, {}
        for part in (p.strip() for p in str(spec).split(",") if p.strip()):
            if "=" in part:
                key, value = part.split("=", 1)
                per_block[key.strip()] = float(value)
            else:
                default = float(part)
    for key, r in {"*": default, **per_block}.items():
        if not 0.0 <= r < 1.0:
            raise ValueError(f"pruning ratio for {key!r} must be in [0, 1), got {r}")
    return default, per_block


def layer_widths(model: SegModel) -> dict[str, int]:
    """Output channels of every conv, by module name (for the before/after plot)."""
    return {name: int(m.out_channels) for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))}


def prune_seg(model: SegModel, ratio: str | float | dict = 0.5, *, example_size: int = 64) -> SegModel:
    """Return a channel-pruned copy of ``model`` (the input is left untouched).

    Args:
        model: the U-Net to prune.
        ratio: a ratio spec (module docstring).
        example_size: side of the example input the dependency graph is traced with.

    Raises:
        ValueError: bad ratio spec or a block name the U-Net does not have.
    """
    import torch_pruning as tp

    default, per_block = parse_ratio(ratio)
    pruned = copy.deepcopy(model).cpu().eval()
    ratio_dict = {}
    for key, r in per_block.items():
        try:
            ratio_dict[pruned.unet.get_submodule(key)] = r
        except AttributeError:
            blocks = [f"down_path.{i}" for i in range(len(pruned.unet.down_path))]
            blocks += [f"up_path.{i}" for i in range(len(pruned.unet.up_path))]
            raise ValueError(f"no U-Net block {key!r}; blocks are {', '.join(blocks)}") from None
    before = pruned.current_widths()
    example = torch.zeros(1, pruned.widths.in_channels, example_size, example_size)
    # the dependency graph is traced through autograd: it must not run under no_grad
    with torch.enable_grad():
        pruner = tp.pruner.BasePruner(
            pruned,
            example,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=default,
            pruning_ratio_dict=ratio_dict or None,
            ignored_layers=[pruned.unet.last],
        )
        pruner.step()
    widths = pruned.current_widths()
    pruned.widths = widths
    pruned.unet.widths = widths
    n0, n1 = (sum(p.numel() for p in m.parameters()) for m in (model, pruned))
    log.info("pruned channels (default %.2f, %s): %s -> %s; params %d -> %d (%.2fx)", default,
             per_block or "no per-block ratios", before.down, widths.down, n0, n1, n0 / max(n1, 1))
    return pruned
