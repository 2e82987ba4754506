"""serve: an OpenAI-compatible chat server (/v1/chat/completions, /v1/models) over any model the pipeline made.

Runs on the hf backend with the standard library's ThreadingHTTPServer. Requests share one model, so generation
is serialised by a lock, one request at a time (not batched: a request's seed gives the same completion only when
it runs alone). For throughput on a GPU use `vllm serve` instead.

Protection against bad or hostile clients, each a Config field:
- `timeout_s`: every socket read/write times out, and a body must arrive within it, so an idle or slow client
  (or one that sends fewer bytes than its Content-Length) is answered 400 or dropped, never held forever;
  `max_connections` bounds open connections (more get 503), `max_body_bytes` the body (more get 413).
- every request is checked before it waits for the model: a bad field, a non-UTF-8 body, an out-of-range seed or
  a prompt + max_tokens longer than the model's context get 400 with the reason; a `model` other than the served
  one gets 404; when `max_queue` requests already wait, 429 with Retry-After.
- `api_key_env`: clients must send `Authorization: Bearer <key>` (compared in constant time; the key is never
  printed). Listening anywhere but loopback without a key is refused unless `allow_no_auth_on_network: true`.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO

from align.config import DTYPE_HELP, Dtype, opt
from align.data.records import Message, check_messages
from align.errors import ConfigError, DataError, ModelError
from align.generation import Sampler, SamplingSettings

log = logging.getLogger(__name__)

MAX_SEED = 2**63 - 1
GREEDY_BELOW = 1e-5  # a smaller temperature overflows the logits; decode greedily instead (as vLLM does)


@dataclass(frozen=True)
class Config:
    model: str = opt("default", "'default', a model or adapter folder, or a stage run folder (e.g. runs/dpo)")
    model_name: str = opt("", "id reported by /v1/models and in replies ('': the folder name); a request naming "
                              "another model gets 404 (omit `model` or send this id)")
    host: str = opt("127.0.0.1", "address to listen on; anything but loopback needs api_key_env (or "
                                 "allow_no_auth_on_network: true)")
    port: int = opt(8000, "port (0: any free port)", ge=0, le=65535)
    dtype: Dtype = opt("auto", DTYPE_HELP)
    trust_remote_code: bool = opt(False, "allow model code from the model folder")
    api_key_env: str = opt("", "environment variable holding the key clients must send as 'Authorization: Bearer "
                               "<key>' ('': no authentication, allowed on loopback only)")
    allow_no_auth_on_network: bool = opt(False, "serve a non-loopback host without a key (a network you trust)")
    max_tokens_limit: int = opt(512, "largest max_tokens a request may ask for", ge=1)
    max_n: int = opt(8, "largest n (completions per request)", ge=1)
    default_max_tokens: int = opt(128, "max_tokens when a request gives none (at most max_tokens_limit)", ge=1)
    batch_size: int = opt(8, "sequences per generate call when n > 1", ge=1)
    max_context: int = opt(0, "longest prompt + max_tokens in tokens (0: the model's max_position_embeddings)", ge=0)
    max_queue: int = opt(8, "requests that may wait while one generates; more get 429 with Retry-After", ge=0)
    max_connections: int = opt(64, "open connections; more are answered 503 and closed", ge=1)
    max_body_bytes: int = opt(4 << 20, "largest request body in bytes; larger gets 413", ge=1)
    timeout_s: float = opt(30.0, "seconds a client may stay silent (idle or mid-request), and the most a body may "
                                 "take to arrive; then it gets 400 or is dropped", gt=0)


class RequestError(DataError):
    """A client error: its HTTP status (400 unless said) and extra response headers."""

    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def error_body(status: int, message: str) -> dict[str, Any]:
    """An OpenAI-style error body."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "code": status}}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or '' (every interface)


def api_key(cfg: Config) -> str:
    """The key from the environment variable `cfg.api_key_env` ('' when auth is off). Never printed."""
    if not cfg.api_key_env:
        return ""
    key = os.environ.get(cfg.api_key_env, "")
    if not key.strip():
        raise ConfigError(f"api_key_env={cfg.api_key_env} but that environment variable is not set; export "
                          f"the key there (clients send 'Authorization: Bearer <key>')")
    return key


