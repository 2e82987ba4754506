"""`openai` judge: any OpenAI-compatible chat-completions endpoint (a vLLM or llama.cpp server, `align serve`,
a hosted API) judges pairs with the same prompt template and both-orders rule as the `llm` judge.

The API key is read from the environment variable named in the spec and is never printed or saved. Calls time
out, retry with exponential backoff on 429 / 5xx / timeouts / dropped connections / garbled replies (bounded),
and run on a small thread pool. A call that still fails is returned as a failure for that pair, never a verdict.
"""

from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from align.config import opt
from align.data.records import Message
from align.errors import ConfigError
from align.judges import Verdict
from align.judges.prompted import CallError, PairPrompt, find_template, judge_pairs

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Config:
    base_url: str = opt("http://127.0.0.1:8000/v1", "endpoint root (the part before /chat/completions)")
    model: str = opt("", "model name sent in each request (required)")
    api_key_env: str = opt("", "environment variable holding the API key ('' : send no key)")
    template: str = opt("pairwise.jinja", "Jinja prompt template (a path, or a name under judges/)")
    system: str = opt("", "optional system message for the judge")
    criteria: str = opt("", "what 'better' means, passed to the template as `criteria`")
    both_orders: bool = opt(True, "judge each pair as (a, b) and (b, a); abstain when the orders disagree")
    temperature: float = opt(0.0, "judge sampling temperature")
    max_tokens: int = opt(64, "longest judge answer in tokens")
    timeout_s: float = opt(60.0, "seconds before one HTTP call is abandoned (then retried)")
    max_retries: int = opt(4, "retries per call after the first try (429, 5xx, timeouts, dropped connections, "
                                 "garbled replies)")
    backoff_s: float = opt(1.0, "first retry delay; doubles each retry, with jitter")
    max_backoff_s: float = opt(30.0, "longest single retry delay (a server's Retry-After is honoured up to this)")
    concurrency: int = opt(4, "parallel requests")


def retry_delay(attempt: int, cfg: Config, retry_after: str | None = None) -> float:
    """Seconds to wait before retry number `attempt` (0-based): Retry-After if given, else backoff * 2^attempt,
    jittered by up to 25% so parallel callers do not retry in lockstep; capped at max_backoff_s."""
    if retry_after is not None:
        try:
            return min(max(float(retry_after), 0.0), cfg.max_backoff_s)
        except ValueError:
            pass
    return min(cfg.backoff_s * (2 ** attempt) * (1 + 0.25 * random.random()), cfg.max_backoff_s)


class OpenAIJudge:
    """PairwiseJudge over an OpenAI-compatible endpoint. `calls` and `retries` count HTTP requests made."""

    Config = Config

    def __init__(self, cfg: Config) -> None:
        import httpx

        if not cfg.model:
            raise ConfigError("openai judge: set `model` (the name the endpoint serves, e.g. from GET /v1/models)")
        headers = {"Content-Type": "application/json"}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise ConfigError(f"openai judge: environment variable {cfg.api_key_env} is not set; export the API "
                                  f"key there (or set api_key_env: '' for a server without keys)")
            headers["Authorization"] = f"Bearer {key}"
        self.cfg = cfg
        self.prompt = PairPrompt(find_template(cfg.template), cfg.system, cfg.criteria)
        self.client = httpx.Client(base_url=cfg.base_url.rstrip("/"), headers=headers, timeout=cfg.timeout_s)
        self.calls = 0
        self.retries = 0
        self._count = threading.Lock()

    def chat(self, messages: list[Message]) -> str | CallError:
        """One chat completion with bounded retries; a CallError (returned) when it still fails."""
        import httpx

        body: dict[str, Any] = {"model": self.cfg.model, "messages": messages, "temperature": self.cfg.temperature,
                                "max_tokens": self.cfg.max_tokens}
        problem = ""
        for attempt in range(self.cfg.max_retries + 1):
            with self._count:
                self.calls += 1
                self.retries += attempt > 0
            retry_after = None
            try:
                resp = self.client.post("/chat/completions", json=body)
            except httpx.TimeoutException:
                problem = f"timed out after {self.cfg.timeout_s:g}s"
            except httpx.TransportError as e:
                problem = f"connection error: {type(e).__name__}"
            else:
                if resp.status_code == 200:
                    content = _content(resp)
                    if isinstance(content, str):
                        return content
                    problem = str(content)  # a garbled body is usually transient (a proxy, an overloaded server)
                else:
                    problem = f"HTTP {resp.status_code}: {resp.text[:200]}"
                    if resp.status_code not in RETRY_STATUS:
                        return CallError(problem)  # 400/401/404...: retrying will not help
                    retry_after = resp.headers.get("retry-after")
            if attempt < self.cfg.max_retries:
                time.sleep(retry_delay(attempt, self.cfg, retry_after))
        return CallError(f"{problem} (after {self.cfg.max_retries} retries)")

    def complete(self, chats: list[list[Message]]) -> list[str | CallError]:
        with ThreadPoolExecutor(max_workers=max(1, self.cfg.concurrency)) as pool:
            return list(pool.map(self.chat, chats))

    def judge(self, prompts: list[list[Message]], response_pairs: list[tuple[str, str]]) -> list[Verdict]:
        return judge_pairs(self.complete, self.prompt, prompts, response_pairs, self.cfg.both_orders)


def _content(resp: Any) -> str | CallError:
    """The first choice's message text of a 200 reply; a malformed reply is a CallError."""
    try:
        content = resp.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return CallError(f"malformed reply (not a chat completion): {resp.text[:200]!r}")
    if not isinstance(content, str):
        return CallError(f"malformed reply: message content is {type(content).__name__}, not text")
    return content
