"""What a deployed model needs to be fed right, stored with the file.

A classifier trained on resampled crops must be fed crops of the same voxel size
(``crop_spacing_mm``, see :mod:`nodulekit.data.crops`), and one with a context channel its second,
coarser crop (``context``). The ONNX file keeps that in its
``metadata_props`` (key ``nodulekit``, a JSON object); an ``.rknn`` file cannot carry metadata,
so it gets a sidecar ``<file>.json``. A file without either is taken as dlwpt's native-voxel
classifier.
"""

from __future__ import annotations

import json
from pathlib import Path

KEY = "nodulekit"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def write_model_meta(path: str | Path, meta: dict) -> None:
    """Attach ``meta`` (JSON-serialisable) to a deployed file: ONNX metadata or a sidecar JSON."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path))
        props = {p.key: p.value for p in model.metadata_props}
        props[KEY] = json.dumps(meta)
        onnx.helper.set_model_props(model, props)
        onnx.save(model, str(path))
    else:
        _sidecar(path).write_text(json.dumps(meta, indent=1))


def read_model_meta(path: str | Path) -> dict:
    """The metadata :func:`write_model_meta` attached, or ``{}``."""
    path = Path(path)
    try:
        if path.suffix == ".onnx":
            import onnx

            model = onnx.load(str(path), load_external_data=False)
            raw = next((p.value for p in model.metadata_props if p.key == KEY), None)
        else:
            side = _sidecar(path)
            raw = side.read_text() if side.is_file() else None
        doc = json.loads(raw) if raw else {}
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def crop_spacing_of(path: str | Path) -> tuple[float, float, float] | None:
    """The crop voxel size a deployed classifier expects; ``None`` for native voxels."""
    cs = read_model_meta(path).get("crop_spacing_mm")
    return None if cs is None else tuple(float(v) for v in cs)


def context_of(path: str | Path) -> float | None:
    """The context channel's field-of-view factor a deployed classifier expects; ``None``: one channel."""
    from nodulekit.data.crops import check_context
    from nodulekit.errors import InputError

    try:
        return check_context(read_model_meta(path).get("context"))
    except ValueError as exc:
        raise InputError(path, str(exc)) from None
