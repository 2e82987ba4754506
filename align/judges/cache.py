"""Judge cache: one JSONL line per finished judgement, keyed by sha256 of (judge identity, prompt, responses).

The judge identity is what determines its verdicts (model, template text, system, criteria, sampling...; see
`LoadedJudge.identity`), not transport settings: changing a timeout or the concurrency re-uses the cache.

Re-running a judge skips every key already present; failures are never cached, so a re-run retries them.
Lines are appended and fsync'd per batch; a torn last line (a killed run) is ignored on load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from align.data.records import Message


def cache_key(judge_identity: dict[str, Any], prompt: list[Message], responses: list[str]) -> str:
    payload = json.dumps({"judge": judge_identity, "prompt": prompt, "responses": responses}, sort_keys=True,
                         ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


class JudgeCache:
    """Key -> value (a verdict dict or {"score": x}). `path=None` keeps it in memory only."""

    def __init__(self, path: Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self.values: dict[str, Any] = {}
        if self.path is not None and self.path.is_file():
            data = self.path.read_bytes()
            good = data.rfind(b"\n") + 1
            if good < len(data):  # a torn last line would swallow the next append: cut it off
                with open(self.path, "r+b") as f:
                    f.truncate(good)
            for line in data[:good].decode("utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line)
                    self.values[row["key"]] = row["value"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a torn or foreign line: that judgement is simply redone

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def get(self, key: str) -> Any:
        return self.values.get(key)

    def put(self, entries: list[tuple[str, Any]]) -> None:
        if not entries:
            return
        self.values.update(entries)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps({"key": k, "value": v}, ensure_ascii=False) + "\n" for k, v in entries))
            f.flush()
            os.fsync(f.fileno())
