"""OpenVINO: converting ONNX to IR, NNCF int8 quantization, and the CPU runners (the exporters that
use them live with every other format in :mod:`nodulekit.deploy.export`).

OpenVINO is the runtime a user picks for CNN inference on x86 CPUs: its CPU plugin fuses the
U-Net's conv + ReLU + BatchNorm chains and has int8 (VNNI) and bf16 kernels. The IR is converted
from the same ONNX graph the ONNX Runtime rows run, so both runtimes execute one graph.

Precision: on a CPU with bf16 support the plugin's default inference precision is bf16, which
changes the probabilities in the third decimal. Every runner here sets
``INFERENCE_PRECISION_HINT=f32`` unless asked for bf16, so an fp32 IR computes in fp32 and an int8
IR runs its quantized convs in int8 and the rest in fp32; ``precision`` on the runner says which.

int8 comes from ``nncf.quantize`` (post-training, per-channel symmetric weights, per-tensor
activations, fast bias correction) on the same calibration inputs as ONNX Runtime's PTQ
(:mod:`nodulekit.deploy.ptq`). For the U-Net the conv feeding the output Sigmoid stays float, as in
the ONNX Runtime PTQ: the 0.5 threshold sits at logit 0, where a coarse grid hurts most.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np

from nodulekit.errors import InputError
from nodulekit.log import get_logger

log = get_logger("deploy")

PRECISIONS = ("f32", "bf16")

_SIGNAL_STACKS: dict[int, tuple] = {}  # thread id -> (buffer, stack_t), kept for the process's life


def pin_signal_stack() -> None:
    """Give the calling thread an alternate signal stack that lives as long as the process.

    OpenVINO's CPU plugin installs its own alternate signal stack when it compiles a model and puts
    back the one it found when that model is freed. Freed in another order than compiled (two
    runners, or NNCF's internal models), the thread is left pointing at a freed stack, and the next
    signal handled there (Python's handlers run with SA_ONSTACK: torch's SIGCHLD handler when a
    subprocess exits, faulthandler's) kills the process with SIGSEGV. Re-pinning a stack that never
    goes away after every compile keeps whatever OpenVINO later restores valid. Each thread gets its
    own buffer, as the kernel requires, at least as large as the one found.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    class StackT(ctypes.Structure):
        _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]

    libc = ctypes.CDLL(None, use_errno=True)
    key = threading.get_ident()
    if key not in _SIGNAL_STACKS:
        current = StackT()
        libc.sigaltstack(None, ctypes.byref(current))
        size = max(int(current.ss_size or 0), 1 << 16)
        buf = ctypes.create_string_buffer(size)
        _SIGNAL_STACKS[key] = (buf, StackT(ctypes.addressof(buf), 0, size))
    if libc.sigaltstack(ctypes.byref(_SIGNAL_STACKS[key][1]), None) != 0:
        log.debug("sigaltstack failed (errno %d)", ctypes.get_errno())


def openvino_available() -> bool:
    """Whether the ``openvino`` package imports (it is a pinned dependency, but optional at run time)."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def _save(ov_model, out: Path) -> None:
    import openvino as ov

    # compress_to_fp16 defaults to True: it would store fp16 weights in an "fp32" IR
    ov.save_model(ov_model, str(out), compress_to_fp16=False)


def _ir_files(out: Path) -> list[Path]:
    return [out, out.with_suffix(".bin")]


def convert_onnx(onnx_path: str | Path, *, batch_dynamic: bool = False):
    """An ``openvino.Model`` of an ONNX file; ``batch_dynamic`` frees a fixed batch dimension (the
    classifier's ONNX has batch 1, OpenVINO takes any batch)."""
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    if batch_dynamic:
        shape = model.input(0).get_partial_shape()
        shape[0] = -1
        model.reshape({model.input(0): shape})
    return model


def _calibration_inputs(calibration) -> list[np.ndarray]:
    """The model inputs of a calibration source, as the ONNX Runtime PTQ reads them (a
    :class:`~nodulekit.deploy.ptq.SliceReader`, ``(items, scans)``, or an array of inputs)."""
    from nodulekit.deploy.ptq import _as_reader

    reader = _as_reader(calibration, "x")
    reader.rewind()
    return [item["x"] for item in iter(reader.get_next, None)]


def _output_conv(model) -> list[str]:
    """Friendly names of the convolution (and its bias add) feeding the model's output Sigmoid."""
    names = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Sigmoid":
            continue
        node = op.input_value(0).get_node()
        while node.get_type_name() in ("Add", "Convolution"):
            names.append(node.get_friendly_name())
            if node.get_type_name() == "Convolution":
                break
            node = node.input_value(0).get_node()
    return names


def quantize_ir(model, calibration, *, keep_output_float: bool) -> tuple[object, dict]:
    """``nncf.quantize`` of an ``openvino.Model`` on ``calibration`` inputs."""
    import nncf

    inputs = _calibration_inputs(calibration)
    if not inputs:
        raise ValueError("openvino-int8 needs at least one calibration input")
    ignored = _output_conv(model) if keep_output_float else []
    scope = nncf.IgnoredScope(names=ignored, validate=False) if ignored else None
    kwargs = {"ignored_scope": scope} if scope is not None else {}
    try:
        q = nncf.quantize(model, nncf.Dataset(inputs), subset_size=len(inputs), **kwargs)
    finally:
        pin_signal_stack()  # NNCF compiles and frees models of its own
    log.info("NNCF int8: %d calibration inputs, float: %s", len(inputs), ignored)
    return q, {"method": "nncf", "slices": len(inputs), "weights": "int8 per-channel symmetric",
               "activations": "int8 per-tensor", "float_nodes": ignored}


def compile_config(threads: int | None, precision: str = "f32") -> dict:
    """The CPU plugin settings of every OpenVINO runner: one stream (one request at a time, as the
    pipeline calls it), ``threads`` threads, and an explicit inference precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown OpenVINO precision {precision!r} ({', '.join(PRECISIONS)})")
    cfg = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_PRECISION_HINT": precision}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = str(int(threads))
    return cfg


class OpenVinoRunner:
    """An OpenVINO IR (``.xml``) or ONNX file compiled for the CPU; returns the first output.

    Args:
        path: ``.xml`` IR (its ``.bin`` beside it) or ``.onnx`` (OpenVINO reads ONNX directly).
        threads: inference threads (``None``: the plugin's default).
        precision: ``f32`` (default) or ``bf16`` inference precision of the float layers.
    """

    def __init__(self, path: str | Path, threads: int | None = 2, precision: str = "f32"):
        import openvino as ov

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(self.path, "OpenVINO model file not found")
        cfg = compile_config(threads, precision)
        try:
            model = ov.Core().read_model(str(self.path))
            if len(model.input(0).get_partial_shape()) == 5:  # a classifier's ONNX has batch 1
                shape = model.input(0).get_partial_shape()
                shape[0] = -1
                model.reshape({model.input(0): shape})
            self.compiled = ov.Core().compile_model(model, "CPU", cfg)
        except Exception as exc:
            raise InputError(self.path, f"OpenVINO cannot load it ({exc})") from None
        finally:
            pin_signal_stack()
        self.request = self.compiled.create_infer_request()
        types = [op.get_type_name() for op in model.get_ops()]
        self.precision = "int8" if "FakeQuantize" in types else precision
        # levels of a U-Net (one average pool per level below the top): lung-box crops need them
        self.unet_depth = types.count("AvgPool") + 1 if "AvgPool" in types else None

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        res = self.request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
        return [np.array(res[out]) for out in self.compiled.outputs]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._run(x)[0]


class OpenVinoClsRunner(OpenVinoRunner):
    """OpenVINO classifier: the last output (probabilities), any batch; crop spacing from the
    file's metadata (a sidecar of the IR, the ONNX metadata of an ``.onnx``)."""

    def __init__(self, path: str | Path, threads: int | None = 2, precision: str = "f32"):
        from nodulekit.deploy.model_meta import context_of, crop_spacing_of

        super().__init__(path, threads, precision)
        self.crop_spacing = crop_spacing_of(self.path)
        self.context = context_of(self.path)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        from nodulekit.deploy.outputs import class1_probability

        return class1_probability(self._run(x)[-1])


def compile_module(model, export, runner=OpenVinoRunner, threads: int | None = None):
    """A torch module compiled by OpenVINO for the CPU, for training's validation and scoring:
    ``export(model, path)`` writes it to a temporary ONNX file, ``runner(path, threads)`` compiles
    it (the compiled model keeps no reference to the file, which is removed)."""
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export(model, path)
        return runner(path, threads=torch.get_num_threads() if threads is None else threads)
