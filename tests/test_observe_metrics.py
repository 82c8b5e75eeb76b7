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


def test_output_mean_per_prompt_bucket_from_per_island_series() -> None:
    """Islands split by prompt length expose the prompt/output correlation the model-wide histograms hide."""
    from archipelago.observe.metrics import HistogramBucket, output_means_by_prompt_bucket

    def hist(*counts):
        edges = [(0.0, 1000.0), (1000.0, 2000.0), (2000.0, float("inf"))]
        return tuple(HistogramBucket(lo, hi, c) for (lo, hi), c in zip(edges, counts, strict=True))

    model = hist(100, 300, 50)
    # island a: short prompts (mean answer 100); island b: the 1-2k prompts and 10 short ones (mean 370)
    per = {"a": (hist(90, 0, 0), 100.0), "b": (hist(10, 300, 0), 370.0), "c": (hist(0, 0, 50), 60.0)}
    got = output_means_by_prompt_bucket(model, per, overall_mean=200.0)
    assert got == pytest.approx(((90 * 100 + 10 * 370) / 100, 370.0, 60.0))
    assert output_means_by_prompt_bucket(model, {"a": per["a"]}, 200.0) is None  # one island: nothing to add
    assert output_means_by_prompt_bucket(model, {**per, "d": (hist(0, 0, 0), 0.0)}, 200.0) == got

    class P(FakeProm):
        def custom_query(self, q: str) -> list:
            self.queries.append(q)
            if q.startswith("sum by (isl, le) (increase(vllm:request_prompt_tokens_bucket"):
                return [{"metric": {"isl": i, "le": le}, "value": [0, str(v)]} for i, le, v in
                        [("a", "1000", 90), ("a", "2000", 90), ("a", "+Inf", 90),
                         ("b", "1000", 10), ("b", "2000", 310), ("b", "+Inf", 360)]]
            if q.startswith("sum by (isl) (increase(vllm:generation_tokens_total"):
                return [{"metric": {"isl": "a"}, "value": [0, "9000"]}, {"metric": {"isl": "b"}, "value": [0, "133200"]}]
            if q.startswith("sum by (isl) (increase(vllm:request_success_total"):
                return [{"metric": {"isl": "a"}, "value": [0, "90"]}, {"metric": {"isl": "b"}, "value": [0, "360"]}]
            if "vllm:request_prompt_tokens_bucket" in q:
                return [{"metric": {"le": "1000"}, "value": [0, "100"]}, {"metric": {"le": "2000"}, "value": [0, "400"]},
                        {"metric": {"le": "+Inf"}, "value": [0, "450"]}]
            if q.startswith("sum(increase(vllm:request_success_total"):
                return val(450)
            if q.startswith("sum(increase(vllm:generation_tokens_total"):
                return val(142200)
            if q.startswith("sum(rate(vllm:request_success_total"):
                return val(1.5)
            return []

    obs = observe_model(P({}), "vllm", {}, window_s=300, group_label="isl")
    assert obs.output_mean_by_prompt_bucket == pytest.approx(((90 * 100 + 10 * 370) / 100, 370.0, 370.0))
    assert "output_mean_by_prompt_bucket" not in obs.unknown
    with pytest.raises(ValueError, match="label name"):
        observe_model(P({}), "vllm", {}, window_s=300, group_label="bad-label")


def test_resolve_workload_uses_the_per_bucket_output_means() -> None:
    from archipelago.api.v1alpha1 import ModelDeployment
    from archipelago.controller.snapshot import resolve_workload
    from archipelago.decide.planner.capacity import workload_buckets
    from archipelago.observe.metrics import HistogramBucket, ObservedWorkload

    md = ModelDeployment.model_validate({
        "apiVersion": "archipelago.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "m", "namespace": "llm"},
        "spec": {"model": {"name": "meta-llama/Llama-3.1-8B-Instruct"}, "sloRef": "s"}})
    pb = (HistogramBucket(0, 1000, 100), HistogramBucket(1000, 2000, 300), HistogramBucket(2000, float("inf"), 50))
    obs = ObservedWorkload("vllm", 300.0, 0.99, request_rate=1.5, prompt_tokens_mean=1300, output_tokens_mean=316,
                           prompt_len_buckets=pb, output_mean_by_prompt_bucket=(127.0, 370.0, 370.0))
    w = resolve_workload(obs, md).workload
    assert w.output_mean_by_input == (127.0, 370.0, 370.0)
    assert [round(b.mean_out) for b in workload_buckets(w)] == [127, 370, 370]


