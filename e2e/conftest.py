"""Fixtures for the e2e suite (marker ``e2e``): a real Kubernetes control plane.

* Default: bring up a local cluster with ``e2e/localcluster.py`` (etcd, kube-apiserver,
  kube-controller-manager, kube-scheduler, KWOK) and the small fleet ``e2e/fleets/small.yaml``
  once per session, and stop it at the end. Its logs stay in the run directory
  (``~/.cache/archipelago/clusters/e2e/logs``); when a test fails their tails are printed in the
  terminal summary. If the binaries cannot be found or built, the session FAILS (never skips).
* ``ARCHIPELAGO_KUBECONFIG=/path/kubeconfig``: use that existing cluster (the kind path, see
  ``e2e/kind.sh``); it is not torn down. The CRDs from ``crds/`` are (re)installed either way.

Environment: ``ARCHIPELAGO_E2E_CLUSTER`` (local cluster name, default ``e2e``; while another
pytest session holds that name, ``e2e-2``, ``e2e-3``, ... are used; a cluster of the chosen name
left running by a dead session is restarted fresh), ``ARCHIPELAGO_E2E_FLEET`` (fleet file).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

E2E_DIR = Path(__file__).resolve().parent
if str(E2E_DIR) not in sys.path:
    sys.path.insert(0, str(E2E_DIR))

import localcluster as lc  # noqa: E402
import prometheus as prom  # noqa: E402

REPO_ROOT = E2E_DIR.parent
SAMPLES_DIR = REPO_ROOT / "manifests" / "samples"
GROUP, VERSION = "archipelago.dev", "v1alpha1"

_FAILED = pytest.StashKey[bool]()
_CLUSTER = pytest.StashKey["ClusterHandle"]()


@dataclass
class ClusterHandle:
    """The cluster under test.

    Attributes:
        kubeconfig: admin kubeconfig path.
        name: cluster name (local) or ``external``.
        local: the :class:`localcluster.LocalCluster` when the harness started it, else None.
        work_dir: directory for Prometheus and other per-session files (the run dir when local).
        up_timings: phases of ``up`` in seconds (local only).
        kubectl: a kubectl binary that talks to this cluster.
    """

    kubeconfig: Path
    name: str
    local: lc.LocalCluster | None
    work_dir: Path
    kubectl: str | None
    up_timings: lc.Timings | None = None
    crds: list[str] = field(default_factory=list)

    def api_client(self):
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(item.path).resolve().is_relative_to(E2E_DIR):
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.failed:
        item.config.stash[_FAILED] = True
    return rep


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    handle = config.stash.get(_CLUSTER, None)
    if handle is None:
        return
    tr = terminalreporter
    if handle.up_timings is not None:
        t = handle.up_timings
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in t.phases.items())
        tr.write_line(f"e2e cluster {handle.name}: up in {t.total:.1f} s ({phases})")
    if config.stash.get(_FAILED, False) and handle.local is not None:
        tr.section(f"control-plane log tails ({handle.local.logs})")
        for comp in (*lc.COMPONENTS, "prometheus"):
            text = handle.local.log_tail(comp, 15)
            if text:
                tr.write_line(f"--- {comp} ---")
                tr.write_line(text)


def _find_kubectl(local: lc.LocalCluster | None) -> str | None:
    if local is not None:
        return str(local.bin_dir / "kubectl")
    import shutil

    found = shutil.which("kubectl")
    if found:
        return found
    try:
        return str(lc.find_binaries(build=False) / "kubectl")
    except lc.ClusterError:
        return None


def _claim_cluster_name(base: str):
    """Take ``base`` (or ``base-2``, ``base-3``, ...) for this session.

    Each session holds an exclusive ``flock`` on ``<run dir>/.session.lock`` while it uses the
    cluster, so two pytest sessions on one machine never restart each other's cluster. A lock
    left by a dead session is free again (the kernel drops it with the process), and that
    session's leftover processes are stopped when the cluster is started fresh.

    Returns:
        (name, open lock file); close the file to release the name.
    """
    import fcntl

    for i in range(1, 50):
        name = base if i == 1 else f"{base}-{i}"
        run_dir = lc.default_run_dir(name)
        run_dir.mkdir(parents=True, exist_ok=True)
        f = open(run_dir / ".session.lock", "w")  # noqa: SIM115 - held for the whole session
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        f.write(f"{os.getpid()}\n")
        f.flush()
        return name, f
    pytest.fail(f"49 e2e clusters named {base}, {base}-2, ... are in use by other pytest sessions", pytrace=False)


@pytest.fixture(scope="session")
def cluster(request, tmp_path_factory) -> Iterator[ClusterHandle]:
    """The cluster under test (see module docstring); session-scoped."""
    external = os.environ.get("ARCHIPELAGO_KUBECONFIG")
    if external:
        kc = Path(external)
        if not kc.is_file():
            pytest.fail(f"ARCHIPELAGO_KUBECONFIG={kc} is not a file", pytrace=False)
        handle = ClusterHandle(kc, "external", None, tmp_path_factory.mktemp("external-cluster"),
                               _find_kubectl(None))
        problem = None
        try:
            api = handle.api_client()
            try:
                from kubernetes import client

                client.CoreV1Api(api).list_namespace(limit=1)
                handle.crds = lc.install_crds(api, lc.DEFAULT_CRD_DIR, timeout=60)
            finally:
                api.close()
        except Exception as e:  # noqa: BLE001 - any failure to reach the cluster fails the session
            problem = e.report() if isinstance(e, lc.ClusterError) else f"{type(e).__name__}: {e}"
        if problem is not None:
            pytest.fail(f"cannot use the cluster in ARCHIPELAGO_KUBECONFIG={kc}: {problem}", pytrace=False)
        request.config.stash[_CLUSTER] = handle
        yield handle
        return

    name, lock = _claim_cluster_name(os.environ.get("ARCHIPELAGO_E2E_CLUSTER", "e2e"))
    fleet = Path(os.environ.get("ARCHIPELAGO_E2E_FLEET", str(E2E_DIR / "fleets" / "small.yaml")))
    local = lc.LocalCluster(name)
    problem = None
    try:
        local = lc.LocalCluster(name, bin_dir=lc.find_binaries(build=True))
        timings = local.up(fleet, reuse=False, timeout=180)
    except (lc.ClusterError, lc.FleetError) as e:
        problem = e.report() if isinstance(e, lc.ClusterError) else str(e)
    if problem is not None:
        pytest.fail(f"the local e2e cluster could not be brought up:\n{problem}\n(logs: {local.logs})",
                    pytrace=False)
    handle = ClusterHandle(local.kubeconfig, name, local, local.run_dir, _find_kubectl(local), timings)
    handle.crds = [c["metadata"]["name"] for c in lc.load_crds(lc.DEFAULT_CRD_DIR)]
    request.config.stash[_CLUSTER] = handle
    try:
        yield handle
    finally:
        local.down(quiet=True)
        lock.close()


@pytest.fixture(scope="session")
def api(cluster):
    """A ``kubernetes.client.ApiClient`` for the admin user."""
    client = cluster.api_client()
    yield client
    client.close()


@pytest.fixture(scope="session")
def core(api):
    from kubernetes import client

    return client.CoreV1Api(api)


@pytest.fixture(scope="session")
def custom(api):
    from kubernetes import client

    return client.CustomObjectsApi(api)


@pytest.fixture
def namespace(core):
    """A fresh namespace (``e2e-<random>``) with its default ServiceAccount; deleted afterwards."""
    from kubernetes.client.rest import ApiException

    name = f"e2e-{secrets.token_hex(3)}"
    core.create_namespace({"metadata": {"name": name, "labels": {"archipelago.dev/e2e": "true"}}})
    deadline = time.monotonic() + 60
    while True:
        try:
            core.read_namespaced_service_account("default", name)
            break
        except ApiException:
            if time.monotonic() > deadline:
                pytest.fail(f"ServiceAccount {name}/default was not created within 60 s "
                            "(kube-controller-manager's serviceaccount controller)", pytrace=False)
            time.sleep(0.2)
    yield name
    with contextlib.suppress(ApiException):
        core.delete_namespace(name)


@pytest.fixture(scope="session")
def prometheus_server(cluster):
    """A Prometheus started in the cluster's work dir; stopped at the end of the session."""
    try:
        p = prom.start_prometheus(cluster.work_dir, scrape_interval="1s", timeout=60)
    except lc.ClusterError as e:
        pytest.fail(e.report(), pytrace=False)
    yield p
    prom.stop_prometheus(p)
