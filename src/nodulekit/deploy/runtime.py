"""Runners: one callable interface over PyTorch models and deployed artifacts.

A segmentation runner maps ``np.float32 (N, 7, H, W)`` HU (already clipped) to ``np.float32
(N, 1, H, W)`` probabilities; a classifier runner maps ``(N, 1, 32, 48, 48)`` to ``(N,)`` nodule
probabilities. Metrics and the detection app only ever see runners, so the file a runtime executes
is what gets measured.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nodulekit.deploy import BACKENDS
from nodulekit.deploy.outputs import class1_probability
from nodulekit.errors import InputError


class TorchSegRunner:
    """A PyTorch segmentation model as a runner."""

    def __init__(self, model: torch.nn.Module, threads: int | None = None):
        self.model = model.eval()
        self.threads = threads

    def _forward(self, x: np.ndarray):
        if self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            return self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._forward(x).numpy()


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
    voxels; every classifier runner has it.
    """

    def __init__(self, model: torch.nn.Module, threads: int | None = None):
        super().__init__(model, threads)
        self.crop_spacing = getattr(model, "crop_spacing", None)

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
        from nodulekit.deploy.model_meta import crop_spacing_of

        super().__init__(path, threads)
        self.crop_spacing = crop_spacing_of(self.path)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return class1_probability(self._run(x)[-1])


RUNTIMES = (*BACKENDS, "torchscript")
_SUFFIX_RUNTIME = {".rknn": "rknn", ".onnx": "onnx", ".ts": "torchscript", ".jit": "torchscript"}


def load_runner(path: str | Path, kind: str = "seg", backend: str | None = None, threads: int | None = 2):
    """The one runner loader: a checkpoint or a deployed file as a ``kind`` (``seg`` or ``cls``) runner.

    Args:
        path: a checkpoint (PyTorch), ``.onnx`` (ONNX Runtime on the CPU), ``.ts`` / ``.jit``
            (TorchScript) or ``.rknn`` (an RK3588 board) file.
        kind: ``seg`` or ``cls`` (what the runner's outputs mean, see the module docstring).
        backend: one of :data:`RUNTIMES`; a file suffix above takes precedence; ``None``: by suffix,
            else a PyTorch checkpoint.
        threads: CPU threads (``None``: the runtime's default).

    Raises:
        InputError: the file is missing or its runtime cannot load it.
    """
    path = Path(path)
    if kind not in ("seg", "cls"):
        raise ValueError(f"unknown runner kind {kind!r} (seg, cls)")
    backend = _SUFFIX_RUNTIME.get(path.suffix, backend or "torch")
    if backend not in RUNTIMES:
        raise ValueError(f"unknown backend {backend!r} ({', '.join(RUNTIMES)})")
    if backend == "rknn":
        from nodulekit.deploy.rknn import load_rknn_runner  # rknn-toolkit-lite2, on the board

        return load_rknn_runner(path, kind=kind)
    if backend == "onnx":
        return (OnnxClsRunner if kind == "cls" else OnnxRunner)(path, threads=threads)
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
        backend: one of :data:`BACKENDS`; an ``.onnx`` / ``.rknn`` suffix selects that runtime.
        threads: CPU threads.
    """
    return load_runner(path, "seg", backend, threads)


def load_cls_runner(path: str | Path, backend: str = "torch", threads: int | None = 2):
    """A classifier runner: ``(N, 1, 32, 48, 48)`` clipped HU -> ``(N,)`` nodule probability.

    Args: as :func:`load_seg_runner`, with ``LunaModel`` checkpoints or its exports (3D or Conv2d).
    """
    return load_runner(path, "cls", backend, threads)
