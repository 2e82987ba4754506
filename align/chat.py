"""Chat templates and system prompts: `chat_template=` gives a model without a template one (a shipped name such as
chatml, or a Jinja file), `system_prompt=` puts a system message first in every conversation that has none. The
template is saved with the trained model's tokenizer, so later stages and exports use the same one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from align.data.records import Message
from align.errors import ConfigError, DataError

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEMPLATES = {"chatml": CHATML}
CHAT_TEMPLATE_HELP = ("chat template for a model without one, or to replace its own: " + " | ".join(TEMPLATES)
                      + " | a .jinja file ('' = the model's own)")
SYSTEM_PROMPT_HELP = "system message put first in every conversation that has none ('' = none)"


def template_text(spec: str) -> str:
    """A shipped template's name or a Jinja file -> the template text."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    path = Path(spec)
    if path.suffix in (".jinja", ".j2", ".jinja2") and path.is_file():
        return path.read_text()
    raise ConfigError(f"chat_template={spec!r}: give one of {', '.join(TEMPLATES)} or an existing .jinja file")


def use_chat_template(tokenizer: Any, spec: str, model: str | Path) -> Any:
    """Set the template `spec` names (if any) on `tokenizer`; a tokenizer left without one is a DataError that
    names the option."""
    if spec:
        tokenizer.chat_template = template_text(spec)
    if not tokenizer.chat_template:
        raise DataError(f"model {model} has no chat template; give it one with chat_template=chatml (or "
                        f"chat_template=<file.jinja>)")
    return tokenizer


def with_system_prompt(messages: list[Message], system_prompt: str) -> list[Message]:
    """`messages` with `system_prompt` as a first system message, unless it is empty or one is already there."""
    if not system_prompt or (messages and messages[0]["role"] == "system"):
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]
