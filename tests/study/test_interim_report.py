"""The study's interim report (guard_fast/study/gates.py interim_reporter): the gates are checked after every job,
report.md and its charts are rewritten only every report_every_s seconds, on a failed gate, or when forced."""

from __future__ import annotations

import pytest

from guard_fast.runtime.errors import ConfigError
from guard_fast.study.config import load_study
from guard_fast.study.gates import interim_reporter
from tests.conftest import REPO

PRESET = str(REPO / "configs" / "digits" / "study.toml")
OK = {"gate": "teacher_min", "where": "seed0/teachers/none", "measured": 0.9, "threshold": 0.88, "ok": True}
BAD = {**OK, "measured": 0.5, "ok": False}


def reporter(every: float, gate_results: list[list[dict]], times: list[float]):
    cfg = load_study(["--config", PRESET, f"--report_every_s={every}"])
    clock, checks, written = iter(times), [], []

    def gates():
        checks.append(1)
        return gate_results.pop(0)

    def report():
        written.append(len(checks))  # which job's check the report followed
        return {}

    return interim_reporter(cfg, gates, report, clock=lambda: next(clock)), checks, written


def test_reports_are_rate_limited_but_gates_are_checked_after_every_job():
    # clock reads: start 0; then per job one read to decide, and one more after a write
    after, checks, written = reporter(60, [[OK], [OK], [OK], [OK]], [0, 10, 61, 62, 70, 130, 131])
    assert [after() for _ in range(4)] == [None] * 4
    assert len(checks) == 4 and written == [2, 4]  # t = 61 and t = 130; t = 10 and t = 70 were within 60 s


def test_a_failed_gate_and_force_always_write_the_report():
    after, checks, written = reporter(3600, [[OK], [OK, BAD], [OK]], [0, 1, 2, 3, 4, 5])
    assert after() is None and written == []
    line = after()
    assert line.startswith("gate teacher_min failed at seed0/teachers/none") and written == [2]
    assert after(force=True) is None and written == [2, 3]


def test_zero_reports_after_every_job_and_negative_is_refused():
    after, _, written = reporter(0, [[OK], [OK]], [0, 0, 0, 0, 0])
    after(), after()
    assert written == [1, 2]
    with pytest.raises(ConfigError, match="report_every_s"):
        load_study(["--config", PRESET, "--report_every_s=-1"]).validate()
