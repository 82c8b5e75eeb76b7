"""manifests/ (kustomize) stays installable and in sync with crds/ and policies/.

kustomize refuses files outside a kustomization's root, so manifests/kustomization.yaml pulls in
../crds and ../policies as bases with their own kustomization.yaml. These tests fail when a CRD or
policy file is added without being listed, and build the whole install with ``kubectl kustomize``
when a kubectl binary is available (the e2e build provides one).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"


def _kustomization(d: Path) -> dict:
    return yaml.safe_load((d / "kustomization.yaml").read_text())


def test_manifests_reference_crds_and_policies_bases() -> None:
    k = _kustomization(MANIFESTS)
    assert "../crds" in k["resources"] and "../policies" in k["resources"]
    for r in k["resources"]:
        assert (MANIFESTS / r).exists(), f"manifests/kustomization.yaml lists {r}, which does not exist"


def test_every_generated_crd_is_listed() -> None:
    listed = set(_kustomization(ROOT / "crds")["resources"])
    on_disk = {p.name for p in (ROOT / "crds").glob("*.yaml") if p.name != "kustomization.yaml"}
    assert on_disk, "crds/ is empty: run `make crds`"
    assert listed == on_disk, (f"crds/kustomization.yaml is out of sync: missing {sorted(on_disk - listed)}, "
                               f"stale {sorted(listed - on_disk)}")


def test_every_policy_file_is_in_the_configmap() -> None:
    gen = _kustomization(ROOT / "policies")["configMapGenerator"][0]
    assert gen["name"] == "archipelago-policies"
    listed = set(gen["files"])
    on_disk = {p.name for p in (ROOT / "policies").glob("*.yaml") if p.name != "kustomization.yaml"}
    assert listed == on_disk, (f"policies/kustomization.yaml is out of sync: missing {sorted(on_disk - listed)}, "
                               f"stale {sorted(listed - on_disk)}")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_rbac_is_least_privilege() -> None:
    role = next(d for d in _docs(MANIFESTS / "rbac.yaml") if d["kind"] == "ClusterRole")
    for rule in role["rules"]:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], f"wildcard in {key}: {rule}"
        assert not ({"escalate", "bind", "impersonate"} & set(rule["verbs"]))
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    for need in [("apps", "deployments", "patch"), ("apps", "deployments", "delete"), ("", "services", "patch"),
                 ("", "configmaps", "patch"), ("", "nodes", "watch"), ("", "pods", "watch"), ("", "events", "create"),
                 ("archipelago.dev", "modeldeployments/status", "patch"), ("kopf.dev", "clusterkopfpeerings", "patch")]:
        assert need in granted, f"operator needs {need}"
    assert ("", "nodes", "patch") not in granted and ("", "secrets", "get") not in granted
    binding = next(d for d in _docs(MANIFESTS / "rbac.yaml") if d["kind"] == "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == "archipelago-operator"


def test_operator_deployment_hardening() -> None:
    dep = _docs(MANIFESTS / "deployment.yaml")[0]
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    c = pod["containers"][0]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert "--peering=archipelago" in c["args"] and "--all-namespaces" in c["args"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert "/etc/archipelago/policies" in mounts and "/tmp" in mounts
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["ARCHIPELAGO_POLICIES"] == "/etc/archipelago/policies"


def _kubectl() -> str | None:
    found = shutil.which("kubectl")
    if found:
        return found
    cache = Path(os.environ.get("ARCHIPELAGO_CACHE", str(Path.home() / ".cache" / "archipelago")))
    bins = sorted((cache / "bin").glob("*/kubectl"), key=lambda p: p.stat().st_mtime, reverse=True)
    return str(bins[0]) if bins else None


def test_kustomize_build_contains_the_install() -> None:
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip("no kubectl binary (run `make setup`); the static checks above still ran")
    out = subprocess.run([kubectl, "kustomize", str(MANIFESTS)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for crd in ("gpupools.archipelago.dev", "servingslos.archipelago.dev", "modeldeployments.archipelago.dev",
                "clusterkopfpeerings.kopf.dev"):
        assert ("CustomResourceDefinition", crd) in kinds
    assert ("Deployment", "archipelago-operator") in kinds and ("Namespace", "archipelago-system") in kinds
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    assert cm["metadata"]["name"].startswith("archipelago-policies-")
    assert set(cm["data"]) >= {"gpus.yaml", "models.yaml"}
    dep = next(d for d in docs if d["kind"] == "Deployment")
    vol = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "policies")
    assert vol["configMap"]["name"] == cm["metadata"]["name"]  # hashed name wired through
    assert all(d["metadata"].get("namespace") in (None, "archipelago-system") for d in docs)
