"""Tests of the generated CustomResourceDefinitions (crds/) and of the generator itself.

Structural-schema rules checked here are those of apiextensions.k8s.io/v1 ("Specifying a
structural schema" in the Kubernetes CRD docs). CEL rules are only checked for field names
here; the e2e suite installs the CRDs into a real kube-apiserver and exercises the rules.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, Field

from archipelago.api import RESOURCES, parse_resource
from archipelago.api.crdgen import (
    HEADER,
    StructuralSchemaError,
    file_name,
    generate_crds,
    rendered_files,
    stale_files,
    to_structural,
    write,
)
from archipelago.api.v1alpha1 import ApiModel

ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = ROOT / "crds"
SAMPLES = ROOT / "manifests" / "samples"

FORBIDDEN_KEYS = {"$ref", "anyOf", "allOf", "oneOf", "not", "definitions", "$defs", "title", "uniqueItems", "const"}


@pytest.fixture(scope="module")
def crds() -> dict[str, dict[str, Any]]:
    return generate_crds()


def schema_of(crd: dict[str, Any]) -> dict[str, Any]:
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def walk(node: dict[str, Any], path: str = ""):
    """Yield (path, schema node) for every node of a structural schema."""
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


# ---------------------------------------------------------------------------------------------
# crds/ is in sync with the models
# ---------------------------------------------------------------------------------------------


def test_crds_directory_matches_freshly_generated_output() -> None:
    stale = stale_files(CRD_DIR)
    assert not stale, f"crds/ is stale ({', '.join(stale)}): run `make crds` (python -m archipelago.api.crdgen --out crds/)"
    extra = sorted(p.name for p in CRD_DIR.glob("*.yaml") if p.name not in rendered_files())
    assert not extra, f"crds/ has files the generator does not produce: {extra}; delete them or run `make crds`"


def test_generated_files_have_header_and_one_crd_each(tmp_path: Path) -> None:
    written = write(tmp_path)
    crd_files = [
        "archipelago.dev_gpupools.yaml",
        "archipelago.dev_modeldeployments.yaml",
        "archipelago.dev_servingslos.yaml",
    ]
    assert sorted(p.name for p in written) == [*crd_files, "kustomization.yaml"]
    kustomization = yaml.safe_load((tmp_path / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization" and kustomization["resources"] == crd_files
    written = [p for p in written if p.name != "kustomization.yaml"]
    for p in written:
        text = p.read_text()
        assert text.startswith(HEADER) and "do not edit" in text.splitlines()[1]
        docs = list(yaml.safe_load_all(text))
        assert len(docs) == 1 and docs[0]["kind"] == "CustomResourceDefinition"
    assert stale_files(tmp_path) == []
    (tmp_path / written[0].name).write_text(written[0].read_text() + "# hand edit\n")
    assert stale_files(tmp_path) == [written[0].name]


def test_generation_is_deterministic() -> None:
    assert rendered_files() == rendered_files()


def test_file_names_follow_controller_gen_convention() -> None:
    assert file_name("modeldeployments.archipelago.dev") == "archipelago.dev_modeldeployments.yaml"


# ---------------------------------------------------------------------------------------------
# CRD metadata: names, scope, subresources, printer columns
# ---------------------------------------------------------------------------------------------

EXPECTED = {
    "gpupools.archipelago.dev": ("GPUPool", "Cluster", ["gp"], ["GPU", "Nodes", "GPUs", "Free", "$/GPU-h", "Age"]),
    "servingslos.archipelago.dev": ("ServingSLO", "Namespaced", ["slo"], ["TTFT", "TPOT", "Attainment", "Age"]),
    "modeldeployments.archipelago.dev": (
        "ModelDeployment", "Namespaced", ["md"], ["Engine", "SLO", "Replicas", "GPUs", "$/h", "Phase", "Age"],
    ),
}


def test_crd_names_scope_and_subresources(crds: dict[str, dict[str, Any]]) -> None:
    assert set(crds) == set(EXPECTED)
    for name, crd in crds.items():
        kind, scope, short, columns = EXPECTED[name]
        assert crd["apiVersion"] == "apiextensions.k8s.io/v1" and crd["kind"] == "CustomResourceDefinition"
        assert crd["metadata"]["name"] == name
        spec = crd["spec"]
        assert spec["group"] == "archipelago.dev" and spec["scope"] == scope
        names = spec["names"]
        assert names["kind"] == kind and names["listKind"] == f"{kind}List"
        assert f"{names['plural']}.archipelago.dev" == name and names["singular"] == kind.lower()
        assert names["shortNames"] == short and names["categories"] == ["archipelago"]
        (version,) = spec["versions"]
        assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
        assert version["subresources"] == {"status": {}}
        assert [c["name"] for c in version["additionalPrinterColumns"]] == columns


def resolve_json_path(schema: dict[str, Any], json_path: str) -> dict[str, Any] | None:
    node = schema
    for part in json_path.lstrip(".").split("."):
        if part == "metadata":
            return {"type": "object"}
        node = node.get("properties", {}).get(part)
        if node is None:
            return None
    return node


def test_printer_columns_point_at_fields_of_the_right_type(crds: dict[str, dict[str, Any]]) -> None:
    for crd in crds.values():
        schema = schema_of(crd)
        for col in crd["spec"]["versions"][0]["additionalPrinterColumns"]:
            assert col["type"] in {"integer", "number", "string", "boolean", "date"}
            assert col["description"]
            if col["jsonPath"] == ".metadata.creationTimestamp":
                assert col["type"] == "date"
                continue
            node = resolve_json_path(schema, col["jsonPath"])
            assert node is not None, f"{crd['metadata']['name']}: column {col['name']} path {col['jsonPath']} not in schema"
            assert node["type"] == col["type"], (col, node["type"])


# ---------------------------------------------------------------------------------------------
# Structural schema
# ---------------------------------------------------------------------------------------------


def test_schemas_are_structural(crds: dict[str, dict[str, Any]]) -> None:
    for crd_name, crd in crds.items():
        root = schema_of(crd)
        assert root["type"] == "object" and set(root["properties"]) == {"apiVersion", "kind", "metadata", "spec", "status"}
        assert root["properties"]["metadata"] == {"type": "object"}, "metadata may only say type: object"
        for path, node in walk(root):
            where = f"{crd_name}{path}"
            assert not FORBIDDEN_KEYS & set(node), f"{where}: forbidden keys {FORBIDDEN_KEYS & set(node)}"
            preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
            assert node.get("type") or preserve, f"{where}: node without type"
            assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean", None}
            assert not ("properties" in node and "additionalProperties" in node), f"{where}: properties + additionalProperties"
            if "exclusiveMinimum" in node:
                assert node["exclusiveMinimum"] is True and "minimum" in node, where
            if "exclusiveMaximum" in node:
                assert node["exclusiveMaximum"] is True and "maximum" in node, where
            if node.get("type") == "array":
                assert isinstance(node.get("items"), dict), f"{where}: array without items schema"
            for req in node.get("required", []):
                assert req in node.get("properties", {}), f"{where}: required {req} is not a property"
            if node.get("x-kubernetes-list-type") == "set":
                assert node["items"]["type"] in {"string", "integer", "number", "boolean"}, where
            if node.get("x-kubernetes-list-type") == "map":
                item = node["items"]
                for key in node["x-kubernetes-list-map-keys"]:
                    assert key in item.get("required", []) or "default" in item["properties"][key], where


def test_property_names_are_lower_camel_case(crds: dict[str, dict[str, Any]]) -> None:
    """Guards against alias-generator surprises such as e2e -> e2E."""
    bad = []
    for crd_name, crd in crds.items():
        for path, node in walk(schema_of(crd)):
            for name in node.get("properties", {}):
                if not re.fullmatch(r"[a-z][a-zA-Z0-9]*", name) or re.search(r"[0-9][A-Z](?![a-z])", name):
                    bad.append(f"{crd_name}{path}.{name}")
    assert not bad, bad


def test_every_spec_and_status_property_has_a_description(crds: dict[str, dict[str, Any]]) -> None:
    missing = []
    for crd_name, crd in crds.items():
        root = schema_of(crd)
        for part in ("spec", "status"):
            for path, node in walk(root["properties"][part], f".{part}"):
                if path.endswith("[]") or path.endswith("{}"):
                    continue  # list items / map values are described by their field
                if not node.get("description", "").strip():
                    missing.append(f"{crd_name}{path}")
    assert not missing, f"fields without description (kubectl explain): {missing}"


def test_spec_strings_have_max_length_and_lists_have_max_items(crds: dict[str, dict[str, Any]]) -> None:
    """The API server's CEL cost estimator needs bounded strings and lists."""
    unbounded = []
    for crd_name, crd in crds.items():
        for path, node in walk(schema_of(crd)["properties"]["spec"], ".spec"):
            if node.get("type") == "string" and "maxLength" not in node and "enum" not in node:
                unbounded.append(f"{crd_name}{path} (string)")
            if node.get("type") == "array" and "maxItems" not in node:
                unbounded.append(f"{crd_name}{path} (array)")
            if node.get("type") == "object" and "additionalProperties" in node and "maxProperties" not in node:
                unbounded.append(f"{crd_name}{path} (map)")
    assert not unbounded, unbounded


