"""`openai` judge: any OpenAI-compatible chat-completions endpoint (a vLLM or llama.cpp server, `align serve`,
a hosted API) judges pairs with the same prompt template and both-orders rule as the `llm` judge.

The API key is read from the environment variable named in the spec; it is never printed or saved (every error
and answer text is passed through `redact` before it is kept). Calls time out, retry with exponential backoff on
429 / 5xx / timeouts / dropped connections / garbled replies (bounded; a server's Retry-After is clamped to
[0, max_backoff_s]), and run on a small thread pool. A call that still fails is returned as a failure for that
pair, never a verdict; only an endpoint that refuses the very first connection stops the run (one clear error).

Optional: `constrain` asks the server to constrain the answer (`json_schema`: OpenAI-style `response_format`,
understood by vLLM, llama.cpp and OpenAI; `choice`: vLLM's `structured_outputs.choice`), and `logprobs` asks
for the top log-probabilities of the answer tokens, from which the verdict gets a confidence. A server that
ignores either still answers in text, which is parsed as usual.
"""

from __future__ import annotations

import email.utils
import math
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from align.config import opt
from align.data.records import Message
from align.errors import AlignError, ConfigError
from align.judges import Verdict, redact
from align.judges.parse import parse_verdict
from align.judges.prompted import Answer, CallError, PairPrompt, find_template, judge_pairs, prompt_identity

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
# Settings that change how a verdict is fetched, not what it is: the judge cache ignores them.
TRANSPORT = ("base_url", "api_key_env", "timeout_s", "max_retries", "backoff_s", "max_backoff_s", "concurrency")
CHOICES = ["A", "B", "tie"]
VERDICT_SCHEMA = {"type": "object", "properties": {"verdict": {"type": "string", "enum": CHOICES}},
                  "required": ["verdict"], "additionalProperties": False}
ERROR_CHARS = 200  # how much of a server's error body is kept (after redaction)


@dataclass(frozen=True)
class Config:
    base_url: str = opt("http://127.0.0.1:8000/v1", "endpoint root (the part before /chat/completions)")
    model: str = opt("", "model name sent in each request (required)")
    api_key_env: str = opt("", "environment variable holding the API key ('' : send no key)")
    template: str = opt("pairwise.jinja", "Jinja prompt template (a path, or a name under judges/)")
    system: str = opt("", "optional system message for the judge")
    criteria: str = opt("", "what 'better' means, passed to the template as `criteria`")
    both_orders: bool = opt(True, "judge each pair as (a, b) and (b, a); abstain when the orders disagree")
    temperature: float = opt(0.0, "judge sampling temperature", ge=0.0, le=2.0)
    max_tokens: int = opt(64, "longest judge answer in tokens", ge=1)
    constrain: Literal["none", "json_schema", "json_object", "choice"] = opt(
        "none", "ask the server to constrain the answer: none | json_schema (response_format with a "
                "{\"verdict\": \"A\"|\"B\"|\"tie\"} schema: vLLM, llama-server, OpenAI) | json_object (the same "
                "schema as {type: json_object, schema}: llama-cpp-python's server, llama-server) | choice (exactly "
                "A, B or tie: vLLM >= 0.10.2 structured_outputs)")
    logprobs: bool = opt(True, "request top log-probabilities (logprobs/top_logprobs) to give each verdict a "
                               "confidence; servers that ignore it still work")
    top_logprobs: int = opt(5, "alternatives per answer token when logprobs is on", ge=1, le=20)
    min_confidence: float = opt(0.0, "abstain when the confidence (the probability of the picked side, 0.5..1, "
                                     "averaged over both orders; only known with logprobs) is below this",
                                ge=0.0, le=1.0)
    timeout_s: float = opt(60.0, "seconds before one HTTP call is abandoned (then retried)", gt=0.0, le=3600.0)
    max_retries: int = opt(4, "retries per call after the first try (429, 5xx, timeouts, dropped connections, "
                              "garbled replies)", ge=0, le=20)
    backoff_s: float = opt(1.0, "first retry delay; doubles each retry, with jitter", ge=0.0, le=600.0)
    max_backoff_s: float = opt(30.0, "longest single retry delay (a server's Retry-After is honoured up to this)",
                               ge=0.0, le=3600.0)
    concurrency: int = opt(4, "parallel requests", ge=1, le=256)


