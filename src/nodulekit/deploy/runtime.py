"""Runners: one callable interface over PyTorch models and deployed artifacts.

A segmentation runner maps ``np.float32 (N, 7, H, W)`` HU (already clipped) to ``np.float32
(N, 1, H, W)`` probabilities; a classifier runner maps ``(N, 1, 32, 48, 48)`` to ``(N,)`` nodule
probabilities. Metrics and the detection app only ever see runners, so the file a runtime executes
is what gets measured.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nodulekit.deploy import BACKENDS
from nodulekit.deploy.outputs import class1_probability
from nodulekit.errors import InputError
from nodulekit.log import get_logger

log = get_logger("deploy")


class TorchSegRunner:
    """A PyTorch segmentation model as a runner."""

    def __init__(self, model, threads: int | None = None):
        self.model = model.eval()
        self.threads = threads
        widths = getattr(model, "widths", None)
        # levels of the U-Net (receptive field and size multiple for lung-box crops)
        self.unet_depth = getattr(widths, "depth", None)

    def _forward(self, x: np.ndarray):
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            return self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._forward(x).numpy()


def _onnx_unet_depth(path: Path) -> int | None:
    """A U-Net's levels from its ONNX graph: one average pool per level below the top."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - a graph onnx cannot parse still runs, uncropped
        return None
    pools = sum(n.op_type == "AveragePool" for n in graph.node)
    return pools + 1 if pools else None


class OnnxRunner:
    """ONNX Runtime session on the CPU with a fixed thread count (``None``: ONNX Runtime's own
    defaults); returns the first output."""

    def __init__(self, path: str | Path, threads: int | None = 2):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(self.path, "ONNX file not found")
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise InputError(self.path, f"ONNX Runtime cannot load it ({exc})") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.unet_depth = _onnx_unet_depth(self.path)
        # a file exported with a fixed batch (NPU-ready, e.g. batch 1) gets its batch in pieces
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        b = self.fixed_batch
        if b is None or len(x) == b:
            return self.session.run(None, {self.input_name: x})
        if len(x) % b:
            raise ValueError(f"{self.path} takes batches of {b}, got {len(x)}")
        parts = [self.session.run(None, {self.input_name: x[i:i + b]}) for i in range(0, len(x), b)]
        return [np.concatenate(outs) for outs in zip(*parts)]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._run(x)[0]


class TorchClsRunner(TorchSegRunner):
    """A ``LunaModel`` (or any module returning ``(logits, probabilities)``) as a classifier runner.

    ``crop_spacing`` is the crop voxel size (mm, index/row/col) the model wants, ``None`` for native
    voxels, and ``context`` its context channel's field-of-view factor (``None``: one channel); every
    classifier runner has both.
    """

    def __init__(self, model, threads: int | None = None):
        super().__init__(model, threads)
        self.crop_spacing = getattr(model, "crop_spacing", None)
        self.context = getattr(model, "context", None)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = self._forward(x)
        if isinstance(out, (tuple, list)):
            out = out[-1]
        return class1_probability(out.numpy())


class OnnxClsRunner(OnnxRunner):
    """ONNX classifier; takes the last output (probabilities when both logits and probabilities
    are exported, as ``LunaModel.forward`` returns them); its crop spacing comes from the file's
    metadata (:mod:`nodulekit.deploy.model_meta`)."""

    def __init__(self, path: str | Path, threads: int | None = 2):
        from nodulekit.deploy.model_meta import context_of, crop_spacing_of

        super().__init__(path, threads)
        self.crop_spacing = crop_spacing_of(self.path)
        self.context = context_of(self.path)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return class1_probability(self._run(x)[-1])


RUNTIMES = (*BACKENDS, "torchscript")
AUTO = "auto"
_SUFFIX_RUNTIME = {".rknn": "rknn", ".onnx": "onnx", ".ts": "torchscript", ".jit": "torchscript", ".xml": "openvino"}


