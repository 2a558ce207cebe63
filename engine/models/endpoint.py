"""Endpoint addresses: the defaults, checks and the form safe to show.

Apart from the model client so that what only needs to name or check an
endpoint (config, doctor, the embeddings' settings) does not import the
``openai`` package, which is most of a command's start-up time.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

OPENAI_BASE_URL = "https://api.openai.com/v1"
# Local servers (Ollama, llama.cpp, vLLM) ignore the key but the client
# insists on having one.
PLACEHOLDER_API_KEY = "not-needed"


def _is_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a malformed port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _is_openai_host(base_url: str) -> bool:
    host = (urlsplit(base_url).hostname or "").lower()
    return host == "openai.com" or host.endswith(".openai.com")


def _display_url(url: str) -> str:
    """``url`` without user:password, query or fragment: safe to show and log."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "(invalid URL)"
    if parts.hostname is None:
        return url.split("?", 1)[0].split("@")[-1]
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
