"""Atomic file writes: the one way nodulekit writes a file that must never be seen half-written.

Every writer goes through a temporary file in the target's folder and ``os.replace``, so a killed
run leaves either the old file or the new one, never a truncated mix, and readers in other
processes (DataLoader workers, a second run) never see a partial file.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` to fill a temporary file beside ``path``, then move it into place.

    The folder is created if needed. On any error the temporary file is removed and ``path`` keeps
    what it held before.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp makes the file owner-only; give it the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def write_output_text(path: str | Path, text: str) -> Path:
    """Write a user-named output file: atomically when it is (or will be) a regular file, directly
    when it is a device or a pipe (replacing ``/dev/stdout`` with a file would be wrong). An
    ``OSError`` always names ``path``."""
    path = Path(path)
    try:
        if path.exists() and not path.is_file():
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
            return path
        return atomic_write_text(path, text)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def json_ready(obj):
    """``obj`` made JSON-ready: NaN and infinities become None (JSON has no NaN), numpy scalars
    Python numbers."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        return json_ready(obj.item())
    return obj


def write_json(path: str | Path, obj) -> Path:
    """Write ``obj`` as indented UTF-8 JSON (:func:`json_ready`), atomically."""
    return atomic_write_text(path, json.dumps(json_ready(obj), indent=2, ensure_ascii=False) + "\n")
