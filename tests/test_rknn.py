"""RKNN: log parsers on recorded toolkit output (fast), and real builds in .venv-rknn (slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nodulekit.deploy import rknn_logs

DATA = Path(__file__).parent / "data" / "rknn"


def _read(name: str) -> str:
    return (DATA / name).read_text()


@pytest.mark.parametrize("name, dtype, weight_kib, internal_kib", [
    ("build_unet512_fp16.log", "FLOAT16", 232.812, 45056),
    ("build_unet512_int8.log", "INT8", 121.438, 28672),
    ("build_unet64_qdq.log", "INT8", 121.438, None),
])
def test_parse_build_log(name, dtype, weight_kib, internal_kib):
    info = rknn_logs.parse_build_log(_read(name))
    assert info["weight_memory_kib"] == pytest.approx(weight_kib)
    if internal_kib is not None:
        assert info["internal_memory_kib"] == pytest.approx(internal_kib)
    assert info["dtypes"] == [dtype]
    assert info["cpu_fallback_layers"] == []
    convs = [r for r in info["layers"] if r["op_type"].startswith("Conv")]
    assert len(convs) == 13 and all(r["target"] == "NPU" for r in convs)
    assert info["layers"][0]["op_type"] == "InputOperator"
    assert info["cycles_estimate"] > 0


def test_cpu_fallback_is_flagged():
    text = _read("build_unet512_int8.log").replace(
        "AveragePool        INT8     NPU", "AveragePool        INT8     CPU", 1)
    assert rknn_logs.parse_build_log(text)["cpu_fallback_layers"] == ["AveragePool:/unet/AveragePool"]


@pytest.mark.parametrize("name", ["build_unet512_fp16.log", "error_analysis_unet512_fp16.txt"])
def test_parse_accuracy_analysis(name):
    rows = rknn_logs.parse_accuracy_analysis(_read(name))
    assert len(rows) == 29
    assert rows[0]["op"] == "Input" and rows[-1]["name"] == "prob"
    assert rows[1]["entire_euc"] == pytest.approx(193.95409)
    assert min(r["entire_cos"] for r in rows) >= 0.9999


def test_parse_eval_perf_debug():
    perf = rknn_logs.parse_eval_perf(_read("eval_perf_unet512_int8_perf_debug.txt"))
    assert perf["total_us"] == 28360
    assert perf["memory_rw_kib"] == 85492
    assert perf["frequencies"] == {"cpu": [1800000, 2256000, 2304000], "npu": [1000000000], "ddr": [2112000000]}
    assert len(perf["layers"]) == 19
    assert sum(r["time_us"] for r in perf["layers"]) == perf["total_us"]
    assert rknn_logs.cpu_fallback_layers(perf["layers"]) == []
    ranking = {r["op_type"]: r for r in perf["ranking"]}
    assert ranking["ConvRelu"]["calls"] == 10 and ranking["ConvRelu"]["npu_us"] == 19580
    assert sum(r["total_us"] for r in perf["ranking"]) == perf["total_us"]


def test_parse_eval_perf_summary():
    perf = rknn_logs.parse_eval_perf(_read("eval_perf_unet512_int8_summary.txt"))
    assert perf["total_us"] == 27150 and perf["layers"] == []


def test_parse_eval_memory():
    mem = rknn_logs.parse_eval_memory(_read("eval_memory_unet512_int8.txt"))
    assert mem["weight_kib"] == pytest.approx(0.12 * 1024)
    assert mem["internal_kib"] == pytest.approx(28 * 1024)
    assert mem["other_kib"] == pytest.approx(4.52 * 1024)
    assert mem["total_kib"] == pytest.approx(32.64 * 1024)
    assert mem["model_size_kib"] == pytest.approx(0.52 * 1024)
    as_dict = rknn_logs.parse_eval_memory({"total_weight_allocation": 4312608, "total_internal_allocation": 1756160,
                                           "total_model_allocation": 6068768})
    assert as_dict["weight_kib"] == pytest.approx(4312608 / 1024)


def test_main_env_never_imports_rknn():
    code = ("import sys, nodulekit.deploy.rknn, nodulekit.deploy.rknn_logs; "
            "bad = [m for m in sys.modules if m == 'rknn' or m.startswith(('rknn.', 'rknnlite'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_env_says_make_rknn(monkeypatch, tmp_path):
    from nodulekit.deploy import rknn

    monkeypatch.setenv(rknn.ENV_PYTHON, str(tmp_path / "nope" / "python"))
    assert not rknn.rknn_available()
    with pytest.raises(rknn.RknnUnavailable, match="make rknn"):
        rknn.rknn_python()
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"x")
    with pytest.raises(rknn.RknnUnavailable, match="make rknn"):
        rknn.build_rknn(onnx_file, tmp_path / "m.rknn", quantize=False)


def test_board_runner_without_lite_toolkit(tmp_path):
    from nodulekit.deploy import rknn

    model = tmp_path / "m.rknn"
    model.write_bytes(b"rknn")
    with pytest.raises(rknn.RknnUnavailable, match="rknn-toolkit-lite2"):
        rknn.load_rknn_runner(model, kind="seg")


# ---- real builds (slow): need .venv-rknn -------------------------------------------------------

@pytest.fixture(scope="module")
def rknn_env():
    from nodulekit.deploy import rknn

    if os.environ.get("NODULEKIT_SKIP_RKNN") == "1":
        pytest.skip("NODULEKIT_SKIP_RKNN=1")
    if not rknn.rknn_available():
        pytest.fail("the rknn-toolkit2 environment .venv-rknn is missing: run `make rknn` "
                    "(or set NODULEKIT_SKIP_RKNN=1 to skip the RKNN tests)")
    return rknn


def _small_unet_onnx(path: Path, size: int) -> Path:
    import torch

    from nodulekit.models.unet import SegModel

    torch.manual_seed(0)
    torch.onnx.export(SegModel().eval(), torch.zeros(1, 7, size, size), str(path), input_names=["x"],
                      output_names=["prob"], opset_version=17, dynamo=False)
    return path


def _inputs(n: int, size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.uniform(-1000, 1000, (1, 7, size, size)).astype(np.float32) for _ in range(n)]


@pytest.mark.slow
def test_simulator_fp16_and_int8(rknn_env, tmp_path):
    import onnxruntime as ort

    size = 64
    onnx_file = _small_unet_onnx(tmp_path / "unet.onnx", size)
    xs = _inputs(3, size)
    ref = ort.InferenceSession(str(onnx_file)).run(None, {"x": xs[0]})[0]
    fp16 = rknn_env.build_rknn(onnx_file, tmp_path / "fp16.rknn", quantize=False, input_size=(1, 7, size, size),
                                eval_inputs=xs[:1], analysis_input=xs[0])
    assert fp16["cpu_fallback_layers"] == [] and fp16["dtypes"] == ["FLOAT16"]
    assert fp16["weight_memory_kib"] > 0 and Path(tmp_path / "fp16.rknn").stat().st_size > 0
    out = fp16["outputs"][0][0].reshape(ref.shape)
    assert np.abs(out - ref).max() < 1e-2
    assert fp16["accuracy"] and min(r["entire_cos"] for r in fp16["accuracy"]) > 0.999
    int8 = rknn_env.build_rknn(onnx_file, tmp_path / "int8.rknn", quantize=True, dataset=xs, algorithm="mmse",
                                input_size=(1, 7, size, size), eval_inputs=xs[:1])
    assert int8["dtypes"] == ["INT8"] and int8["cpu_fallback_layers"] == []
    assert int8["weight_memory_kib"] < 0.6 * fp16["weight_memory_kib"]


@pytest.mark.slow
def test_qdq_onnx_runs_int8_on_npu(rknn_env, tmp_path):
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    size = 64
    fp32 = _small_unet_onnx(tmp_path / "unet.onnx", size)
    xs = _inputs(4, size)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": x} for x in xs])

        def get_next(self):
            return next(self.it, None)

    qdq = tmp_path / "unet_qdq.onnx"
    quantize_static(str(fp32), str(qdq), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    info = rknn_env.build_rknn(qdq, tmp_path / "qdq.rknn", quantize=False, input_size=(1, 7, size, size),
                                eval_inputs=xs[:1])
    convs = [r for r in info["layers"] if r["op_type"].startswith("Conv")]
    assert len(convs) == 13 and all(r["dtype"] == "INT8" and r["target"] == "NPU" for r in convs)
    assert info["cpu_fallback_layers"] == []
    ref = ort.InferenceSession(str(fp32)).run(None, {"x": xs[0]})[0]
    out = info["outputs"][0][0].reshape(ref.shape)
    assert ((out > 0.5) == (ref > 0.5)).mean() > 0.97


@pytest.mark.slow
def test_torchao_qat_qdq_runs_int8_on_npu(rknn_env, tmp_path):
    """The QAT graph's QDQ placement lets rknn-toolkit2 run every layer int8 (no fp16 islands)."""
    import torch

    from nodulekit.deploy.export import export
    from nodulekit.deploy.runtime import OnnxRunner
    from nodulekit.models.unet import SegModel
    from nodulekit.optimize import quantize as Q

    size = 64
    torch.manual_seed(0)
    prepared = Q.qat_prepare(SegModel().eval(), example_size=32)
    Q.set_train_mode(prepared)
    with torch.no_grad():  # a few batches so the observers and the BatchNorm statistics see data
        for x in _inputs(3, 32):
            prepared(torch.from_numpy(np.repeat(x, 2, axis=0)))
    Q.set_eval_mode(prepared)
    art = export(Q.qat_convert(prepared), "onnx-int8", tmp_path / "qat.int8.onnx", variant="qat")
    xs = _inputs(1, size)
    info = rknn_env.build_rknn(art.path, tmp_path / "qat.rknn", quantize=False, input_size=(1, 7, size, size),
                                eval_inputs=xs)
    compute = [r for r in info["layers"] if r["op_type"] not in ("InputOperator", "OutputOperator")]
    assert compute and all(r["dtype"] == "INT8" and r["target"] == "NPU" for r in compute), \
        [(r["op_type"], r["dtype"], r["target"]) for r in compute if r["dtype"] != "INT8"]
    assert not any(r["op_type"] == "exDataConvert" for r in info["layers"])
    assert info["cpu_fallback_layers"] == []
    ref = OnnxRunner(art.path)(xs[0])
    out = info["outputs"][0][0].reshape(ref.shape)
    assert ((out > 0.5) == (ref > 0.5)).mean() > 0.97