def resolve_backend(path: str | Path, backend: str | None = AUTO) -> str:
    """The runtime that runs ``path`` for ``backend``.

    A suffix decides (``.onnx`` ONNX Runtime, ``.xml`` OpenVINO, ``.ts`` TorchScript, ``.rknn`` the
    NPU), except that OpenVINO also reads ``.onnx`` files (``backend="openvino"``). ``auto`` (the
    detection default) picks the fastest CPU runtime installed: OpenVINO for ``.onnx`` files and
    checkpoints, else ONNX Runtime. Per slice of the U-Net, OpenVINO's CPU plugin is ahead of ONNX
    Runtime at fp32 (it fuses each conv with its ReLU and BatchNorm), and ONNX Runtime is
    several times ahead of eager PyTorch, whose conv + ReLU + BatchNorm run as separate passes
    over full-resolution feature maps; the scan benchmark (``nodulekit bench --scan``) measures all three.
    """
    path = Path(path)
    suffix_rt = _SUFFIX_RUNTIME.get(path.suffix)
    if backend in (None, AUTO):
        from nodulekit.deploy.openvino import openvino_available

        if suffix_rt in ("onnx", None) and openvino_available():
            return "openvino"
        return suffix_rt or "onnx"
    if backend == "openvino" and suffix_rt == "onnx":
        return "openvino"
    if backend not in RUNTIMES:
        raise ValueError(f"unknown backend {backend!r} ({', '.join((*RUNTIMES, AUTO))})")
    return suffix_rt or backend


_CACHED_SUFFIX = {"openvino": ".xml", "onnx": ".onnx", "openvino-int8": ".xml"}  # FORMATS' suffixes
INT8_RUNTIMES = ("openvino",)  # where a classifier checkpoint can run int8 (cached_export's openvino-int8)


def cached_export(path: str | Path, kind: str, fmt: str) -> Path:
    """The ``fmt`` export (``openvino``, ``onnx``, or ``openvino-int8`` of a classifier) of a
    checkpoint, made once and kept in a cache keyed by the checkpoint's bytes (``$NODULEKIT_CACHE``,
    default ``~/.cache/nodulekit``). ``openvino-int8`` is calibrated on synthetic crops
    (:func:`nodulekit.deploy.ptq.synthetic_cls_crops`), so that it needs no data and a checkpoint
    always gets the same int8 model."""
    import hashlib
    import os
    import shutil
    import tempfile

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    if fmt == "openvino-int8" and kind != "cls":
        raise ValueError("int8 from a checkpoint at run time is offered for the classifier only; "
                         "the segmentation's int8 forms come from `nodulekit export` or the study")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:20]
    root = Path(os.environ.get("NODULEKIT_CACHE") or Path.home() / ".cache" / "nodulekit")
    tag = fmt
    if fmt == "openvino-int8":
        from nodulekit.deploy.ptq import CLS_CALIB_CROPS, CLS_CALIB_SCANS, CLS_CALIB_SEED

        tag = f"{fmt}-s{CLS_CALIB_SEED}x{CLS_CALIB_SCANS}n{CLS_CALIB_CROPS}"  # a new calibration, a new entry
    final = root / f"{kind}-{tag}-{digest}"
    target = final / f"model{_CACHED_SUFFIX[fmt]}"
    if target.is_file():
        return target
    from nodulekit.deploy.export import export  # PyTorch: a second of start-up, only on a cache miss

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        if fmt == "openvino-int8":
            log.info("int8 classifier for %s: calibrating once (cached in %s)", path, root)
            export_int8_classifier(path, tmp / target.name)
        else:
            export(path, fmt, tmp / target.name, kind=kind)
        try:
            os.replace(tmp, final)  # whole folder at once: a concurrent run sees all files or none
        except OSError:
            if not target.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def export_int8_classifier(path: str | Path, out: str | Path):
    """The ``openvino-int8`` export of a classifier checkpoint, calibrated on synthetic crops cut at
    the model's own crop spacing (:func:`nodulekit.deploy.ptq.synthetic_cls_crops`): what
    ``detect --cls-int8`` runs (through :func:`cached_export`) and ``bench --scan`` times."""
    from nodulekit.deploy.export import export
    from nodulekit.deploy.ptq import synthetic_cls_crops
    from nodulekit.models.checkpoint import load_cls_model

    model, _ = load_cls_model(path)
    return export(model, "openvino-int8", out, kind="cls",
                  calibration=synthetic_cls_crops(model.crop_spacing, model.context))


