"""Judges are hardened (issue 12): specs cannot call arbitrary code, every HTTP fault is a counted failure, keys
never reach disk, the cache ignores transport settings, unreachable endpoints and failing judges stop the stage."""

from __future__ import annotations

import dataclasses
import json
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from align.config import load_config
from align.errors import AlignError, ConfigError, DataError
from align.judges import Verdict, redact
from align.judges.registry import load_judge

ROOT = Path(__file__).resolve().parent.parent
SECRET = "sk-live-7f3a9c1e-NEVER-STORE"

# ---- specs are code: only judge classes are built ----


@pytest.mark.parametrize("kind", ["subprocess:run", "os:system", "subprocess:Popen", "builtins:eval"])
def test_a_spec_naming_a_function_or_non_judge_class_is_refused_and_nothing_runs(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "marker"
    spec = tmp_path / "evil.yaml"
    # Were the object called with the spec's options, subprocess.run(args=[...]) would create the marker.
    spec.write_text(f"kind: {kind}\nargs: [touch, {marker}]\n")
    with pytest.raises(ConfigError, match="not a judge class|must define exactly one"):
        load_judge(spec)
    with pytest.raises(ConfigError, match="not a judge class|must define exactly one"):
        load_judge(kind)  # judge=subprocess:run on the command line
    assert not marker.exists()


def test_an_entry_point_naming_a_function_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "marker"
    (tmp_path / "evil_judges.py").write_text(
        f"from pathlib import Path\n\ndef make(**options):\n    Path({str(marker)!r}).touch()\n")
    dist = tmp_path / "evil_judges-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: evil-judges\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[align.judges]\nevil_ep = evil_judges:make\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="not a judge class"):
        load_judge("evil_ep")
    assert not marker.exists()


def test_readme_says_specs_are_code() -> None:
    text = (ROOT / "judges/README.md").read_text()
    assert "run only recipes you trust" in text and "reward.function" in text and "rules" in text


# ---- a scripted OpenAI-compatible server ----

Reply = tuple[int, dict[str, str], bytes]


class FakeServer:
    """Answers each POST with `respond(body, headers)`; records every request body."""

    def __init__(self, respond: Callable[[dict, dict], Reply]) -> None:
        self.respond, self.bodies = respond, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.bodies.append(body)
                status, headers, payload = server.respond(body, dict(self.headers))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def completion(text: str, logprobs: dict | None = None) -> Reply:
    body = {"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                      "finish_reason": "stop", "logprobs": logprobs}]}
    return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()


def shorter(body: dict) -> str:
    text = body["messages"][-1]["content"]
    a = text.split("[Response A]\n")[1].split("\n\n[Response B]")[0]
    b = text.split("[Response B]\n")[1].split("\n\n")[0]
    return "Verdict: A" if len(a) < len(b) else "Verdict: B" if len(b) < len(a) else "Verdict: tie"


@pytest.fixture
def server_factory() -> Iterator[Callable[[Callable[[dict, dict], Reply]], FakeServer]]:
    servers: list[FakeServer] = []

    def make(respond: Callable[[dict, dict], Reply]) -> FakeServer:
        servers.append(FakeServer(respond))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def openai_spec(tmp_path: Path, url: str, **extra) -> Path:
    options = {"name": "remote", "kind": "openai", "base_url": url, "model": "m", "max_retries": 2,
               "backoff_s": 0.01, "max_backoff_s": 0.05, "timeout_s": 5.0, "concurrency": 2, "logprobs": False,
               **extra}
    spec = tmp_path / "remote.yaml"
    spec.write_text(json.dumps(options))  # JSON is YAML
    return spec


Q = [{"role": "user", "content": "How long to boil an egg?"}]


# ---- every fault is a counted failure ----

@pytest.mark.parametrize("value", ["nan", "inf", "-5", "1e308", "soon", "Wed, 21 Oct 2015 07:28:00 GMT", ""])
def test_retry_delay_is_finite_and_bounded_for_any_retry_after(value: str) -> None:
    from align.judges.openai import Config, retry_delay

    cfg = Config(model="m", backoff_s=0.5, max_backoff_s=7.0)
    for attempt in (0, 3, 10_000):
        delay = retry_delay(attempt, cfg, value)
        assert math.isfinite(delay) and 0.0 <= delay <= 7.0
    assert retry_delay(0, cfg, "1e308") == 7.0 and retry_delay(0, cfg, "inf") == 7.0  # huge: the cap
    assert 0.5 <= retry_delay(0, cfg, "nan") <= 0.625  # unusable: our own backoff


def test_nan_retry_after_and_undecodable_bodies_are_counted_failures(tmp_path: Path, server_factory) -> None:
    def respond(body: dict, headers: dict) -> Reply:
        text = body["messages"][-1]["content"]
        if "NAN" in text:
            return 429, {"Retry-After": "nan"}, b'{"error": "slow down"}'
        if "GZIP" in text:  # claims gzip, is not: httpx raises DecodingError while reading the body
            return 200, {"Content-Encoding": "gzip", "Content-Type": "application/json"}, b"not gzip at all"
        if "LATIN" in text:  # not UTF-8 JSON
            return 200, {"Content-Type": "application/json"}, b'{"choices": "\xff\xfe"}'
        return completion(shorter(body))

    server = server_factory(respond)
    judge = load_judge(openai_spec(tmp_path, server.url)).judge
    pairs = [("NAN one", "two"), ("GZIP", "xy"), ("LATIN a", "b"), ("short", "longer one")]
    verdicts = judge.judge([Q] * 4, pairs)
    assert [v.failed for v in verdicts] == [True, True, True, False] and verdicts[3].winner == "a"
    assert "HTTP 429" in verdicts[0].error and "after 2 retries" in verdicts[0].error
    assert "DecodingError" in verdicts[1].error
    assert "malformed reply" in verdicts[2].error


def test_an_echoed_key_is_redacted_everywhere(tmp_path: Path, server_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import write_jsonl

    from align.stages.judge import Config, run

    def respond(body: dict, headers: dict) -> Reply:
        text = body["messages"][-1]["content"]
        echo = json.dumps({"you sent": {"authorization": headers.get("Authorization")}})
        if "ECHO500" in text:
            return 500, {}, echo.encode()  # long enough that truncation would cut through the key
        if "ECHO400" in text:
            return 400, {}, ("x" * 150 + echo).encode()  # the key straddles the 200-char cut
        return completion(f"{shorter(body)} (I was called with {headers.get('Authorization')})")

    server = server_factory(respond)
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    spec = openai_spec(tmp_path, server.url, api_key_env="JUDGE_TEST_KEY")
    samples = write_jsonl(tmp_path / "samples.jsonl", [
        {"id": f"p{i}", "prompt": [{"role": "user", "content": f"q{i}"}], "responses": list(r)}
        for i, r in enumerate([("ECHO500 a", "b"), ("ECHO400 a", "b"), ("short", "much longer")])])
    cfg = load_config(Config, ROOT / "stages/tiny/judge.yaml", [f"samples={samples}", f"output_dir={tmp_path / 'run'}",
                                                              f"judge={spec}", "max_failure_rate=1.0"])
    out = run(cfg)
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert len(failures) == 2 and all("[REDACTED]" in f["error"] for f in failures)
    assert "called with Bearer [REDACTED]" in (out / "verdicts.jsonl").read_text()  # an echo in the answer text
    for path in out.rglob("*"):
        text = path.read_text(errors="ignore") if path.is_file() else ""
        assert SECRET not in text and SECRET[:10] not in text, path  # not even a truncated prefix
    assert redact(f"Authorization: Bearer {SECRET}", [SECRET]) == "Authorization: Bearer [REDACTED]"


# ---- the cache keys on what determines the verdict ----

def test_changing_transport_settings_reuses_the_cache(tmp_path: Path, server_factory) -> None:
    from conftest import write_jsonl

    from align.runs import read_manifest
    from align.stages.judge import Config, run

    server = server_factory(lambda body, headers: completion(shorter(body)))
    spec = openai_spec(tmp_path, server.url)
    samples = write_jsonl(tmp_path / "samples.jsonl", [
        {"id": f"p{i}", "prompt": [{"role": "user", "content": f"q{i}"}], "responses": [f"answer {i}", "a longer one"]}
        for i in range(3)])
    cfg = load_config(Config, ROOT / "stages/tiny/judge.yaml", [
        f"samples={samples}", f"output_dir={tmp_path / 'run1'}", f"judge={spec}", f"cache_dir={tmp_path / 'cache'}"])
    first = run(cfg)
    assert len(server.bodies) == 6  # 3 pairs x 2 orders
    transport = {"timeout_s": 99.0, "max_retries": 0, "backoff_s": 3.0, "max_backoff_s": 9.0, "concurrency": 1,
                 "base_url": server.url + "/"}
    again = run(dataclasses.replace(cfg, output_dir=str(tmp_path / "run2"), judge_options=transport))
    assert len(server.bodies) == 6 and read_manifest(again)["metrics"]["cached_judgements"] == 3
    assert read_manifest(again)["judge"]["id"] == read_manifest(first)["judge"]["id"]
    assert (again / "preferences.jsonl").read_text() == (first / "preferences.jsonl").read_text()
    # What the verdict depends on does change the key: new criteria re-judge everything.
    run(dataclasses.replace(cfg, output_dir=str(tmp_path / "run3"), judge_options={"criteria": "brevity"}))
    assert len(server.bodies) == 12


def test_editing_the_template_text_changes_the_judge_identity(tmp_path: Path) -> None:
    template = tmp_path / "t.jinja"
    template.write_text("{{ question }} A: {{ response_a }} B: {{ response_b }} Verdict?")
    spec = tmp_path / "s.yaml"
    spec.write_text(f"kind: openai\nmodel: m\ntemplate: {template}\n")
    before = load_judge(spec).id
    template.write_text("{{ question }} First: {{ response_a }} Second: {{ response_b }} Verdict?")
    assert load_judge(spec).id != before


# ---- fail fast and fail loudly ----

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_endpoint_is_one_clear_error(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}/v1"
    judge = load_judge(openai_spec(tmp_path, url, max_retries=4, backoff_s=2.0, max_backoff_s=10.0)).judge
    started = time.monotonic()
    with pytest.raises(AlignError, match=f"cannot connect to {url}"):
        judge.judge([Q] * 8, [("a", "b")] * 8)
    assert time.monotonic() - started < 3.0  # not 4 retries x 2-10 s per pair
    assert judge.calls <= 2  # one per worker at most, no retries


FLAKY = {"broken": True, "calls": 0}


class FlakyJudge:
    """Pairwise test judge that fails every pair while FLAKY['broken'], else prefers the shorter response."""

    def judge(self, prompts, response_pairs):
        FLAKY["calls"] += len(response_pairs)
        if FLAKY["broken"]:
            return [Verdict("abstain", error="endpoint says no") for _ in response_pairs]
        return [Verdict("a" if len(a) < len(b) else "b") for a, b in response_pairs]


def samples_file(tmp_path: Path) -> Path:
    from conftest import write_jsonl

    return write_jsonl(tmp_path / "samples.jsonl", [
        {"id": f"p{i}", "prompt": [{"role": "user", "content": f"q{i}"}], "responses": ["x" * (i + 1), "yy" * (i + 1)]}
        for i in range(4)])


def test_a_judge_that_always_fails_fails_the_stage_and_resume_finishes_it(tmp_path: Path) -> None:
    from align.data.records import read_preferences
    from align.runs import read_manifest
    from align.stages.judge import Config, run

    cfg = load_config(Config, ROOT / "stages/tiny/judge.yaml", [
        f"samples={samples_file(tmp_path)}", f"output_dir={tmp_path / 'run'}", "judge=test_judge_safety:FlakyJudge"])
    assert cfg.max_failure_rate == 0.2
    FLAKY.update(broken=True, calls=0)
    with pytest.raises(AlignError, match=r"4 of 4 judgements failed \(100% > max_failure_rate=0.2\)"):
        run(cfg)
    manifest = read_manifest(tmp_path / "run")
    assert manifest["status"] == "failed" and manifest["metrics"]["failed_judgements"] == 4
    assert len((tmp_path / "run/failures.jsonl").read_text().splitlines()) == 4  # written before failing
    FLAKY.update(broken=False, calls=0)
    out = run(dataclasses.replace(cfg, resume=True))
    assert read_manifest(out)["status"] == "completed" and FLAKY["calls"] == 4
    assert len(read_preferences(out / "preferences.jsonl")) == 4
    with pytest.raises(ConfigError, match="max_failure_rate"):
        load_config(Config, ROOT / "stages/tiny/judge.yaml", ["max_failure_rate=1.5"])


def test_human_pairs_are_resolved_before_anything_is_judged(tmp_path: Path) -> None:
    from conftest import write_jsonl

    from align.stages.judge import Config, run

    samples = samples_file(tmp_path)
    base = [f"samples={samples}", f"output_dir={tmp_path / 'run'}", "judge=test_judge_safety:FlakyJudge"]
    FLAKY.update(broken=False, calls=0)
    with pytest.raises(DataError, match="human preferences .*missing.jsonl not found"):
        run(load_config(Config, ROOT / "stages/tiny/judge.yaml", [*base, f"human={tmp_path / 'missing.jsonl'}"]))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "not messages"}])
    with pytest.raises(DataError, match="bad.jsonl:1"):
        run(load_config(Config, ROOT / "stages/tiny/judge.yaml", [*base, f"human={bad}"]))
    # A run folder of the wrong stage (here: a judge run) is refused by the shared resolver.
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"stage": "judge", "status": "completed", "outputs": {}}))
    with pytest.raises(DataError, match="is a judge run; expected the run folder of import or preferences"):
        run(load_config(Config, ROOT / "stages/tiny/judge.yaml", [*base, f"human={other}"]))
    with pytest.raises(DataError, match="is a judge run; expected the run folder of generate"):
        run(load_config(Config, ROOT / "stages/tiny/judge.yaml", [f"samples={other}", *base[1:]]))
    assert FLAKY["calls"] == 0 and not (tmp_path / "run").exists()


def test_the_cli_reports_an_unreachable_endpoint_in_one_line_and_marks_the_run_failed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from align.cli import main
    from align.runs import read_manifest

    url = f"http://127.0.0.1:{closed_port()}/v1"
    spec = openai_spec(tmp_path, url, max_retries=4, backoff_s=2.0)
    code = main(["judge", str(ROOT / "stages/tiny/judge.yaml"), f"samples={samples_file(tmp_path)}",
                 f"output_dir={tmp_path / 'run'}", f"judge={spec}"])
    err = capsys.readouterr().err.strip().splitlines()
    # status lines are logged to stderr too: the error is the last line, one line, no traceback
    assert code == 2 and err[-1].startswith("align judge: error") and f"cannot connect to {url}" in err[-1]
    assert not any("Traceback" in line for line in err)
    assert read_manifest(tmp_path / "run")["status"] == "failed"
