"""The decide layer is pure: it imports neither kopf nor kubernetes (nor network clients).

Checked twice: statically over every module's import statements (fast, names the file and line),
and at run time by importing every ``archipelago.decide`` module in a fresh interpreter and
inspecting ``sys.modules`` (catches indirect imports through other packages).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

FORBIDDEN = ("kopf", "kubernetes", "prometheus_api_client", "aiohttp", "requests")
PKG = Path(__file__).resolve().parents[1] / "operator" / "archipelago"
DECIDE = PKG / "decide"


def _decide_modules() -> list[str]:
    mods = []
    for path in sorted(DECIDE.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods.append(".".join(parts))
    return mods


def test_decide_has_modules() -> None:
    assert len(_decide_modules()) >= 1


def test_decide_source_imports_nothing_forbidden() -> None:
    offenders = []
    for path in sorted(DECIDE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in FORBIDDEN or name.startswith(
                    ("archipelago.observe", "archipelago.act", "archipelago.controller")
                ):
                    offenders.append(f"{path.relative_to(PKG.parent)}:{node.lineno} imports {name}")
    assert not offenders, "decide must stay pure:\n" + "\n".join(offenders)


def test_decide_runtime_pulls_in_nothing_forbidden() -> None:
    code = (
        "import importlib, json, sys\n"
        f"for m in {_decide_modules()!r}: importlib.import_module(m)\n"
        f"print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == [], f"importing archipelago.decide loaded {loaded}"
