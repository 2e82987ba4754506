"""Read a pairwise verdict (a | b | tie) out of free-form judge text; None when it cannot be read safely.

Judges answer in many styles: a bare letter, `[[A]]` (MT-Bench), `Output (b)` (AlpacaEval), `Verdict: B`,
JSON, `A > B`, or a sentence ("Response B is better"). Checks run from the most explicit form to the least,
and a later explicit statement wins over earlier reasoning ("... A rambles. Verdict: B" is B). Anything
ambiguous or contradictory is None, which the caller counts as a failure rather than guessing.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

Choice = Literal["a", "b", "tie"]

_TOKENS: dict[str, Choice] = {
    "a": "a", "b": "b", "1": "a", "2": "b", "tie": "tie", "draw": "tie", "equal": "tie", "equally": "tie",
    "both": "tie", "neither": "tie", "c": "tie", "same": "tie",
}
_LABEL = r"(?:response|assistant|output|answer|option|candidate|completion|model)"
_TOKEN = r"(a|b|1|2|tie|draw|equal|c)"
_JSON_KEYS = ("winner", "verdict", "choice", "preferred", "preference", "better", "best", "answer", "decision",
              "result", "label", "final_answer", "final_verdict", "output")

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_BRACKET = re.compile(r"\[\[\s*(a|b|c|tie)\s*\]\]", re.IGNORECASE)
_XML = re.compile(r"<(answer|verdict|winner|choice)>\s*(.*?)\s*</\1>", re.IGNORECASE | re.DOTALL)
_LABELLED = re.compile(
    r"\b(?:final\s+verdict|verdict|final\s+answer|answer|winner|choice|decision|preferred\s+response|preference|"
    r"better\s+(?:response|answer|one)|best\s+(?:response|answer|one)|judge?ment|result|my\s+pick)\b"
    r"(?:\s*(?:is|was|would\s+be|goes\s+to)\s*:?|\s*[:=\-])"  # a separator is required: "answer a question" is not a verdict
    r"[\s*_\"'`(\[]*(?:" + _LABEL + r"\s*)?[\s*_\"'`(\[]*" + _TOKEN + r"\b", re.IGNORECASE)
_COMPARE = re.compile(r"\b(A|B)\s*(>=|<=|>|<|=)\s*(A|B)\b", re.IGNORECASE)
_BETTER = re.compile(
    r"(?:\b(" + _LABEL + r")\s*)?\(?\b(a|b|1|2)\b\)?\s+(?:is|was|seems|appears|looks)\s+"
    r"(?:clearly\s+|much\s+|slightly\s+|somewhat\s+|far\s+|the\s+|a\s+)?"
    r"(better|superior|preferred|preferable|more\s+helpful|best|stronger|winner|worse|inferior|weaker|"
    r"less\s+helpful)", re.IGNORECASE)
_PREFER = re.compile(r"\b(?:prefer|choose|pick|select|go\s+with|vote\s+for)\s+(?:(" + _LABEL + r")\s*)?\(?\b(a|b)\b\)?",
                     re.IGNORECASE)
_TIE = re.compile(r"\b(?:it'?s\s+a\s+tie|tie|draw|equally\s+(?:good|bad|helpful|strong|weak|valid)|"
                  r"both\s+(?:responses\s+)?(?:are\s+)?(?:equally|equal|the\s+same)|"
                  r"neither\s+(?:response\s+)?(?:is\s+)?better|no\s+(?:clear\s+)?preference|same\s+quality)\b", re.IGNORECASE)
_REPEATED = re.compile(r"[\W_]*([AB])(?:[\W_]+\1)*[\W_]*")
_STRIP = " \t\r\n*_`'\"()[]{}.,:;!#>-"


def _token(value: Any) -> Choice | None:
    """A short answer like 'B', 'Response A', '(b)', 'Tie', 1 -> its choice; None for anything longer."""
    if isinstance(value, bool):
        return None
    text = str(value).strip(_STRIP).lower()
    text = re.sub(r"^" + _LABEL + r"\s*", "", text).strip(_STRIP)
    return _TOKENS.get(text)


def _from_json(text: str) -> Choice | None:
    for start in [m.start() for m in re.finditer(r"\{", text)]:
        end = text.find("}", start)
        while end != -1:
            try:
                obj = json.loads(text[start:end + 1])
            except json.JSONDecodeError:
                end = text.find("}", end + 1)
                continue
            if isinstance(obj, dict):
                lowered = {str(k).lower(): v for k, v in obj.items()}
                for key in _JSON_KEYS:
                    if key in lowered and (choice := _token(lowered[key])) is not None:
                        return choice
            break
    return None


def _sentences(text: str) -> Choice | None:
    """'Response B is better', 'I prefer A', 'A is worse': one consistent claim, else None."""
    found: set[Choice] = set()
    for m in _BETTER.finditer(text):
        label, letter, word = m.group(1), m.group(2), m.group(3).lower()
        if not label and (letter.islower() or letter.isdigit()):  # "a better answer" / "2 is" are not verdicts
            continue
        choice = _TOKENS[letter.lower()]
        worse = word.startswith(("worse", "inferior", "weaker", "less"))
        found.add(("b" if choice == "a" else "a") if worse else choice)
    for m in _PREFER.finditer(text):
        label, letter = m.group(1), m.group(2)
        if not label and letter.islower():  # "I prefer a shorter answer"
            continue
        found.add(_TOKENS[letter.lower()])
    return found.pop() if len(found) == 1 else None


def parse_verdict(text: str) -> Choice | None:
    """'a', 'b' or 'tie' from a judge's output text; None when no unambiguous verdict is found."""
    if not isinstance(text, str):
        return None
    text = _THINK.sub(" ", text).strip()
    if not text:
        return None
    if (choice := _from_json(text)) is not None:
        return choice
    if brackets := _BRACKET.findall(text):
        return _TOKENS[brackets[-1].lower()]
    for m in reversed(list(_XML.finditer(text))):
        if (choice := _token(m.group(2))) is not None:
            return choice
    if labelled := _LABELLED.findall(text):
        return _TOKENS[labelled[-1].lower()]
    if (choice := _token(text)) is not None:
        return choice
    first_line = text.splitlines()[0]
    if (choice := _token(first_line)) is not None:  # "B\n\nExplanation: ..."
        return choice
    if m := _REPEATED.fullmatch(first_line):  # small models stutter: 'A, "A"'
        return _TOKENS[m.group(1).lower()]
    compares = {_compare(m) for m in _COMPARE.finditer(text)}
    if len(compares) == 1:
        return compares.pop()
    if (choice := _sentences(text)) is not None:
        return choice
    if _TIE.search(text):
        return "tie"
    return None


def _compare(m: re.Match[str]) -> Choice:
    left, op, right = m.group(1).lower(), m.group(2), m.group(3).lower()
    if op == "=" or left == right:
        return "tie"
    bigger = left if op in (">", ">=") else right
    return "a" if bigger == "a" else "b"
