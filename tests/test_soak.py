"""The soak with faults (tests/soak.py): a short one in the default run, the full one
(500 edits) in `make test-slow`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from serving.tritonserver import TritonServer
from tests.soak import run_soak


@pytest.fixture(scope="module")
def server(start_server: Callable[..., TritonServer], lean_repository: Path) -> TritonServer:
    return start_server(lean_repository)


def _check(report, edits: int, summary, title: str) -> None:
    summary(title, report.table())
    assert report.sent == edits
    assert not report.failures, "\n".join(report.failures)
    assert (
        report.outcomes["succeeded"] + report.outcomes["invalid"] + report.outcomes["abandoned"]
        == edits
    )
    assert report.outcomes["invalid"] >= edits // 10 - 1
    assert report.health_checks > 0 and report.health_unanswered == 0


def test_a_short_soak_with_faults(server: TritonServer, summary) -> None:
    report = run_soak(server, edits=120, concurrency=4, seed=1)
    _check(report, 120, summary, "soak, 120 edits at concurrency 4")
    assert len(report.kills) == 1 and report.outcomes["abandoned"] == 1


@pytest.mark.slow
def test_a_soak_of_500_edits_with_faults(server: TritonServer, summary) -> None:
    report = run_soak(server, edits=500, concurrency=4, seed=2)
    _check(report, 500, summary, "soak, 500 edits at concurrency 4")
    assert len(report.kills) == 5 and report.outcomes["abandoned"] == 5
    # Memory does not creep: the server's RSS at edit 500 against edit 100.
    assert report.rss_mb[500] < report.rss_mb[100] * 1.05
