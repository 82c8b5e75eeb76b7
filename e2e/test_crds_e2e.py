"""e2e: Archipelago's CRDs on a real API server — installed and Established, bad specs refused
at admission with readable messages, defaults applied, samples round-tripping without pruning."""

from __future__ import annotations

import contextlib
import copy
import secrets
import subprocess

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

import localcluster as lc

pytestmark = pytest.mark.e2e

GROUP, VERSION = "archipelago.dev", "v1alpha1"
SAMPLES_DIR = lc.REPO_ROOT / "manifests" / "samples"

CRDS = {
    "gpupools.archipelago.dev": ("GPUPool", "gpupools", "Cluster"),
    "servingslos.archipelago.dev": ("ServingSLO", "servingslos", "Namespaced"),
    "modeldeployments.archipelago.dev": ("ModelDeployment", "modeldeployments", "Namespaced"),
}
PLURAL = {kind: plural for kind, plural, _ in CRDS.values()}


def _samples() -> dict[str, dict]:
    """Sample resources from manifests/samples by file stem (kustomization and namespace excluded)."""
    out = {}
    for path in sorted(SAMPLES_DIR.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if isinstance(doc, dict) and doc.get("kind") in PLURAL:
            out[path.stem] = doc
    return out


def _schema(kind: str) -> dict:
    for crd in lc.load_crds(lc.DEFAULT_CRD_DIR):
        if crd["spec"]["names"]["kind"] == kind:
            return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    raise AssertionError(f"no CRD for {kind} in {lc.DEFAULT_CRD_DIR}")


def _apply_schema_defaults(value, schema: dict):
    """Structural defaulting as the API server does it: absent properties with a ``default`` get
    it, recursively (into given values and applied defaults). Returns a new value."""
    value = copy.deepcopy(value)
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties") or {}
        for k, sub in props.items():
            if k not in value and "default" in sub:
                value[k] = copy.deepcopy(sub["default"])
        for k in list(value):
            if k in props:
                value[k] = _apply_schema_defaults(value[k], props[k])
    elif isinstance(value, list) and "items" in schema:
        value = [_apply_schema_defaults(v, schema["items"]) for v in value]
    return value


def _create(custom, ns: str, doc: dict) -> dict:
    plural = PLURAL[doc["kind"]]
    if doc["kind"] == "GPUPool":
        return custom.create_cluster_custom_object(GROUP, VERSION, plural, doc)
    return custom.create_namespaced_custom_object(GROUP, VERSION, ns, plural, doc)


def _get(custom, ns: str, doc: dict) -> dict:
    plural, name = PLURAL[doc["kind"]], doc["metadata"]["name"]
    if doc["kind"] == "GPUPool":
        return custom.get_cluster_custom_object(GROUP, VERSION, plural, name)
    return custom.get_namespaced_custom_object(GROUP, VERSION, ns, plural, name)


@pytest.fixture
def pools_to_delete(custom):
    """Names of cluster-scoped GPUPools a test created; deleted afterwards."""
    names: list[str] = []
    yield names
    for n in names:
        with contextlib.suppress(ApiException):
            custom.delete_cluster_custom_object(GROUP, VERSION, "gpupools", n)


def _prepare(doc: dict, ns: str, pools: list[str]) -> dict:
    doc = copy.deepcopy(doc)
    if doc["kind"] == "GPUPool":
        doc["metadata"]["name"] = f"{doc['metadata']['name']}-{secrets.token_hex(2)}"
        pools.append(doc["metadata"]["name"])
    else:
        doc["metadata"]["namespace"] = ns
    return doc


def test_three_crds_installed_and_established(api, cluster):
    ext = client.ApiextensionsV1Api(api)
    for name, (kind, plural, scope) in CRDS.items():
        crd = ext.read_custom_resource_definition(name)
        conds = {c.type: c.status for c in crd.status.conditions}
        assert conds.get("Established") == "True" and conds.get("NamesAccepted") == "True", (name, conds)
        assert crd.spec.names.kind == kind and crd.spec.names.plural == plural and crd.spec.scope == scope
        assert crd.status.accepted_names.kind == kind
    assert set(CRDS) <= set(cluster.crds)


def test_kubectl_explain_serves_schema_descriptions(cluster):
    assert cluster.kubectl, "no kubectl binary found for this cluster"

    def explain():
        out = subprocess.run([cluster.kubectl, "--kubeconfig", str(cluster.kubeconfig), "explain",
                              "modeldeployments.spec.replicas"], capture_output=True, text=True, timeout=60)
        return out if out.returncode == 0 else None

    # The OpenAPI document of a new CRD is published shortly after it is Established.
    out = lc.wait_for(explain, 30, interval=1, what="kubectl explain modeldeployments.spec.replicas")
    assert "GROUP:      archipelago.dev" in out.stdout or "archipelago.dev" in out.stdout
    schema_desc = _schema("ModelDeployment")["properties"]["spec"]["properties"]["replicas"]["description"]
    assert schema_desc.split(".")[0] in " ".join(out.stdout.split())


def _bad(sample: str, mutate, *fragments: str):
    return pytest.param(sample, mutate, fragments, id=f"{sample}:{fragments[0]}")


def _set(path: str, value):
    def mutate(doc):
        node = doc
        keys = path.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return mutate


BAD_SPECS = [
    _bad("modeldeployment-llama-3-1-70b", _set("spec.replicas", {"min": 5, "max": 2}),
         "spec.replicas.min", "replicas.min must be <= replicas.max"),
    _bad("modeldeployment-llama-3-1-70b", _set("spec.placement.tensorParallel", [3]),
         "spec.placement.tensorParallel", "tensorParallel entries must be powers of two: 1, 2, 4 or 8"),
    _bad("modeldeployment-llama-3-1-8b", _set("spec.engine.kind", "tgi"),
         "spec.engine.kind", 'Unsupported value: "tgi"', '"vllm"', '"sglang"'),
    _bad("modeldeployment-mixtral-8x7b", _set("spec.model.architecture.kvHeads", 7),
         "kvHeads must divide attentionHeads"),
    _bad("servingslo-interactive", _set("spec.attainment", 1.5),
         "spec.attainment", "should be less than or equal to 1"),
    _bad("servingslo-interactive", _set("spec.attainment", 0),
         "spec.attainment", "should be greater than 0"),
    _bad("servingslo-interactive", _set("spec.ttft.seconds", -0.5),
         "spec.ttft.seconds", "should be greater than 0"),
    _bad("servingslo-batch", _set("spec.objective.preset", "cost"),
         "set exactly one of objective.preset or objective.weights"),
    _bad("gpupool-h100", _set("spec.nodeSelector", {"matchLabels": {}}),
         "nodeSelector must not be empty"),
    _bad("gpupool-h100", _set("spec.pricing.useSpot", True),
         "pricing.useSpot is true but pricing.spotPerGPUHour is not set"),
]


@pytest.mark.parametrize(("sample", "mutate", "fragments"), BAD_SPECS)
def test_api_server_rejects_bad_spec_with_readable_message(custom, namespace, pools_to_delete,
                                                          sample, mutate, fragments):
    samples = _samples()
    assert sample in samples, f"manifests/samples/{sample}.yaml is missing"
    doc = _prepare(samples[sample], namespace, pools_to_delete)
    mutate(doc)
    with pytest.raises(ApiException) as ei:
        _create(custom, namespace, doc)
    msg = lc.api_message(ei.value)
    assert ei.value.status == 422, msg
    assert f'{doc["kind"]}.archipelago.dev "{doc["metadata"]["name"]}" is invalid' in msg
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in server message: {msg}"


def test_kubectl_shows_the_rejection_reason(cluster, namespace):
    assert cluster.kubectl, "no kubectl binary found for this cluster"
    doc = copy.deepcopy(_samples()["servingslo-interactive"])
    doc["metadata"]["namespace"] = namespace
    doc["spec"]["attainment"] = 1.5
    out = subprocess.run([cluster.kubectl, "--kubeconfig", str(cluster.kubeconfig), "apply", "-f", "-"],
                         input=yaml.safe_dump(doc), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "spec.attainment" in out.stderr and "should be less than or equal to 1" in out.stderr, out.stderr


MINIMAL = [
    {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelDeployment", "metadata": {"name": "minimal"},
     "spec": {"model": {"name": "meta-llama/Llama-3.1-8B-Instruct"}, "sloRef": "interactive"}},
    {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ServingSLO", "metadata": {"name": "minimal"},
     "spec": {"ttft": {"seconds": 1.0}, "tpot": {"seconds": 0.1}}},
    {"apiVersion": f"{GROUP}/{VERSION}", "kind": "GPUPool", "metadata": {"name": "minimal"},
     "spec": {"nodeSelector": {"matchLabels": {"nvidia.com/gpu.product": "NVIDIA-L4"}}, "gpu": {"type": "L4"}}},
]


def test_minimal_specs_round_trip_with_defaults(custom, namespace, pools_to_delete):
    stored = {}
    for m in MINIMAL:
        doc = _prepare(m, namespace, pools_to_delete)
        _create(custom, namespace, doc)
        got = _get(custom, namespace, doc)
        stored[doc["kind"]] = got["spec"]
        # Exactly the schema's defaults were applied, nothing else added or dropped.
        assert got["spec"] == _apply_schema_defaults(doc["spec"], _schema(doc["kind"])["properties"]["spec"])
    md, slo, pool = stored["ModelDeployment"], stored["ServingSLO"], stored["GPUPool"]
    assert md["engine"]["kind"] == "vllm"
    assert md["replicas"]["min"] == 1
    assert md["placement"]["disaggregation"] == "none"
    assert slo["attainment"] == 0.99
    assert slo["ttft"]["percentile"] == 99 and slo["tpot"]["percentile"] == 99
    assert slo["objective"] == {"preset": "cost"}
    assert pool["pricing"]["useSpot"] is False


def _subset_missing(want, got, path="spec") -> list[str]:
    """Paths present in ``want`` but absent or different in ``got`` (pruned or rewritten fields)."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [path]
        out = []
        for k, v in want.items():
            out += _subset_missing(v, got.get(k), f"{path}.{k}") if k in got else [f"{path}.{k}"]
        return out
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [path]
        return [p for i, (w, g) in enumerate(zip(want, got, strict=True))
                for p in _subset_missing(w, g, f"{path}[{i}]")]
    return [] if want == got else [f"{path} ({want!r} -> {got!r})"]


def test_every_sample_is_accepted_and_nothing_is_pruned(custom, namespace, pools_to_delete):
    samples = _samples()
    kinds = {d["kind"] for d in samples.values()}
    assert kinds == set(PLURAL), f"samples cover {sorted(kinds)}"
    for stem, sample in samples.items():
        doc = _prepare(sample, namespace, pools_to_delete)
        try:
            _create(custom, namespace, doc)
        except ApiException as e:
            pytest.fail(f"manifests/samples/{stem}.yaml refused: {lc.api_message(e)}")
        got = _get(custom, namespace, doc)
        missing = _subset_missing(doc["spec"], got["spec"])
        assert not missing, f"manifests/samples/{stem}.yaml: fields pruned or changed by the API server: {missing}"
