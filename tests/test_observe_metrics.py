"""Prometheus queries: missing series are unknown (never zero), outages are a distinct error."""

from __future__ import annotations

import re
import socket

import pytest

from archipelago.observe.metrics import (
    MetricsQueryError,
    PrometheusUnavailable,
    bucket_mean,
    make_client,
    observe_model,
    selector,
)


class FakeProm:
    """Answers PromQL by exact metric-name lookup: ``series[name] -> result list``; records queries."""

    def __init__(self, series: dict[str, list]):
        self.series = series
        self.queries: list[str] = []
        self.url = "fake"

    def custom_query(self, q: str) -> list:
        self.queries.append(q)
        fn = re.match(r"^(\w+)\(", q).group(1)
        names = re.findall(r"([a-z_]+:[a-z_]+)", q)
        key = f"{fn}:{names[0]}"
        return self.series.get(key, [])


def val(v: float) -> list:
    return [{"metric": {}, "value": [0, str(v)]}]


def test_vllm_full_series() -> None:
    class P(FakeProm):  # answers by query shape (rate vs increase of the same counter)
        def custom_query(self, q: str) -> list:
            self.queries.append(q)
            if q.startswith("sum(delta(vllm:num_requests_waiting"):
                return val(60)  # the queue grew by 60 requests over the 300 s window
            if q.startswith("sum(delta(vllm:num_requests_running"):
                return val(-30)
            if q.startswith("sum(rate(vllm:request_success_total"):
                return val(2.5)
            if q.startswith("sum(increase(vllm:request_success_total"):
                return val(750)
            if q.startswith("sum(increase(vllm:prompt_tokens_total"):
                return val(750 * 1000)
            if q.startswith("sum(increase(vllm:generation_tokens_total"):
                return val(750 * 200)
            if "vllm:request_prompt_tokens_bucket" in q:
                return [{"metric": {"le": "512"}, "value": [0, "100"]},
                        {"metric": {"le": "2048"}, "value": [0, "700"]},
                        {"metric": {"le": "+Inf"}, "value": [0, "750"]}]
            if "vllm:request_generation_tokens_bucket" in q:
                return []
            if "time_to_first_token" in q:
                return val(0.42)
            if "vllm:inter_token_latency_seconds" in q:
                return []  # fall back to the older name
            if "vllm:time_per_output_token_seconds" in q:
                return val(0.031)
            if "vllm:kv_cache_usage_perc" in q:
                return val(0.6)
            if "num_requests_running" in q:
                return val(12)
            if "num_requests_waiting" in q:
                return val(0)
            return []

    p = P({})
    obs = observe_model(p, "vllm", {"namespace": "llm", "model_name": "chat"}, window_s=300, quantile=0.99)
    assert obs.completion_rate == 2.5
    assert obs.request_rate == pytest.approx(2.5 + (60 - 30) / 300)  # arrivals = completions + growth
    assert obs.prompt_tokens_mean == pytest.approx(1000)
    assert obs.output_tokens_mean == pytest.approx(200)
    assert [(b.lo, b.hi, b.count) for b in obs.prompt_len_buckets] == [
        (0.0, 512.0, 100.0), (512.0, 2048.0, 600.0), (2048.0, float("inf"), 50.0)]
    assert obs.output_len_buckets is None
    assert obs.ttft_p_s == 0.42 and obs.itl_p_s == 0.031
    assert obs.kv_cache_usage == 0.6 and obs.running == 12
    assert obs.waiting == 0.0  # a present series at zero is a real zero
    assert obs.unknown == ("output_len_buckets",)
    # a shrinking backlog does not lower the arrival estimate below the completion rate
    assert obs.has_load
    assert any('[300s]' in q and 'model_name="chat"' in q and 'namespace="llm"' in q for q in p.queries)
    assert any(q.startswith("histogram_quantile(0.99") for q in p.queries)


