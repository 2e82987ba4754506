"""Start a real server program on loopback for a test and talk JSON to it (stdlib only: no client libraries, so
what the test sends is exactly what a user's HTTP call would)."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("ALIGN_INTEGRATIONS_CACHE", Path.home() / ".cache" / "align" / "integrations"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv_python(name: str) -> Path | str:
    """The python of the cached venv `name` (tests/integrations/setup.sh), or the one line saying why it is not
    there (the setup's own failure line when it tried)."""
    python = CACHE / f"{name}-venv" / "bin" / "python"
    if (CACHE / f"{name}-venv" / ".installed").exists() and python.exists():
        return python
    failed = CACHE / f"{name}.failed"
    if failed.exists():
        return failed.read_text().strip()
    return f"{name} is not installed: run tests/integrations/setup.sh {name} (or make test-integrations)"


def request(url: str, body: Any = None, *, token: str = "", method: str | None = None,
            timeout: float = 60) -> tuple[int, bytes]:
    """(status, body bytes) of one HTTP call; `body` is sent as JSON."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Token {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def call(url: str, body: Any = None, **kw: Any) -> Any:
    """The JSON answer of a call that must succeed (AssertionError with the server's answer otherwise)."""
    status, raw = request(url, body, **kw)
    assert 200 <= status < 300, f"{kw.get('method') or ('POST' if body is not None else 'GET')} {url}: " \
                                f"{status} {raw[:500]!r}"
    return json.loads(raw) if raw else None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kw: Any) -> None:
        return None  # the browser follows redirects itself


@contextmanager
def auth_proxy(upstream: str, authorization: str) -> Iterator[str]:
    """A loopback HTTP proxy in front of `upstream` that adds `Authorization: <authorization>` to every request,
    so a headless browser (which cannot set headers from its command line) is logged in. Yields its base URL."""
    opener = urllib.request.build_opener(_NoRedirect)

    class Handler(http.server.BaseHTTPRequestHandler):
        def forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            headers["Authorization"] = authorization
            req = urllib.request.Request(upstream + self.path, data=body, headers=headers, method=self.command)
            try:
                resp = opener.open(req, timeout=60)
            except urllib.error.HTTPError as e:
                resp = e
            data = resp.read()
            self.send_response(resp.status)
            for k, v in resp.headers.items():
                if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = forward

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def serving(cmd: list[str], ready_url: str, log: Path, *, env: dict[str, str] | None = None,
            timeout: float = 300) -> Iterator[subprocess.Popen]:
    """Run `cmd` (its own process group, output to `log`) until `ready_url` answers 200, yield it, then stop
    the whole group. Fails with the log's tail when the program exits or never gets ready."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if request(ready_url, timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{ready_url} not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
