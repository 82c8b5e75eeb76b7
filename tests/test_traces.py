"""Traces: readers (Azure CSV, generic CSV/JSONL), errors with file/line/column, windows, rate
scaling, synthetic generators and Prometheus-style length histograms."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from archipelago.decide.traces import (
    Trace,
    TraceError,
    gamma_trace,
    histogram_edges,
    length_histogram,
    load_azure_csv,
    load_generic,
    load_trace,
    poisson_trace,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces"
CONV = DATA / "AzureLLMInferenceTrace_conv.csv"
CODE = DATA / "AzureLLMInferenceTrace_code.csv"

needs_data = pytest.mark.skipif(not CONV.exists(), reason="shared/data traces not present")


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ---------------------------------------------------------------------------------------------
# real Azure traces


@needs_data
def test_azure_conv_matches_published_statistics() -> None:
    tr = load_azure_csv(CONV)
    assert len(tr) == 19366
    assert tr.arrival_s[0] == 0.0
    assert np.all(np.diff(tr.arrival_s) >= 0)
    assert tr.arrival_s.dtype == np.float64 and tr.input_tokens.dtype == np.int32
    # data/README.md: prompt mean 1,155 / median 1,020 / max 14,050; output mean 211 / median 129 / max 1,000
    assert round(float(tr.input_tokens.mean())) == 1155
    assert int(np.median(tr.input_tokens)) == 1020
    assert int(tr.input_tokens.max()) == 14050
    assert round(float(tr.output_tokens.mean())) == 211
    assert int(tr.output_tokens.max()) == 1000
    # 18:15:46.68 -> 19:14:08.40: about 5.5 requests per second
    assert tr.duration_s == pytest.approx(3501.721937, abs=1e-6)
    assert tr.rate_rps == pytest.approx(5.53, abs=0.01)


@needs_data
def test_load_trace_dispatches_azure_code_trace() -> None:
    tr = load_trace(CODE)
    assert len(tr) == 8819
    assert round(float(tr.input_tokens.mean())) == 2048
    assert round(float(tr.output_tokens.mean())) == 28


def test_azure_seven_fractional_digits_are_kept(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "t.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:17:03.9799600,10,2\n"
        "2023-11-16 18:17:04.0000001,20,3\n"
        "2023-11-16 18:18:04.5,30,4\n",
    )
    tr = load_azure_csv(p)
    assert tr.arrival_s[1] == pytest.approx(0.0200401, abs=1e-9)
    assert tr.arrival_s[2] == pytest.approx(60.52004, abs=1e-9)
    assert tr.input_tokens.tolist() == [10, 20, 30]
    assert tr.output_tokens.tolist() == [2, 3, 4]
    assert tr.source == str(p)


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ("2023-11-16 18:17:05.0,abc,3", "line 4: ContextTokens 'abc' is not a non-negative integer"),
        ("2023-11-16 18:17:05.0,-5,3", "line 4: ContextTokens '-5' is not a non-negative integer"),
        ("2023-11-16 18:17:05.0,5,1.5", "line 4: GeneratedTokens '1.5' is not a non-negative integer"),
        ("2023-11-16 18:17:05.0,5,", "line 4: GeneratedTokens '' is not a non-negative integer"),
        ("yesterday,5,3", "line 4: TIMESTAMP 'yesterday' is not a date-time"),
    ],
)
def test_azure_bad_cell_names_file_line_and_column(tmp_path: Path, row: str, needle: str) -> None:
    p = _write(
        tmp_path,
        "bad.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:17:03.9799600,10,2\n"
        "2023-11-16 18:17:04.0,20,3\n" + row + "\n",
    )
    with pytest.raises(TraceError) as exc:
        load_trace(p)
    assert str(p) in str(exc.value)
    assert needle in str(exc.value)


def test_blank_lines_do_not_shift_line_numbers(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "blank.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:17:03.0,10,2\n"
        "\n"
        "2023-11-16 18:17:04.0,20,3\n"
        "2023-11-16 18:17:05.0,x,3\n",
    )
    with pytest.raises(TraceError, match=r"line 5: ContextTokens 'x'"):
        load_azure_csv(p)
    ok = _write(tmp_path, "ok.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.0,10,2\n\n"
                "2023-11-16 18:17:04.0,20,3\n")
    assert len(load_azure_csv(ok)) == 2


def test_azure_missing_column_names_header_line(tmp_path: Path) -> None:
    p = _write(tmp_path, "m.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:17:03.0,10\n")
    with pytest.raises(TraceError, match=r"line 1: missing column\(s\) GeneratedTokens"):
        load_azure_csv(p)


def test_unrecognised_header_lists_accepted_formats(tmp_path: Path) -> None:
    p = _write(tmp_path, "u.csv", "time,prompt,completion\n1,2,3\n")
    with pytest.raises(TraceError) as exc:
        load_trace(p)
    msg = str(exc.value)
    assert "line 1: unrecognised header" in msg
    assert "TIMESTAMP,ContextTokens,GeneratedTokens" in msg and "input_tokens" in msg


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="not found"):
        load_trace(tmp_path / "nope.csv")
    empty = _write(tmp_path, "e.csv", "\n\n")
    with pytest.raises(TraceError, match="empty"):
        load_trace(empty)


# ---------------------------------------------------------------------------------------------
# generic CSV / JSONL


def test_generic_csv_seconds_sorted_and_rebased(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "g.csv",
        "timestamp,input_tokens,output_tokens,user\n105.5,100,10,a\n100.0,200,20,b\n101.25,300,30,c\n",
    )
    tr = load_trace(p)
    assert tr.arrival_s.tolist() == [0.0, 1.25, 5.5]
    assert tr.input_tokens.tolist() == [200, 300, 100]
    assert tr.output_tokens.tolist() == [20, 30, 10]


def test_generic_csv_iso_timestamps(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "iso.csv",
        "timestamp,input_tokens,output_tokens\n2024-05-01T12:00:00Z,1,1\n2024-05-01T12:00:02.5Z,2,2\n",
    )
    tr = load_generic(p)
    assert tr.arrival_s.tolist() == [0.0, 2.5]


def test_generic_mixed_timestamp_kinds_rejected(tmp_path: Path) -> None:
    p = _write(tmp_path, "mix.csv", "timestamp,input_tokens,output_tokens\n1.0,1,1\n2024-05-01T12:00:00Z,2,2\n")
    with pytest.raises(TraceError, match=r"line 3: timestamp '2024-05-01T12:00:00Z' is not a number of seconds"):
        load_generic(p)


def test_jsonl_reader_and_errors(tmp_path: Path) -> None:
    rows = [
        {"timestamp": 3.0, "input_tokens": 30, "output_tokens": 3},
        {"timestamp": 1.0, "input_tokens": 10, "output_tokens": 1, "extra": "ignored"},
    ]
    p = _write(tmp_path, "t.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    tr = load_trace(p)
    assert tr.arrival_s.tolist() == [0.0, 2.0]
    assert tr.input_tokens.tolist() == [10, 30]

    bad = _write(tmp_path, "bad.jsonl", json.dumps(rows[0]) + "\n\n{not json}\n")
    with pytest.raises(TraceError, match=r"bad.jsonl line 3: not valid JSON"):
        load_trace(bad)
    missing = _write(tmp_path, "miss.jsonl", json.dumps({"timestamp": 1, "input_tokens": 2}) + "\n")
    with pytest.raises(TraceError, match=r"line 1: missing field 'output_tokens'"):
        load_trace(missing)
    neg = _write(tmp_path, "neg.jsonl", json.dumps(rows[0]) + "\n" +
                 json.dumps({"timestamp": 4, "input_tokens": -1, "output_tokens": 2}) + "\n")
    with pytest.raises(TraceError, match=r"neg.jsonl line 2: input_tokens '-1' is not a non-negative integer"):
        load_trace(neg)


# ---------------------------------------------------------------------------------------------
# Trace object


def _small() -> Trace:
    return Trace(
        arrival_s=np.array([0.0, 1.0, 2.0, 3.0, 10.0]),
        input_tokens=np.array([10, 20, 30, 40, 50]),
        output_tokens=np.array([1, 2, 3, 4, 5]),
        source="small",
    )


def test_trace_window_rebases_and_keeps_span() -> None:
    tr = _small()
    w = tr.window(1.0, 5.0)
    assert w.arrival_s.tolist() == [0.0, 1.0, 2.0]
    assert w.input_tokens.tolist() == [20, 30, 40]
    assert w.duration_s == 4.0
    assert w.rate_rps == pytest.approx(3 / 4.0)
    tail = tr.window(5.0, math.inf)
    assert tail.arrival_s.tolist() == [5.0] and tail.duration_s == 5.0
    assert len(tr.window(4.0, 6.0)) == 0 and tr.window(4.0, 6.0).duration_s == 2.0
    with pytest.raises(TraceError):
        tr.window(5.0, 5.0)
    with pytest.raises(TraceError):
        tr.window(-1.0, 5.0)


def test_trace_scale_rate() -> None:
    tr = _small()
    s = tr.scale_rate(2.0)
    assert s.arrival_s.tolist() == [0.0, 0.5, 1.0, 1.5, 5.0]
    assert s.rate_rps == pytest.approx(2 * tr.rate_rps)
    assert s.duration_s == pytest.approx(tr.duration_s / 2)
    assert s.input_tokens.tolist() == tr.input_tokens.tolist()
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(TraceError):
            tr.scale_rate(bad)


def test_trace_validation() -> None:
    with pytest.raises(TraceError, match="differ in length"):
        Trace(np.array([0.0, 1.0]), np.array([1]), np.array([1, 2]))
    with pytest.raises(TraceError, match="not sorted"):
        Trace(np.array([1.0, 0.5]), np.array([1, 1]), np.array([1, 1]))
    with pytest.raises(TraceError, match="non-negative integers"):
        Trace(np.array([0.0]), np.array([1.5]), np.array([1]))
    with pytest.raises(TraceError, match="shorter than the last arrival"):
        Trace(np.array([0.0, 5.0]), np.array([1, 1]), np.array([1, 1]), span_s=4.0)
    empty = Trace(np.zeros(0), np.zeros(0, dtype=int), np.zeros(0, dtype=int))
    assert len(empty) == 0 and empty.duration_s == 0.0 and empty.rate_rps == 0.0


# ---------------------------------------------------------------------------------------------
# synthetic traces


def test_poisson_trace_rate_and_determinism() -> None:
    a = poisson_trace(20.0, 500.0, input_tokens=512, output_tokens=64, seed=7)
    b = poisson_trace(20.0, 500.0, input_tokens=512, output_tokens=64, seed=7)
    c = poisson_trace(20.0, 500.0, input_tokens=512, output_tokens=64, seed=8)
    assert np.array_equal(a.arrival_s, b.arrival_s)
    assert not np.array_equal(a.arrival_s[:50], c.arrival_s[:50])
    expected = 20.0 * 500.0
    assert abs(len(a) - expected) < 4 * math.sqrt(expected)  # Poisson count, 4 sigma
    assert a.duration_s == 500.0 and a.arrival_s[-1] < 500.0
    gaps = np.diff(a.arrival_s)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, abs=0.05)  # exponential: CV = 1
    assert set(a.input_tokens.tolist()) == {512} and set(a.output_tokens.tolist()) == {64}


def test_gamma_trace_burstiness_and_sampled_lengths() -> None:
    sample = np.array([100, 200, 4000])
    tr = gamma_trace(10.0, 3.0, 3000.0, input_tokens=sample,
                     output_tokens=lambda rng, n: rng.integers(1, 10, n), seed=1)
    gaps = np.diff(tr.arrival_s)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(3.0, rel=0.15)
    assert tr.rate_rps == pytest.approx(10.0, rel=0.15)
    assert set(tr.input_tokens.tolist()) == {100, 200, 4000}
    assert tr.output_tokens.min() >= 1 and tr.output_tokens.max() <= 9
    with pytest.raises(TraceError):
        gamma_trace(10.0, 0.0, 10.0)
    with pytest.raises(TraceError):
        poisson_trace(-1.0, 10.0)
    with pytest.raises(TraceError):
        poisson_trace(1.0, 10.0, input_tokens=-3)


# ---------------------------------------------------------------------------------------------
# histograms


def test_length_histogram_prometheus_le_semantics() -> None:
    tr = Trace(
        arrival_s=np.arange(7, dtype=float),
        input_tokens=np.array([1, 128, 129, 256, 1000, 5000, 0]),
        output_tokens=np.array([1, 1, 1, 1, 1, 1, 300]),
    )
    edges = [128, 256, 1024]
    # le=128: {1, 128, 0}; le=256: {129, 256}; le=1024: {1000}; +Inf: {5000}
    assert histogram_edges(edges).tolist() == [128, 256, 1024, math.inf]
    assert length_histogram(tr, edges).tolist() == [3, 2, 1, 1]
    assert length_histogram(tr, edges, cumulative=True).tolist() == [3, 5, 6, 7]
    assert length_histogram(tr, [128, 256, 1024, math.inf]).tolist() == [3, 2, 1, 1]
    assert length_histogram(tr, [256], which="output").tolist() == [6, 1]
    with pytest.raises(TraceError):
        length_histogram(tr, [256, 128])
    with pytest.raises(TraceError):
        length_histogram(tr, [])


@needs_data
def test_length_histogram_of_real_trace_sums_to_requests() -> None:
    tr = load_trace(CONV)
    counts = length_histogram(tr, [256, 512, 1024, 2048, 4096, 8192])
    assert counts.sum() == len(tr)
    assert counts[-1] == int((tr.input_tokens > 8192).sum())
