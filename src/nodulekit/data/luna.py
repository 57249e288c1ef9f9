"""LUNA16 tables (annotations, candidates, seriesuids) and the scans of a dataset folder.

Tables are all-or-nothing: the first bad row raises an ``InputError`` naming the file and line.
A table must be UTF-8 text (a BOM is fine); UTF-16, other encodings and binary data are refused
with a line saying so. Rows repeated verbatim in an annotations or marks table are dropped with a
named warning: counted twice they would add a false positive (or a nodule) per copy.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from nodulekit.errors import InputError
from nodulekit.io import atomic_write

ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
CANDIDATE_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "class")
MARK_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")


@dataclass(frozen=True)
class Annotation:
    """A nodule (or, in annotations_excluded.csv, a finding to ignore) at world (x, y, z) mm."""

    seriesuid: str
    center_xyz: tuple[float, float, float]
    diameter_mm: float


@dataclass(frozen=True)
class Candidate:
    """A candidate location; ``diameter_mm`` is 0.0 until :func:`merge_candidates` matches it."""

    seriesuid: str
    center_xyz: tuple[float, float, float]
    is_nodule: bool
    diameter_mm: float = 0.0


def read_text_table(path: str | Path) -> str:
    """The text of a table file, which must be UTF-8 (with or without a BOM).

    Raises:
        InputError: missing, not a regular file, UTF-16, binary (NUL bytes) or not UTF-8.
    """
    from nodulekit.data.validate import check_regular_file

    path = Path(path)
    check_regular_file(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(path, f"cannot read it ({exc.strerror})") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise InputError(path, "UTF-16 text; save the table as UTF-8 (CSV UTF-8)")
    nul = data.find(b"\0")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise InputError(path, f"binary data (a NUL byte at line {line}), not a CSV table")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(path, f"line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the table "
                               f"as UTF-8") from None


def _rows(path: str | Path, columns: tuple[str, ...]):
    """Yield ``(line_number, row_dict)`` for each non-blank data row, after checking the header."""
    path = Path(path)
    reader = csv.reader(io.StringIO(read_text_table(path), newline=""))
    try:
        yield from _checked_rows(path, reader, columns)
    except csv.Error as exc:
        raise InputError(path, f"line {reader.line_num}: {exc}") from None


def _checked_rows(path: Path, reader, columns: tuple[str, ...]):
    """Check the header, then yield ``(line_number, row_dict)`` per non-blank data row."""
    header = next(reader, None)
    while header is not None and not any(c.strip() for c in header):
        header = next(reader, None)
    if header is None:
        raise InputError(path, "empty file (expected a header: " + ",".join(columns) + ")")
    header = [c.strip() for c in header]
    missing = [c for c in columns if c not in header]
    if missing:
        raise InputError(path, f"line {reader.line_num}: missing column(s) {', '.join(missing)}; "
                               f"header is {','.join(header)}")
    index = {c: header.index(c) for c in columns}
    for row in reader:
        if not any(c.strip() for c in row):
            continue
        if len(row) < len(header):
            raise InputError(path, f"line {reader.line_num}: {len(row)} fields, header has {len(header)}")
        yield reader.line_num, {c: row[i].strip() for c, i in index.items()}


def _drop_duplicates(path, rows: list[tuple[int, object]]) -> list:
    """The rows (``(line, row)``) without verbatim repeats, warning once, with the first repeat."""
    seen: dict = {}
    out, dropped = [], []
    for line, row in rows:
        if row in seen:
            dropped.append((line, seen[row]))
            continue
        seen[row] = line
        out.append(row)
    if dropped:
        from nodulekit.data.validate import warn

        warn(path, f"{len(dropped)} duplicated row(s) dropped (line {dropped[0][0]} repeats line {dropped[0][1]})")
    return out


def _number(path, line: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputError(path, f"line {line}: {column} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise InputError(path, f"line {line}: {column} is {text}")
    return value


def _center(path, line: int, row: dict) -> tuple[float, float, float]:
    return tuple(_number(path, line, c, row[c]) for c in ("coordX", "coordY", "coordZ"))


def _uid(path, line: int, row: dict) -> str:
    if not row["seriesuid"]:
        raise InputError(path, f"line {line}: empty seriesuid")
    return row["seriesuid"]


def read_annotations(path: str | Path, *, unknown_diameter_mm: float | None = None) -> list[Annotation]:
    """Read ``annotations.csv`` or ``annotations_excluded.csv`` (columns in :data:`ANNOTATION_COLUMNS`).

    Args:
        unknown_diameter_mm: LUNA16's ``annotations_excluded.csv`` writes -1 for findings of unknown
            size; with this set, a negative diameter takes this value instead of being an error.

    Rows repeated verbatim are dropped with a warning.

    Raises:
        InputError: missing file or columns, a non-numeric or non-finite value, a negative diameter,
            a diameter of 0 (no mark can hit a finding without a size).
    """
    out = []
    for line, row in _rows(path, ANNOTATION_COLUMNS):
        diameter = _number(path, line, "diameter_mm", row["diameter_mm"])
        if diameter < 0:
            if unknown_diameter_mm is None:
                raise InputError(path, f"line {line}: negative diameter_mm {diameter}")
            diameter = unknown_diameter_mm
        if diameter == 0:
            raise InputError(path, f"line {line}: diameter_mm is 0; a finding needs a size"
                                   + (" (-1: unknown)" if unknown_diameter_mm is not None else ""))
        out.append((line, Annotation(_uid(path, line, row), _center(path, line, row), diameter)))
    return _drop_duplicates(path, out)


CANDIDATE_TABLES = ("candidates_V2.csv", "candidates.csv")  # LUNA16's revised list first


def candidates_table(data_dir: str | Path) -> Path:
    """The candidates table of a LUNA16-layout folder: ``candidates_V2.csv`` or ``candidates.csv``.

    Raises:
        InputError: neither exists.
    """
    data_dir = Path(data_dir)
    for name in CANDIDATE_TABLES:
        if (data_dir / name).is_file():
            return data_dir / name
    raise InputError(data_dir, f"no candidates table ({' or '.join(CANDIDATE_TABLES)})")


def read_candidates(path: str | Path) -> list[Candidate]:
    """Read ``candidates.csv`` or ``candidates_V2.csv`` (columns in :data:`CANDIDATE_COLUMNS`).

    Raises:
        InputError: missing file or columns, bad coordinates, a ``class`` other than 0 or 1.
    """
    out = []
    for line, row in _rows(path, CANDIDATE_COLUMNS):
        cls = _number(path, line, "class", row["class"])
        if cls not in (0.0, 1.0):
            raise InputError(path, f"line {line}: class {row['class']!r} is not 0 or 1")
        out.append(Candidate(_uid(path, line, row), _center(path, line, row), cls == 1.0))
    return out


@dataclass(frozen=True)
class Mark:
    """One row of a LUNA16 submission (a CAD mark): where, and how likely a nodule."""

    seriesuid: str
    center_xyz: tuple[float, float, float]
    probability: float


def read_marks(path: str | Path) -> list[Mark]:
    """Read a LUNA16 submission table (``seriesuid,coordX,coordY,coordZ,probability``; extra columns
    such as ``diameter_mm`` are ignored).

    Rows repeated verbatim are dropped with a warning.

    Raises:
        InputError: missing file or column, a non-numeric, non-finite or empty field, a probability
            outside [0, 1] (naming the line).
    """
    out = []
    for line, row in _rows(path, MARK_COLUMNS):
        p = _number(path, line, "probability", row["probability"])
        if not 0.0 <= p <= 1.0:
            raise InputError(path, f"line {line}: probability {row['probability']} is outside [0, 1]")
        out.append((line, Mark(_uid(path, line, row), _center(path, line, row), p)))
    return _drop_duplicates(path, out)


def read_seriesuids(path: str | Path) -> list[str]:
    """Read LUNA16's ``seriesuids.csv``: one uid per line, no header (a ``seriesuid`` header is
    accepted too). Order is kept; blank lines are skipped, a uid listed twice is kept once (with a
    warning)."""
    path = Path(path)
    reader = csv.reader(io.StringIO(read_text_table(path), newline=""))
    rows = []
    try:
        for row in reader:
            if row and row[0].strip():
                rows.append((reader.line_num, row[0].strip()))
    except csv.Error as exc:
        raise InputError(path, f"line {reader.line_num}: {exc}") from None
    if rows and rows[0][1].lower() == "seriesuid":
        rows = rows[1:]
    if not rows:
        raise InputError(path, "empty file: no seriesuid")
    return _drop_duplicates(path, rows)


def find_series(data_dir: str | Path) -> dict[str, Path]:
    """Map seriesuid -> ``.mhd`` path over ``data_dir/subset*/*.mhd`` and ``data_dir/*.mhd``.

    Raises:
        InputError: ``data_dir`` is missing, or one uid appears in two files.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(data_dir, "no such folder")
    files = sorted(data_dir.glob("*.mhd")) + sorted(data_dir.glob("subset*/*.mhd"))
    out: dict[str, Path] = {}
    for f in files:
        uid = f.name[: -len(".mhd")]
        if uid in out:
            raise InputError(f, f"seriesuid {uid} also in {out[uid]}")
        out[uid] = f
    return out


