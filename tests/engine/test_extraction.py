"""Reading json-mode answers the way small local models write them, and the per-endpoint cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.extraction import MAX_JSON_DEPTH, EndpointModes, depth, parse_json_changes


def _shape(text: str) -> list[tuple[str, dict[str, object], str | None]]:
    found = parse_json_changes(text)
    assert found.usable
    return [(c.name, c.arguments, c.error) for c in found.calls]


@pytest.mark.parametrize(
    "text",
    [
        '{"add": ["Name is Ann"]}',
        '```json\n{"add": ["Name is Ann"]}\n```',
        'Sure! Here are the changes: {"add": ["Name is Ann"]} Hope this helps.',
        '<think>the user said her name</think>{"add": [{"memory": "Name is Ann"}]}',
        '{"note": "not this one"} then {"add": ["Name is Ann"], "update": [], "delete": []}',
    ],
)
def test_the_change_object_is_found_in_fences_prose_and_after_other_json(text: str) -> None:
    calls = _shape(text)
    assert [(name, args.get("memory")) for name, args, _ in calls] == [
        ("add_memory", "Name is Ann")
    ]


@pytest.mark.parametrize("text", ["", "  ", "{}", "none", "None.", "nothing", "null"])
def test_empty_answers_are_a_usable_no_change(text: str) -> None:
    found = parse_json_changes(text)
    assert found.usable and found.calls == ()


def test_prose_without_any_change_object_is_unusable() -> None:
    found = parse_json_changes("I think the user likes cats, but I am not sure.")
    assert not found.usable and found.calls == ()


def test_update_and_delete_entries_in_each_accepted_form() -> None:
    calls = _shape(
        json.dumps(
            {
                "update": [{"id": "m1", "memory": "Lives in Oslo", "topics": ["location"]}],
                "delete": ["m2", {"id": "m3"}],
            }
        )
    )
    assert calls == [
        ("update_memory", {"id": "m1", "memory": "Lives in Oslo", "topics": ["location"]}, None),
        ("delete_memory", {"id": "m2"}, None),
        ("delete_memory", {"id": "m3"}, None),
    ]


def test_a_too_deep_entry_is_refused_alone_and_its_neighbours_kept() -> None:
    deep: object = "x"
    for _ in range(MAX_JSON_DEPTH + 5):
        deep = {"memory": deep}
    calls = _shape(json.dumps({"add": ["Likes tea", deep, 7]}))
    assert calls[0] == ("add_memory", {"memory": "Likes tea"}, None)
    assert calls[1][2] == f"nested deeper than {MAX_JSON_DEPTH} levels"
    assert calls[2][2] == "a JSON int where an entry was expected"


def test_nesting_deep_enough_to_break_the_json_parser_is_not_an_exception() -> None:
    text = '{"add": [' + "[" * 100_000 + "]" * 100_000 + ', "Likes tea"]}'
    found = parse_json_changes(text)
    assert not found.usable  # the only object there could not be read: said, not raised


def test_depth_is_counted_without_recursion() -> None:
    nested: object = []
    for _ in range(50_000):
        nested = [nested]
    assert depth(nested) == MAX_JSON_DEPTH + 1  # stops counting at the limit
    assert depth({"a": [1, {"b": 2}]}) == 3
    assert depth("text") == 0


def test_learnt_modes_are_kept_per_endpoint(tmp_path: Path) -> None:
    path = tmp_path / "state" / "modes.json"
    modes = EndpointModes(path)
    assert modes.get("m @ http://a") is None
    modes.remember("m @ http://a", "json", "the endpoint refuses tools")
    modes.remember("m @ http://b", "tools", "the endpoint returned a forced tool call")
    again = EndpointModes(path)
    learnt = again.get("m @ http://a")
    assert learnt is not None and learnt.mode == "json"
    assert learnt.reason == "the endpoint refuses tools"
    assert again.get("m @ http://b") is not None
    again.forget("m @ http://a")
    assert EndpointModes(path).get("m @ http://a") is None


@pytest.mark.parametrize(
    "content", [b"", b"not json", b"[1, 2]", b'{"e": {"mode": "yaml"}}', b"\x00\xff" * 10]
)
def test_a_broken_cache_file_means_probe_again(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "modes.json"
    path.write_bytes(content)
    modes = EndpointModes(path)
    assert modes.get("e") is None
    modes.remember("e", "tools", "ok")  # and it is replaced, not a crash
    learnt = EndpointModes(path).get("e")
    assert learnt is not None and learnt.mode == "tools"


def test_an_unwritable_cache_only_costs_a_probe(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    modes = EndpointModes(blocker / "modes.json")  # its parent is a file
    modes.remember("e", "json", "x")
    assert modes.get("e") is None


def test_token_estimates_err_high_for_digits_symbols_and_other_scripts() -> None:
    from engine.context_budget import clip_to_tokens, estimate_tokens

    assert estimate_tokens("the quick brown fox") == 7 + 4  # 19 letters/spaces / 3, rounded up
    assert estimate_tokens("1234567890") == 10 + 4  # a token per digit
    assert estimate_tokens("東京都") == 3 + 4  # a token per CJK character
    long = "9" * 1000 + "words " * 1000
    clipped = clip_to_tokens(long, 300)
    assert estimate_tokens(clipped) <= 300 + 10
    assert clipped.startswith("999") and clipped.endswith("words ")
