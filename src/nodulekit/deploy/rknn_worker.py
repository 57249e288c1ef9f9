"""Build, simulate and profile one RKNN model; runs inside ``.venv-rknn``, never in the main environment.

Usage: ``.venv-rknn/bin/python rknn_worker.py JOB.json``. The job (written by
:func:`nodulekit.deploy.rknn.build_rknn`) names the ONNX file, the build options and the input
``.npy`` files; the worker writes ``result`` (a JSON file) and leaves the toolkit's log on stdout,
which the caller keeps and parses. This file imports only the standard library, numpy and rknn.api,
because it runs with rknn-toolkit2's pinned dependencies.

Steps: ``config`` -> ``load_onnx`` -> ``build`` -> ``export_rknn``; then, without a board, the
simulator (``init_runtime()``) for ``inference`` and ``accuracy_analysis``; with ``device_id``, the
board (``init_runtime(target, device_id, perf_debug=True)``) for ``inference`` and ``eval_perf``,
and a second session with ``eval_mem=True`` for ``eval_memory``.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

# this file sits next to nodulekit's own rknn.py, which would shadow the toolkit's package
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]


def _check(ret, step: str) -> None:
    if ret != 0:
        raise RuntimeError(f"rknn {step} returned {ret}")


def _run_inputs(rknn, paths: list[str], out_dir: Path) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    for i, path in enumerate(paths):
        x = np.load(path)
        outputs = rknn.inference(inputs=[x], data_format=["nchw"])
        if outputs is None:
            raise RuntimeError(f"rknn inference returned nothing for {path}")
        for j, y in enumerate(outputs):
            dst = out_dir / f"out{i:04d}_{j}.npy"
            np.save(dst, np.asarray(y, dtype=np.float32))
            saved.append(str(dst))
    return saved


def _step(result: dict, name: str, fn):
    """Run one optional step; a failure is recorded in the result instead of ending the job."""
    t0 = time.perf_counter()
    try:
        value = fn()
    except Exception as exc:
        result["errors"][name] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        value = None
    result["seconds"][name] = round(time.perf_counter() - t0, 3)
    return value


def run(job: dict) -> dict:
    from rknn.api import RKNN

    result = {"ok": False, "errors": {}, "seconds": {}, "outputs": [], "perf": None, "memory": None}
    try:
        import importlib.metadata as md

        result["toolkit_version"] = md.version("rknn-toolkit2")
    except Exception:
        result["toolkit_version"] = None
    rknn = RKNN(verbose=True)
    try:
        t0 = time.perf_counter()
        _check(rknn.config(target_platform=job["target"], quantized_dtype="w8a8",
                           quantized_algorithm=job["algorithm"], quantized_method="channel",
                           optimization_level=job.get("optimization_level", 3)), "config")
        _check(rknn.load_onnx(model=job["onnx"], inputs=[job["input_name"]],
                              input_size_list=[list(job["input_size"])]), "load_onnx")
        _check(rknn.build(do_quantization=job["quantize"], dataset=job.get("dataset")), "build")
        _check(rknn.export_rknn(job["out"]), "export_rknn")
        result["seconds"]["build"] = round(time.perf_counter() - t0, 3)
        print("NODULEKIT_BUILD_DONE", flush=True)

        device_id = job.get("device_id")
        if device_id:
            def board():
                _check(rknn.init_runtime(target=job["target"], device_id=device_id, perf_debug=True),
                       "init_runtime(board)")
                result["outputs"] = _run_inputs(rknn, job.get("eval_inputs", []), Path(job["outputs_dir"]))
                return rknn.eval_perf(is_print=True)

            result["perf"] = _step(result, "eval_perf", board)

            def memory():
                _check(rknn.init_runtime(target=job["target"], device_id=device_id, eval_mem=True),
                       "init_runtime(eval_mem)")
                return rknn.eval_memory(is_print=True)

            result["memory"] = _step(result, "eval_memory", memory)
        elif job.get("eval_inputs") or job.get("analysis_input"):
            def simulate():
                _check(rknn.init_runtime(), "init_runtime(simulator)")
                return _run_inputs(rknn, job.get("eval_inputs", []), Path(job["outputs_dir"]))

            result["outputs"] = _step(result, "inference", simulate) or []
        if job.get("analysis_input"):
            kwargs = {"target": job["target"], "device_id": device_id} if device_id else {}
            _step(result, "accuracy_analysis", lambda: _check(rknn.accuracy_analysis(
                inputs=[job["analysis_input"]], output_dir=job["analysis_dir"], **kwargs), "accuracy_analysis"))
        result["ok"] = True
    except Exception as exc:
        result["errors"]["build"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        rknn.release()
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: rknn_worker.py JOB.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[1]).read_text())
    result = run(job)
    Path(job["result"]).write_text(json.dumps(result, indent=1, default=str))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
