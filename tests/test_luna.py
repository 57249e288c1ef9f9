"""LUNA16 tables: reading, validation, writing, series lookup and candidate merging."""

from __future__ import annotations

import pytest

from nodulekit.data.luna import (
    Annotation,
    Candidate,
    annotations_by_series,
    find_series,
    merge_candidates,
    read_annotations,
    read_candidates,
    read_seriesuids,
    write_annotations,
    write_candidates,
    write_seriesuids,
)
from nodulekit.errors import InputError

ANN_HEADER = "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
CAND_HEADER = "seriesuid,coordX,coordY,coordZ,class\n"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_read_annotations(tmp_path):
    path = write(tmp_path, "annotations.csv", ANN_HEADER + "1.2.3,-128.69,-175.31,-298.38,5.65\n\n"
                                                          "1.2.4,103.78,-211.92,-227.12,4.22\n")
    rows = read_annotations(path)
    assert rows == [Annotation("1.2.3", (-128.69, -175.31, -298.38), 5.65),
                    Annotation("1.2.4", (103.78, -211.92, -227.12), 4.22)]


def test_read_annotations_header_only(tmp_path):
    assert read_annotations(write(tmp_path, "a.csv", ANN_HEADER)) == []


def test_read_candidates_v2_extra_columns(tmp_path):
    path = write(tmp_path, "candidates_V2.csv",
                 "seriesuid,coordX,coordY,coordZ,class,extra\n1.2.3,1,2,3,0,x\n1.2.3,4.5,5,6,1,y\n")
    assert read_candidates(path) == [Candidate("1.2.3", (1.0, 2.0, 3.0), False),
                                     Candidate("1.2.3", (4.5, 5.0, 6.0), True)]


@pytest.mark.parametrize("text,match", [
    ("", "empty file"),
    ("seriesuid,coordX,coordY,diameter_mm\n1,2,3,4\n", "line 1: missing column.*coordZ"),
    (ANN_HEADER + "1.2.3,1,2,3,4\n1.2.3,abc,2,3,4\n", "line 3: coordX 'abc' is not a number"),
    (ANN_HEADER + "1.2.3,1,nan,3,4\n", "line 2: coordY is nan"),
    (ANN_HEADER + "1.2.3,1,2,3,-4\n", "line 2: negative diameter_mm"),
    (ANN_HEADER + ",1,2,3,4\n", "line 2: empty seriesuid"),
    (ANN_HEADER + "1.2.3,1,2\n", "line 2: 3 fields"),
])
def test_bad_annotations(tmp_path, text, match):
    path = write(tmp_path, "annotations.csv", text)
    with pytest.raises(InputError, match=match) as err:
        read_annotations(path)
    assert str(err.value).startswith(f"{path}: ")


@pytest.mark.parametrize("text,match", [
    ("seriesuid,coordX,coordY,coordZ\n1,2,3,4\n", "missing column.*class"),
    (CAND_HEADER + "1.2.3,1,2,z,0\n", "line 2: coordZ 'z' is not a number"),
    (CAND_HEADER + "1.2.3,1,2,3,2\n", "line 2: class '2' is not 0 or 1"),
])
def test_bad_candidates(tmp_path, text, match):
    path = write(tmp_path, "candidates.csv", text)
    with pytest.raises(InputError, match=match) as err:
        read_candidates(path)
    assert str(err.value).startswith(f"{path}: ")


def test_missing_table(tmp_path):
    with pytest.raises(InputError, match="no such file") as err:
        read_annotations(tmp_path / "nope.csv")
    assert str(tmp_path / "nope.csv") in str(err.value)


@pytest.mark.parametrize("text", ["1.2.3\n1.2.4\n", "seriesuid\n1.2.3\n\n1.2.4\n"])
def test_read_seriesuids(tmp_path, text):
    assert read_seriesuids(write(tmp_path, "seriesuids.csv", text)) == ["1.2.3", "1.2.4"]


def test_read_seriesuids_empty(tmp_path):
    path = write(tmp_path, "seriesuids.csv", "\n")
    with pytest.raises(InputError, match="empty") as err:
        read_seriesuids(path)
    assert str(path) in str(err.value)


