"""Run the Archipelago operator as a subprocess against a cluster, tracked by PID, logs kept.

Used by ``e2e/test_operator.py`` and ``bench/bench_reconcile.py``. The operator is started with
``.venv/bin/archipelago run`` when the top-level CLI mounts ``run``, else with
``python -m archipelago.cli_run`` (the same command). It is stopped by its PID (SIGTERM, wait,
SIGKILL) -- never by process name.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES_DIR = REPO_ROOT / "manifests" / "samples"
GROUP, VERSION = "archipelago.dev", "v1alpha1"
PLURALS = {"GPUPool": "gpupools", "ServingSLO": "servingslos", "ModelDeployment": "modeldeployments"}


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def stop_process(proc: subprocess.Popen | None, timeout: float = 20.0, kill: bool = False) -> None:
    """Stop ``proc`` by its PID: SIGTERM (SIGKILL when ``kill``), wait up to ``timeout`` seconds, then SIGKILL.

    No-op when ``proc`` is None or has exited."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _operator_argv() -> list[str]:
    exe = Path(sys.executable).parent / "archipelago"
    if exe.exists():
        out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=False)
        if " run " in out.stdout or "│ run" in out.stdout:
            return [str(exe), "run"]
    return [sys.executable, "-m", "archipelago.cli_run"]


class OperatorProcess:
    """One ``archipelago run`` subprocess.

    Args:
        kubeconfig: cluster credentials (passed as ``KUBECONFIG``).
        log_dir: where ``operator-<n>.log`` files go (kept after the run).
        extra_args: more command-line flags (e.g. ``["--cooldown", "5"]``).
        env: more environment variables.
        standalone: ``--standalone`` (default) or kopf peering ``archipelago``.
    """

    _count = 0

    def __init__(self, kubeconfig: Path, log_dir: Path, extra_args: Iterable[str] = (),
                 env: Mapping[str, str] | None = None, standalone: bool = True):
        self.standalone = standalone
        self.kubeconfig, self.log_dir = Path(kubeconfig), Path(log_dir)
        self.extra_args, self.env = list(extra_args), dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.health_port = 0
        self.metrics_port = 0

    def start(self, timeout: float = 90.0) -> OperatorProcess:
        """Start and wait until kopf's liveness endpoint answers 200.

        Raises:
            RuntimeError: the process exited or never became healthy (with the log tail).
        """
        OperatorProcess._count += 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"operator-{os.getpid()}-{OperatorProcess._count}.log"
        self.health_port, self.metrics_port = free_port(), free_port()
        argv = _operator_argv() + [
            "--all-namespaces", *(["--standalone"] if self.standalone else ["--peering", "archipelago"]),
            "--liveness", f"http://127.0.0.1:{self.health_port}/healthz",
            "--metrics-port", str(self.metrics_port),
            *self.extra_args,
        ]
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"operator exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"operator not healthy within {timeout}s:\n{self.tail()}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0, kill: bool = False) -> None:
        """Stop by PID: SIGTERM (or SIGKILL when ``kill``), wait, then SIGKILL (:func:`stop_process`)."""
        stop_process(self.proc, timeout, kill)

    def tail(self, lines: int = 60) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def metrics(self) -> str:
        """The operator's own /metrics text."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()


# ------------------------------------------------------------------------------------------------
# samples and cluster helpers
# ------------------------------------------------------------------------------------------------


def load_samples(namespace: str) -> list[dict[str, Any]]:
    """The sample GPUPools, ServingSLOs and ModelDeployments, namespaced objects moved to ``namespace``."""
    k = yaml.safe_load((SAMPLES_DIR / "kustomization.yaml").read_text())
    out = []
    for f in k["resources"]:
        for d in yaml.safe_load_all((SAMPLES_DIR / f).read_text()):
            if not d or d["kind"] not in PLURALS:
                continue
            if d["kind"] != "GPUPool":
                d["metadata"]["namespace"] = namespace
            out.append(d)
    return out


def apply_custom(custom: Any, obj: Mapping[str, Any]) -> None:
    """Server-side apply one archipelago.dev object (field manager ``e2e``)."""
    plural = PLURALS[obj["kind"]]
    name, ns = obj["metadata"]["name"], obj["metadata"].get("namespace")
    kw = dict(field_manager="e2e", force=True, _content_type="application/apply-patch+yaml")
    if obj["kind"] == "GPUPool":
        custom.patch_cluster_custom_object(GROUP, VERSION, plural, name, dict(obj), **kw)
    else:
        custom.patch_namespaced_custom_object(GROUP, VERSION, ns, plural, name, dict(obj), **kw)


def get_md(custom: Any, ns: str, name: str) -> dict[str, Any]:
    return custom.get_namespaced_custom_object(GROUP, VERSION, ns, "modeldeployments", name)


def condition(obj: Mapping[str, Any], ctype: str) -> dict[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return c
    return None


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll ``pred`` until it returns a truthy value; raise AssertionError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            last = pred()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - keep polling through transient API errors
            last_exc = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r}, error: {last_exc!r})")


def our_deployments(apps: Any, ns: str, model: str | None = None) -> list[Any]:
    sel = "app.kubernetes.io/managed-by=archipelago" + (f",archipelago.dev/model={model}" if model else "")
    return apps.list_namespaced_deployment(ns, label_selector=sel).items


def our_pods(core: Any, ns: str, model: str | None = None) -> list[Any]:
    sel = "app.kubernetes.io/managed-by=archipelago" + (f",archipelago.dev/model={model}" if model else "")
    return core.list_namespaced_pod(ns, label_selector=sel).items


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)[:4000]


def service_account_kubeconfig(kubectl: str, admin_kubeconfig: Path, namespace: str, sa: str, out: Path) -> Path:
    """A kubeconfig that authenticates as ServiceAccount ``namespace/sa`` (token from ``kubectl create
    token``), to run the operator with exactly the RBAC of the install manifests."""
    env = {**os.environ, "KUBECONFIG": str(admin_kubeconfig)}
    token = subprocess.run([kubectl, "create", "token", sa, "-n", namespace, "--duration", "1h"], env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    admin = yaml.safe_load(Path(admin_kubeconfig).read_text())
    cluster = admin["clusters"][0]
    doc = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster["cluster"]}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": sa}}],
        "current-context": "sa",
    }
    out.write_text(yaml.safe_dump(doc))
    return out
