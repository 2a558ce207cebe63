"""`python -m bench peers`: the agent framework's workload beside memchat's.

The scenario itself runs against the real PostgreSQL and the fake model
process over HTTP when agno is installed (the `peers` extra); without it, it
says so in one line and the bench goes on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from bench.fake_openai import FakeOpenAI
from bench.peers import sqlalchemy_url

REPO = Path(__file__).resolve().parents[2]


def test_the_fake_model_answers_text_once_its_tool_results_come_back() -> None:
    # An agent framework's loop: tool call, tool result, the model's last word.
    # Calling the tool again here would loop forever.
    tools = [{"type": "function", "function": {"name": "add_memory", "parameters": {}}}]
    ask = {"role": "user", "content": "My name is Ann."}
    with FakeOpenAI() as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key="x", max_retries=0)
        first = client.chat.completions.create(model="m", messages=[ask], tools=tools)
        call = first.choices[0].message.tool_calls[0]
        back = [
            ask,
            {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "Memory added successfully"},
        ]
        second = client.chat.completions.create(model="m", messages=back, tools=tools)
    assert first.choices[0].finish_reason == "tool_calls"
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == "Done." and not second.choices[0].message.tool_calls


def test_sqlalchemy_url_keeps_the_login_and_the_socket_dir() -> None:
    dsn = "postgresql://postgres:p%40ss@/memchat_bench_peers?host=/tmp/pg%20dir"
    assert sqlalchemy_url(dsn) == (
        "postgresql+psycopg://postgres:p%40ss@/memchat_bench_peers?host=/tmp/pg%20dir"
    )
    with pytest.raises(ValueError):
        sqlalchemy_url("mysql://x@y/z")


def test_without_agno_the_scenario_says_so_in_one_line(pg_server_dsn: str) -> None:
    # sys.modules[name] = None is how Python blocks an import: as if not installed.
    code = (
        "import sys; sys.modules['agno'] = None; from bench.cli import main; "
        f"sys.exit(main(['peers', '--quick', '--json', '--dsn', {pg_server_dsn!r}]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # no point: nothing was measured
    # agno first; the extra's other packages are named too when they are missing.
    assert "peers: skipped: agno" in done.stderr
    assert "not installed (pip install -e '.[peers]'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_peers_quick_measures_both_on_the_same_server(pg_server_dsn: str) -> None:
    pytest.importorskip("agno", reason="the peers extra is not installed")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "peers", "--quick", "--json", "--dsn", pg_server_dsn],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [point] = [json.loads(line) for line in done.stdout.splitlines()]
    figures = point["figures"]
    runs = point["params"]["runs"]
    assert point["scenario"] == "peers" and runs == 18
    # Every run of the framework wrote its memory (the fake adds one per call),
    # and memchat's audit is clean.
    assert figures["peer_memories"] == runs
    assert figures["peer_failed_turns"] == 0 and figures["memchat_failed_turns"] == 0
    assert (figures["leaks"], figures["lost"], figures["duplicates"]) == (0, 0, 0)
    assert figures["peer_cpu_ms_per_run"] > 0 and figures["memchat_cpu_ms_per_run"] > 0
    assert figures["wall_ratio"] == pytest.approx(
        figures["peer_wall_s"] / figures["memchat_wall_s"], abs=0.1
    )
