"""A real Prometheus (Debian package ``prometheus``, 2.42) as a local process for e2e runs.

Layout inside a cluster's run directory (see ``e2e/localcluster.py``)::

    prometheus/prometheus.yml     generated config
    prometheus/data/              TSDB (wiped on every start)
    prometheus/targets/*.json     file_sd target files; later issues write emulated engine
                                  targets here (see :func:`write_targets`), Prometheus re-reads
                                  them every ``refresh_interval``
    prometheus/state.json         PID, port, binary
    logs/prometheus.log

The configuration has two jobs besides any extra ``scrape_configs`` given: ``prometheus``
(Prometheus scraping itself) and ``archipelago-targets`` (``file_sd_configs`` over
``prometheus/targets/*.json``). The process is tracked and stopped by PID, like the control plane.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

import localcluster as lc

FILE_SD_JOB = "archipelago-targets"


class PrometheusError(lc.ClusterError):
    """Prometheus is missing, failed to start, or did not answer; carries its log tail."""


@dataclass(frozen=True)
class PrometheusProcess:
    """A running Prometheus: ``pid``, ``port``, ``url`` (``http://127.0.0.1:<port>``), paths."""

    pid: int
    port: int
    url: str
    config_path: Path
    targets_dir: Path
    log_path: Path


def _dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "prometheus"


def prometheus_config(run_dir: str | os.PathLike, port: int, scrape_configs: Sequence[Mapping] = (),
                      scrape_interval: str = "5s") -> dict:
    """The Prometheus configuration (pure).

    Args:
        run_dir: cluster run directory; targets are read from ``<run_dir>/prometheus/targets/*.json``.
        port: Prometheus's own listen port (for the self-scrape job).
        scrape_configs: extra Prometheus ``scrape_configs`` entries, appended as given.
        scrape_interval: global scrape and evaluation interval (Prometheus duration string).

    Raises:
        ValueError: an extra scrape config lacks ``job_name`` or reuses a built-in job name.
    """
    targets = _dir(run_dir).resolve() / "targets"
    jobs = [
        {"job_name": "prometheus", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]},
        {"job_name": FILE_SD_JOB,
         "file_sd_configs": [{"files": [str(targets / "*.json")], "refresh_interval": "5s"}]},
    ]
    names = {j["job_name"] for j in jobs}
    for i, sc in enumerate(scrape_configs):
        jn = sc.get("job_name")
        if not jn:
            raise ValueError(f"scrape_configs[{i}] has no job_name; every Prometheus job needs one")
        if jn in names:
            raise ValueError(f"scrape_configs[{i}].job_name {jn!r} is already used; pick another name")
        names.add(jn)
        jobs.append(dict(sc))
    return {"global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval,
                       "scrape_timeout": scrape_interval},
            "scrape_configs": jobs}


def write_targets(run_dir: str | os.PathLike, name: str, targets: Sequence[str],
                  labels: Mapping[str, str] | None = None) -> Path:
    """Write one file_sd target group to ``<run_dir>/prometheus/targets/<name>.json``.

    Args:
        name: file stem (e.g. an emulated pod's name); the file is replaced atomically.
        targets: ``host:port`` strings to scrape (``/metrics``).
        labels: labels attached to every scraped series (e.g. ``{"namespace": ..., "pod": ...}``).

    Returns:
        The path written. Prometheus picks it up within its 5 s refresh interval.
    """
    d = _dir(run_dir) / "targets"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.json"
    tmp = d / f".{name}.json.tmp"  # not matched by *.json while being written
    tmp.write_text(json.dumps([{"targets": list(targets), "labels": dict(labels or {})}], indent=1))
    tmp.replace(path)
    return path


