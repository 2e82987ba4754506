"""serve: an OpenAI-compatible chat server (/v1/chat/completions, /v1/models) over any model the pipeline made.

Runs on the hf backend with the standard library's ThreadingHTTPServer; requests share one model, so
generation is serialised by a lock. For throughput on a GPU use `vllm serve` instead. Listens on 127.0.0.1 by
default: set host=0.0.0.0 only on a network you trust (there is no authentication).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from align.config import opt
from align.data.records import check_messages
from align.errors import DataError
from align.generation import Sampler, SamplingSettings

MAX_BODY = 4 << 20  # bytes; a chat request larger than this is refused


@dataclass(frozen=True)
class Config:
    model: str = opt("default", "'default', a model or adapter folder, or a stage run folder (e.g. runs/dpo)")
    model_name: str = opt("", "id reported by /v1/models and in replies ('': the folder name); requests may "
                              "name any model")
    host: str = opt("127.0.0.1", "address to listen on (0.0.0.0 exposes it to the network, without auth)")
    port: int = opt(8000, "port (0: any free port)")
    dtype: str = opt("auto", "auto | float32 | bfloat16 | float16")
    trust_remote_code: bool = opt(False, "allow model code from the model folder")
    max_tokens_limit: int = opt(512, "largest max_tokens a request may ask for")
    max_n: int = opt(8, "largest n (completions per request)")
    default_max_tokens: int = opt(128, "max_tokens when a request gives none")
    batch_size: int = opt(8, "sequences per generate call when n > 1")


class ChatService:
    """Turns OpenAI chat-completion request bodies into Sampler calls. Separate from HTTP so it is easy to test."""

    def __init__(self, sampler: Sampler, model_name: str, cfg: Config = Config()) -> None:
        self.sampler = sampler
        self.model_name = model_name
        self.cfg = cfg
        self.lock = threading.Lock()
        self.requests = 0

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "align"}]}

    def params(self, body: dict[str, Any]) -> tuple[SamplingSettings, int, list[str]]:
        """Sampling settings, n and stop strings from a request body; DataError for bad values."""
        def number(key: str, default: float, lo: float, hi: float) -> float:
            value = body.get(key, default)
            value = default if value is None else value
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
                raise DataError(f"'{key}' must be a number in [{lo}, {hi}], got {value!r}")
            return float(value)

        max_tokens = int(number("max_tokens", body.get("max_completion_tokens") or self.cfg.default_max_tokens,
                                1, self.cfg.max_tokens_limit))
        n = int(number("n", 1, 1, self.cfg.max_n))
        seed = body.get("seed")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise DataError("'stop' must be a string or a list of non-empty strings")
        params = SamplingSettings(temperature=number("temperature", 1.0, 0.0, 2.0), top_p=number("top_p", 1.0, 0.0, 1.0),
                                  max_new_tokens=max_tokens, seed=seed if isinstance(seed, int) else self.requests,
                                  batch_size=self.cfg.batch_size)
        return params, n, stop

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("stream"):
            raise DataError("stream=true is not supported by align serve; send stream=false")
        messages = check_messages(body.get("messages"), "request", field_name="messages")
        params, n, stop = self.params(body)
        with self.lock:
            self.requests += 1
            samples = self.sampler.generate([messages], params, n=n)[0]
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


def make_handler(service: ChatService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:  # one short line per request, not the default noise
            print(f"{self.address_string()} {fmt % args}", flush=True)

        def reply(self, status: int, data: dict[str, Any]) -> None:
            payload = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
            self.reply(status, {"error": {"message": message, "type": kind, "code": status}})

        def do_GET(self) -> None:
            path = self.path.split("?")[0].rstrip("/")
            if path == "/v1/models":
                self.reply(200, service.models())
            elif path in ("/health", "/v1/health"):
                self.reply(200, {"status": "ok"})
            else:
                self.error(404, f"no route {self.path}; try /v1/models or POST /v1/chat/completions")

        def do_POST(self) -> None:
            if self.path.split("?")[0].rstrip("/") != "/v1/chat/completions":
                self.error(404, f"no route {self.path}; POST /v1/chat/completions")
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length <= 0 or length > MAX_BODY:
                self.error(400 if length <= 0 else 413, "send a JSON body (at most 4 MiB)")
                return
            try:
                body = json.loads(self.rfile.read(length))
                if not isinstance(body, dict):
                    raise DataError("the body must be a JSON object")
                self.reply(200, service.chat(body))
            except (json.JSONDecodeError, DataError) as e:
                self.error(400, str(e))
            except Exception as e:  # noqa: BLE001 - report, keep serving
                self.error(500, f"{type(e).__name__}: {e}", "server_error")

    return Handler


def make_server(service: ChatService, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A bound (not yet serving) server; `server.server_address[1]` is the port when port=0."""
    server = ThreadingHTTPServer((host, port), make_handler(service))
    server.daemon_threads = True
    return server


def load_service(cfg: Config) -> ChatService:
    from align.generation.select import BackendSettings, build_sampler
    from align.models.load import resolve_model

    path = resolve_model(cfg.model)
    sampler = build_sampler(cfg.model, BackendSettings(backend="hf", dtype=cfg.dtype,
                                                       trust_remote_code=cfg.trust_remote_code))
    name = cfg.model_name or (cfg.model if cfg.model == "default" else Path(path).name if Path(path).name != "model"
                              else Path(path).parent.name)
    return ChatService(sampler, name, cfg)


def run(cfg: Config) -> Path | None:
    service = load_service(cfg)
    server = make_server(service, cfg.host, cfg.port)
    host, port = server.server_address[:2]
    print(f"serving {service.model_name!r} on http://{host}:{port}/v1 (chat/completions, models); Ctrl-C stops",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        server.server_close()
    return None