def server_delay(value: str | None) -> float | None:
    """Seconds asked for by a Retry-After header (delta-seconds or an HTTP date); inf for an absurdly large
    value; None when absent, negative, NaN or unreadable (the caller then uses its own backoff)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = max((when - datetime.now(timezone.utc)).total_seconds(), 0.0)
    if math.isnan(seconds) or seconds < 0:
        return None
    return seconds


def retry_delay(attempt: int, cfg: Config, retry_after: str | None = None) -> float:
    """Seconds to wait before retry number `attempt` (0-based): the server's Retry-After if usable, else
    backoff * 2^attempt jittered by up to 25% (so parallel callers do not retry in lockstep); always finite and
    within [0, max_backoff_s]."""
    cap = cfg.max_backoff_s if math.isfinite(cfg.max_backoff_s) and cfg.max_backoff_s >= 0 else 60.0
    asked = server_delay(retry_after)
    delay = asked if asked is not None else cfg.backoff_s * 2.0 ** min(attempt, 32) * (1 + 0.25 * random.random())
    return min(delay, cap) if delay >= 0 and not math.isnan(delay) else cap


class OpenAIJudge:
    """PairwiseJudge over an OpenAI-compatible endpoint. `calls` and `retries` count HTTP requests made."""

    Config = Config

    def __init__(self, cfg: Config) -> None:
        import httpx

        if not cfg.model:
            raise ConfigError("openai judge: set `model` (the name the endpoint serves, e.g. from GET /v1/models)")
        if not cfg.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"openai judge: base_url {redact(cfg.base_url)!r} must start with http:// or "
                              f"https:// (e.g. http://127.0.0.1:8000/v1)")
        headers = {"Content-Type": "application/json"}
        self.secrets: tuple[str, ...] = ()
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise ConfigError(f"openai judge: environment variable {cfg.api_key_env} is not set; export the API "
                                  f"key there (or set api_key_env: '' for a server without keys)")
            headers["Authorization"] = f"Bearer {key}"
            self.secrets = (key,)
        self.cfg = cfg
        self.prompt = PairPrompt(find_template(cfg.template), cfg.system, cfg.criteria)
        self.client = httpx.Client(base_url=cfg.base_url.rstrip("/"), headers=headers, timeout=cfg.timeout_s)
        self.calls = 0
        self.retries = 0
        self.reached = False  # set by the first HTTP response: until then a refused connection is fatal
        self.unreachable: AlignError | None = None  # that fatal error, so queued calls stop without trying
        self._count = threading.Lock()

    def identity(self) -> dict[str, Any]:
        """What determines the verdicts (the cache key): not the endpoint address, key, timeouts or retries."""
        return prompt_identity(self.cfg, TRANSPORT, self.prompt)

    def clean(self, text: str) -> str:
        return redact(text, self.secrets)

    def request(self, messages: list[Message]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.cfg.model, "messages": messages, "temperature": self.cfg.temperature,
                                "max_tokens": self.cfg.max_tokens}
        if self.cfg.constrain == "json_schema":
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "verdict", "strict": True, "schema": VERDICT_SCHEMA}}
        elif self.cfg.constrain == "json_object":  # llama-cpp-python 0.3 refuses type json_schema (HTTP 500)
            body["response_format"] = {"type": "json_object", "schema": VERDICT_SCHEMA}
        elif self.cfg.constrain == "choice":
            body["structured_outputs"] = {"choice": CHOICES}
        if self.cfg.logprobs:
            body.update(logprobs=True, top_logprobs=self.cfg.top_logprobs)
        return body

    def chat(self, messages: list[Message]) -> Answer | CallError:
        """One chat completion with bounded retries; a CallError (returned) when it still fails. Raises only when
        the endpoint cannot be reached at all on the first call."""
        import httpx

        body = self.request(messages)
        problem = ""
        for attempt in range(self.cfg.max_retries + 1):
            if self.unreachable is not None:
                raise self.unreachable
            with self._count:
                self.calls += 1
                self.retries += attempt > 0
            retry_after = None
            try:
                resp = self.client.post("/chat/completions", json=body)
                status, text = resp.status_code, resp.text
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                if not self.reached:
                    self.unreachable = AlignError(
                        f"openai judge: cannot connect to {self.clean(self.cfg.base_url)} ({type(e).__name__}: "
                        f"{self.clean(str(e))[:ERROR_CHARS]}); start the server (align serve, vllm serve, "
                        f"llama-server) or fix base_url in the judge spec")
                    raise self.unreachable from None
                problem = f"connection error: {type(e).__name__}"
            except httpx.TimeoutException:
                problem = f"timed out after {self.cfg.timeout_s:g}s"
            except (httpx.HTTPError, httpx.StreamError, httpx.InvalidURL, ValueError, OSError) as e:
                # dropped connections, protocol errors, undecodable bodies (httpx.DecodingError), bad charsets
                problem = f"transport error: {type(e).__name__}: {self.clean(str(e))[:ERROR_CHARS]}"
            else:
                self.reached = True
                if status == 200:
                    answer = reply_answer(resp, self.clean)
                    if isinstance(answer, Answer):
                        return answer
                    problem = str(answer)  # a garbled body is usually transient (a proxy, an overloaded server)
                else:
                    problem = f"HTTP {status}: {self.clean(text)[:ERROR_CHARS]}"
                    if status not in RETRY_STATUS:
                        return CallError(problem)  # 400/401/404...: retrying will not help
                    retry_after = resp.headers.get("retry-after")
            if attempt < self.cfg.max_retries:
                time.sleep(retry_delay(attempt, self.cfg, retry_after))
        return CallError(f"{problem} (after {self.cfg.max_retries} retries)")

    def complete(self, chats: list[list[Message]]) -> list[Answer | CallError]:
        pool = ThreadPoolExecutor(max_workers=max(1, self.cfg.concurrency))
        try:
            return list(pool.map(self.chat, chats))
        finally:  # on a fatal error, drop the queued calls instead of making each of them fail in turn
            pool.shutdown(wait=True, cancel_futures=True)

    def judge(self, prompts: list[list[Message]], response_pairs: list[tuple[str, str]]) -> list[Verdict]:
        return judge_pairs(self.complete, self.prompt, prompts, response_pairs, self.cfg.both_orders,
                           min_confidence=self.cfg.min_confidence)


def reply_answer(resp: Any, clean: Any = redact) -> Answer | CallError:
    """The first choice's text (redacted by `clean`) and, when the reply carries log-probabilities, the
    probability that the first shown response ("A") is better; a malformed reply is a CallError."""
    try:
        choice = resp.json()["choices"][0]
        content = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return CallError(f"malformed reply (not a chat completion): {clean(resp.text)[:ERROR_CHARS]!r}")
    if not isinstance(content, str):
        return CallError(f"malformed reply: message content is {type(content).__name__}, not text")
    text = clean(content)
    logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
    return Answer(text, p_first=first_letter_probability(logprobs, text))


_LETTER_STRIP = " \t\r\n\"'*()[]{}.,:;`"


def first_letter_probability(logprobs: Any, text: str) -> float | None:
    """P("A") / (P("A") + P("B")) at the answer token that spells the parsed verdict's letter, from an OpenAI
    `logprobs` object ({"content": [{"token", "logprob", "top_logprobs": [...]}, ...]}); None when the verdict
    is a tie or unreadable, or the reply has no usable log-probabilities."""
    letter = {"a": "A", "b": "B"}.get(parse_verdict(text) or "")
    if letter is None or not isinstance(logprobs, dict) or not isinstance(logprobs.get("content"), list):
        return None
    for entry in logprobs["content"]:
        if not isinstance(entry, dict) or str(entry.get("token", "")).strip(_LETTER_STRIP) != letter:
            continue
        mass = {"A": 0.0, "B": 0.0}
        seen: set[str] = set()
        for alt in [entry, *(entry.get("top_logprobs") or [])]:
            token, logprob = (alt.get("token"), alt.get("logprob")) if isinstance(alt, dict) else (None, None)
            side = str(token).strip(_LETTER_STRIP)
            if side in mass and token not in seen and isinstance(logprob, (int, float)) and math.isfinite(logprob):
                seen.add(token)
                mass[side] += math.exp(min(logprob, 0.0))
        total = mass["A"] + mass["B"]
        return mass["A"] / total if total > 0 else None
    return None
