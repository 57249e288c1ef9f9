import math

import numpy as np
import pytest

from nodulekit.data.seg_dataset import SegScan, SegValDataset
from nodulekit.evaluate.seg_metrics import evaluate_seg


def _val_ds():
    hu = np.full((10, 16, 16), -800, np.int16) + np.arange(10, dtype=np.int16)[:, None, None] * 10
    lab = np.zeros(hu.shape, np.uint16)
    lab[2:4, 2:6, 2:6] = 1  # 4 x 4 x 2 = 32 voxels, 8 mm
    lab[6, 10:12, 10:12] = 2  # 4 voxels, 3 mm
    return SegValDataset([SegScan.from_labels("u", hu, lab, {1: 8.0, 2: 3.0})], negative_slices=2)


def _oracle(ds, keep):
    """Predict the label of the nodules in ``keep`` exactly, from the slice content."""
    def predict(x):
        out = []
        for img in x:
            i = next(j for j in range(len(ds)) if np.array_equal(ds[j][0], img))
            out.append(np.isin(ds[i][1], list(keep)).astype(np.float32)[None])
        return np.stack(out)
    return predict


def test_perfect_prediction():
    ds = _val_ds()
    lab_by_z = {z: ds.scans[0].labels(z) for _, z in ds.items}
    zs = [z for _, z in ds.items]

    def predict(x):
        return np.stack([(lab_by_z[z] > 0).astype(np.float32)[None] for z in zs[: len(x)]])

    m = evaluate_seg(predict, ds, batch_size=len(ds))
    assert m["recall"] == m["precision"] == m["dice"] == 1.0
    assert m["nodule_recall"] == m["nodule_recall_lt5"] == m["nodule_recall_ge5"] == 1.0
    assert (m["nodules"], m["nodules_lt5"], m["nodules_ge5"], m["slices"]) == (2, 1, 1, len(ds))


def test_missed_small_nodule_and_false_positives():
    ds = _val_ds()
    base = _oracle(ds, {1})

    def predict(x):
        p = base(x)
        p[:, :, 15, 15] = 0.9  # one false-positive pixel per slice
        return p

    m = evaluate_seg(predict, ds, batch_size=3)
    assert m["tp"] == 32 and m["fn"] == 4 and m["fp"] == len(ds)
    assert m["recall"] == pytest.approx(32 / 36)
    assert m["precision"] == pytest.approx(32 / (32 + len(ds)))
    assert m["dice"] == pytest.approx(64 / (64 + len(ds) + 4))
    assert (m["nodule_recall"], m["nodule_recall_ge5"], m["nodule_recall_lt5"]) == (0.5, 1.0, 0.0)


def test_one_pixel_finds_a_nodule_and_threshold_is_strict():
    ds = _val_ds()

    def predict(x, value):
        p = np.zeros((len(x), 1, 16, 16), np.float32)
        p[:, 0, 3, 3] = value  # inside nodule 1 on its slices
        return p

    assert evaluate_seg(lambda x: predict(x, 0.6), ds)["nodule_recall_ge5"] == 1.0
    assert evaluate_seg(lambda x: predict(x, 0.5), ds)["nodule_recall_ge5"] == 0.0


def test_a_nodule_is_found_only_by_a_mark_that_lies_mostly_on_it():
    """Marking every dense structure touches every nodule; the nodule is then a sliver of one blob
    whose centre falls outside it, and it does not count as found (FOUND_SHARE)."""
    from nodulekit.evaluate.seg_metrics import FOUND_SHARE, found_nodules

    lab = np.zeros((2, 16, 16), np.uint16)
    lab[0, 2:6, 2:6] = 1  # 16 pixels
    lab[1, 10:12, 10:12] = 2  # 4 pixels
    assert found_nodules(np.ones(lab.shape, bool), lab) == set()  # the whole slice marked
    rim = np.zeros(lab.shape, bool)
    rim[0, 1:7, 1:7] = True  # a one-pixel rim: 16 of 36 pixels on the nodule
    assert found_nodules(rim, lab) == {1}
    vessel = rim.copy()
    vessel[0, 3, 7:16] = True  # a vessel joined to the rim: 16 of 45
    assert 16 / 45 >= FOUND_SHARE and found_nodules(vessel, lab) == {1}
    blob = np.zeros(lab.shape, bool)
    blob[1, 4:16, 4:16] = True  # 144 pixels, 4 of them on nodule 2
    assert found_nodules(blob, lab) == set()
    blob[1, 11, 11] = False
    blob[1, 10:12, 10:12] = True  # still one component
    assert found_nodules(blob, lab) == set()
    apart = blob.copy()
    apart[1, 9, 9:13] = apart[1, 12, 9:13] = apart[1, 9:13, 9] = apart[1, 9:13, 12] = False  # cut out as its own
    assert found_nodules(apart, lab) == {2}
    m = evaluate_seg(lambda x: np.ones((len(x), 1, 16, 16), np.float32), _val_ds())
    assert m["recall"] == 1.0 and m["nodule_recall"] == 0.0


def test_empty_validation_gives_nan():
    ds = SegValDataset([], negative_slices=2)
    m = evaluate_seg(lambda x: x[:, :1], ds)
    assert math.isnan(m["recall"]) and math.isnan(m["nodule_recall"]) and m["slices"] == 0


def test_pr_histogram_and_recall_at_a_matched_precision():
    """Counts per probability bin reproduce the 0.5-threshold figures, and raising the threshold
    until precision reaches a target reads the recall there."""
    from nodulekit.evaluate.seg_metrics import recall_at_precision

    ds = _val_ds()
    base = _oracle(ds, {1, 2})

    def predict(x):
        p = base(x) * 0.9  # nodules at 0.9
        p[:, :, 0, :] = 0.6  # a row of confident false positives on every slice
        p[:, :, 15, :4] = 0.3  # a few weak ones
        return p

    m = evaluate_seg(predict, ds, batch_size=3, pr_bins=10)
    hist = m["pr_hist"]
    assert sum(hist["pos"]) == 36 and sum(hist["pos"]) + sum(hist["neg"]) == len(ds) * 256
    assert sum(hist["pos"][6:]) == m["tp"] and sum(hist["neg"][6:]) == m["fp"]  # bins from 0.5 up
    at = recall_at_precision(hist, precision=0.99)  # above 0.6 only nodules remain
    assert at["recall"] == 1.0 and at["precision"] == 1.0 and at["threshold"] == pytest.approx(0.7)
    low = recall_at_precision(hist, precision=m["precision"])
    assert low["recall"] == 1.0 and low["threshold"] <= 0.5
    assert math.isnan(recall_at_precision({"pos": [5, 0], "neg": [0, 9]}, 0.5)["recall"])
    assert "pr_hist" not in evaluate_seg(predict, ds, batch_size=3)
