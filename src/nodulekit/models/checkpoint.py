"""Self-describing checkpoints, written atomically and read without unpickling code.

A nodulekit checkpoint is a ``torch.save`` dict of tensors and plain values, read back with
``torch.load(..., weights_only=True)``. It keeps dlwpt-code's ``model_state`` key, so one reader
serves both; nodulekit adds ``arch``, ``widths``, ``variant``, ``config`` and training state.
dlwpt checkpoints carry no widths: they are read off the tensor shapes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from nodulekit.errors import InputError
from nodulekit.io import atomic_write
from nodulekit.models.classifier import LunaModel, classifier_widths_from_state_dict
from nodulekit.models.unet import SegModel, UNetWidths, widths_from_state_dict

FORMAT = "nodulekit/1"


def atomic_torch_save(obj, path: str | Path) -> Path:
    """``torch.save`` of ``obj`` through :func:`nodulekit.io.atomic_write`: a kill never leaves a
    half-written checkpoint behind. The bytes reach the disk before the rename, so a crash of the
    machine cannot leave an empty file under the checkpoint's name either."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())

    return atomic_write(path, write)


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint dict safely (no code is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or holds pickled code
        raise InputError(path, f"not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict):
        raise InputError(path, "checkpoint is not a dict")
    if "model_state" not in ckpt:
        # a bare state dict is accepted too
        if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            ckpt = {"model_state": ckpt}
        else:
            raise InputError(path, "checkpoint has no 'model_state'")
    return ckpt


def save_seg_checkpoint(path, model: SegModel, **extra) -> Path:
    """Save a segmentation model with its widths (and any training state in ``extra``)."""
    obj = {
        "format": FORMAT,
        "arch": "seg_unet",
        "model_name": "UNetWrapper",
        "widths": model.current_widths().to_dict(),
        "model_state": model.state_dict(),
        **extra,
    }
    return atomic_torch_save(obj, path)


def save_cls_checkpoint(path, model: LunaModel, **extra) -> Path:
    obj = {
        "format": FORMAT,
        "arch": "luna_cls",
        "model_name": "LunaModel",
        "widths": [list(w) for w in model.widths],
        "crop": list(model.crop),
        "crop_spacing_mm": None if model.crop_spacing is None else list(model.crop_spacing),
        "model_state": model.state_dict(),
        **extra,
    }
    return atomic_torch_save(obj, path)


def _strip_module_prefix(state: dict) -> dict:
    # DataParallel / DDP checkpoints prefix every key with "module."
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def load_seg_model(path: str | Path) -> tuple[SegModel, dict]:
    """Build a :class:`SegModel` from a nodulekit or dlwpt ``UNetWrapper`` checkpoint.

    Returns the model in eval mode and the checkpoint dict (for its metadata).
    """
    ckpt = read_checkpoint(path)
    state = _strip_module_prefix(ckpt["model_state"])
    try:
        widths = UNetWidths.from_dict(ckpt["widths"]) if "widths" in ckpt else widths_from_state_dict(state)
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(path, f"not a segmentation U-Net checkpoint ({exc})") from None
    model = SegModel(widths)
    _load_state(model, state, path)
    return model.eval(), ckpt


def load_cls_model(path: str | Path) -> tuple[LunaModel, dict]:
    """Build a :class:`LunaModel` from a nodulekit or dlwpt ``LunaModel`` checkpoint (dlwpt's
    were trained on native-voxel crops: ``crop_spacing`` None)."""
    ckpt = read_checkpoint(path)
    state = _strip_module_prefix(ckpt["model_state"])
    try:
        widths = ckpt.get("widths") or classifier_widths_from_state_dict(state)
        crop = tuple(ckpt.get("crop", (32, 48, 48)))
    except KeyError as exc:
        raise InputError(path, f"not a LunaModel classifier checkpoint ({exc})") from None
    # a run's resume point (cls_last.pt) may hold training-time batch norms: merged on loading
    norm = any(".bn1." in k for k in state)
    model = LunaModel(widths=widths, crop=crop, crop_spacing=ckpt.get("crop_spacing_mm"), norm=norm)
    _load_state(model, state, path)
    return model.folded().eval(), ckpt


def _load_state(model: torch.nn.Module, state: dict, path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise InputError(path, f"checkpoint keys do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise InputError(path, f"tensor '{k}' has shape {tuple(state[k].shape)}, model expects {tuple(v.shape)}")
    model.load_state_dict(state)
