"""The demo task's house-style rule score: a cheap, transparent judge for "kitchen helper" answers.

House style (what the demo's human annotators prefer): a direct answer of 1-3 sentences and at most ~40 words,
no filler opener, naming the ingredient the user asked about, ending with one short "Tip: ..." sentence.

`house_style_score(prompt, response)` is the sum of four rule checks worth 0.25 each, minus a small penalty
for repeated word trigrams, clipped to [0, 1]:

  no_filler    the response does not open with filler ("Great question!", "Sure!", "As an AI, ...") and
               does not say "as an AI" anywhere;
  length       8 <= words <= 45;
  ingredient   the response names the ingredient the prompt asks about (found with `INGREDIENTS`; the
               latest user turn that names one wins, so follow-ups like "How long does it keep?" work). When
               no user turn names a known ingredient, the response must share a content word (4+ letters,
               not a stop word) with the last user turn; a question with no content word passes;
  tip          the response ends with exactly one sentence that starts with "Tip:" and has 2-15 words;
  repetition   -0.05 for each repeated word trigram (count beyond the first), at most -0.25.

It is the demo's evaluation judge (`rules` judge `align.judges.house_style:house_style_score`) and a toy PPO
reward. It did NOT produce the demo's preference labels (those are simulated annotators in
data/make_demo.py), so a policy that scores well here has learned the style, not this function.
Pure Python, no torch: cheap enough to call on every sample.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from align.data.records import Message

# Every ingredient of the demo task (canonical name -> the surface forms that count as naming it).
# data/make_demo.py holds the facts for each; the keys here and its content table must match.
INGREDIENTS: dict[str, tuple[str, ...]] = {
    # vegetables
    "carrot": ("carrot", "carrots"),
    "potato": ("potato", "potatoes"),
    "tomato": ("tomato", "tomatoes"),
    "onion": ("onion", "onions"),
    "garlic": ("garlic",),
    "broccoli": ("broccoli",),
    "spinach": ("spinach",),
    "zucchini": ("zucchini", "zucchinis", "courgette", "courgettes"),
    "bell pepper": ("bell pepper", "bell peppers"),
    "mushroom": ("mushroom", "mushrooms"),
    "cucumber": ("cucumber", "cucumbers"),
    "cauliflower": ("cauliflower",),
    "sweet potato": ("sweet potato", "sweet potatoes"),
    "eggplant": ("eggplant", "eggplants", "aubergine", "aubergines"),
    "kale": ("kale",),
    "asparagus": ("asparagus",),
    "leek": ("leek", "leeks"),
    # fruits
    "apple": ("apple", "apples"),
    "banana": ("banana", "bananas"),
    "avocado": ("avocado", "avocados"),
    "lemon": ("lemon", "lemons"),
    "strawberry": ("strawberry", "strawberries"),
    "blueberry": ("blueberry", "blueberries"),
    "peach": ("peach", "peaches"),
    "pineapple": ("pineapple", "pineapples"),
    "mango": ("mango", "mangoes", "mangos"),
    "kiwi": ("kiwi", "kiwis", "kiwifruit"),
    # herbs and aromatics
    "basil": ("basil",),
    "parsley": ("parsley",),
    "cilantro": ("cilantro", "coriander"),
    "rosemary": ("rosemary",),
    "thyme": ("thyme",),
    "ginger": ("ginger",),
    "dill": ("dill",),
    # grains and legumes
    "rice": ("rice",),
    "oats": ("oats", "oatmeal"),
    "pasta": ("pasta",),
    "lentil": ("lentil", "lentils"),
    "chickpea": ("chickpea", "chickpeas", "garbanzo", "garbanzos"),
    "quinoa": ("quinoa",),
    # proteins
    "chicken breast": ("chicken breast", "chicken breasts", "chicken"),
    "salmon": ("salmon",),
    "egg": ("egg", "eggs"),
    "ground beef": ("ground beef", "beef mince", "minced beef"),
    "tofu": ("tofu",),
    "shrimp": ("shrimp", "shrimps", "prawn", "prawns"),
    "cod": ("cod",),
    # dairy
    "butter": ("butter",),
    "milk": ("milk",),
    "yogurt": ("yogurt", "yoghurt"),
    "cheddar": ("cheddar",),
    "parmesan": ("parmesan", "parmigiano"),
    "ricotta": ("ricotta",),
}

# Openers that add nothing; matched at the start of the response, case-insensitively.
FILLER_OPENERS: tuple[str, ...] = (
    "great question", "good question", "excellent question", "what a", "sure", "certainly", "of course",
    "absolutely", "as an ai", "as a language model", "i'd be happy", "i would be happy", "i'm happy to",
    "happy to help", "thanks for asking", "thank you for asking", "hello", "hi", "hey", "well,", "okay",
    "ok,", "oh,", "so,", "let me",
)
STOP_WORDS = frozenset(
    ["what", "which", "when", "where", "while", "with", "would", "could", "should", "about", "best", "from", "have", "into", "just", "like", "long", "much", "make", "many", "some", "than", "that", "them", "then", "there", "they", "this", "does", "your", "good", "want", "need", "know", "tell", "right", "really", "using", "used", "keep", "cook", "cooking"])

_WORD = re.compile(r"[a-z0-9°]+(?:'[a-z]+)?")
_FILLER = re.compile(r"^(?:" + "|".join(re.escape(f) for f in FILLER_OPENERS) + r")(?![a-z])")
_TIP = re.compile(r"(?:^|(?<=[.!?])\s+)tip:\s*(?P<tip>[^.!?]+[.!?]?)\s*$", re.IGNORECASE)


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, degree signs, inner apostrophes)."""
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def _forms_pattern(forms: Sequence[str]) -> re.Pattern[str]:
    return re.compile(r"(?<![a-z])(?:" + "|".join(re.escape(f) for f in forms) + r")(?![a-z])")