def test_spec_schema_is_fully_typed(crds: dict[str, dict[str, Any]]) -> None:
    for crd_name, crd in crds.items():
        for path, node in walk(schema_of(crd)["properties"]["spec"], ".spec"):
            assert "x-kubernetes-preserve-unknown-fields" not in node, f"{crd_name}{path}: spec must be fully typed"


CEL_SELF_FIELD = re.compile(r"\bself\.([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?")
CEL_HAS_FIELD = re.compile(r"has\(self\.([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?\)")
CEL_FUNCS = {"all", "exists", "exists_one", "map", "filter", "size", "matches", "startsWith", "endsWith", "contains"}


def test_cel_rules_reference_existing_fields(crds: dict[str, dict[str, Any]]) -> None:
    """Catch typos such as self.spotPerGpuHour in CEL rules (the API server would refuse the CRD)."""
    checked = 0
    for crd_name, crd in crds.items():
        for path, node in walk(schema_of(crd)):
            for rule in node.get("x-kubernetes-validations", []):
                assert rule["message"] and rule["rule"]
                # CEL string literals reject escapes such as \. (found when installing into kube-apiserver)
                assert "\\" not in rule["rule"], f"{crd_name}{path}: backslash in CEL rule {rule['rule']!r}; use [.]"
                checked += 1
                for m in CEL_SELF_FIELD.finditer(rule["rule"]):
                    field, sub = m.group(1), m.group(2)
                    if field in CEL_FUNCS:
                        continue
                    props = node.get("properties", {})
                    assert field in props, f"{crd_name}{path}: rule {rule['rule']!r} names unknown field {field}"
                    if sub and sub not in CEL_FUNCS:
                        assert sub in props[field].get("properties", {}), f"{crd_name}{path}: unknown {field}.{sub}"
                if "fieldPath" in rule:
                    target = rule["fieldPath"].lstrip(".")
                    assert target in node.get("properties", {}), f"{crd_name}{path}: bad fieldPath {rule['fieldPath']}"
                # optional fields must be guarded with has() before use (CEL errors on absent fields)
                required = set(node.get("required", []))
                guarded = {m.group(1) for m in CEL_HAS_FIELD.finditer(rule["rule"])}
                for m in CEL_SELF_FIELD.finditer(rule["rule"]):
                    field = m.group(1)
                    if field in CEL_FUNCS or field in required:
                        continue
                    assert field in guarded or "default" in node["properties"][field], (
                        f"{crd_name}{path}: rule {rule['rule']!r} uses optional {field} without has()"
                    )
    assert checked >= 15