def start_prometheus(run_dir: str | os.PathLike, scrape_configs: Sequence[Mapping] = (), port: int | None = None,
                     *, binary: str | None = None, scrape_interval: str = "5s",
                     timeout: float = 60.0) -> PrometheusProcess:
    """Start Prometheus for ``run_dir`` (stopping one already recorded there) and wait for it.

    Args:
        run_dir: cluster run directory (any directory works; it is created).
        scrape_configs: extra scrape jobs (see :func:`prometheus_config`).
        port: listen port on 127.0.0.1 (default: a free one).
        binary: prometheus executable (default: ``$ARCHIPELAGO_PROMETHEUS`` or ``prometheus`` on PATH).
        timeout: seconds to wait for ``/-/ready`` and for ``/api/v1/query?query=up`` to answer.

    Returns:
        :class:`PrometheusProcess`.

    Raises:
        PrometheusError: the binary is missing (install the Debian package ``prometheus``), the
            process exits, or it does not answer in time (with its log tail).
    """
    binary = binary or os.environ.get("ARCHIPELAGO_PROMETHEUS") or shutil.which("prometheus")
    if not binary or not os.access(binary, os.X_OK):
        raise PrometheusError("prometheus binary not found; install it with `apt-get install -y prometheus` "
                              "(scripts/setup.sh does) or set ARCHIPELAGO_PROMETHEUS", "prometheus")
    stop_prometheus(run_dir)
    d = _dir(run_dir)
    (d / "targets").mkdir(parents=True, exist_ok=True)
    shutil.rmtree(d / "data", ignore_errors=True)
    port = port or lc.free_ports(1)[0]
    cfg = d / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(prometheus_config(run_dir, port, scrape_configs, scrape_interval),
                                  sort_keys=False))
    log = Path(run_dir) / "logs" / "prometheus.log"
    argv = [binary, f"--config.file={cfg}", f"--storage.tsdb.path={d / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle",
            "--storage.tsdb.retention.time=1d", "--log.level=info"]
    pid = lc.start_process("prometheus", argv, log)
    (d / "state.json").write_text(json.dumps({"pid": pid, "port": port, "cmd0": argv[0]}))
    proc = PrometheusProcess(pid, port, f"http://127.0.0.1:{port}", cfg, d / "targets", log)
    deadline = time.monotonic() + timeout
    detail = ""
    while time.monotonic() < deadline:
        if not lc.pid_alive(pid, argv[0]):
            raise PrometheusError("prometheus exited during start-up", "prometheus", lc.tail(log, 40))
        code, body = lc.http_get(f"{proc.url}/api/v1/query?query=up")
        if code == 200 and json.loads(body).get("status") == "success":
            return proc
        detail = f"{code} {body[:200]}"
        time.sleep(0.25)
    stop_prometheus(run_dir)
    raise PrometheusError(f"prometheus did not answer /api/v1/query within {timeout:.0f} s ({detail})",
                          "prometheus", lc.tail(log, 40))


def stop_prometheus(run_dir: str | os.PathLike | PrometheusProcess) -> bool:
    """Stop the Prometheus recorded in ``run_dir`` (or the given process) by PID.

    Returns:
        True when a running Prometheus was signalled.
    """
    if isinstance(run_dir, PrometheusProcess):
        run_dir = run_dir.targets_dir.parent.parent
    state = _dir(run_dir) / "state.json"
    try:
        st = json.loads(state.read_text())
    except (OSError, ValueError):
        return False
    stopped = lc.stop_process(st.get("pid"), st.get("cmd0"), timeout=10.0)
    state.unlink(missing_ok=True)
    return stopped


def prometheus_url(run_dir: str | os.PathLike) -> str | None:
    """``http://127.0.0.1:<port>`` of the Prometheus recorded in ``run_dir`` (None if none)."""
    try:
        st = json.loads((_dir(run_dir) / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return f"http://127.0.0.1:{st['port']}"


def prometheus_status(run_dir: str | os.PathLike) -> dict:
    """A status row like :meth:`localcluster.LocalCluster.status` rows, for Prometheus."""
    try:
        st = json.loads((_dir(run_dir) / "state.json").read_text())
    except (OSError, ValueError):
        st = {}
    alive = lc.pid_alive(st.get("pid"), st.get("cmd0"))
    healthy, detail = False, "" if st else "not started"
    if alive:
        code, body = lc.http_get(f"http://127.0.0.1:{st['port']}/-/ready")
        healthy, detail = code == 200, ("" if code == 200 else body[:100])
    return {"component": "prometheus", "pid": st.get("pid"), "port": st.get("port"), "alive": alive,
            "healthy": healthy, "detail": detail}


def query(url: str, promql: str, timeout: float = 5.0) -> list[dict]:
    """Run an instant PromQL query against ``url``; returns ``data.result`` (vector samples).

    Raises:
        PrometheusError: HTTP error or a non-success status (the message from Prometheus included).
    """
    code, body = lc.http_get(f"{url}/api/v1/query?query={urllib.parse.quote(promql)}", timeout=timeout)
    try:
        doc = json.loads(body)
    except ValueError:
        doc = {}
    if code != 200 or doc.get("status") != "success":
        raise PrometheusError(f"query {promql!r} failed: HTTP {code}: {doc.get('error', body[:200])}", "prometheus")
    return doc["data"]["result"]