def check_config(cfg: Config) -> None:
    """The auth rule (and that the key is there), before the model loads."""
    if not api_key(cfg) and not is_loopback(cfg.host) and not cfg.allow_no_auth_on_network:
        raise ConfigError(f"host={cfg.host!r} exposes the server to the network without authentication; set "
                          f"api_key_env=<VAR> with the key in $VAR, or allow_no_auth_on_network=true on a network "
                          f"you trust, or host=127.0.0.1")


def authorized(header: str | None, key: str) -> bool:
    """`Authorization: Bearer <key>`, compared in constant time; always True when `key` is ''."""
    if not key:
        return True
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def model_context(model: Any, tokenizer: Any) -> int:
    """Longest sequence the model takes, from its config (tokenizer.model_max_length is often a huge sentinel)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(getattr(config, key, None), int) and getattr(config, key) > 0:
            return int(getattr(config, key))
    if 0 < getattr(tokenizer, "model_max_length", 0) < 1_000_000:
        return int(tokenizer.model_max_length)
    raise ModelError("the model's config gives no context length; set max_context=<tokens>")


class ChatService:
    """Turns OpenAI chat-completion request bodies into Sampler calls. Separate from HTTP so it is easy to test.

    `prompt_tokens(messages)` counts a prompt through the chat template; with it (and max_context > 0) prompt +
    max_tokens is checked against the context. `api_key` '' means no authentication.
    """

    def __init__(self, sampler: Sampler, model_name: str, cfg: Config = Config(), *, api_key: str = "",
                 prompt_tokens: Callable[[list[Message]], int] | None = None, max_context: int = 0) -> None:
        self.sampler = sampler
        self.model_name = model_name
        self.cfg = cfg
        self.api_key = api_key
        self.prompt_tokens = prompt_tokens
        self.max_context = cfg.max_context or max_context
        self.lock = threading.Lock()  # the model: one generate call at a time
        self.admit = threading.Lock()  # guards in_flight and seconds_per_request
        self.in_flight = 0  # the request generating plus those waiting for the lock
        self.seconds_per_request = 1.0  # a running average, for Retry-After
        self.requests = 0

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "align"}]}

    def params(self, body: dict[str, Any]) -> tuple[SamplingSettings, int, list[str]]:
        """Sampling settings, n and stop strings from a request body; RequestError (400) for bad values."""
        def number(key: str, value: Any, lo: float, hi: float, integer: bool = False) -> Any:
            kind = (int,) if integer else (int, float)
            if not isinstance(value, kind) or isinstance(value, bool) or not lo <= value <= hi:
                raise RequestError(f"'{key}' must be {'an integer' if integer else 'a number'} in [{lo}, {hi}], "
                                   f"got {value!r}")
            return value

        def get(key: str, default: Any) -> Any:
            return default if body.get(key) is None else body[key]

        default_max = min(self.cfg.default_max_tokens, self.cfg.max_tokens_limit)
        max_tokens = number("max_tokens", get("max_tokens", get("max_completion_tokens", default_max)),
                            1, self.cfg.max_tokens_limit, integer=True)
        n = number("n", get("n", 1), 1, self.cfg.max_n, integer=True)
        seed = number("seed", get("seed", self.requests % MAX_SEED), 0, MAX_SEED, integer=True)
        temperature = number("temperature", get("temperature", 1.0), 0.0, 2.0)
        stop = get("stop", [])
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise RequestError("'stop' must be a string or a list of non-empty strings")
        params = SamplingSettings(temperature=0.0 if temperature < GREEDY_BELOW else float(temperature),
                                  top_p=float(number("top_p", get("top_p", 1.0), 0.0, 1.0)), max_new_tokens=max_tokens,
                                  seed=seed, batch_size=self.cfg.batch_size)
        return params, n, stop

    def messages(self, body: dict[str, Any], max_tokens: int) -> list[Message]:
        """The request's messages, checked: roles, text (no lone surrogates), prompt + max_tokens within the context."""
        try:
            messages = check_messages(body.get("messages"), "request", field_name="messages")
        except DataError as e:
            raise RequestError(str(e)) from None
        if self.prompt_tokens is None or not self.max_context:
            return messages
        try:
            n_prompt = self.prompt_tokens(messages)
        except Exception as e:  # noqa: BLE001 - the template and tokenizer see only the client's messages
            raise RequestError(f"the model's chat template cannot render these messages: {e}") from None
        if n_prompt + max_tokens > self.max_context:
            raise RequestError(f"the prompt is {n_prompt} tokens and max_tokens is {max_tokens}: "
                               f"{n_prompt + max_tokens} > the model's context of {self.max_context} tokens; "
                               f"shorten the messages or lower max_tokens")
        return messages

    def enter(self) -> None:
        """Take a place in the queue for the model, or RequestError 429 with Retry-After when it is full."""
        with self.admit:
            if self.in_flight > self.cfg.max_queue:  # one generating + max_queue waiting
                wait = max(1, math.ceil(self.seconds_per_request * self.in_flight))
                raise RequestError(f"the server is busy ({self.cfg.max_queue} requests already wait for the model); "
                                   f"retry after {wait} s", 429, {"Retry-After": str(wait)})
            self.in_flight += 1

    def leave(self, seconds: float | None) -> None:
        with self.admit:
            self.in_flight -= 1
            if seconds is not None:
                self.seconds_per_request = 0.8 * self.seconds_per_request + 0.2 * seconds

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("stream"):
            raise RequestError("stream=true is not supported by align serve; send stream=false")
        if body.get("model") not in (None, self.model_name):
            raise RequestError(f"model {body['model']!r} is not served here; this server serves "
                               f"{self.model_name!r} (GET /v1/models)", 404)
        params, n, stop = self.params(body)
        messages = self.messages(body, params.max_new_tokens)
        self.enter()
        seconds = None
        try:
            with self.lock:
                self.requests += 1
                start = time.monotonic()
                samples = self.sampler.generate([messages], params, n=n)[0]
                seconds = time.monotonic() - start
        finally:
            self.leave(seconds)
        choices = []
        for i, s in enumerate(samples):
            text, reason = s.text, "stop" if s.finished else "length"
            cut = min((text.find(x) for x in stop if x in text), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
            choices.append({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                            "logprobs": None})
        prompt_tokens = len(samples[0].prompt_ids) if samples else 0
        completion_tokens = sum(len(s.response_ids) for s in samples)
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}


