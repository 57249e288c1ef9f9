"""Static int8 post-training quantization in ONNX Runtime: a float ONNX file in, a QDQ file out.

The deployed form: per-channel symmetric int8 weights and per-tensor uint8 activations at the
inputs of the convs. For the segmentation U-Net the input BatchNorm and the final Sigmoid stay in
float, and so does the last conv's output (the logits): the threshold of 0.5 sits at logit 0,
exactly where a uint8 grid over a wide logit range is coarsest.

Calibration uses :data:`CALIB_SLICES` whole training slices, half of them holding nodule voxels:
on a random slice a nodule is < 0.1 % of the pixels, so ranges calibrated on lung slices alone
clip the bright, rare activations a nodule produces. Percentile calibration (99.999 %) ignores the
extreme few values an uncalibrated MinMax would stretch the grid for.

Quantization-aware training, which produces its QDQ graph itself, is in
:mod:`nodulekit.optimize.quantize`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nodulekit.log import get_logger

log = get_logger("deploy")

# 64 whole slices: ~16 M pixels per channel, enough for stable 99.999th percentiles (a few hundred
# values above the cut-off), while calibration stays a small part of the study's time.
CALIB_SLICES = 64
CALIB_METHODS = ("minmax", "percentile", "entropy")
PERCENTILE = 99.999
CALIB_STRIDE = 4  # slices per calibration chunk: bounds the memory of histogram calibration


# A classifier quantized where no dataset is at hand (``detect --cls-int8``) is calibrated on crops
# of a synthetic draw of its own: the candidates detection hands the classifier are mostly vessels,
# bronchi and their forks, with a few nodules, and the generator's class-0 candidates are those
# structures. 128 crops give NNCF's per-tensor minima and maxima every kind of candidate a few times
# over; the seed is neither training's (0, 100) nor the independent draw's (1).
CLS_CALIB_SEED = 7
CLS_CALIB_SCANS = 3
CLS_CALIB_CROPS = 128


def synthetic_cls_crops(crop_spacing=None, context: float | None = None, *, n: int = CLS_CALIB_CROPS,
                        scans: int = CLS_CALIB_SCANS, seed: int = CLS_CALIB_SEED) -> np.ndarray:
    """``(n, C, 32, 48, 48)`` classifier calibration crops cut as detection cuts them (at
    ``crop_spacing``, with a ``context`` channel when given) around every nodule of ``scans``
    generated scans (64 slices each, deterministic) and, for the rest, class-0 candidates spread
    evenly through each scan's list."""
    from nodulekit import CLS_CROP
    from nodulekit.data.crops import cls_input
    from nodulekit.data.synth.scan import generate_scan

    per_scan = []
    for index in range(scans):
        s = generate_scan(seed, index, max_slices=64)
        nodules = [s.ct.world_to_voxel(nod.center_xyz) for nod in s.nodules]
        negatives = [s.ct.world_to_voxel(xyz) for xyz in s.negatives]
        per_scan.append((s.ct, nodules, negatives))
    n_nodules = sum(len(p[1]) for p in per_scan)
    left = max(0, n - n_nodules)
    crops = []
    for index, (ct, nodules, negatives) in enumerate(per_scan):
        want = left // scans + (index < left % scans)
        pick = np.linspace(0, len(negatives) - 1, min(want, len(negatives))).round().astype(int) if negatives else []
        for irc in [*nodules, *(negatives[i] for i in pick)]:
            crops.append(cls_input(ct.hu, ct.spacing, irc, CLS_CROP, crop_spacing, context))
    log.info("classifier calibration: %d synthetic crops (%d nodules), seed %d", len(crops[:n]), n_nodules, seed)
    return np.stack(crops[:n]).astype(np.float32)


