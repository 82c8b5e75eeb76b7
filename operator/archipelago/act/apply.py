"""Server-side apply of the emitted objects, and pruning of the ones a plan no longer wants.

:class:`Applier` wraps the ``kubernetes`` client: every write is a server-side apply
(``application/apply-patch+yaml``) with the operator's own field manager ``archipelago`` and
``force=True`` (the operator owns what it emits; a human editing an emitted Deployment is
overridden on the next reconcile). Reads return plain dicts (``_preload_content=False``), so
nothing depends on the client's generated models.

Errors: :class:`ApplyError` carries the HTTP status and the API server's message, naming the object.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from archipelago.act.manifests import LABEL_MANAGED_BY, LABEL_MODEL, MANAGED_BY, label_value

FIELD_MANAGER = "archipelago"
APPLY_CONTENT_TYPE = "application/apply-patch+yaml"
MERGE_CONTENT_TYPE = "application/merge-patch+json"


class ApplyError(RuntimeError):
    """A write to the API server failed. ``status`` is the HTTP status (0 when unknown)."""

    def __init__(self, what: str, status: int, message: str):
        self.status = status
        super().__init__(f"{what}: HTTP {status}: {message}")


def _api_message(e: ApiException) -> str:
    try:
        return json.loads(e.body).get("message", str(e.reason))
    except Exception:  # noqa: BLE001 - body may be anything
        return str(e.reason)


@dataclass(frozen=True)
class _KindOps:
    api: str
    read: str
    patch: str
    list: str
    delete: str


_OPS: dict[str, _KindOps] = {
    "Deployment": _KindOps("apps", "read_namespaced_deployment", "patch_namespaced_deployment",
                           "list_namespaced_deployment", "delete_namespaced_deployment"),
    "Service": _KindOps("core", "read_namespaced_service", "patch_namespaced_service",
                        "list_namespaced_service", "delete_namespaced_service"),
    "ConfigMap": _KindOps("core", "read_namespaced_config_map", "patch_namespaced_config_map",
                          "list_namespaced_config_map", "delete_namespaced_config_map"),
}
EMITTED_KINDS = tuple(_OPS)


class Applier:
    """Server-side apply, list, delete and status patches for the operator's objects.

    Args:
        api_client: a configured ``kubernetes.client.ApiClient`` (in-cluster or kubeconfig).
        field_manager: SSA field manager name (default ``archipelago``).
        timeout_s: per-request timeout, seconds.
    """

    def __init__(self, api_client: k8s.ApiClient, field_manager: str = FIELD_MANAGER, timeout_s: float = 15.0):
        self.api_client = api_client
        self.field_manager = field_manager
        self.timeout_s = timeout_s
        self._apis = {"apps": k8s.AppsV1Api(api_client), "core": k8s.CoreV1Api(api_client)}
        self._custom = k8s.CustomObjectsApi(api_client)

    def _fn(self, kind: str, op: str) -> Any:
        if kind not in _OPS:
            raise ValueError(f"kind: {kind!r} is not emitted by Archipelago (one of {EMITTED_KINDS})")
        ops = _OPS[kind]
        return getattr(self._apis[ops.api], getattr(ops, op))

    @staticmethod
    def _json(resp: Any) -> dict[str, Any]:
        data = resp.data if hasattr(resp, "data") else resp.read()
        return json.loads(data) if data else {}

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply one object (Deployment, Service or ConfigMap); returns the live object.

        Raises:
            ApplyError: the API server refused the object (message names kind/namespace/name).
        """
        kind, meta = obj["kind"], obj["metadata"]
        what = f"apply {kind} {meta['namespace']}/{meta['name']}"
        try:
            resp = self._fn(kind, "patch")(
                name=meta["name"], namespace=meta["namespace"], body=dict(obj),
                field_manager=self.field_manager, force=True,
                _content_type=APPLY_CONTENT_TYPE, _preload_content=False, _request_timeout=self.timeout_s,
            )
        except ApiException as e:
            raise ApplyError(what, e.status or 0, _api_message(e)) from e
        return self._json(resp)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The live object or None if it does not exist."""
        try:
            resp = self._fn(kind, "read")(name=name, namespace=namespace, _preload_content=False,
                                          _request_timeout=self.timeout_s)
        except ApiException as e:
            if e.status == 404:
                return None
            raise ApplyError(f"read {kind} {namespace}/{name}", e.status or 0, _api_message(e)) from e
        return self._json(resp)

    def list_owned(self, kind: str, namespace: str, model: str) -> list[dict[str, Any]]:
        """Objects of ``kind`` in ``namespace`` labelled as Archipelago's for ModelDeployment ``model``."""
        sel = f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_MODEL}={label_value(model)}"
        try:
            resp = self._fn(kind, "list")(namespace=namespace, label_selector=sel, _preload_content=False,
                                          _request_timeout=self.timeout_s)
        except ApiException as e:
            raise ApplyError(f"list {kind} in {namespace}", e.status or 0, _api_message(e)) from e
        return self._json(resp).get("items", [])

    def delete(self, kind: str, namespace: str, name: str, uid: str | None = None) -> bool:
        """Delete one object (with a UID precondition when given). Returns False if it was already gone."""
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self._fn(kind, "delete")(name=name, namespace=namespace, body=body, _preload_content=False,
                                     _request_timeout=self.timeout_s)
        except ApiException as e:
            if e.status in (404, 409):
                return False
            raise ApplyError(f"delete {kind} {namespace}/{name}", e.status or 0, _api_message(e)) from e
        return True

    def patch_custom_status(self, group: str, version: str, plural: str, name: str, status: Mapping[str, Any],
                            namespace: str | None = None) -> dict[str, Any]:
        """JSON-merge-patch ``status`` of a custom object (one write). Cluster-scoped when ``namespace`` is None."""
        body = {"status": dict(status)}
        what = f"patch status of {plural}/{name}"
        try:
            if namespace is None:
                resp = self._custom.patch_cluster_custom_object_status(
                    group, version, plural, name, body, _content_type=MERGE_CONTENT_TYPE,
                    _preload_content=False, _request_timeout=self.timeout_s)
            else:
                resp = self._custom.patch_namespaced_custom_object_status(
                    group, version, namespace, plural, name, body, _content_type=MERGE_CONTENT_TYPE,
                    _preload_content=False, _request_timeout=self.timeout_s)
        except ApiException as e:
            raise ApplyError(what, e.status or 0, _api_message(e)) from e
        return self._json(resp)


def deployment_available(dep: Mapping[str, Any] | None, want_replicas: int | None = None) -> bool:
    """True when a Deployment's rollout is complete and all wanted replicas are available.

    ``status.observedGeneration >= metadata.generation``, ``updatedReplicas`` and ``availableReplicas``
    both reach ``want_replicas`` (default ``spec.replicas``). A Deployment scaled to 0 is available.
    """
    if not dep:
        return False
    spec, st, meta = dep.get("spec") or {}, dep.get("status") or {}, dep.get("metadata") or {}
    want = spec.get("replicas", 1) if want_replicas is None else want_replicas
    if st.get("observedGeneration", 0) < meta.get("generation", 0):
        return False
    if want == 0:
        return True
    return st.get("updatedReplicas", 0) >= want and st.get("availableReplicas", 0) >= want
