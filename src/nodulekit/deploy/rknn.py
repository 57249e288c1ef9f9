"""RKNN models for the RK3588 NPU, from the main environment.

rknn-toolkit2 pins old torch, numpy and onnx, so it lives in its own virtual environment
(``.venv-rknn``, created by ``make rknn``) and is reached only through a subprocess running
``rknn_worker.py`` with a JSON job file. This module never imports ``rknn``.

On the board, models run through rknn-toolkit-lite2 (:class:`RknnLiteRunner`), imported when a
runner is built.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from nodulekit import SEG_CHANNELS
from nodulekit.deploy.outputs import class1_probability
from nodulekit.deploy.rknn_logs import parse_accuracy_analysis, parse_build_log, parse_eval_memory, parse_eval_perf
from nodulekit.errors import InputError, NodulekitError
from nodulekit.log import get_logger

log = get_logger("rknn")

ENV_PYTHON = "NODULEKIT_RKNN_PYTHON"
WORKER = Path(__file__).with_name("rknn_worker.py")
ALGORITHMS = ("normal", "mmse", "kl_divergence")
DEFAULT_TIMEOUT_S = 3600.0


class RknnUnavailable(NodulekitError):
    """The rknn-toolkit2 environment (or, on a board, rknn-toolkit-lite2) is missing."""


def rknn_python() -> Path:
    """The Python of the rknn-toolkit2 environment: ``$NODULEKIT_RKNN_PYTHON`` or ``.venv-rknn/bin/python``.

    ``.venv-rknn`` is looked up in the current directory, then in the repository holding this package.

    Raises:
        RknnUnavailable: no such interpreter; ``make rknn`` creates it.
    """
    env = os.environ.get(ENV_PYTHON)
    candidates = [Path(env)] if env else [Path.cwd() / ".venv-rknn/bin/python",
                                          Path(__file__).resolve().parents[3] / ".venv-rknn/bin/python"]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    where = f"${ENV_PYTHON}={env}" if env else " or ".join(str(p) for p in candidates)
    raise RknnUnavailable(f"rknn-toolkit2 environment not found ({where}); run `make rknn` in the "
                          f"repository to create .venv-rknn, or point {ENV_PYTHON} at its python")


def rknn_available() -> bool:
    """True when the rknn-toolkit2 environment exists (it is not started to check)."""
    try:
        rknn_python()
    except RknnUnavailable:
        return False
    return True


def _onnx_input_name(path: Path) -> str:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    stored = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in stored]
    if len(names) != 1:
        raise InputError(path, f"expected one graph input, found {names}")
    return names[0]


def _save_inputs(arrays, folder: Path, input_size) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, x in enumerate(arrays):
        x = np.asarray(x, dtype=np.float32).reshape(input_size)  # NCHW: rknn rejects NHWC .npy data
        path = folder / f"{i:04d}.npy"
        np.save(path, x)
        paths.append(str(path))
    return paths


def build_rknn(onnx_path, out_path, *, quantize: bool, dataset=None, algorithm: str = "normal",
                target: str = "rk3588", input_size=(1, SEG_CHANNELS, 512, 512), eval_inputs=None,
                analysis_input=None, device_id: str | None = None, optimization_level: int = 3,
                keep_analysis_tensors: bool = False, timeout: float = DEFAULT_TIMEOUT_S) -> dict:
    """Build an ``.rknn`` file from a static ONNX model and measure it, in ``.venv-rknn``.

    Without ``device_id`` the toolkit's simulator runs ``eval_inputs`` and the accuracy analysis.
    With ``device_id`` (an adb serial or ``IP:port``) they run on the board, with ``eval_perf``
    (``perf_debug=True``) and ``eval_memory``.

    Args:
        onnx_path: ONNX file, opset 13-19, whose single input is ``input_size`` (or dynamic).
        out_path: the ``.rknn`` file to write.
        quantize: int8 (w8a8) quantization by the toolkit from ``dataset``. ``False`` builds fp16, or
            keeps the int8 of a QDQ (QAT) ONNX file.
        dataset: calibration inputs (arrays of ``input_size``), or an existing ``dataset.txt``.
        algorithm: ``normal``, ``mmse`` or ``kl_divergence``.
        target: rknn target platform.
        input_size: the static NCHW input shape.
        eval_inputs: arrays to run; their outputs come back as ``result["outputs"]``.
        analysis_input: one array for ``accuracy_analysis`` (per-layer cosine similarity).
        device_id: run on this connected board instead of the simulator.
        optimization_level: rknn compiler optimisation level.
        keep_analysis_tensors: keep the per-layer tensor dumps of the accuracy analysis (about
            2 GB for a 512x512 U-Net); by default only the error table is kept.
        timeout: seconds before the worker is stopped.

    Returns:
        The build log's figures (:func:`parse_build_log`): ``weight_memory_kib``,
        ``internal_memory_kib``, ``layers``, ``cpu_fallback_layers``, ``cycles_estimate``; plus
        ``size_kib``, ``outputs`` (list of output-array lists), ``accuracy`` (per-layer rows),
        ``perf`` and ``memory`` (board only), ``errors`` (per optional step), ``seconds``,
        ``log`` (its path) and ``toolkit_version``.

    Raises:
        RknnUnavailable: ``.venv-rknn`` is missing.
        InputError: bad arguments, or the build failed (the message quotes the log).
    """
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise InputError(onnx_path, "ONNX file not found")
    if algorithm not in ALGORITHMS:
        raise InputError(onnx_path, f"unknown quantization algorithm {algorithm!r}; choose from {ALGORITHMS}")
    if quantize and dataset is None:
        raise InputError(onnx_path, "an int8 rknn build needs a calibration dataset")
    python = rknn_python()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    work = out_path.with_name(out_path.stem + ".rknn_work")
    work.mkdir(exist_ok=True)
    log_path = out_path.with_suffix(".build.log")
    with tempfile.TemporaryDirectory(prefix="nodulekit-rknn-") as tmp:
        tmp = Path(tmp)
        job = {"onnx": str(onnx_path.resolve()), "out": str(out_path.resolve()), "target": target,
               "quantize": bool(quantize), "algorithm": algorithm, "input_size": list(input_size),
               "input_name": _onnx_input_name(onnx_path), "optimization_level": optimization_level,
               "device_id": device_id, "outputs_dir": str(tmp / "outputs"), "result": str(tmp / "result.json"),
               "analysis_dir": str(work / "analysis")}
        if quantize:
            if isinstance(dataset, (str, Path)):
                job["dataset"] = str(Path(dataset).resolve())
            else:
                lst = tmp / "dataset.txt"
                lst.write_text("\n".join(_save_inputs(dataset, tmp / "calib", input_size)) + "\n")
                job["dataset"] = str(lst)
        job["eval_inputs"] = _save_inputs(eval_inputs or [], tmp / "eval", input_size)
        if analysis_input is not None:
            job["analysis_input"] = _save_inputs([analysis_input], tmp / "analysis_in", input_size)[0]
        (tmp / "job.json").write_text(json.dumps(job, indent=1))
        log.info("rknn build %s -> %s (%s, %s) in %s", onnx_path.name, out_path,
                 f"int8 {algorithm}" if quantize else "no toolkit quantization", target, python)
        start = time.perf_counter()
        with open(log_path, "w") as fh:
            try:
                proc = subprocess.run([str(python), str(WORKER), str(tmp / "job.json")], stdout=fh,
                                      stderr=subprocess.STDOUT, timeout=timeout, cwd=tmp)
            except subprocess.TimeoutExpired:
                raise InputError(onnx_path, f"rknn worker ran past {timeout:.0f} s (log: {log_path})") from None
        text = log_path.read_text(errors="replace")
        result = json.loads((tmp / "result.json").read_text()) if (tmp / "result.json").is_file() else {}
        if proc.returncode != 0 or not out_path.is_file():
            tail = "\n".join(text.splitlines()[-15:])
            err = result.get("errors", {}).get("build", f"exit code {proc.returncode}")
            raise InputError(onnx_path, f"rknn build failed: {err} (log: {log_path})\n{tail}")
        outputs = _collect_outputs(result.get("outputs", []), len(job["eval_inputs"]))
    info = parse_build_log(text)
    info.update(size_kib=out_path.stat().st_size / 1024, outputs=outputs, errors=result.get("errors", {}),
                seconds=result.get("seconds", {}), toolkit_version=result.get("toolkit_version"),
                log=str(log_path), quantize=bool(quantize), algorithm=algorithm if quantize else None,
                accuracy=_read_analysis(work / "analysis", keep_analysis_tensors),
                perf=parse_eval_perf(result["perf"]) if result.get("perf") else None,
                memory=parse_eval_memory(result["memory"]) if result.get("memory") else None)
    log.info("wrote %s (%.1f KiB, weights %.2f KiB, %d CPU layers) in %.1f s", out_path, info["size_kib"],
             info["weight_memory_kib"] or float("nan"), len(info["cpu_fallback_layers"]),
             time.perf_counter() - start)
    return info


def _collect_outputs(paths: list[str], n_inputs: int) -> list[list[np.ndarray]]:
    per_input: list[list[np.ndarray]] = [[] for _ in range(n_inputs)]
    for path in sorted(paths):
        i, _j = Path(path).stem[3:].split("_")
        per_input[int(i)].append(np.load(path))
    return per_input


def _read_analysis(folder: Path, keep_tensors: bool) -> list[dict]:
    table = folder / "error_analysis.txt"
    if not keep_tensors:
        import shutil

        for sub in ("golden", "simulator", "runtime"):
            shutil.rmtree(folder / sub, ignore_errors=True)
    rows = parse_accuracy_analysis(table.read_text()) if table.is_file() else []
    for empty in (folder, folder.parent):
        if empty.is_dir() and not any(empty.iterdir()):
            empty.rmdir()
    return rows


class RknnLiteRunner:
    """An ``.rknn`` model on the board's NPU through rknn-toolkit-lite2 (aarch64 only).

    Maps ``np.float32 (N, 7, H, W)`` to the model's first output, one input at a time (the model is
    built for batch 1), e.g. ``(N, 1, H, W)`` probabilities for the segmentation U-Net.

    Args:
        path: ``.rknn`` file built for this board's platform.
        core_mask: ``RKNNLite.NPU_CORE_*`` name suffix: ``AUTO``, ``0``, ``0_1``, ``0_1_2``...
    """

    def __init__(self, path: str | Path, core_mask: str = "AUTO"):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(self.path, "RKNN file not found")
        try:
            from rknnlite.api import RKNNLite
        except ImportError:
            raise RknnUnavailable("rknn-toolkit-lite2 is not installed: on the RK3588 board run "
                                  "`pip install rknn-toolkit-lite2` (see docs/rknn.md)") from None
        self.rknn = RKNNLite(verbose=False)
        if self.rknn.load_rknn(str(self.path)) != 0:
            raise InputError(self.path, "rknn-toolkit-lite2 cannot load it")
        mask = getattr(RKNNLite, f"NPU_CORE_{core_mask}", None)
        if mask is None:
            raise InputError(self.path, f"unknown NPU core mask {core_mask!r}")
        if self.rknn.init_runtime(core_mask=mask) != 0:
            raise InputError(self.path, "rknn-toolkit-lite2 init_runtime failed (is this an RK3588 with librknnrt?)")

    def run_all(self, x: np.ndarray) -> list[np.ndarray]:
        """Every output for a batch, stacked over the batch."""
        outs = [self.rknn.inference(inputs=[np.ascontiguousarray(x[i:i + 1], dtype=np.float32)],
                                    data_format=["nchw"]) for i in range(len(x))]
        return [np.concatenate([np.asarray(o[k], dtype=np.float32) for o in outs]) for k in range(len(outs[0]))]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run_all(x)[0]

    def close(self) -> None:
        self.rknn.release()


class RknnLiteClsRunner(RknnLiteRunner):
    """A classifier ``.rknn`` (3D or Conv2d rewrite) on the board: ``(N, 1, D, H, W) -> (N,)`` probability.

    Its crop spacing comes from the sidecar ``<file>.json`` (:mod:`nodulekit.deploy.model_meta`).
    """

    def __init__(self, path: str | Path, core_mask: str = "AUTO"):
        from nodulekit.deploy.model_meta import context_of, crop_spacing_of

        super().__init__(path, core_mask=core_mask)
        self.crop_spacing = crop_spacing_of(path)
        self.context = context_of(path)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return class1_probability(self.run_all(x)[-1])


def load_rknn_runner(path: str | Path, kind: str = "seg", core_mask: str = "AUTO"):
    """The board runner of an ``.rknn`` file: ``kind`` is ``seg`` or ``cls``."""
    if kind not in ("seg", "cls"):
        raise ValueError(f"unknown runner kind {kind!r} (seg, cls)")
    return (RknnLiteClsRunner if kind == "cls" else RknnLiteRunner)(path, core_mask=core_mask)