def test_expected_cel_rules_are_present(crds: dict[str, dict[str, Any]]) -> None:
    md = schema_of(crds["modeldeployments.archipelago.dev"])["properties"]["spec"]["properties"]
    tp = md["placement"]["properties"]["tensorParallel"]
    assert tp["x-kubernetes-validations"][0]["rule"] == "self.all(t, t in [1, 2, 4, 8])"
    assert "self.min <= self.max" in md["replicas"]["x-kubernetes-validations"][0]["rule"]
    assert md["engine"]["properties"]["kind"]["enum"] == ["vllm", "sglang"]
    gmu = md["engine"]["properties"]["gpuMemoryUtilization"]
    assert (gmu["minimum"], gmu["exclusiveMinimum"], gmu["maximum"]) == (0, True, 1)
    slo = schema_of(crds["servingslos.archipelago.dev"])["properties"]["spec"]["properties"]
    att = slo["attainment"]
    assert (att["minimum"], att["exclusiveMinimum"], att["maximum"], att["default"]) == (0, True, 1, 0.99)
    assert slo["ttft"]["properties"]["seconds"]["exclusiveMinimum"] is True
    weights = slo["objective"]["properties"]["weights"]
    assert "> 0.0" in weights["x-kubernetes-validations"][0]["rule"]
    assert all(weights["properties"][w]["minimum"] == 0 for w in ("cost", "latency", "energy"))
    gp = schema_of(crds["gpupools.archipelago.dev"])["properties"]["spec"]["properties"]
    assert "self.min <= self.max" in gp["nodes"]["x-kubernetes-validations"][0]["rule"]
    assert gp["pricing"]["properties"]["onDemandPerGPUHour"]["minimum"] == 0
    assert gp["resourceName"]["default"] == "nvidia.com/gpu"