def test_write_read_round_trip(tmp_path):
    anns = [Annotation("1.2.3", (0.1, -2.5, 3.0), 6.25), Annotation("1.2.4", (1.0, 2.0, 3.0), 4.0)]
    cands = [Candidate("1.2.3", (0.1, -2.5, 3.0), True), Candidate("1.2.4", (7.0, 8.0, 9.0), False)]
    assert read_annotations(write_annotations(tmp_path / "a.csv", anns)) == anns
    assert read_candidates(write_candidates(tmp_path / "c.csv", cands)) == cands
    assert read_seriesuids(write_seriesuids(tmp_path / "s.csv", ["1.2.3", "1.2.4"])) == ["1.2.3", "1.2.4"]
    assert (tmp_path / "s.csv").read_text() == "1.2.3\n1.2.4\n"


def test_find_series(tmp_path):
    for rel in ["subset0/1.2.3.mhd", "subset9/1.2.4.mhd", "1.2.5.mhd", "masks/1.2.3.mhd", "subset0/x.raw"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    found = find_series(tmp_path)
    assert found == {"1.2.5": tmp_path / "1.2.5.mhd", "1.2.3": tmp_path / "subset0/1.2.3.mhd",
                     "1.2.4": tmp_path / "subset9/1.2.4.mhd"}
    (tmp_path / "subset1").mkdir()
    (tmp_path / "subset1/1.2.3.mhd").write_text("")
    with pytest.raises(InputError, match="also in"):
        find_series(tmp_path)
    with pytest.raises(InputError, match="no such folder"):
        find_series(tmp_path / "nope")


def test_merge_candidates():
    anns = [Annotation("a", (10.0, 10.0, 10.0), 8.0), Annotation("a", (50.0, 50.0, 50.0), 20.0),
            Annotation("b", (0.0, 0.0, 0.0), 4.0)]
    cands = [
        Candidate("a", (11.9, 8.1, 12.0), True),     # within 2 mm on every axis of the first
        Candidate("a", (12.1, 10.0, 10.0), True),    # 2.1 mm off in x: no match
        Candidate("a", (54.0, 46.0, 55.0), False),   # within 5 mm of the second, class kept
        Candidate("b", (10.0, 10.0, 10.0), False),   # other series: the "a" annotation does not count
    ]
    merged = merge_candidates(cands, anns)
    assert [c.diameter_mm for c in merged] == [8.0, 0.0, 20.0, 0.0]
    assert [c.is_nodule for c in merged] == [True, True, False, False]
    assert merged[0].center_xyz == cands[0].center_xyz


def test_annotations_by_series():
    anns = [Annotation("b", (0, 0, 0), 1), Annotation("a", (1, 1, 1), 2), Annotation("b", (2, 2, 2), 3)]
    grouped = annotations_by_series(anns)
    assert list(grouped) == ["b", "a"]
    assert [a.diameter_mm for a in grouped["b"]] == [1, 3]


def test_candidates_table_prefers_v2(tmp_path):
    from nodulekit.data.luna import candidates_table

    with pytest.raises(InputError, match="no candidates table"):
        candidates_table(tmp_path)
    (tmp_path / "candidates.csv").write_text("seriesuid,coordX,coordY,coordZ,class\n")
    assert candidates_table(tmp_path).name == "candidates.csv"
    (tmp_path / "candidates_V2.csv").write_text("seriesuid,coordX,coordY,coordZ,class\n")
    assert candidates_table(tmp_path).name == "candidates_V2.csv"


def test_a_table_is_written_whole_or_not_at_all(tmp_path):
    from nodulekit.data.luna import write_seriesuids

    path = write_seriesuids(tmp_path / "seriesuids.csv", ["1.2.3", "1.2.4"])

    def rows():
        yield "1.2.5"
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_seriesuids(path, rows())
    assert read_seriesuids(path) == ["1.2.3", "1.2.4"]
    assert [p.name for p in tmp_path.iterdir()] == ["seriesuids.csv"]
