"""Every benchmark scenario still runs end to end (at a tiny size).

Only what a benchmark must get right is asserted (one JSON object per point,
its shape, and correctness figures: no leaks, nothing lost); timings are the
benchmark's to report, never the test suite's to judge.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import peers
from bench.cli import SCENARIOS

REPO = Path(__file__).resolve().parents[2]
ZERO_FIGURES = ("leaks", "lost", "duplicates", "unmatched", "missing", "failed_turns")


@pytest.fixture(scope="module")
def quick_points(pg_server_dsn: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", "--dsn", pg_server_dsn],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.slow
def test_every_scenario_reports_points_with_params_figures_targets_and_machine(
    quick_points: list[dict[str, Any]],
) -> None:
    # peers measures only where its optional framework is installed (it says so).
    optional = {"peers"} if peers.missing() else set()
    assert {p["scenario"] for p in quick_points} == set(SCENARIOS) - optional
    for point in quick_points:
        assert point["params"] and point["figures"], point
        assert set(point["met"]) == set(point["targets"]), point
        for name in point["targets"]:
            assert name in point["figures"], (point["point"], name)
        machine = point["machine"]
        assert machine["cores"] >= 1 and machine["python"] and machine["postgresql"]
        assert machine["commit"]


@pytest.mark.slow
def test_nothing_leaks_is_lost_or_duplicated_in_any_scenario(
    quick_points: list[dict[str, Any]],
) -> None:
    checked = 0
    for point in quick_points:
        for name in ZERO_FIGURES:
            if name in point["figures"]:
                assert point["figures"][name] == 0, (point["point"], name)
                checked += 1
    assert checked >= 10


@pytest.mark.slow
def test_cpu_figures_are_measured_not_missing(quick_points: list[dict[str, Any]]) -> None:
    cost = [p for p in quick_points if p["scenario"] == "cost"]
    assert {p["params"]["model"] for p in cost} == {"offline", "http"}
    for point in cost:
        assert point["figures"]["memchat_cpu_ms_per_run"] > 0
        assert point["figures"]["sql_statements_per_run"] > 0


def test_unknown_scenario_bad_sizes_and_no_server_are_one_line_errors() -> None:
    for args, expected, code in (
        (["nope"], "unknown scenario 'nope'", 2),
        (["--users", "ten"], "--users takes numbers", 2),
        (["--soak-runs", "1500"], "--soak-runs must be a multiple of 1000", 2),
        (["cost", "--dsn", "postgresql://nobody@127.0.0.1:1/x"], "Connection refused", 1),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "bench", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == code
        assert expected in done.stderr and "Traceback" not in done.stderr


def test_memchat_bench_passes_its_arguments_to_python_m_bench() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from engine.cli.main import main; raise SystemExit(main())",
            "bench",
            "--",
            "nope",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "unknown scenario 'nope'" in done.stderr
