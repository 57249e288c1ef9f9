"""Parsers for rknn-toolkit2's text output: the build log, accuracy analysis, eval_perf, eval_memory.

All take the text as printed (ANSI colours and the ``D RKNN: [hh:mm:ss.mmm]`` prefix are stripped)
and return plain dicts. Formats are those of rknn-toolkit2 2.x; samples live in ``tests/data/rknn/``.
RKNN's "KB" and "MiB" are binary units; every size returned here is in KiB.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PREFIX = re.compile(r"^[DIWE] RKNN: \[[^\]]*\] ?")
# the NPU runs everything else; input and output copies are always listed on the CPU
_IO_OPS = {"InputOperator", "OutputOperator"}
_UNITS_KIB = {"B": 1 / 1024, "KB": 1.0, "KIB": 1.0, "MB": 1024.0, "MIB": 1024.0, "GB": 1024.0**2, "GIB": 1024.0**2}


def clean_lines(text: str) -> list[str]:
    """Lines of a toolkit log without colour codes or the ``D RKNN: [time]`` prefix."""
    return [_PREFIX.sub("", _ANSI.sub("", line)).rstrip() for line in text.replace("\r", "\n").splitlines()]


def _kib(value: str, unit: str) -> float:
    return float(value) * _UNITS_KIB[unit.upper()]


def _num(token: str):
    try:
        return int(token)
    except ValueError:
        try:
            return float(token)
        except ValueError:
            return None


def parse_layer_table(lines: list[str], title: str = "Network Layer Information Table") -> list[dict]:
    """Rows of the per-layer table (build log, or ``eval_perf`` with ``perf_debug=True``).

    Returns:
        One dict per layer: ``id``, ``op_type``, ``dtype``, ``target`` (``NPU``/``CPU``/``GPU``),
        ``input_shape``, ``output_shape``, ``full_name``, and when present ``cycles``
        (DDR, NPU, total), ``time_us``, ``rw_kb``.
    """
    rows: list[dict] = []
    for i, line in enumerate(lines):
        if title in line:
            break
    else:
        return rows
    header = None
    for line in lines[i + 1:]:
        tokens = line.split()
        if not tokens or set(line.strip()) <= {"-", "+"}:
            if header and rows and not tokens:
                break
            continue
        if tokens[0] == "ID" and "OpType" in tokens:
            header = tokens
            continue
        if header is None or not tokens[0].isdigit():
            if rows:
                break
            continue
        row = {"id": int(tokens[0]), "op_type": tokens[1], "dtype": tokens[2], "target": tokens[3],
               "input_shape": tokens[4], "output_shape": tokens[5], "full_name": tokens[-1]}
        if len(tokens) == len(header):
            fields = dict(zip(header, tokens))
            cycles = fields.get("Cycles(DDR/NPU/Total)")
            if cycles and cycles.count("/") == 2:
                row["cycles"] = [int(c) for c in cycles.split("/")]
            for key, name in (("Time(us)", "time_us"), ("RW(KB)", "rw_kb")):
                if key in fields:
                    row[name] = _num(fields[key])
        rows.append(row)
    return rows


def cpu_fallback_layers(layers: list[dict]) -> list[str]:
    """Full names of the layers that run on the CPU (the input/output copies excepted)."""
    return [r["full_name"] for r in layers if r["target"] != "NPU" and r["op_type"] not in _IO_OPS]


def parse_build_log(text: str) -> dict:
    """Memory, per-layer placement and the cycle estimate from a ``build`` log (``RKNN(verbose=True)``).

    Returns:
        ``weight_memory_kib``, ``internal_memory_kib`` (None when not printed), ``layers``,
        ``cpu_fallback_layers``, ``dtypes`` (data types of the NPU layers) and
        ``cycles_estimate``: the compiler's summed per-layer cycle estimate, not a measurement.
    """
    lines = clean_lines(text)
    out = {"weight_memory_kib": None, "internal_memory_kib": None}
    for line in lines:
        m = re.search(r"Total (Weight|Internal) Memory Size:\s*([\d.]+)\s*([KMG]?i?B)", line)
        if m:
            out[f"{m.group(1).lower()}_memory_kib"] = _kib(m.group(2), m.group(3))
    layers = parse_layer_table(lines)
    out["layers"] = layers
    out["cpu_fallback_layers"] = cpu_fallback_layers(layers)
    out["dtypes"] = sorted({r["dtype"] for r in layers if r["target"] == "NPU"})
    cycles = [r["cycles"][2] for r in layers if "cycles" in r]
    out["cycles_estimate"] = sum(cycles) if cycles else None
    return out


def parse_accuracy_analysis(text: str) -> list[dict]:
    """Per-layer errors from ``accuracy_analysis`` (its log or ``error_analysis.txt``).

    Returns:
        One dict per layer: ``op``, ``name``, ``entire_cos``, ``entire_euc``, ``single_cos``,
        ``single_euc`` (simulator against the fp32 "golden" run), plus ``runtime_*`` columns
        when the analysis ran on a board.
    """
    rows = []
    pattern = re.compile(r"^\[(\w+)\]\s+(\S+)\s+(.*)$")
    for line in clean_lines(text):
        m = pattern.match(line.strip())
        if not m:
            continue
        numbers = [float(v) for v in re.findall(r"-?\d+\.\d+(?:e[-+]?\d+)?", m.group(3))]
        if len(numbers) < 4:
            continue
        row = {"op": m.group(1), "name": m.group(2), "entire_cos": numbers[0], "entire_euc": numbers[1],
               "single_cos": numbers[2], "single_euc": numbers[3]}
        if len(numbers) >= 8:
            row.update(runtime_entire_cos=numbers[4], runtime_entire_euc=numbers[5],
                       runtime_single_cos=numbers[6], runtime_single_euc=numbers[7])
        rows.append(row)
    return rows


def parse_eval_perf(text: str) -> dict:
    """``eval_perf`` output (a board run).

    Returns:
        ``total_us`` (per frame: "Total Operator Elapsed Per Frame Time" with ``perf_debug=True``,
        "Total Time" without), ``memory_rw_kib`` (per frame), ``layers`` (per-layer table with
        ``time_us``), ``ranking`` (time by operator type) and ``frequencies`` (CPU kHz, NPU/DDR Hz).
    """
    lines = clean_lines(text)
    out: dict = {"total_us": None, "memory_rw_kib": None, "frequencies": {}, "ranking": []}
    joined = "\n".join(lines)
    m = re.search(r"Total Operator Elapsed(?: Per Frame)? Time\(us\):\s*([\d.]+)", joined) or \
        re.search(r"^\s*Total Time\(us\):\s*([\d.]+)", joined, re.M)
    if m:
        out["total_us"] = _num(m.group(1))
    m = re.search(r"Total Memory Read/Write(?: Per Frame)? Size\(KB\):\s*([\d.]+)", joined)
    if m:
        out["memory_rw_kib"] = _num(m.group(1))
    for m in re.finditer(r"^(CPU|NPU|DDR) Current Frequency List:\s*\n((?:\s*-\s*\d+\s*\n?)+)", joined, re.M):
        out["frequencies"][m.group(1).lower()] = [int(v) for v in re.findall(r"\d+", m.group(2))]
    out["layers"] = parse_layer_table(lines)
    in_ranking = False
    for line in lines:
        tokens = line.split()
        if tokens[:2] == ["OpType", "CallNumber"]:
            in_ranking = True
            continue
        if in_ranking and len(tokens) == 7 and tokens[1].isdigit():
            out["ranking"].append({"op_type": tokens[0], "calls": int(tokens[1]), "cpu_us": _num(tokens[2]),
                                   "gpu_us": _num(tokens[3]), "npu_us": _num(tokens[4]),
                                   "total_us": _num(tokens[5]), "ratio": _num(tokens[6].rstrip("%"))})
        elif in_ranking and out["ranking"] and tokens and set(tokens[0]) <= {"-", "="}:
            in_ranking = False
    return out


def parse_eval_memory(result) -> dict:
    """``eval_memory``: its returned dict (bytes) or its printed "Memory Profile Info Dump".

    Returns:
        ``weight_kib``, ``internal_kib``, ``other_kib``, ``total_kib`` and ``model_size_kib``
        (None where absent).
    """
    out = {"weight_kib": None, "internal_kib": None, "other_kib": None, "total_kib": None, "model_size_kib": None}
    if isinstance(result, dict):
        for key, name in (("total_weight_allocation", "weight_kib"), ("total_internal_allocation", "internal_kib"),
                          ("total_model_allocation", "total_kib")):
            if key in result:
                out[name] = float(result[key]) / 1024
        return out
    for line in clean_lines(str(result)):
        for label, name in (("Weight Memory", "weight_kib"), ("Internal Tensor Memory", "internal_kib"),
                            ("Other Memory", "other_kib"), ("Total Memory", "total_kib"),
                            ("current model size is", "model_size_kib")):
            m = re.search(rf"(?:Total )?{label}:?\s*([\d.]+)\s*([KMG]?i?B)", line)
            if m and (label != "Total Memory" or "Total Memory:" in line):
                out[name] = _kib(m.group(1), m.group(2))
    return out
