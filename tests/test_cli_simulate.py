"""`archipelago simulate` through typer's CliRunner: results, plots, SLO files, and exit code 2 with
a message naming the file / line / field for every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from archipelago.cli_simulate import simulate_command

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "policies" / "examples" / "fleet-sim.yaml"
CONV = ROOT.parent / "shared" / "data" / "traces" / "AzureLLMInferenceTrace_conv.csv"

app = typer.Typer()
app.command("simulate")(simulate_command)


@app.command("version")  # a second command keeps typer from collapsing the app into one command
def _version() -> None:
    typer.echo("test")


runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, ["simulate", *args])


@pytest.fixture()
def small_trace(tmp_path: Path) -> Path:
    rows = ["timestamp,input_tokens,output_tokens"]
    for i in range(120):
        rows.append(f"{i * 0.25:.2f},{[200, 900, 3000][i % 3]},{[20, 120, 300][i % 3]}")
    p = tmp_path / "trace.csv"
    p.write_text("\n".join(rows) + "\n")
    return p


@pytest.fixture()
def fleet_file(tmp_path: Path) -> Path:
    p = tmp_path / "fleet.yaml"
    p.write_text(
        "model: meta-llama/Llama-3.1-8B-Instruct\n"
        "islands:\n"
        "  - name: short\n"
        "    gpu: L4\n"
        "    replicas: 2\n"
        "    input_range: [0, 1000]\n"
        "  - name: long\n"
        "    gpu: A100-80GB\n"
        "    tp: 1\n"
        "    replicas: 1\n"
        "    price_per_gpu_hour: 2.0\n"
        "    input_range: [1000, null]\n"
    )
    return p


def test_json_output_and_length_routing(fleet_file: Path, small_trace: Path) -> None:
    res = _run("--fleet", str(fleet_file), "--trace", str(small_trace), "--ttft", "2", "--tpot", "0.15",
               "--router", "length", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    s = out["summary"]
    assert s["requests"] == 120 and s["completed"] == 120
    assert 0.0 <= s["attainment"] <= 1.0
    assert s["replicas"] == 3
    islands = {row["island"]: row for row in out["islands"]}
    # prompts of 200 and 900 tokens go to the L4 island, 3000 to the A100 island
    assert islands["short"]["completed"] == 80 and islands["long"]["completed"] == 40
    # the A100 island's price comes from the fleet file: $2.00/h over the horizon
    assert islands["long"]["cost_usd"] == pytest.approx(2.0 * s["horizon_s"] / 3600)


def test_table_output_window_rate_scale_and_plots(fleet_file: Path, small_trace: Path, tmp_path: Path) -> None:
    plots = tmp_path / "plots"
    res = _run("--fleet", str(fleet_file), "--trace", str(small_trace), "--window", "5:25", "--rate-scale", "2",
               "--ttft", "1", "--tpot", "0.1", "--plot", str(plots))
    assert res.exit_code == 0, res.output
    assert "TTFT (s)" in res.stdout and "SLO attainment" in res.stdout and "Islands" in res.stdout
    for name in ("latency_cdf.png", "load.png"):
        data = (plots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    js = _run("--fleet", str(fleet_file), "--trace", str(small_trace), "--window", "5:25", "--rate-scale", "2",
              "--json")
    s = json.loads(js.stdout)["summary"]
    assert s["requests"] == 80  # arrivals in [5 s, 25 s) at 4 per second
    assert s["duration_s"] == pytest.approx(10.0)  # 20 s window compressed 2x
    assert s["attainment"] is None  # no SLO given


def test_slo_file_matches_flags(fleet_file: Path, small_trace: Path, tmp_path: Path) -> None:
    slo = tmp_path / "slo.yaml"
    slo.write_text(
        "apiVersion: archipelago.dev/v1alpha1\nkind: ServingSLO\nmetadata: {name: chat, namespace: default}\n"
        "spec:\n  ttft: {seconds: 0.5, percentile: 90}\n  tpot: {seconds: 0.06}\n  attainment: 0.9\n"
    )
    a = json.loads(_run("--fleet", str(fleet_file), "--trace", str(small_trace), "--slo", str(slo), "--json").stdout)
    b = json.loads(_run("--fleet", str(fleet_file), "--trace", str(small_trace), "--ttft", "0.5", "--tpot", "0.06",
                        "--json").stdout)
    assert a["summary"]["attainment"] == b["summary"]["attainment"]
    assert a["summary"]["goodput_rps"] == b["summary"]["goodput_rps"]
    assert a["summary"]["attainment"] < 1.0  # the targets bite, so the comparison means something
    # a flag overrides one target of the file and keeps the other
    c = json.loads(_run("--fleet", str(fleet_file), "--trace", str(small_trace), "--slo", str(slo), "--tpot", "10",
                        "--json").stdout)
    d = json.loads(_run("--fleet", str(fleet_file), "--trace", str(small_trace), "--ttft", "0.5", "--tpot", "10",
                        "--json").stdout)
    assert c["summary"]["attainment"] == d["summary"]["attainment"] >= a["summary"]["attainment"]


@pytest.mark.skipif(not CONV.exists(), reason="shared/data traces not present")
def test_example_fleet_on_azure_window() -> None:
    res = _run("--fleet", str(EXAMPLE), "--trace", str(CONV), "--window", "0:120", "--ttft", "2", "--tpot", "0.1",
               "--router", "length", "--json")
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)["summary"]
    assert s["requests"] > 400 and s["completed"] == s["requests"]


def _err(res) -> str:
    return res.stderr if res.stderr else res.output


def test_bad_trace_row_exits_2_naming_line(fleet_file: Path, tmp_path: Path) -> None:
    t = tmp_path / "bad.csv"
    t.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.0,10,2\n2023-11-16 18:17:04.0,abc,3\n")
    res = _run("--fleet", str(fleet_file), "--trace", str(t))
    assert res.exit_code == 2
    assert "bad.csv line 3: ContextTokens 'abc' is not a non-negative integer" in _err(res)


@pytest.mark.parametrize(
    ("fleet_text", "needles"),
    [
        ("model: meta-llama/Llama-3.1-8B-Instruct\nislands:\n  - gpu: H1000\n",
         ["line 3: islands[0].gpu", "unknown GPU 'H1000'", "A100-80GB"]),
        ("model: no-such-model\nislands:\n  - gpu: L4\n", ["field model", "no-such-model"]),
        ("model: meta-llama/Llama-3.1-70B-Instruct\nislands:\n  - gpu: L4\n    tp: 1\n",
         ["line 3: islands[0]", "does not fit"]),
        ("model: meta-llama/Llama-3.1-8B-Instruct\nislands:\n  - gpu: L4\n    replica: 2\n",
         ["line 3: islands[0]", "unknown field(s) ['replica']", "replicas"]),
        ("model: meta-llama/Llama-3.1-8B-Instruct\nislands:\n  - gpu: L4\n    tp: two\n",
         ["islands[0].tp", "'two' is not an integer"]),
        ("model: meta-llama/Llama-3.1-8B-Instruct\nislands:\n  - gpu: L4\n    max_num_seqs: 0\n",
         ["islands[0]", "max_num_seqs must be >= 1"]),
        ("model: meta-llama/Llama-3.1-8B-Instruct\nislands: [\n", ["not valid YAML"]),
        ("model: meta-llama/Llama-3.1-8B-Instruct\nislands: []\n", ["non-empty list of islands"]),
    ],
)
def test_bad_fleet_exits_2_naming_field(tmp_path: Path, small_trace: Path, fleet_text: str, needles) -> None:
    f = tmp_path / "fleet.yaml"
    f.write_text(fleet_text)
    res = _run("--fleet", str(f), "--trace", str(small_trace))
    assert res.exit_code == 2, res.output
    msg = _err(res)
    assert "fleet.yaml" in msg
    for n in needles:
        assert n in msg, msg


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--router", "random"], "--router 'random' is unknown"),
        (["--window", "10"], "--window '10': expected START:END"),
        (["--window", "20:10"], "need 0 <= START < END"),
        (["--ttft", "1"], "give both --ttft and --tpot"),
        (["--ttft", "-1", "--tpot", "0.1"], "SLOTarget.ttft_s must be a number of seconds > 0"),
        (["--rate-scale", "0"], "rate scale factor must be a finite number > 0"),
        (["--model", "nope-7b"], "--model: unknown model"),
    ],
)
def test_bad_flags_exit_2(fleet_file: Path, small_trace: Path, args, needle: str) -> None:
    res = _run("--fleet", str(fleet_file), "--trace", str(small_trace), *args)
    assert res.exit_code == 2, res.output
    assert needle in _err(res)


def test_length_router_needs_ranges_and_bad_slo_file(tmp_path: Path, small_trace: Path) -> None:
    f = tmp_path / "fleet.yaml"
    f.write_text("model: meta-llama/Llama-3.1-8B-Instruct\nislands:\n  - gpu: L4\n")
    res = _run("--fleet", str(f), "--trace", str(small_trace), "--router", "length")
    assert res.exit_code == 2 and "no island of the fleet has input_range" in _err(res)
    slo = tmp_path / "slo.yaml"
    slo.write_text("apiVersion: archipelago.dev/v1alpha1\nkind: ServingSLO\nmetadata: {name: x}\n"
                   "spec:\n  ttft: {seconds: -1}\n  tpot: {seconds: 0.1}\n")
    res = _run("--fleet", str(f), "--trace", str(small_trace), "--slo", str(slo))
    assert res.exit_code == 2 and "spec.ttft.seconds" in _err(res)
