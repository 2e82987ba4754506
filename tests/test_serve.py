"""`align serve` (OpenAI-compatible) and the `openai` judge against it, through a fault-injecting proxy."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from align.config import load_config
from align.stages.serve import ChatService, Config, make_server

ROOT = Path(__file__).resolve().parent.parent
SECRET = "sk-test-4f9c2e-DO-NOT-LEAK"


def start(server: ThreadingHTTPServer) -> str:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


@pytest.fixture(scope="module")
def tiny_server(tiny_model: Path) -> Iterator[str]:
    from align.stages.serve import load_service

    cfg = Config(model=str(tiny_model), dtype="float32", port=0, max_tokens_limit=16)
    server = make_server(load_service(cfg), "127.0.0.1", 0)
    yield start(server)
    server.shutdown()
    server.server_close()


def test_models_and_chat_completions_on_a_tiny_model(tiny_server: str, tiny_model: Path) -> None:
    models = httpx.get(f"{tiny_server}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == tiny_model.name
    body = {"model": tiny_model.name, "messages": [{"role": "user", "content": "How do I store basil?"}],
            "max_tokens": 5, "n": 2, "temperature": 0.7, "seed": 3}
    reply = httpx.post(f"{tiny_server}/v1/chat/completions", json=body, timeout=60).json()
    assert reply["object"] == "chat.completion" and len(reply["choices"]) == 2
    for i, choice in enumerate(reply["choices"]):
        assert choice["index"] == i and choice["message"]["role"] == "assistant"
        assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")
    usage = reply["usage"]
    assert 0 < usage["completion_tokens"] <= 10 < usage["prompt_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    again = httpx.post(f"{tiny_server}/v1/chat/completions", json=body, timeout=60).json()
    assert [c["message"] for c in again["choices"]] == [c["message"] for c in reply["choices"]]  # same seed


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": True}, 400, "stream"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("not an object", 400, "object"),
])
def test_bad_requests_get_openai_style_errors(tiny_server: str, body, status: int, message: str) -> None:
    resp = httpx.post(f"{tiny_server}/v1/chat/completions", json=body)
    assert resp.status_code == status and message in resp.json()["error"]["message"]
    assert httpx.get(f"{tiny_server}/v1/nothing").status_code == 404


class ShorterJudgeModel:
    """A stand-in judge model behind `align serve`: reads the rendered pairwise prompt, names the shorter answer."""

    name = "fake"

    def generate(self, prompts, params, n=1):
        from align.generation import Sample

        text = prompts[0][-1]["content"]
        a = text.split("[Response A]\n")[1].split("\n\n[Response B]")[0]
        b = text.split("[Response B]\n")[1].split("\n\n")[0]
        answer = "Verdict: A" if len(a) < len(b) else "Verdict: B" if len(b) < len(a) else "Verdict: tie"
        return [[Sample(text=answer, prompt_ids=[1, 2], response_ids=[3, 4], finished=True)] * n]


class FaultProxy:
    """Forwards to the real server, injecting faults: the first requests get a scripted 429 / 500 / timeout /
    garbage body; any request mentioning BROKEN always gets a 500 and GARBLED always a reply with no verdict,
    until `healthy` is set. Records every request's Authorization header."""

    def __init__(self, upstream: str, script: list[str], stall_s: float) -> None:
        self.upstream, self.script, self.stall_s = upstream, list(script), stall_s
        self.healthy = False
        self.requests = 0
        self.auth: set[str] = set()
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                with proxy.lock:
                    proxy.requests += 1
                    proxy.auth.add(self.headers.get("Authorization", ""))
                    fault = proxy.script.pop(0) if proxy.script and not proxy.healthy else None
                text = raw.decode()
                if not proxy.healthy and "BROKEN" in text:
                    fault = "500"
                if fault == "429":
                    return self.send(429, b'{"error": {"message": "slow down"}}', {"Retry-After": "0"})
                if fault == "500":
                    return self.send(500, b'{"error": {"message": "boom"}}')
                if fault == "timeout":
                    time.sleep(proxy.stall_s)
                    return self.send(200, b"{}")
                if fault == "garbage":
                    return self.send(200, b"<html>definitely not json</html>")
                reply = httpx.post(proxy.upstream + self.path, content=raw,
                                   headers={"Content-Type": "application/json"}).content
                if not proxy.healthy and "GARBLED" in text:
                    data = json.loads(reply)
                    data["choices"][0]["message"]["content"] = "I like both of them, really."
                    reply = json.dumps(data).encode()
                self.send(200, reply, {"Content-Type": "application/json"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = start(self.server)


def test_openai_judge_retries_counts_failures_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import write_jsonl

    from align.data.records import read_preferences
    from align.runs import read_manifest
    from align.stages.judge import Config as JudgeConfig
    from align.stages.judge import run

    server = make_server(ChatService(ShorterJudgeModel(), "judge-model"), "127.0.0.1", 0)
    proxy = FaultProxy(start(server), script=["429", "500", "timeout", "garbage", "429"], stall_s=4.0)
    monkeypatch.setenv("TEST_JUDGE_KEY", SECRET)
    spec = tmp_path / "local.yaml"
    spec.write_text(f"name: local\nkind: openai\nbase_url: {proxy.url}/v1\nmodel: judge-model\n"
                    f"api_key_env: TEST_JUDGE_KEY\ntimeout_s: 2.0\nmax_retries: 5\nbackoff_s: 0.01\n"
                    f"max_backoff_s: 0.05\nconcurrency: 3\n")
    answers = [("short", "a longer answer"), ("a much longer answer", "tiny"), ("BROKEN one", "x"),
               ("GARBLED", "yy"), ("equal", "same!"), ("fine", "finer one")]
    samples = write_jsonl(tmp_path / "samples.jsonl", [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"q{i}"}],
                                                        "responses": list(pair)} for i, pair in enumerate(answers)])
    cfg = load_config(JudgeConfig, ROOT / "stages/tiny/judge.yaml",
                      [f"samples={samples}", f"output_dir={tmp_path / 'run'}", f"judge={spec}",
                       "max_failure_rate=0.5"])  # 2 of 6 pairs fail on purpose here
    out = run(cfg)
    m = read_manifest(out)["metrics"]
    # Nothing lost: every pair is a preference, a tie/abstain, or a counted failure.
    assert m["pairs_judged"] + m["failures"] == len(answers)
    assert m["failures"] == 2 and m["preferences"] == 3 and m["ties"] == 1
    failures = {f["prompt_id"]: f["error"] for f in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}
    assert "HTTP 500" in failures["p2"] and "after 5 retries" in failures["p2"]
    assert "unparseable" in failures["p3"]
    prefs = read_preferences(out / "preferences.jsonl")
    assert {p.chosen[0]["content"] for p in prefs} == {"short", "tiny", "fine"}
    assert all(p.meta["source"] == "ai" and p.meta["judge"].startswith("local@") for p in prefs)
    # Transient faults were retried: 6 pairs x 2 orders = 12 chats, plus 5 scripted faults, plus BROKEN's retries.
    assert proxy.requests >= 12 + 5 + 5
    assert proxy.auth == {f"Bearer {SECRET}"}
    for path in out.rglob("*"):
        assert not path.is_file() or SECRET not in path.read_text(errors="ignore")

    # The endpoint recovers; a resumed run judges only the two failed pairs (4 chats) and takes the rest from cache.
    proxy.healthy = True
    before = proxy.requests
    again = run(dataclasses.replace(cfg, resume=True))
    m2 = read_manifest(again)["metrics"]
    assert proxy.requests - before == 4
    assert m2["failures"] == 0 and m2["cached_judgements"] == 4 and m2["pairs_judged"] == len(answers)
    assert {p.chosen[0]["content"] for p in read_preferences(again / "preferences.jsonl")} == {
        "short", "tiny", "x", "yy", "fine"}
    for s in (proxy.server, server):
        s.shutdown()
        s.server_close()