def test_npu_rows_follow_the_row_schema(tmp_path, monkeypatch):
    """Every NPU row has the common keys, its format says who quantized it, and the weight-memory
    ratio against the fp16 baseline build is in the row (the report only shows it)."""
    from nodulekit.deploy import rknn
    from nodulekit.deploy.measure import npu_rows

    def fake_build(onnx_path, out_path, *, quantize, **kwargs):
        out_path.write_bytes(b"RKNN")
        return {"weight_memory_kib": 100.0 if onnx_path.name == "base.onnx" else 25.0, "internal_memory_kib": 1.0,
                "size_kib": 4 / 1024, "cpu_fallback_layers": [], "cycles_estimate": None, "dtypes": {},
                "accuracy": [], "perf": None, "outputs": [], "errors": {}}

    monkeypatch.setattr(rknn, "build_rknn", fake_build)
    rows = npu_rows([("baseline", tmp_path / "base.onnx", "fp16"), ("ptq", tmp_path / "b.onnx", "ptq"),
                          ("qat", tmp_path / "q.onnx", "qat"), ("odd", tmp_path / "o.onnx", "int4")],
                         tmp_path / "npu", calibration=[np.zeros((1, 7, 8, 8), np.float32)])
    by = {r["name"]: r for r in rows}
    assert [(by[n]["format"], by[n]["quantization"]) for n in ("baseline", "ptq", "qat")] == [
        ("rknn", "fp16"), ("rknn-int8", "int8"), ("rknn", "int8")]
    assert all(r["kind"] == "seg" and r["artifact"].endswith(f"{r['name']}.rknn") for r in rows)
    assert by["baseline"]["weight_memory_ratio"] == 1.0 and by["ptq"]["weight_memory_ratio"] == 4.0
    assert by["baseline"]["latency_us"] is None  # no board
    assert "unknown NPU build mode" in by["odd"]["error"] and "weight_memory_ratio" not in by["odd"]