def read_body(rfile: BinaryIO, length: int, timeout_s: float) -> bytes:
    """`length` bytes, all within `timeout_s`; RequestError when they stop coming or the client hangs up.

    Each read already times out after `timeout_s` of silence (the socket timeout); the deadline also stops a
    client that trickles one byte at a time.
    """
    deadline = time.monotonic() + timeout_s
    chunks: list[bytes] = []
    got = 0
    try:
        while got < length:
            if time.monotonic() > deadline:
                raise TimeoutError
            chunk = rfile.read1(min(length - got, 1 << 16))  # type: ignore[attr-defined]
            if not chunk:
                raise RequestError(f"the body ended after {got} of the {length} bytes its Content-Length promised")
            chunks.append(chunk)
            got += len(chunk)
    except TimeoutError:
        raise RequestError(f"the body did not arrive within {timeout_s:g} s ({got} of the {length} bytes its "
                           f"Content-Length promised)") from None
    return b"".join(chunks)


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RequestError(f"the body is not UTF-8 (byte {e.start}); send JSON encoded as UTF-8") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise RequestError(f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    return body


def make_handler(service: ChatService) -> type[BaseHTTPRequestHandler]:
    cfg = service.cfg
    connections = threading.BoundedSemaphore(cfg.max_connections)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = cfg.timeout_s  # StreamRequestHandler sets it on the socket: every read and write times out
        unread_body = False  # the last request was answered before its body was read

        def log_message(self, fmt: str, *args: Any) -> None:  # one short line per request, not the default noise
            log.info(f"{self.address_string()} {fmt % args}")

        def handle(self) -> None:
            if not connections.acquire(blocking=False):
                self.close_connection = True
                payload = json.dumps(error_body(503, f"too many open connections ({cfg.max_connections}); retry "
                                                              f"shortly")).encode()
                with contextlib.suppress(OSError):  # answered before reading the request, then closed
                    self.wfile.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                     b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                                     % (len(payload), payload))
                return
            try:
                super().handle()
                if self.unread_body:
                    self.linger()
            finally:
                connections.release()

        def linger(self) -> None:
            """After refusing a request without reading its body: stop writing, then discard what the client still
            sends (briefly), so it reads our answer rather than a connection reset."""
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_WR)
                deadline = time.monotonic() + min(1.0, cfg.timeout_s)
                while (left := deadline - time.monotonic()) > 0:
                    self.connection.settimeout(left)
                    if not self.connection.recv(1 << 16):
                        break

        def reply(self, status: int, data: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            payload = json.dumps(data).encode()
            try:
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(key, value)
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except OSError:  # the client left (or stopped reading past the timeout)
                self.close_connection = True

        def error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
            self.reply(status, error_body(status, message), headers)

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            # The standard library's own rejections (bad request line, headers too long, ...) as JSON, then close.
            self.close_connection = True
            if self.request_version == "HTTP/0.9":  # its default before a request line parses; no status line
                self.request_version = "HTTP/1.1"
            self.error(code, message or explain or self.responses.get(code, ("error",))[0])

        def route(self) -> str:
            return self.path.split("?")[0].rstrip("/")

        def check_auth(self) -> bool:
            if authorized(self.headers.get("Authorization"), service.api_key):
                return True
            self.close_connection = True  # the body, if any, is left unread
            self.error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                       {"WWW-Authenticate": "Bearer"})
            return False

        def do_GET(self) -> None:
            if self.headers.get("Transfer-Encoding") or self.headers.get("Content-Length", "0").strip() != "0":
                self.close_connection = True  # a GET body is never read; it must not be taken for the next request
            if self.route() in ("/health", "/v1/health"):
                self.reply(200, {"status": "ok"})
            elif not self.check_auth():
                return
            elif self.route() == "/v1/models":
                self.reply(200, service.models())
            else:
                self.error(404, f"no route {self.path}; try /v1/models or POST /v1/chat/completions")

        def do_POST(self) -> None:
            self.unread_body = True
            if not self.check_auth():
                return
            try:
                body = self.body()
                if self.route() != "/v1/chat/completions":
                    raise RequestError(f"no route {self.path}; POST /v1/chat/completions", 404)
                self.reply(200, service.chat(body))
            except RequestError as e:
                self.error(e.status, str(e), e.headers)
            except Exception as e:  # noqa: BLE001 - report, keep serving
                self.error(500, f"{type(e).__name__}: {e}")

        def body(self) -> dict[str, Any]:
            """The request's JSON object. Until it is read in full, an error closes the connection."""
            asked_to_close, self.close_connection = self.close_connection, True
            if self.headers.get("Transfer-Encoding"):
                raise RequestError("send the body with a Content-Length (chunked transfer is not supported)")
            length = self.headers.get("Content-Length", "")
            if not length.strip().isdigit():
                raise RequestError(f"send a JSON body with a Content-Length (got {length[:20]!r})")
            if int(length) > cfg.max_body_bytes:
                raise RequestError(f"the body is {int(length)} bytes; the limit is {cfg.max_body_bytes}", 413)
            raw = read_body(self.rfile, int(length), cfg.timeout_s)
            self.close_connection, self.unread_body = asked_to_close, False
            return parse_body(raw)

    return Handler