def select_series(data_dir: str | Path, uids: Iterable[str] | None = None) -> dict[str, Path]:
    """:func:`find_series` narrowed to ``uids`` in the order given (default: all, sorted).

    Raises:
        InputError: a seriesuid has no scan in ``data_dir``.
    """
    series = find_series(data_dir)
    uids = sorted(series) if uids is None else list(uids)
    missing = [u for u in uids if u not in series]
    if missing:
        raise InputError(data_dir, f"{len(missing)} seriesuid(s) not found, e.g. {missing[0]}")
    return {u: series[u] for u in uids}


def annotations_by_series(rows: Iterable[Annotation | Candidate]) -> dict[str, list]:
    """Group annotations (or candidates) by seriesuid, keeping their order."""
    out: dict[str, list] = {}
    for row in rows:
        out.setdefault(row.seriesuid, []).append(row)
    return out


def merge_candidates(candidates: Iterable[Candidate], annotations: Iterable[Annotation]) -> list[Candidate]:
    """Give each candidate the diameter of the first annotation of its series that lies within a
    quarter of that annotation's diameter on every axis (dlwpt-code's rule); otherwise 0.0.

    Classes are kept as they are (a non-nodule close to a nodule gets its diameter too), and so is
    the order of ``candidates``.
    """
    by_uid = annotations_by_series(annotations)
    out = []
    for cand in candidates:
        diameter = 0.0
        for ann in by_uid.get(cand.seriesuid, ()):
            if all(abs(c - a) <= ann.diameter_mm / 4 for c, a in zip(cand.center_xyz, ann.center_xyz)):
                diameter = ann.diameter_mm
                break
        out.append(Candidate(cand.seriesuid, tuple(cand.center_xyz), cand.is_nodule, diameter))
    return out


def _write(path: str | Path, header: tuple[str, ...] | None, rows: Iterable[Iterable]) -> Path:
    """Write a table whole or not at all (:func:`nodulekit.io.atomic_write`)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            if header:
                w.writerow(header)
            w.writerows(rows)

    return atomic_write(path, write)


def write_annotations(path: str | Path, rows: Iterable[Annotation]) -> Path:
    """Write annotations in LUNA16's ``annotations.csv`` format."""
    return _write(path, ANNOTATION_COLUMNS,
                  ([a.seriesuid, *(repr(float(v)) for v in a.center_xyz), repr(float(a.diameter_mm))]
                   for a in rows))


def write_candidates(path: str | Path, rows: Iterable[Candidate]) -> Path:
    """Write candidates in LUNA16's ``candidates.csv`` format (the diameter is not a column there)."""
    return _write(path, CANDIDATE_COLUMNS,
                  ([c.seriesuid, *(repr(float(v)) for v in c.center_xyz), int(bool(c.is_nodule))]
                   for c in rows))


def write_seriesuids(path: str | Path, uids: Iterable[str]) -> Path:
    """Write ``seriesuids.csv``: one uid per line, no header (as LUNA16)."""
    return _write(path, None, ([u] for u in uids))