def test_openai_judge_needs_its_key_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from align.errors import ConfigError
    from align.judges.registry import load_judge

    monkeypatch.delenv("MISSING_KEY_VAR", raising=False)
    spec = tmp_path / "s.yaml"
    spec.write_text("kind: openai\nmodel: m\napi_key_env: MISSING_KEY_VAR\n")
    with pytest.raises(ConfigError, match="MISSING_KEY_VAR is not set"):
        load_judge(spec)


def test_retry_delay_backs_off_and_honours_retry_after() -> None:
    from align.judges.openai import Config as OpenAIConfig
    from align.judges.openai import retry_delay

    cfg = OpenAIConfig(model="m", backoff_s=1.0, max_backoff_s=10.0)
    delays = [retry_delay(i, cfg) for i in range(5)]
    assert 1.0 <= delays[0] <= 1.25 and 2.0 <= delays[1] <= 2.5 and 4.0 <= delays[2] <= 5.0 and delays[4] == 10.0
    assert retry_delay(0, cfg, "3") == 3.0 and retry_delay(0, cfg, "999") == 10.0


def test_serve_recipe_loads() -> None:
    from align.stages.serve import check_config

    cfg = load_config(Config, ROOT / "stages/serve.yaml")
    assert cfg.host == "127.0.0.1" and cfg.api_key_env == "" and cfg.timeout_s == 30.0 and cfg.max_queue == 8
    check_config(cfg)  # loopback without a key is allowed