def test_missing_series_are_unknown_not_zero() -> None:
    obs = observe_model(FakeProm({}), "sglang", {"model_name": "x"})
    assert obs.request_rate is None and obs.running is None and obs.kv_cache_usage is None
    assert not obs.has_load
    assert "request_rate" in obs.unknown and "ttft_p_s" in obs.unknown


def test_nan_quantile_is_unknown() -> None:
    prom = FakeProm({"histogram_quantile:sglang:time_to_first_token_seconds_bucket": val(float("nan"))})
    obs = observe_model(prom, "sglang", {})
    assert obs.ttft_p_s is None


def test_sglang_names_used() -> None:
    prom = FakeProm({"sum:sglang:num_running_reqs": val(3), "avg:sglang:token_usage": val(0.25)})
    obs = observe_model(prom, "sglang", {"model_name": "x"})
    assert obs.running == 3 and obs.kv_cache_usage == 0.25
    assert not any(q for q in prom.queries if "vllm:" in q)


def test_unreachable_prometheus_is_distinct_error() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    client = make_client(f"http://127.0.0.1:{port}", timeout_s=1.0)
    with pytest.raises(PrometheusUnavailable, match="unreachable"):
        observe_model(client, "vllm", {"model_name": "x"})


def test_rejected_query_is_query_error() -> None:
    from prometheus_api_client import PrometheusApiClientException

    class Bad:
        url = "x"

        def custom_query(self, q: str) -> list:
            raise PrometheusApiClientException("HTTP Status Code 400 (b'bad_data')")

    with pytest.raises(MetricsQueryError):
        observe_model(Bad(), "vllm", {})


def test_selector_escapes_and_validation() -> None:
    assert selector({"b": 'x"y', "a": "1"}) == '{a="1",b="x\\"y"}'
    assert selector({}) == ""
    with pytest.raises(ValueError, match="window_s"):
        observe_model(FakeProm({}), "vllm", {}, window_s=0.5)
    with pytest.raises(ValueError, match="engine"):
        observe_model(FakeProm({}), "tgi", {})


def test_bucket_mean() -> None:
    from archipelago.observe.metrics import HistogramBucket as B

    assert bucket_mean((B(0, 100, 1), B(100, 300, 1))) == pytest.approx(125)
    assert bucket_mean((B(0, 100, 0),)) is None


def test_arrival_rate_without_queue_series_is_completion_rate() -> None:
    prom = FakeProm({"sum:sglang:num_requests_total": val(4.0)})
    obs = observe_model(prom, "sglang", {})
    assert obs.request_rate == obs.completion_rate == 4.0


def test_malformed_series_are_unknown_not_zero() -> None:
    """Values that are not numbers, infinite, or results without a value are unknown, so the operator
    falls back to the workload hint rather than planning for zero load."""
    bad = [{"metric": {}, "value": [0, "not-a-number"]}]
    for series in ({"sum:sglang:num_requests_total": bad},
                   {"sum:sglang:num_requests_total": [{"metric": {}}]},
                   {"sum:sglang:num_requests_total": val(float("inf"))},
                   {"sum:sglang:num_requests_total": [{"metric": {}, "value": None}]}):
        obs = observe_model(FakeProm(series), "sglang", {})
        assert obs.request_rate is None and "request_rate" in obs.unknown and not obs.has_load
    from archipelago.api.v1alpha1 import ModelDeployment
    from archipelago.controller.snapshot import resolve_workload

    md = ModelDeployment.model_validate({
        "apiVersion": "archipelago.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "m", "namespace": "llm"},
        "spec": {"model": {"name": "meta-llama/Llama-3.1-8B-Instruct"}, "sloRef": "s",
                 "workloadHint": {"requestsPerSecond": 2.5, "meanInputTokens": 500, "meanOutputTokens": 100}}})
    choice = resolve_workload(observe_model(FakeProm({"sum:sglang:num_requests_total": bad}), "sglang", {}), md)
    assert choice.source == "hint" and choice.workload.rate_rps == 2.5
