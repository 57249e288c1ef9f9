"""Lung-box segmentation: the U-Net on the box around the lung gives the whole slice's
probabilities inside the lung."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nodulekit.deploy.runtime import TorchSegRunner
from nodulekit.detect.candidates import lung_box, receptive_radius, segment_slices
from nodulekit.models.unet import SegModel, UNetWidths

# Inside the lung the cropped and whole-slice runs compute each output pixel from the same inputs
# on the same pooling grid; only the order of the float sums may differ.
PROB_TOL = 1e-5


@pytest.mark.parametrize("depth", [3, 4])
def test_receptive_radius_is_the_models(depth):
    torch.manual_seed(0)
    model = SegModel(UNetWidths.default(depth=depth)).eval()
    x = torch.zeros(1, 7, 192, 192, requires_grad=True)
    model.unet(model.input_batchnorm(x))[0, 0, 96, 96].backward()
    seen = torch.nonzero(x.grad.abs().sum((0, 1)))
    assert int((96 - seen.min(0).values).max()) <= receptive_radius(depth)
    assert int((seen.max(0).values - 96).max()) <= receptive_radius(depth)


def test_lung_box_snaps_to_the_grid_and_keeps_the_margin():
    rows = np.zeros(100, bool)
    cols = np.zeros(90, bool)
    rows[40:61] = True
    cols[60:70] = True
    r0, r1, c0, c1 = lung_box(rows, cols, depth=3)
    assert all(v % 8 == 0 for v in (r0, r1, c0, c1))
    assert r0 <= 40 - receptive_radius(3) and r1 >= 61 + receptive_radius(3)
    assert c0 <= 60 - receptive_radius(3) and c1 == 96  # past the slice's end by less than one multiple
    assert lung_box(np.zeros(10, bool), cols, 3) is None


def _phantom(rng):
    """A chest-like volume: tissue at 40 HU, two lungs at -850 HU with vessels, air outside."""
    z, h, w = 12, 120, 200
    hu = np.full((z, h, w), -1000.0, np.float32)
    hu[:, 10:110, 8:192] = 40.0
    lung = np.zeros(hu.shape, bool)
    lung[2:10, 30:85, 24:66] = True
    lung[3:11, 28:88, 84:128] = True
    hu[lung] = -850.0
    hu += rng.normal(0, 30, hu.shape).astype(np.float32)
    hu[lung & (rng.random(hu.shape) < 0.02)] = 60.0
    return hu, lung


def test_lung_box_probabilities_equal_whole_slices_inside_the_lung():
    rng = np.random.default_rng(0)
    hu, lung = _phantom(rng)
    torch.manual_seed(0)
    model = SegModel().eval()
    with torch.no_grad():
        model.input_batchnorm.running_var.fill_(400.0 ** 2)
    runner = TorchSegRunner(model, threads=1)
    seen = []

    def recording(x):
        seen.append(x.shape)
        return runner(x)

    recording.unet_depth = runner.unet_depth
    slices = np.flatnonzero(lung.any(axis=(1, 2)))
    probs = {}

    def capture(name, fn):
        def run(x):
            out = fn(x)
            probs.setdefault(name, []).append(out)
            return out
        run.unet_depth = getattr(fn, "unet_depth", None)
        return run

    full = segment_slices(hu, capture("full", runner.__call__), slices, batch_size=3, threshold=0.5)
    boxed = segment_slices(hu, capture("box", recording), slices, batch_size=3, threshold=0.5, lung=lung)
    # the box is smaller than the slice, and every batch shape a U-Net takes
    assert all(s[2] < 120 and s[3] < 200 and s[2] % 8 == 0 and s[3] % 8 == 0 for s in seen)
    assert np.array_equal(full & lung, boxed & lung)
    # the probabilities themselves, pasted back into slices
    for k, start in enumerate(range(0, len(slices), 3)):
        chunk = slices[start:start + 3]
        whole = probs["full"][k][:, 0, :120, :200]
        part = probs["box"][k][:, 0]
        rows_any = lung[chunk].any(axis=(0, 2))
        cols_any = lung[chunk].any(axis=(0, 1))
        r0, r1, c0, c1 = lung_box(rows_any, cols_any, runner.unet_depth)
        pasted = np.full_like(whole, np.nan)
        pasted[:, r0:min(r1, 120), c0:min(c1, 200)] = part[:, : min(r1, 120) - r0, : min(c1, 200) - c0]
        inside = lung[chunk]
        assert np.abs(pasted[inside] - whole[inside]).max() <= PROB_TOL


def test_slices_without_lung_are_skipped_and_unknown_depth_runs_whole_slices():
    hu = np.full((9, 64, 64), -1000.0, np.float32)
    lung = np.zeros(hu.shape, bool)
    lung[4, 20:40, 20:40] = True
    shapes = []

    def runner(x):
        shapes.append(x.shape)
        return np.zeros((len(x), 1, *x.shape[2:]), np.float32)

    segment_slices(hu, runner, [4], lung=lung)
    assert shapes == [(1, 7, 64, 64)]  # no unet_depth: the whole slice
    runner.unet_depth = 3
    segment_slices(hu, runner, [4], lung=lung)
    assert shapes[-1][2:] == (64, 64)  # 20..40 with a 22-pixel margin covers this small slice