_PATTERNS = {name: _forms_pattern(forms) for name, forms in INGREDIENTS.items()}


def find_ingredient(text: str) -> str | None:
    """The canonical ingredient named in `text` (the longest match wins: "sweet potatoes" over "potatoes")."""
    low = text.lower()
    best: tuple[int, int, str] | None = None  # (-length, start, name)
    for name, pattern in _PATTERNS.items():
        for m in pattern.finditer(low):
            key = (-(m.end() - m.start()), m.start(), name)
            if best is None or key < best:
                best = key
    return best[2] if best else None


def mentions(text: str, ingredient: str) -> bool:
    """Whether `text` names `ingredient` (any of its surface forms, whole words, any case)."""
    return _PATTERNS[ingredient].search(text.lower()) is not None


def _user_turns(prompt: Sequence[Message] | str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    return [m["content"] for m in prompt if m["role"] == "user"]


def asked_ingredient(prompt: Sequence[Message] | str) -> str | None:
    """The ingredient of the latest user turn that names one, or None."""
    for turn in reversed(_user_turns(prompt)):
        name = find_ingredient(turn)
        if name:
            return name
    return None


def has_filler(response: str) -> bool:
    text = response.strip().lower().replace("\u2019", "'")
    return bool(_FILLER.match(text)) or "as an ai" in text


def ends_with_tip(response: str) -> bool:
    m = _TIP.search(response.strip())
    return m is not None and 2 <= len(words(m.group("tip"))) <= 15


def names_ingredient(prompt: Sequence[Message] | str, response: str) -> bool:
    name = asked_ingredient(prompt)
    if name:
        return mentions(response, name)
    turns = _user_turns(prompt)
    content = {w for w in words(turns[-1] if turns else "") if len(w) >= 4 and w not in STOP_WORDS}
    return not content or bool(content & set(words(response)))


def repeated_trigrams(response: str) -> int:
    """How many word trigrams are repeats of an earlier one."""
    ws = words(response)
    grams = list(zip(ws, ws[1:], ws[2:]))
    return len(grams) - len(set(grams))


def house_style_checks(prompt: Sequence[Message] | str, response: str) -> dict[str, float]:
    """Each rule's contribution (the four checks 0 or 0.25, `repetition` 0 to -0.25); they sum to the score."""
    n = len(words(response))
    return {
        "no_filler": 0.25 * (not has_filler(response)),
        "length": 0.25 * (8 <= n <= 45),
        "ingredient": 0.25 * names_ingredient(prompt, response),
        "tip": 0.25 * ends_with_tip(response),
        "repetition": -min(0.25, 0.05 * repeated_trigrams(response)),
    }


def house_style_score(prompt: Sequence[Message] | str, response: str) -> float:
    """House-style score in [0, 1] (see the module docstring); an empty response scores 0."""
    if not response.strip():
        return 0.0
    total = sum(house_style_checks(prompt, response).values())
    return round(min(1.0, max(0.0, total)), 4)