def test_status_engine_args_preserve_unknown_fields_and_conditions_are_a_map_list(crds: dict[str, dict[str, Any]]) -> None:
    status = schema_of(crds["modeldeployments.archipelago.dev"])["properties"]["status"]["properties"]
    island = status["plan"]["properties"]["islands"]["items"]
    assert island["properties"]["engineArgs"] == {
        "type": "object",
        "description": island["properties"]["engineArgs"]["description"],
        "x-kubernetes-preserve-unknown-fields": True,
    }
    cond = status["conditions"]
    assert cond["x-kubernetes-list-type"] == "map" and cond["x-kubernetes-list-map-keys"] == ["type"]
    item = cond["items"]
    assert set(item["required"]) == {"type", "status", "reason", "lastTransitionTime"}
    assert item["properties"]["lastTransitionTime"]["format"] == "date-time"
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]


# ---------------------------------------------------------------------------------------------
# A small OpenAPI validator (defaulting + structural validation, no CEL) to check that defaults
# and the samples are accepted by the generated schema the way the API server would.
# ---------------------------------------------------------------------------------------------


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    if isinstance(value, dict) and schema.get("type") == "object":
        out = dict(value)
        for name, sub in schema.get("properties", {}).items():
            if name not in out and "default" in sub:
                out[name] = sub["default"]
            if name in out:
                out[name] = apply_defaults(sub, out[name])
        return out
    if isinstance(value, list) and schema.get("type") == "array":
        return [apply_defaults(schema["items"], v) for v in value]
    return value


