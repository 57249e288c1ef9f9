"""The weights that ship inside the package, so that ``nodulekit detect CT --out DIR`` runs
without a training run first.

``nodulekit/models/weights/`` holds ``seg.pt`` and ``cls.pt`` (ordinary nodulekit checkpoints,
self-describing: widths, crop, training config and metrics inside) and ``manifest.json``, which
records for each file its SHA-256, size and parameter count, and for the pair the recipe that
trained them (``make weights``, :mod:`nodulekit.release`), its duration and the measurements
taken on it. A file whose hash does not match the manifest is refused: a damaged or swapped file
must not silently produce different detections.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from nodulekit.errors import InputError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST = "manifest.json"
KINDS = ("seg", "cls")


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: str | Path = WEIGHTS_DIR) -> dict:
    """The manifest of a weights folder; an :class:`InputError` when it is missing or unreadable."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise InputError(path, "no shipped weights in this installation: pass --seg and --cls, or build them "
                               "with `make weights`")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"unreadable weights manifest ({type(exc).__name__}: {exc})") from None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict) or not all(isinstance(files.get(k), dict) for k in KINDS):
        raise InputError(path, f"the weights manifest lists no {' and '.join(KINDS)} files")
    return doc


def shipped_model(kind: str, folder: str | Path = WEIGHTS_DIR) -> Path:
    """Path of the shipped ``seg`` or ``cls`` checkpoint, after checking its hash against the
    manifest."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    entry = read_manifest(folder)["files"][kind]
    path = Path(folder) / str(entry.get("file", f"{kind}.pt"))
    if path.parent != Path(folder) or not path.is_file():
        raise InputError(path, "a shipped weights file listed in the manifest is missing")
    if sha256(path) != entry.get("sha256"):
        raise InputError(path, "does not match the SHA-256 its manifest records (damaged or replaced): "
                               "reinstall nodulekit or rebuild the weights with `make weights`")
    return path


def install_weights(seg: str | Path, cls: str | Path, info: dict, folder: str | Path = WEIGHTS_DIR) -> dict:
    """Copy a trained pair into ``folder`` and write its manifest (``info`` adds the recipe, the
    time it took and its measurements). The manifest is written last and atomically, so a killed
    install leaves the old manifest, whose hashes then refuse the half-copied files rather than
    pairing them."""
    from nodulekit.io import atomic_write, atomic_write_text
    from nodulekit.models.checkpoint import load_cls_model, load_seg_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for kind, src, loader in (("seg", seg, load_seg_model), ("cls", cls, load_cls_model)):
        model, _ = loader(src)  # refuses a file that is not a model of its kind
        dest = folder / f"{kind}.pt"
        atomic_write(dest, lambda tmp, src=src: shutil.copyfile(src, tmp))
        files[kind] = {"file": dest.name, "sha256": sha256(dest), "bytes": dest.stat().st_size,
                       "params": sum(p.numel() for p in model.parameters())}
    doc = {"format": "nodulekit-weights/1", **info, "files": files}
    atomic_write_text(folder / MANIFEST, json.dumps(doc, indent=1, default=str) + "\n")
    return doc