# --- `align serve` against bad clients (issue 12 §5): a fake model, tiny timeouts, raw sockets ---------------------

class RecordingSampler:
    """Answers 'ok' at once and records the settings of each call; with `gate`, waits on it inside generate."""

    name = "fake"

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.gate, self.entered, self.calls = gate, threading.Event(), []

    def generate(self, prompts, params, n=1):
        from align.generation import Sample

        self.calls.append(params)
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30)
        return [[Sample(text="ok", prompt_ids=[1, 2], response_ids=[3], finished=True)] * n]


@contextlib.contextmanager
def serving(cfg: Config | None = None, sampler=None, **service_kwargs) -> Iterator[tuple[str, ChatService]]:
    service = ChatService(sampler or RecordingSampler(), "served", cfg or Config(), **service_kwargs)
    server = make_server(service, "127.0.0.1", 0)
    try:
        yield start(server), service
    finally:
        server.shutdown()
        server.server_close()


def raw(url: str, data: bytes, *, then_close_write: bool = False, wait_s: float = 5.0) -> tuple[bytes, float]:
    """Send raw bytes; return everything the server sends until it closes the connection, and how long that took."""
    host, port = url.removeprefix("http://").split(":")
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        sock.sendall(data)
        if then_close_write:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):  # raises socket.timeout if the server holds the connection open
            received += chunk
    return received, time.monotonic() - t0


def post_head(length: int | str, extra: str = "Connection: close\r\n") -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()


def post(body: bytes, extra: str = "Connection: close\r\n") -> bytes:
    return post_head(len(body), extra) + body