def load_runner(path: str | Path, kind: str = "seg", backend: str | None = None, threads: int | None = 2,
                *, int8: bool = False):
    """The one runner loader: a checkpoint or a deployed file as a ``kind`` (``seg`` or ``cls``) runner.

    Args:
        path: a checkpoint (PyTorch), ``.onnx`` (ONNX Runtime, or OpenVINO, on the CPU), ``.xml``
            (OpenVINO IR), ``.ts`` / ``.jit`` (TorchScript) or ``.rknn`` (an RK3588 board) file.
        kind: ``seg`` or ``cls`` (what the runner's outputs mean, see the module docstring).
        backend: one of :data:`RUNTIMES`, or ``auto`` (:func:`resolve_backend`); a file suffix
            takes precedence; ``None``: by suffix, else a PyTorch checkpoint. A checkpoint for
            ``onnx``, ``openvino`` or ``auto`` is exported once to a cache (:func:`cached_export`).
        threads: CPU threads (``None``: the runtime's default).
        int8: a classifier checkpoint runs as its int8 OpenVINO form (:func:`cached_export`'s
            ``openvino-int8``); ``backend`` must then be ``openvino`` or ``auto``.

    Raises:
        InputError: the file is missing or its runtime cannot load it; ``int8`` for a deployed
            file or a runtime other than OpenVINO.
        ValueError: ``int8`` for a segmentation model.
    """
    path = Path(path)
    if kind not in ("seg", "cls"):
        raise ValueError(f"unknown runner kind {kind!r} (seg, cls)")
    backend = resolve_backend(path, backend or "torch")
    if int8:
        if kind != "cls":
            raise ValueError("int8 at run time is offered for the classifier only")
        if path.suffix in _SUFFIX_RUNTIME:
            raise InputError(path, "int8 quantizes a classifier checkpoint; a deployed file runs as it is")
        if backend not in INT8_RUNTIMES:
            raise InputError(path, f"an int8 classifier runs in {' or '.join(INT8_RUNTIMES)}, not {backend} "
                                   "(is OpenVINO installed?)")
        path = cached_export(path, kind, "openvino-int8")
    elif backend in _CACHED_SUFFIX and path.suffix not in _SUFFIX_RUNTIME:
        path = cached_export(path, kind, backend)  # a checkpoint for an ONNX / OpenVINO runtime
    if backend == "rknn":
        from nodulekit.deploy.rknn import load_rknn_runner  # rknn-toolkit-lite2, on the board

        return load_rknn_runner(path, kind=kind)
    if backend == "openvino":
        from nodulekit.deploy.openvino import OpenVinoClsRunner, OpenVinoRunner

        return (OpenVinoClsRunner if kind == "cls" else OpenVinoRunner)(path, threads=threads)
    if backend == "onnx":
        return (OnnxClsRunner if kind == "cls" else OnnxRunner)(path, threads=threads)
    import torch  # a second of start-up: only the PyTorch runners pay it

    if backend == "torchscript":
        if not path.is_file():
            raise InputError(path, "TorchScript file not found")
        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise InputError(path, f"not a TorchScript file ({exc})") from None
    else:
        from nodulekit.models.checkpoint import load_cls_model, load_seg_model

        model, _ = (load_cls_model if kind == "cls" else load_seg_model)(path)
    return (TorchClsRunner if kind == "cls" else TorchSegRunner)(model, threads)


def load_seg_runner(path: str | Path, backend: str = "torch", threads: int | None = 2):
    """A segmentation runner: ``(N, 7, H, W)`` clipped HU -> ``(N, 1, H, W)`` probabilities.

    Args:
        path: a checkpoint (nodulekit or dlwpt) for ``torch``, an ``.onnx`` file for ``onnx``
            (ONNX Runtime on the CPU), an ``.rknn`` file for ``rknn`` (an RK3588 board).
        backend: one of :data:`BACKENDS` or ``auto``; a file suffix selects its runtime
            (:func:`resolve_backend`).
        threads: CPU threads.
    """
    return load_runner(path, "seg", backend, threads)


def load_cls_runner(path: str | Path, backend: str = "torch", threads: int | None = 2, *, int8: bool = False):
    """A classifier runner: ``(N, 1, 32, 48, 48)`` clipped HU -> ``(N,)`` nodule probability.

    Args: as :func:`load_seg_runner`, with ``LunaModel`` checkpoints or its exports (3D or Conv2d);
    ``int8`` as :func:`load_runner`.
    """
    return load_runner(path, "cls", backend, threads, int8=int8)