def test_queued_requests_are_planned_as_extra_load_to_drain() -> None:
    from archipelago.api.v1alpha1 import ModelDeployment
    from archipelago.controller.snapshot import resolve_workload
    from archipelago.observe.metrics import ObservedWorkload

    md = ModelDeployment.model_validate({
        "apiVersion": "archipelago.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "m", "namespace": "llm"},
        "spec": {"model": {"name": "meta-llama/Llama-3.1-8B-Instruct"}, "sloRef": "s"}})
    obs = ObservedWorkload("vllm", 30.0, 0.99, request_rate=10.0, prompt_tokens_mean=1000, output_tokens_mean=200,
                           waiting=120.0)
    assert resolve_workload(obs, md).workload.rate_rps == 10.0  # off by default in the pure function
    assert resolve_workload(obs, md, backlog_drain_s=60).workload.rate_rps == pytest.approx(12.0)
    idle = ObservedWorkload("vllm", 30.0, 0.99, request_rate=1.0, prompt_tokens_mean=1000, output_tokens_mean=200)
    assert resolve_workload(idle, md, backlog_drain_s=60).workload.rate_rps == 1.0  # waiting unknown: nothing added


def test_per_island_service_at_the_slo_percentiles() -> None:
    """With an island label, each island's throughput, TTFT / inter-token latency at the asked quantiles and
    queue come from ``sum by (island)`` queries; NaN quantiles (an island that served nothing) are unknown."""

    def rows(**by):
        return [{"metric": {"isl": k}, "value": [0, str(v)]} for k, v in by.items()]

    class P(FakeProm):
        def custom_query(self, q: str) -> list:
            self.queries.append(q)
            if q.startswith("sum by (isl) (rate(vllm:request_success_total"):
                return rows(a=5.0, b=2.0)
            if q.startswith("histogram_quantile(0.9, sum by (isl, le) (rate(vllm:time_to_first_token_seconds_bucket"):
                return rows(a=0.4, b="NaN")
            if q.startswith("histogram_quantile(0.95, sum by (isl, le) (rate(vllm:inter_token_latency_seconds_bucket"):
                return rows(a=0.12, b=0.04)
            if q.startswith("sum by (isl) (delta(vllm:num_requests_waiting"):
                return rows(a=12, b=-3)
            if q.startswith("sum by (isl) (vllm:num_requests_waiting"):
                return rows(a=20, b=0)
            if q.startswith("sum by (isl) (delta(vllm:num_requests_running"):
                return rows(a=30)
            if q.startswith("sum by (isl) (vllm:num_requests_running"):
                return rows(a=200, b=10)
            if q.startswith("sum by (isl) (rate(vllm:inter_token_latency_seconds_sum"):
                assert "/ sum by (isl) (rate(vllm:inter_token_latency_seconds_count" in q
                return rows(a=0.09, b=0.03)
            return []

    p = P({})
    obs = observe_model(p, "vllm", {"namespace": "llm"}, window_s=30, group_label="isl", island_quantiles=(0.9, 0.95))
    a, b = obs.islands
    assert (a.island, a.completion_rate, a.ttft_p_s, a.itl_p_s, a.waiting, a.waiting_delta) == ("a", 5.0, 0.4, 0.12, 20, 12)
    assert (b.island, b.ttft_p_s, b.itl_p_s, b.waiting_delta) == ("b", None, 0.04, -3)
    assert (a.running, a.running_delta, a.itl_mean_s, b.running, b.running_delta, b.itl_mean_s) == (
        200, 30, 0.09, 10, None, 0.03)
    assert observe_model(P({}), "vllm", {}, window_s=30).islands is None  # no island label: not asked
    with pytest.raises(ValueError, match="quantile"):
        observe_model(P({}), "vllm", {}, group_label="isl", island_quantiles=(0.9, 1.0))


def test_the_workload_shape_has_its_own_longer_window() -> None:
    """Rate and latency follow the short window; mean lengths and length histograms use the shape window."""
    class P(FakeProm):
        def custom_query(self, q: str) -> list:
            self.queries.append(q)
            return []

    p = P({})
    obs = observe_model(p, "vllm", {}, window_s=30, shape_window_s=600)
    assert obs.shape_window_s == 600
    for q in p.queries:
        if "increase(" in q or "_bucket" in q and "histogram_quantile" not in q:
            assert "[600s]" in q, q
        else:
            assert "[600s]" not in q, q
    assert any("rate(vllm:request_success_total" in q and "[30s]" in q for q in p.queries)
    assert observe_model(P({}), "vllm", {}, window_s=300, shape_window_s=60).shape_window_s == 300
