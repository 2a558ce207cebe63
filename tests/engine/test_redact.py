"""engine/redact.py on its own: every DSN form, model URLs, key variants (issue 12, finding 8)."""

from __future__ import annotations

import pytest

from engine.redact import key_variants, redact_dsn, redact_url, remember, scrub, secrets_in_url


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://me:pw@h:5432/db", "postgresql://me:***@h:5432/db"),
        ("postgresql://me:hun/ter#2?x@h/db", "postgresql://me:***@h/db"),
        (
            "postgresql://me@h/db?password=pw&sslmode=require",
            "postgresql://me@h/db?password=***&sslmode=require",
        ),
        ("postgresql://h/db?sslpassword=pw", "postgresql://h/db?sslpassword=***"),
        ("host=h password=pw dbname=x", "host=h password=*** dbname=x"),
        ("host=h password = 'a b\\'c' dbname=x", "host=h password=*** dbname=x"),
        ("host=h sslpassword=pw", "host=h sslpassword=***"),
    ],
)
def test_redact_dsn(dsn: str, shown: str) -> None:
    assert redact_dsn(dsn) == shown


def test_redact_model_url_hides_all_userinfo_and_secret_query_keys() -> None:
    url = "https://tok@llm.example/v1?api-version=2&api_key=k1&key=k2&token=k3&sig=k4&x=1#f"
    assert redact_url(url, keep_user=False) == (
        "https://***@llm.example/v1?api-version=2&api_key=***&key=***&token=***&sig=***&x=1#f"
    )


def test_secret_values_and_key_variants() -> None:
    assert "pa/ss" in secrets_in_url("postgresql://me:pa%2Fss@h/db")
    assert "me" not in secrets_in_url("postgresql://me@h/db")
    assert "tok123" in secrets_in_url("https://tok123@h/v1", user_is_secret=True)
    assert key_variants("sk-proj-abcdef123") == ["sk-proj-abcdef123", "proj-abcdef123", "abcdef123"]
    # A short tail is a word, not a secret: it would hide every "test" in a path.
    assert key_variants("sk-doctor-test") == ["sk-doctor-test", "doctor-test"]


def test_scrub_hides_remembered_values_longest_first() -> None:
    remember(["sk-zz-longsecret-1", "longsecret-1", "abc"])  # "abc": too short to scrub
    assert scrub("echo: longsecret-1 / sk-zz-longsecret-1 / abc") == "echo: *** / *** / abc"
