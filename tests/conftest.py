"""Shared fixtures: a small synthetic LUNA16-format dataset and the real CT series."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("NODULEKIT_REAL_DATA", REPO.parent / "shared" / "data" / "real"))
CPTAC_DIR = REAL_DATA / "CPTAC-LSCC_C3N-00247"
LIDC_DICOM_DIR = REAL_DATA / "LIDC-IDRI-0002_dicom"
CPTAC_UID = "1.3.6.1.4.1.14519.5.2.1.7085.2626.242193282649561899185427104083"
LIDC_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.619372068417051974713149104919"

# small scans keep the suite fast: 256x256 slices (spacing scaled so the field of view stays a chest)
SMALL_SYNTH = dict(n_scans=4, seed=0, size=256, max_slices=48)


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not CPTAC_DIR.is_dir() or not LIDC_DICOM_DIR.is_dir():
        pytest.skip(f"real CT series not found under {REAL_DATA} (need {CPTAC_DIR.name}/ and "
                    f"{LIDC_DICOM_DIR.name}/; set NODULEKIT_REAL_DATA to the folder that holds them)")
    return REAL_DATA


@pytest.fixture(scope="session")
def cptac_mhd(real_data) -> Path:
    return CPTAC_DIR / f"{CPTAC_UID}.mhd"


@pytest.fixture(scope="session")
def lidc_dicom(real_data) -> Path:
    return LIDC_DICOM_DIR


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A 4-scan synthetic dataset in LUNA16 layout, generated once per test session."""
    from nodulekit.data.synth import generate_dataset

    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, progress=False, **SMALL_SYNTH)
    return out


# the files with the longest tests (the quick demo, the README's commands, the compression study)
# run first: under `make test`'s two workers they then overlap with each other and with the many
# short files, instead of one of them starting last and running alone
LONGEST_FIRST = ("test_readme.py", "test_demo.py", "test_optimize.py", "test_search.py", "test_train_cls.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
