"""A skip on the CI machine is a failure unless it is listed as expected.

`.ci/run` exports ADAFUSE_CI=1. There every dependency of the suite is installed by the README's
test command, so a test that skips (a missing package, a missing tool) hides a failure: the
session fails and names it, unless its node id is in EXPECTED_SKIPS with the reason it is right to
skip on that machine. Elsewhere (a developer's laptop, the GPU machine) skips are only reported
(`-rs`). tests/conftest.py loads these hooks.
"""
from __future__ import annotations

import os

import pytest

CI_ENV = "ADAFUSE_CI"
# node id (or module path, for a module skipped at collection) -> why CI skips it, on purpose
EXPECTED_SKIPS: dict[str, str] = {}

_skipped: dict[str, str] = {}  # node id -> skip reason, this session


def on_ci() -> bool:
    return os.environ.get(CI_ENV) == "1"


def unexpected_skips(skipped: dict[str, str], expected: dict[str, str]) -> dict[str, str]:
    """The skips not listed in `expected` (a listed module path also covers the tests inside it)."""
    return {node: reason for node, reason in skipped.items()
            if node not in expected and node.split("::", 1)[0] not in expected}


def _record(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped[report.nodeid] = reason.removeprefix("Skipped: ")


def pytest_runtest_logreport(report) -> None:
    _record(report)


def pytest_collectreport(report) -> None:  # a module skipped as a whole (importorskip at import)
    _record(report)


def pytest_sessionfinish(session, exitstatus) -> None:
    if on_ci() and unexpected_skips(_skipped, EXPECTED_SKIPS) and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:
    bad = unexpected_skips(_skipped, EXPECTED_SKIPS) if on_ci() else {}
    if bad:
        terminalreporter.section(f"skips not expected on CI ({CI_ENV}=1): each one fails the session")
        for node, reason in bad.items():
            terminalreporter.line(f"UNEXPECTED SKIP {node}: {reason}")
