"""Pure helpers for standard ``metav1.Condition`` lists in custom-resource status.

Semantics follow ``k8s.io/apimachinery/pkg/api/meta.SetStatusCondition``: a condition is keyed by
``type``; ``lastTransitionTime`` changes only when ``status`` changes; ``reason``, ``message`` and
``observedGeneration`` are always refreshed. Conditions are plain dicts in the Kubernetes JSON
shape (camelCase keys), so the result can be written to ``status.conditions`` as it is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Literal

from archipelago.api.v1alpha1 import CONDITION_REASON, CONDITION_TYPE, format_time

ConditionStatus = Literal["True", "False", "Unknown"]
_STATUSES = ("True", "False", "Unknown")
_REASON_RE = re.compile(CONDITION_REASON)
_TYPE_RE = re.compile(CONDITION_TYPE)


def _timestamp(now: datetime | str) -> str:
    if isinstance(now, datetime):
        return format_time(now)
    if isinstance(now, str) and now:
        try:
            parsed = datetime.fromisoformat(now.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"now={now!r} is not an RFC 3339 timestamp, e.g. 2025-01-31T12:00:00Z") from None
        return format_time(parsed)
    raise ValueError(f"now must be an aware datetime or an RFC 3339 string, got {now!r}")


def set_condition(
    conditions: Iterable[Mapping[str, Any]] | None,
    type: str,
    status: ConditionStatus | bool,
    reason: str,
    message: str,
    generation: int | None,
    now: datetime | str,
) -> list[dict[str, Any]]:
    """Return a new condition list with the condition of ``type`` set; the input is not modified.

    Args:
        conditions: the current ``status.conditions`` (list of dicts), or ``None``.
        type: condition type in CamelCase, e.g. ``"Ready"``.
        status: ``"True"``, ``"False"``, ``"Unknown"`` or a bool (``True`` -> ``"True"``).
        reason: CamelCase programmatic reason, e.g. ``"SLOInfeasible"`` (pattern of metav1.Condition).
        message: human-readable detail (truncated to 32,768 characters, the API's limit).
        generation: ``metadata.generation`` the condition was computed from (``None`` omits it).
        now: the current time, an aware ``datetime`` or RFC 3339 string; used as
            ``lastTransitionTime`` only when the status changes or the condition is new.

    Returns:
        The list with the condition replaced in place (same position) or appended; other
        conditions are copied unchanged. Timestamps are RFC 3339 strings with seconds and ``Z``.

    Raises:
        ValueError: invalid ``status``, ``type`` or ``reason`` (naming the value and the expected
            form), or a naive/invalid ``now``.
    """
    if isinstance(status, bool):
        status = "True" if status else "False"
    if status not in _STATUSES:
        raise ValueError(f"condition status must be one of {_STATUSES}, got {status!r}")
    if not type or len(type) > 316 or not _TYPE_RE.match(type):
        raise ValueError(f"condition type {type!r} is not valid: use CamelCase like Ready or Planned")
    if not reason or len(reason) > 1024 or not _REASON_RE.match(reason):
        raise ValueError(f"condition reason {reason!r} is not valid: use CamelCase like SLOInfeasible")
    if generation is not None and generation < 0:
        raise ValueError(f"generation must be >= 0, got {generation}")

    out = [dict(c) for c in (conditions or [])]
    new: dict[str, Any] = {
        "type": type,
        "status": status,
        "reason": reason,
        "message": message[:32768],
        "lastTransitionTime": _timestamp(now),
    }
    if generation is not None:
        new["observedGeneration"] = generation
    for i, old in enumerate(out):
        if old.get("type") == type:
            if old.get("status") == status and old.get("lastTransitionTime"):
                new["lastTransitionTime"] = old["lastTransitionTime"]
            out[i] = new
            return out
    out.append(new)
    return out


def get_condition(conditions: Iterable[Mapping[str, Any]] | None, type: str) -> dict[str, Any] | None:
    """The condition of ``type`` as a dict copy, or ``None`` if absent."""
    for c in conditions or []:
        if c.get("type") == type:
            return dict(c)
    return None


def is_true(conditions: Iterable[Mapping[str, Any]] | None, type: str) -> bool:
    """``True`` iff the condition of ``type`` exists with status ``"True"``."""
    c = get_condition(conditions, type)
    return c is not None and c.get("status") == "True"


def remove_condition(conditions: Iterable[Mapping[str, Any]] | None, type: str) -> list[dict[str, Any]]:
    """A new list without the condition of ``type`` (unchanged copy if absent)."""
    return [dict(c) for c in (conditions or []) if c.get("type") != type]