def calibration_items(scans, n: int = CALIB_SLICES, nodule_share: float = 0.5, seed: int = 0):
    """Pick ``n`` ``(scan index, slice)`` pairs: ``nodule_share`` of them hold nodule voxels, the
    rest are spread evenly through each scan (lungs, mediastinum, abdomen)."""
    rng = np.random.default_rng(seed)
    positives = [(s, z) for s, scan in enumerate(scans) for z in sorted(scan.label_slices)]
    n_pos = min(len(positives), int(round(n * nodule_share)))
    picked = [positives[i] for i in sorted(rng.choice(len(positives), n_pos, replace=False))] if n_pos else []
    n_rest = n - n_pos
    per_scan = [n_rest // len(scans) + (i < n_rest % len(scans)) for i in range(len(scans))]
    for s, (scan, k) in enumerate(zip(scans, per_scan)):
        if k:
            zs = np.linspace(0, scan.shape[0] - 1, k + 2)[1:-1].round().astype(int)
            picked += [(s, int(z)) for z in zs]
    return picked


class SliceReader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over whole 7-channel slices.

    Args:
        source: a list of ``(scan index, slice)`` with their ``scans``, or an array ``(N, 7, H, W)``.
        scans: the :class:`SegScan` list the indices refer to.
        input_name: the ONNX input name.
    """

    def __init__(self, source, scans=None, input_name: str = "x"):
        self.source, self.scans, self.input_name = source, scans, input_name
        self._i, self._end = 0, len(source)

    def __len__(self) -> int:
        return len(self.source)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Serve only ``source[start_index:end_index]`` (ORT's strided calibration)."""
        self._i, self._end = start_index, min(end_index, len(self.source))

    def get_next(self):
        if self._i >= self._end:
            return None
        item = self.source[self._i]
        self._i += 1
        if self.scans is not None:
            s, z = item
            item = self.scans[s].context(z)
        return {self.input_name: np.ascontiguousarray(item, dtype=np.float32)[None]}

    def rewind(self):
        self._i, self._end = 0, len(self.source)


def _as_reader(calibration, input_name: str) -> SliceReader:
    if isinstance(calibration, SliceReader):
        calibration.input_name = input_name
        return calibration
    if isinstance(calibration, tuple) and len(calibration) == 2:
        return SliceReader(calibration[0], calibration[1], input_name)
    return SliceReader(np.asarray(calibration, dtype=np.float32), None, input_name)


def _stride(n: int, at_most: int) -> int:
    """The largest divisor of ``n`` not above ``at_most`` (ORT needs the chunks to divide the data)."""
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def quantize_onnx_static(src: str | Path, out: str | Path, calibration, *, method: str = "percentile",
                         kind: str = "seg") -> dict:
    """Static int8 QDQ quantization of an fp32 ONNX file with ONNX Runtime.

    Args:
        src: fp32 ONNX.
        out: QDQ ONNX to write (one file).
        calibration: a :class:`SliceReader`, ``(items, scans)``, or an array of model inputs.
        method: ``minmax``, ``percentile`` or ``entropy``.
        kind: ``seg`` quantizes only the convs and keeps the conv feeding the output Sigmoid float
            (see the module docstring); ``cls`` quantizes every op ORT can, as the classifier's NPU
            build is judged against the toolkit's own int8 of the whole graph.

    Returns:
        The settings used (method, slices, formats) for the report.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIB_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose from {', '.join(CALIB_METHODS)}")
    if kind not in ("seg", "cls"):
        raise ValueError(f"unknown model kind {kind!r} (seg, cls)")
    model = onnx.load(str(src))
    reader = _as_reader(calibration, model.graph.input[0].name)
    calib = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
             "entropy": CalibrationMethod.Entropy}[method]
    options = {}
    last: list[str] = []
    if kind == "seg":
        graph_out = {o.name for o in model.graph.output}
        producers = {o: n for n in model.graph.node for o in n.output}
        last = [producers[n.input[0]].name for n in model.graph.node
                if n.op_type == "Sigmoid" and set(n.output) & graph_out and n.input[0] in producers]
        extra = {"CalibPercentile": PERCENTILE} if method == "percentile" else {}
        # ORT's histogram calibrators keep every activation of every slice in memory (all the U-Net's
        # full-resolution feature maps per slice); strided calibration merges the histograms every few slices
        extra["CalibStridedMinMax"] = _stride(len(reader), CALIB_STRIDE)
        options = {"op_types_to_quantize": ["Conv", "ConvTranspose"], "nodes_to_exclude": last,
                   "extra_options": extra}
    quantize_static(str(src), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=calib,
                    **options)
    convs = sum(n.op_type == "Conv" for n in model.graph.node)
    log.info("PTQ (%s): %s calibration on %d inputs, %d convs quantized, float: %s", kind, method, len(reader),
             convs - len(last), last)
    return {"method": method, "slices": len(reader), "percentile": PERCENTILE if method == "percentile" else None,
            "weights": "int8 per-channel symmetric", "activations": "uint8 per-tensor", "float_nodes": last}