def make_server(service: ChatService, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A bound (not yet serving) server; `server.server_address[1]` is the port when port=0."""
    server = ThreadingHTTPServer((host, port), make_handler(service))
    server.daemon_threads = True
    return server


def load_service(cfg: Config) -> ChatService:
    from align.generation.hf import chat_prompt_ids
    from align.generation.select import BackendSettings, build_sampler
    from align.models.load import resolve_model

    check_config(cfg)
    path = resolve_model(cfg.model)
    sampler = build_sampler(cfg.model, BackendSettings(backend="hf", dtype=cfg.dtype,
                                                       trust_remote_code=cfg.trust_remote_code))
    name = cfg.model_name or (cfg.model if cfg.model == "default" else Path(path).name if Path(path).name != "model"
                              else Path(path).parent.name)
    tokenizer = sampler.tokenizer  # type: ignore[attr-defined]
    return ChatService(sampler, name, cfg, api_key=api_key(cfg),
                       prompt_tokens=lambda messages: len(chat_prompt_ids(tokenizer, messages)),
                       max_context=cfg.max_context or model_context(sampler.model, tokenizer))  # type: ignore


def run(cfg: Config) -> Path | None:
    service = load_service(cfg)
    server = make_server(service, cfg.host, cfg.port)
    host, port = server.server_address[:2]
    auth = "bearer key required" if service.api_key else "no authentication"
    print(f"serving {service.model_name!r} on http://{host}:{port}/v1 (chat/completions, models); {auth}; "
          f"context {service.max_context} tokens; Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        server.server_close()
    return None
