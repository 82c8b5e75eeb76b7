"""Run pytest and fail loudly when nothing ran or e2e tests were skipped.

pytest's own exit codes already fail on errors; this wrapper adds two rules the project needs:

* exit code 5 (no tests collected) is a failure, with a message saying so;
* a skipped test under ``e2e/`` is a failure unless ``ARCHIPELAGO_ALLOW_E2E_SKIP=1`` -- an e2e
  suite that silently skips proves nothing. Skips are still listed by ``-ra``.

Usage: ``python scripts/pytest_strict.py [pytest args...]``; exits with pytest's status (or 1).
"""

from __future__ import annotations

import os
import sys

import pytest


class _SkipCounter:
    def __init__(self) -> None:
        self.e2e_skips: list[str] = []
        self.executed = 0

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" and not report.skipped:
            self.executed += 1
        if report.skipped and report.nodeid.startswith("e2e/"):
            self.e2e_skips.append(report.nodeid)


def main(argv: list[str]) -> int:
    counter = _SkipCounter()
    code = int(pytest.main(["-ra", *argv], plugins=[counter]))
    if code == pytest.ExitCode.NO_TESTS_COLLECTED:
        print("pytest_strict: no tests were collected -- failing (exit 5 must not pass)", file=sys.stderr)
        return 5
    if code == 0 and counter.executed == 0:
        print("pytest_strict: no test executed -- failing", file=sys.stderr)
        return 1
    if counter.e2e_skips and os.environ.get("ARCHIPELAGO_ALLOW_E2E_SKIP") != "1":
        print(f"pytest_strict: {len(counter.e2e_skips)} e2e test(s) skipped -- failing:", file=sys.stderr)
        for nodeid in counter.e2e_skips:
            print(f"  {nodeid}", file=sys.stderr)
        return code or 1
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