def validate(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    errs: list[str] = []
    t = schema.get("type")
    if schema.get("x-kubernetes-preserve-unknown-fields") and t in (None, "object"):
        return [] if t is None or isinstance(value, dict) else [f"{path}: not an object"]
    type_ok = {
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
    }[t]
    if not type_ok:
        return [f"{path}: expected {t}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errs.append(f"{path}: {value!r} not in {schema['enum']}")
    if t in ("integer", "number"):
        if "minimum" in schema and (value <= schema["minimum"] if schema.get("exclusiveMinimum") else value < schema["minimum"]):
            errs.append(f"{path}: {value} below minimum {schema['minimum']}")
        if "maximum" in schema and (value >= schema["maximum"] if schema.get("exclusiveMaximum") else value > schema["maximum"]):
            errs.append(f"{path}: {value} above maximum {schema['maximum']}")
    if t == "string":
        if len(value) > schema.get("maxLength", 10**9) or len(value) < schema.get("minLength", 0):
            errs.append(f"{path}: length {len(value)} out of bounds")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errs.append(f"{path}: {value!r} does not match {schema['pattern']}")
        if schema.get("format") == "date-time":
            datetime.fromisoformat(value.replace("Z", "+00:00"))
    if t == "array":
        if len(value) > schema.get("maxItems", 10**9):
            errs.append(f"{path}: more than {schema['maxItems']} items")
        if schema.get("x-kubernetes-list-type") == "set" and len(set(map(repr, value))) != len(value):
            errs.append(f"{path}: duplicate entries in a set")
        for i, v in enumerate(value):
            errs += validate(schema["items"], v, f"{path}[{i}]")
    if t == "object":
        props = schema.get("properties", {})
        for req in schema.get("required", []):
            if req not in value:
                errs.append(f"{path}.{req}: required")
        if len(value) > schema.get("maxProperties", 10**9):
            errs.append(f"{path}: too many properties")
        for k, v in value.items():
            if k in props:
                errs += validate(props[k], v, f"{path}.{k}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errs += validate(schema["additionalProperties"], v, f"{path}.{k}")
            else:
                errs.append(f"{path}.{k}: unknown field (would be pruned)")
    return errs


def test_every_default_is_valid_for_its_own_schema(crds: dict[str, dict[str, Any]]) -> None:
    """The API server refuses a CRD whose defaults do not validate (after pruning)."""
    count = 0
    for crd_name, crd in crds.items():
        for path, node in walk(schema_of(crd)):
            if "default" in node:
                count += 1
                value = apply_defaults(node, node["default"])
                errs = validate(node, value, f"{crd_name}{path}")
                assert not errs, errs
    assert count >= 15


def sample_docs() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for p in sorted(SAMPLES.glob("*.yaml")):
        for d in yaml.safe_load_all(p.read_text()):
            if d and d.get("apiVersion") == "archipelago.dev/v1alpha1":
                docs.append((p.name, d))
    return docs


def test_samples_pass_the_generated_openapi_schema(crds: dict[str, dict[str, Any]]) -> None:
    by_kind = {crd["spec"]["names"]["kind"]: schema_of(crd) for crd in crds.values()}
    docs = sample_docs()
    assert len(docs) >= 8
    for name, doc in docs:
        schema = by_kind[doc["kind"]]
        body = {k: v for k, v in doc.items() if k != "metadata"}  # metadata is validated by the API server itself
        errs = validate(schema, apply_defaults(schema, body), name)
        assert not errs, errs


def test_pydantic_defaults_agree_with_crd_defaults(crds: dict[str, dict[str, Any]]) -> None:
    """An object defaulted by the API server parses to the same model as the raw object."""
    by_kind = {crd["spec"]["names"]["kind"]: schema_of(crd) for crd in crds.values()}
    for name, doc in sample_docs():
        defaulted = apply_defaults(by_kind[doc["kind"]], doc)
        assert parse_resource(defaulted, name) == parse_resource(doc, name), name


def test_bad_values_fail_the_openapi_schema_too(crds: dict[str, dict[str, Any]]) -> None:
    """Spot checks that the OpenAPI part (not just CEL) refuses what pydantic refuses."""
    md_schema = schema_of(crds["modeldeployments.archipelago.dev"])
    base = {"apiVersion": "archipelago.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {},
            "spec": {"model": {"name": "m"}, "sloRef": "s"}}
    for patch, expect in [
        ({"engine": {"kind": "tgi"}}, "not in"),
        ({"engine": {"gpuMemoryUtilization": 0}}, "below minimum"),
        ({"placement": {"tensorParallel": [16]}}, "above maximum"),
        ({"placement": {"tensorParallel": [2, 2]}}, "duplicate"),
        ({"replicas": {"min": -1}}, "below minimum"),
    ]:
        doc = {**base, "spec": {**base["spec"], **patch}}
        errs = validate(md_schema, apply_defaults(md_schema, doc))
        assert any(expect in e for e in errs), (patch, errs)
    slo_schema = schema_of(crds["servingslos.archipelago.dev"])
    doc = {"spec": {"ttft": {"seconds": 0}, "tpot": {"seconds": 0.1}, "attainment": 1.5}}
    errs = validate(slo_schema, apply_defaults(slo_schema, doc))
    assert any(".ttft.seconds" in e for e in errs) and any(".attainment" in e for e in errs)


# ---------------------------------------------------------------------------------------------
# The generator refuses what a structural schema cannot express
# ---------------------------------------------------------------------------------------------


class _Union(ApiModel):
    """Has a Union field."""

    x: int | str = Field(description="either")


class _Node(ApiModel):
    """Recursive."""

    child: _Node | None = Field(default=None, description="child")


class _AnyField(ApiModel):
    """Has an untyped field."""

    x: Any = Field(description="anything")


class _SetField(ApiModel):
    """Uses a Python set (uniqueItems)."""

    x: set[int] = Field(default_factory=set, description="set")


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (_Union, r"\.x: anyOf with 2 non-null branches"),
        (_Node, r"recursive model '_Node'"),
        (_AnyField, r"\.x: node has no type"),
        (_SetField, r"\.x: uniqueItems is forbidden"),
    ],
)
def test_generator_refuses_non_structural_models(model: type[BaseModel], match: str) -> None:
    with pytest.raises(StructuralSchemaError, match=match):
        to_structural(model.model_json_schema(by_alias=True), path="T")


def test_to_structural_converts_pydantic_idioms() -> None:
    class Inner(ApiModel):
        """Inner doc."""

        a_b: float = Field(gt=0, lt=1, description="bounded")

    class Outer(ApiModel):
        """Outer doc."""

        inner: Inner | None = Field(default=None, description="field doc wins")
        fixed: str = Field(default="x", json_schema_extra={"const": "x"}, description="const")
        labels: dict[str, str] = Field(default_factory=dict, description="map")

    s = to_structural(Outer.model_json_schema(by_alias=True))
    inner = s["properties"]["inner"]
    assert inner["type"] == "object" and inner["description"] == "field doc wins"
    assert inner["properties"]["aB"] == {
        "type": "number", "description": "bounded", "minimum": 0, "exclusiveMinimum": True, "maximum": 1,
        "exclusiveMaximum": True,
    }
    assert inner["required"] == ["aB"]
    assert s["properties"]["labels"]["additionalProperties"] == {"type": "string"}
    assert s["properties"]["fixed"]["enum"] == ["x"]
    assert "additionalProperties" not in s  # extra=forbid is implied by pruning


def test_resources_registry_matches_crds(crds: dict[str, dict[str, Any]]) -> None:
    assert [r.KIND for r in RESOURCES] == [c["spec"]["names"]["kind"] for c in crds.values()]
