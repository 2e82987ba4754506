"""`align serve` (OpenAI-compatible) and the `openai` judge against it, through a fault-injecting proxy."""

from __future__ import annotations

import dataclasses
import json
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
                      [f"samples={samples}", f"output_dir={tmp_path / 'run'}", f"judge={spec}"])
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
    cfg = load_config(Config, ROOT / "stages/serve.yaml")
    assert cfg.host == "127.0.0.1"
