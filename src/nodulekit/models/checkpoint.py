"""Self-describing checkpoints, written atomically and read without unpickling code.

A nodulekit checkpoint is a ``torch.save`` dict of tensors and plain values, read back with
``torch.load(..., weights_only=True)``. It keeps dlwpt-code's ``model_state`` key, so one reader
serves both; nodulekit adds ``arch``, ``widths``, ``variant``, ``config`` and training state.
dlwpt checkpoints carry no widths: they are read off the tensor shapes. Declared widths, crop and
crop spacing are checked against those shapes before a model is built, so a crafted field cannot
make the loader allocate a model of its choosing or fail with a bare ``TypeError``.
"""

from __future__ import annotations

import math
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
    state = ckpt["model_state"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise InputError(path, "its 'model_state' is not a dict of named tensors")
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
        "context": getattr(model, "context", None),
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
    _check_arch(path, ckpt, "seg_unet", "a segmentation U-Net", "--seg")
    state = _strip_module_prefix(ckpt["model_state"])
    try:
        widths = widths_from_state_dict(state)
        declared = UNetWidths.from_dict(ckpt["widths"]) if "widths" in ckpt else widths
    except (KeyError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise InputError(path, f"not a segmentation U-Net checkpoint ({type(exc).__name__}: {exc})") from None
    if declared != widths:
        raise InputError(path, f"its widths field ({ckpt['widths']!r:.120}) does not match its tensors")
    model = _build(path, SegModel, widths)
    _load_state(model, state, path)
    return model.eval(), ckpt


def load_cls_model(path: str | Path) -> tuple[LunaModel, dict]:
    """Build a :class:`LunaModel` from a nodulekit or dlwpt ``LunaModel`` checkpoint (dlwpt's
    were trained on native-voxel crops: ``crop_spacing`` None)."""
    ckpt = read_checkpoint(path)
    _check_arch(path, ckpt, "luna_cls", "a LunaModel classifier", "--cls")
    state = _strip_module_prefix(ckpt["model_state"])
    try:
        widths = classifier_widths_from_state_dict(state)
    except KeyError as exc:
        raise InputError(path, f"not a LunaModel classifier checkpoint ({exc})") from None
    crop, crop_spacing = _checked_crop(path, ckpt, state, widths)
    context = _checked_context(path, ckpt, state, crop_spacing)
    if "widths" in ckpt and not _same_widths(ckpt["widths"], widths):
        raise InputError(path, f"its widths field ({ckpt['widths']!r:.120}) does not match its tensors ({widths})")
    # a run's resume point (cls_last.pt) may hold training-time batch norms: merged on loading
    norm = any(".bn1." in k for k in state)
    model = _build(path, LunaModel, widths=widths, crop=crop, crop_spacing=crop_spacing, norm=norm, context=context)
    _load_state(model, state, path)
    return model.folded().eval(), ckpt


def _check_arch(path, ckpt: dict, arch: str, what: str, option: str) -> None:
    found = ckpt.get("arch")
    if found is not None and found != arch:
        raise InputError(path, f"a {found!r} checkpoint, not {what} (is it given as {option} by mistake?)")


def _same_widths(declared, widths) -> bool:
    try:
        return [list(w) for w in declared] == [list(w) for w in widths]
    except TypeError:
        return False


def _checked_crop(path, ckpt: dict, state: dict, widths) -> tuple[tuple[int, ...], tuple[float, ...] | None]:
    """The crop and crop spacing of a classifier checkpoint, checked: 3 positive multiples of 16
    that fit its head's input size, and 3 positive finite millimetres (or none)."""
    from nodulekit import CLS_CROP

    crop = ckpt.get("crop", CLS_CROP)
    if (not isinstance(crop, (list, tuple)) or len(crop) != 3
            or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 and c % 16 == 0 for c in crop)):
        raise InputError(path, f"crop field {crop!r:.80}: expected 3 positive multiples of 16")
    head = state.get("head_linear.weight")
    if head is not None and head.ndim == 2 and head.shape[1] != widths[-1][1] * math.prod(c // 16 for c in crop):
        raise InputError(path, f"crop field {list(crop)} does not fit the classifier head "
                               f"({head.shape[1]} inputs)")
    spacing = ckpt.get("crop_spacing_mm")
    if spacing is None:
        return tuple(crop), None
    try:
        values = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(path, f"crop_spacing_mm field {spacing!r:.80}: expected 3 positive millimetres")
    return tuple(crop), values


def _checked_context(path, ckpt: dict, state: dict, crop_spacing) -> float | None:
    """The checkpoint's context factor (``None``: one input channel, as dlwpt's), checked against
    its input batch norm's channels and its crop spacing."""
    from nodulekit.data.crops import channel_spacings

    context = ckpt.get("context")
    try:
        channels = len(channel_spacings(crop_spacing, context))
    except ValueError as exc:
        raise InputError(path, f"context field {context!r:.40}: {exc}") from None
    bn = state.get("tail_batchnorm.weight")
    if bn is not None and bn.ndim == 1 and bn.shape[0] != channels:
        raise InputError(path, f"its input batch norm has {bn.shape[0]} channel(s), its context field "
                               f"({context!r:.40}) asks for {channels}")
    return None if context is None else float(context)


def _build(path, cls, *args, **kwargs):
    try:
        return cls(*args, **kwargs)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise InputError(path, f"cannot build the model it describes ({type(exc).__name__}: {exc})") from None


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