def status_and_body(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


HI = {"messages": [{"role": "user", "content": "hi"}]}


def test_short_idle_and_trickling_clients_are_answered_or_dropped_within_the_timeout() -> None:
    with serving(Config(timeout_s=0.5)) as (url, _):
        # Content-Length 1000, 11 bytes sent, then silence: 400 naming the shortfall, connection closed.
        out, took = raw(url, post_head(1000) + b'{"messages"')
        status, body = status_and_body(out)
        assert status == 400 and "11 of the 1000 bytes" in body["error"]["message"] and took < 3
        # The same, but the client hangs up its side: 400 at once.
        out, _ = raw(url, post_head(1000) + b'{"messages"', then_close_write=True)
        assert status_and_body(out)[0] == 400 and "ended after 11 of the 1000" in out.decode()
        # An idle connection (nothing sent) is closed after the timeout.
        out, took = raw(url, b"")
        assert out == b"" and 0.4 < took < 3
        # A client that trickles one byte per 0.2 s (never silent for 0.5 s) still gets 400 once the body's 0.5 s
        # deadline passes.
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(post_head(100))
            t0 = time.monotonic()
            while not select.select([sock], [], [], 0.2)[0] and time.monotonic() - t0 < 5:
                sock.sendall(b" ")
            out = b""
            while chunk := sock.recv(65536):
                out += chunk
            assert b" 400 " in out and b"did not arrive within 0.5 s" in out and time.monotonic() - t0 < 2.5
        # The server still answers well-behaved clients.
        assert httpx.post(f"{url}/v1/chat/completions", json=HI).status_code == 200


@pytest.mark.parametrize(("request_bytes", "status", "message"), [
    (post_head(10**9), 413, "the body is 1000000000 bytes; the limit is 4096"),
    (post_head("abc"), 400, "Content-Length"),
    (post(b""), 400, "not valid JSON"),
    (post(b'{"messages": "\xff\xfe"}'), 400, "not UTF-8 (byte 14)"),
    (post(b"[1,"), 400, "not valid JSON"),
    (post(b"[" * 4000), 400, "not valid JSON"),  # nested too deep for the parser's recursion
    (post(b"x", "Transfer-Encoding: chunked\r\nConnection: close\r\n"), 400, "chunked"),
    (b"NONSENSE\r\n\r\n", 400, "Bad request"),
])
def test_malformed_bodies_get_json_client_errors(request_bytes: bytes, status: int, message: str) -> None:
    with serving(Config(max_body_bytes=4096, timeout_s=5.0)) as (url, service):
        out, took = raw(url, request_bytes)
        got, body = status_and_body(out)
        assert got == status and message in body["error"]["message"]
        assert took < 2.5  # closed at once (the client sent Connection: close), not after the 5 s idle timeout
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == status
        assert service.sampler.calls == []


def test_a_client_error_after_a_complete_body_keeps_the_connection() -> None:
    with serving(Config(timeout_s=5.0)) as (url, service):
        out, took = raw(url, post(b'{"messages": "hi", "model": "x"}', "") + post(b"["))  # the second says close
        statuses = [int(part.split(b" ")[0]) for part in out.split(b"HTTP/1.1 ")[1:]]
        assert statuses == [404, 400] and service.sampler.calls == [] and took < 2.5


@pytest.mark.parametrize(("extra", "status", "message"), [
    ({"seed": -1}, 400, "'seed' must be an integer in [0, 9223372036854775807], got -1"),
    ({"seed": 2**63}, 400, "'seed'"),
    ({"seed": 1.5}, 400, "'seed'"),
    ({"seed": "7"}, 400, "'seed'"),
    ({"seed": True}, 400, "'seed'"),
    ({"n": 2.5}, 400, "'n' must be an integer"),
    ({"max_tokens": 0}, 400, "'max_tokens'"),
    ({"temperature": float("inf")}, 400, "'temperature'"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, 400, "messages[0].content"),  # a lone surrogate
    ({"model": "gpt-4o"}, 404, "model 'gpt-4o' is not served here; this server serves 'served'"),
    ({"model": "served", "seed": 2**63 - 1}, 200, ""),
    ({"model": None}, 200, ""),
])
def test_request_fields_are_checked_before_the_model_runs(extra: dict, status: int, message: str) -> None:
    with serving() as (url, service):
        resp = httpx.post(f"{url}/v1/chat/completions", content=json.dumps({**HI, **extra}),
                          headers={"Content-Type": "application/json"})
        assert resp.status_code == status
        if status != 200:
            assert message in resp.json()["error"]["message"] and service.sampler.calls == []
        else:
            assert resp.json()["model"] == "served" and len(service.sampler.calls) == 1


def test_sampling_settings_from_a_request() -> None:
    with serving(Config(max_tokens_limit=16, default_max_tokens=128)) as (url, service):
        for extra in ({"seed": 2**63 - 1, "temperature": 1e-30}, {"max_completion_tokens": 7, "temperature": 0.5}):
            assert httpx.post(f"{url}/v1/chat/completions", json={**HI, **extra}).status_code == 200
        first, second = service.sampler.calls
        # A vanishing temperature is greedy (dividing logits by 1e-30 overflows); the default is capped by the limit.
        assert (first.seed, first.temperature, first.max_new_tokens) == (2**63 - 1, 0.0, 16)
        assert (second.temperature, second.max_new_tokens) == (0.5, 7)


def test_prompt_plus_max_tokens_must_fit_the_context() -> None:
    words = {"messages": [{"role": "user", "content": " ".join(["w"] * 15)}]}  # 15 "tokens" for the counter below
    count = lambda messages: len(messages[-1]["content"].split())
    with serving(prompt_tokens=count, max_context=20) as (url, service):
        assert httpx.post(f"{url}/v1/chat/completions", json={**words, "max_tokens": 5}).status_code == 200
        resp = httpx.post(f"{url}/v1/chat/completions", json={**words, "max_tokens": 6})
        assert resp.status_code == 400 and resp.json()["error"]["message"] == (
            "the prompt is 15 tokens and max_tokens is 6: 21 > the model's context of 20 tokens; shorten the messages "
            "or lower max_tokens")
        assert len(service.sampler.calls) == 1
    with serving(Config(max_context=10), prompt_tokens=count, max_context=20) as (url, _):  # the config wins
        resp = httpx.post(f"{url}/v1/chat/completions", json={**words, "max_tokens": 1})
        assert resp.status_code == 400 and "16 > the model's context of 10 tokens" in resp.text


def test_a_prompt_longer_than_the_tiny_models_context_is_refused(tiny_server: str) -> None:
    # The tiny model has max_position_embeddings=512 (tests/conftest.py); tokenizer.model_max_length is a sentinel.
    body = {"messages": [{"role": "user", "content": "basil " * 600}], "max_tokens": 4}
    resp = httpx.post(f"{tiny_server}/v1/chat/completions", json=body, timeout=60)
    message = resp.json()["error"]["message"]
    assert resp.status_code == 400 and "max_tokens is 4" in message and "the model's context of 512 tokens" in message
    prompt_tokens = int(message.split("the prompt is ")[1].split(" ")[0])
    assert prompt_tokens > 600


def test_model_context_prefers_the_model_config() -> None:
    from types import SimpleNamespace

    from align.errors import ModelError
    from align.stages.serve import model_context

    sentinel = SimpleNamespace(model_max_length=int(1e30))
    assert model_context(SimpleNamespace(config=SimpleNamespace(max_position_embeddings=8192)), sentinel) == 8192
    assert model_context(SimpleNamespace(config=SimpleNamespace(n_positions=1024)), sentinel) == 1024
    assert model_context(SimpleNamespace(config=None), SimpleNamespace(model_max_length=2048)) == 2048
    with pytest.raises(ModelError, match="set max_context"):
        model_context(SimpleNamespace(config=None), sentinel)


def test_a_full_queue_answers_429_with_retry_after() -> None:
    gate = threading.Event()
    sampler = RecordingSampler(gate)
    with serving(Config(max_queue=1), sampler) as (url, service):
        results: list[int] = []

        def call() -> None:
            results.append(httpx.post(f"{url}/v1/chat/completions", json=HI, timeout=30).status_code)

        threads = [threading.Thread(target=call) for _ in range(2)]
        threads[0].start()
        assert sampler.entered.wait(10)  # the first request is generating (and holds the model)
        threads[1].start()
        deadline = time.monotonic() + 10
        while service.in_flight < 2 and time.monotonic() < deadline:  # the second waits in the queue
            time.sleep(0.01)
        assert service.in_flight == 2
        t0 = time.monotonic()
        resp = httpx.post(f"{url}/v1/chat/completions", json=HI)
        assert resp.status_code == 429 and time.monotonic() - t0 < 2
        assert int(resp.headers["Retry-After"]) >= 1 and "busy" in resp.json()["error"]["message"]
        gate.set()
        for t in threads:
            t.join(30)
        assert results == [200, 200] and len(sampler.calls) == 2 and service.in_flight == 0
        assert httpx.post(f"{url}/v1/chat/completions", json=HI).status_code == 200


def test_too_many_connections_get_503() -> None:
    with serving(Config(max_connections=1, timeout_s=10)) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))):  # holds the only connection slot, sending nothing
            deadline, out = time.monotonic() + 10, b""
            while b" 503 " not in out and time.monotonic() < deadline:  # until the idle one's handler runs
                out = raw(url, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[0]
            assert b" 503 " in out and b"Retry-After: 1" in out and b"too many open connections (1)" in out
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the slot is free again once the idle client has gone
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            time.sleep(0.05)
        assert httpx.get(f"{url}/health").status_code == 200


def test_bearer_key_from_the_environment(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from align.stages.serve import api_key

    monkeypatch.setenv("SERVE_TEST_KEY", SECRET)
    cfg = Config(api_key_env="SERVE_TEST_KEY", host="0.0.0.0")
    with serving(cfg, api_key=api_key(cfg)) as (url, service):
        chat = f"{url}/v1/chat/completions"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": SECRET},
                        {"Authorization": f"Basic {SECRET}"}, {"Authorization": f"Bearer {SECRET}x"}):
            resp = httpx.post(chat, json=HI, headers=headers)
            assert resp.status_code == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
            assert "Authorization: Bearer <key>" in resp.json()["error"]["message"] and SECRET not in resp.text
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200  # liveness probes need no key
        good = {"Authorization": f"Bearer {SECRET}"}
        assert httpx.post(chat, json=HI, headers=good).status_code == 200
        assert httpx.get(f"{url}/v1/models", headers=good).json()["data"][0]["id"] == "served"
        assert len(service.sampler.calls) == 1
    printed = capsys.readouterr()  # the access log is on stderr (align.log), the banner on stdout
    assert SECRET not in printed.out and SECRET not in printed.err


def test_network_hosts_need_a_key_unless_explicitly_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    from align.errors import ConfigError
    from align.stages.serve import check_config, run

    monkeypatch.delenv("SERVE_UNSET_KEY", raising=False)
    monkeypatch.setenv("SERVE_TEST_KEY", SECRET)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_config(Config(host=host))
    check_config(Config(host="0.0.0.0", api_key_env="SERVE_TEST_KEY"))
    check_config(Config(host="0.0.0.0", allow_no_auth_on_network=True))
    for host in ("0.0.0.0", "", "192.168.1.5", "myhost.local", "::"):
        with pytest.raises(ConfigError, match="without authentication; set api_key_env"):
            check_config(Config(host=host))
    with pytest.raises(ConfigError, match="api_key_env=SERVE_UNSET_KEY but that environment variable is not set"):
        check_config(Config(api_key_env="SERVE_UNSET_KEY"))
    # Refused before any model is looked for (this model folder does not exist).
    with pytest.raises(ConfigError, match="without authentication"):
        run(Config(host="0.0.0.0", model="/no/such/model"))
