"""Labeling tasks for people: which pairs to send (selection), gold pairs with known answers, stable task ids,
and the files each annotation tool imports (Label Studio, Argilla, a plain CSV/JSONL). Pure functions over
`Task`s; `align label` reads and writes the files, `align import tasks=...` maps the answers back.

A task is one prompt and 2+ responses in the order shown. Its id hashes the prompt and the *set* of responses,
so it survives re-exports, a tool that reorders fields and a different display order.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from itertools import combinations, pairwise
from typing import Any

from align.data.records import Message, PreferenceRecord, check_messages, prompt_id
from align.errors import AlignError, DataError

SELECTIONS = ("random", "uncertain", "disagree")
# (prompts, responses) -> one reward each: `align.reward_model.RewardModel.score`, or a stand-in in tests
Scorer = Callable[[list[list[Message]], list[str]], list[float]]
Verdicts = dict[tuple[str, str, str], dict[str, Any]]  # (prompt_id, response_a, response_b) -> verdicts.jsonl row


@dataclass(frozen=True)
class Task:
    """One labeling task: `responses` in the order annotators see them; `gold` is the index of the known better
    response (gold tasks only); `selection` says why the task was picked."""

    task_id: str
    prompt_id: str
    prompt: list[Message]
    responses: tuple[str, ...]
    gold: int | None = None
    selection: dict[str, Any] = field(default_factory=dict)
    origin: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "prompt_id": self.prompt_id, "prompt": self.prompt,
                "responses": list(self.responses), "gold": self.gold, "selection": self.selection,
                "origin": self.origin}


def task_id(prompt: list[Message], responses: Iterable[str]) -> str:
    """Stable id (16 hex digits) of a prompt and a set of responses; the display order does not change it."""
    blob = json.dumps({"prompt": prompt, "responses": sorted(responses)}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_task(prompt: list[Message], responses: Sequence[str], origin: str = "", gold: int | None = None) -> Task:
    return Task(task_id(prompt, responses), prompt_id(prompt), prompt, tuple(responses), gold, {}, origin)


def task_from_json(obj: Any, where: str) -> Task:
    """A tasks.jsonl row back into a Task (DataError naming `where` when it is not one)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("task_id"), str) or not isinstance(obj.get("responses"),
                                                                                            list):
        raise DataError(f"{where}: not a labeling task (task_id, prompt, responses); give the tasks.jsonl "
                        f"written by `align label`, or its run folder")
    responses = obj["responses"]
    gold = obj.get("gold")
    if len(responses) < 2 or not all(isinstance(r, str) for r in responses) or not (
            gold is None or (isinstance(gold, int) and 0 <= gold < len(responses))):
        raise DataError(f"{where}: a task needs 2+ text responses and gold null or an index into them")
    prompt = check_messages(obj.get("prompt"), where, field_name="prompt")
    return Task(obj["task_id"], str(obj.get("prompt_id") or prompt_id(prompt)), prompt, tuple(responses), gold,
                dict(obj.get("selection") or {}), str(obj.get("origin") or ""))


def prompt_text(prompt: list[Message]) -> str:
    """What annotators read as the prompt: a lone user turn as is, else every turn as 'role: text' blocks."""
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


# ---- candidates -------------------------------------------------------------------------------------------

def _response_text(value: Any, where: str, name: str) -> str:
    if isinstance(value, str):
        return value
    if (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str)):
        return value[0]["content"]
    raise DataError(f"{where}: {name} must be a text or one assistant message")


def candidate_responses(obj: Any, where: str) -> tuple[list[Message], list[str]]:
    """(prompt, responses) of one candidate row: a samples row {prompt, responses} from `align generate`, or a
    pair {prompt, response_a, response_b} / {prompt, chosen, rejected}."""
    if not isinstance(obj, dict) or "prompt" not in obj:
        raise DataError(f"{where}: a candidate row needs 'prompt' and responses: {{prompt, responses: [...]}} "
                        f"(align generate), {{prompt, response_a, response_b}} or {{prompt, chosen, rejected}}")
    prompt = check_messages(obj["prompt"], where, field_name="prompt")
    if isinstance(obj.get("responses"), list):
        return prompt, [_response_text(r, where, f"responses[{i}]") for i, r in enumerate(obj["responses"])]
    for a, b in (("response_a", "response_b"), ("chosen", "rejected")):
        if a in obj and b in obj:
            return prompt, [_response_text(obj[a], where, a), _response_text(obj[b], where, b)]
    raise DataError(f"{where}: no responses; give 'responses' (a list), 'response_a'/'response_b' or "
                    f"'chosen'/'rejected'")


def candidate_tasks(rows: Iterable[tuple[str, Any]], compare: str) -> tuple[list[Task], int]:
    """Tasks from candidate rows ((where, row) as read): `compare=pairs` makes one task per pair of distinct
    non-empty responses, `all` one task per prompt with every one. Returns (tasks without repeats, rows skipped
    for having fewer than two distinct responses)."""
    tasks: dict[str, Task] = {}
    skipped = 0
    for where, obj in rows:
        prompt, responses = candidate_responses(obj, where)
        distinct = list(dict.fromkeys(r for r in responses if r.strip()))
        if len(distinct) < 2:
            skipped += 1
            continue
        for group in [tuple(distinct)] if compare == "all" else combinations(distinct, 2):
            task = make_task(prompt, group, where)
            tasks.setdefault(task.task_id, task)
    return list(tasks.values()), skipped


def shuffled(task: Task, rng: random.Random) -> Task:
    """The task with its responses in a random order (the gold index follows its response)."""
    order = list(range(len(task.responses)))
    rng.shuffle(order)
    gold = order.index(task.gold) if task.gold is not None else None
    return replace(task, responses=tuple(task.responses[i] for i in order), gold=gold)


# ---- selection --------------------------------------------------------------------------------------------

def reward_scores(tasks: Sequence[Task], scorer: Scorer) -> list[list[float]]:
    """The reward of each response of each task; every distinct (prompt, response) is scored once."""
    keys: dict[tuple[str, str], tuple[list[Message], str]] = {}
    for t in tasks:
        for r in t.responses:
            keys.setdefault((t.prompt_id, r), (t.prompt, r))
    order = list(keys)
    values = scorer([keys[k][0] for k in order], [keys[k][1] for k in order])
    if len(values) != len(order):
        raise AlignError(f"the reward model returned {len(values)} scores for {len(order)} responses")
    got = dict(zip(order, values))
    return [[float(got[(t.prompt_id, r)]) for r in t.responses] for t in tasks]


def smallest_gap(rewards: Sequence[float]) -> float:
    """The smallest |reward difference| between two responses of one task (for a pair: |r_a - r_b|)."""
    ordered = sorted(rewards)
    return min(b - a for a, b in pairwise(ordered))


def index_verdicts(rows: Iterable[dict[str, Any]]) -> Verdicts:
    """verdicts.jsonl rows of `align judge`, keyed by (prompt_id, response_a, response_b)."""
    out: Verdicts = {}
    for v in rows:
        key = (v.get("prompt_id"), v.get("response_a"), v.get("response_b"))
        if isinstance(v, dict) and all(isinstance(k, str) for k in key):
            out[key] = v  # type: ignore[index]
    return out


def pair_verdicts(task: Task, verdicts: Verdicts) -> list[tuple[int, int, dict[str, Any]]]:
    """(i, j, verdict) for each pair of the task the judge saw, where the verdict's response_a is responses[i]."""
    out = []
    for i, j in combinations(range(len(task.responses)), 2):
        a, b = task.responses[i], task.responses[j]
        if (task.prompt_id, a, b) in verdicts:
            out.append((i, j, verdicts[(task.prompt_id, a, b)]))
        elif (task.prompt_id, b, a) in verdicts:
            out.append((j, i, verdicts[(task.prompt_id, b, a)]))
    return out


def judge_confidence(verdict: dict[str, Any]) -> float:
    """How sure the judge was of one pair: 0 when it failed, abstained, called a tie or changed its answer when
    the order was swapped; |score difference| for a score judge; infinity for a plain decisive verdict."""
    orders = verdict.get("orders") or []
    if verdict.get("error") or verdict.get("winner") not in ("a", "b") or len(set(orders)) > 1:
        return 0.0
    scores = verdict.get("scores")
    if isinstance(scores, list) and len(scores) == 2 and all(isinstance(s, (int, float)) for s in scores):
        return abs(scores[0] - scores[1])
    return math.inf


def disagreement(task: Task, rewards: Sequence[float], verdicts: Verdicts) -> float | None:
    """The largest reward margin among the task's pairs where the judge's winner is the response the reward model
    scores lower; None when the two never disagree (or the judge was never decisive)."""
    worst = None
    for i, j, v in pair_verdicts(task, verdicts):
        if v.get("error") or v.get("winner") not in ("a", "b"):
            continue
        win, lose = (i, j) if v["winner"] == "a" else (j, i)
        if rewards[win] < rewards[lose]:
            worst = max(worst or 0.0, rewards[lose] - rewards[win])
    return worst


def select_tasks(tasks: Sequence[Task], selection: str, budget: int, seed: int, *, scorer: Scorer | None = None,
                 verdicts: Verdicts | None = None) -> list[Task]:
    """The `budget` tasks (0: all that qualify) to send to people, each with `selection` saying why.

    random: a seeded random sample. uncertain: the smallest |reward margin| under `scorer` first (without a
    scorer: the judge's least confident pairs first, pairs it never saw last). disagree: only tasks where the
    judge's winner is the reward model's loser, the largest such margin first. Equal keys keep a seeded order.
    """
    if selection not in SELECTIONS:
        raise AlignError(f"selection={selection!r}: use one of {', '.join(SELECTIONS)}")
    if selection == "disagree" and (scorer is None or verdicts is None):
        raise AlignError("selection=disagree needs a reward model and judge verdicts")
    if selection == "uncertain" and scorer is None and verdicts is None:
        raise AlignError("selection=uncertain needs a reward model or judge verdicts")
    order = list(range(len(tasks)))
    random.Random(seed).shuffle(order)
    tiebreak = {i: pos for pos, i in enumerate(order)}
    rewards = reward_scores(tasks, scorer) if scorer is not None and selection != "random" else None
    picks: list[tuple[float, int, dict[str, Any]]] = []  # (sort key, task index, why)
    for i, task in enumerate(tasks):
        if selection == "random":
            picks.append((0.0, i, {}))
        elif selection == "uncertain" and rewards is not None:
            gap = smallest_gap(rewards[i])
            picks.append((gap, i, {"reward_margin": gap}))
        elif selection == "uncertain":
            seen = [judge_confidence(v) for _, _, v in pair_verdicts(task, verdicts or {})]
            least = min(seen) if seen else None
            picks.append((math.inf if least is None else least, i,
                          {"judge_confidence": least if least is not None and math.isfinite(least) else None,
                           "judged": bool(seen)}))
        else:
            margin = disagreement(task, rewards[i], verdicts or {})  # type: ignore[index]
            if margin is not None:
                picks.append((-margin, i, {"reward_margin": margin}))
    # a task the judge never saw ranks after every judged one
    picks.sort(key=lambda p: (p[0], not p[2].get("judged", True), tiebreak[p[1]]))
    kept = picks[:budget] if budget > 0 else picks
    return [replace(tasks[i], selection={"method": selection, **{k: v for k, v in why.items() if k != "judged"}})
            for _, i, why in kept]


# ---- gold ---------------------------------------------------------------------------------------------------

def gold_count(selected: int, rate: float) -> int:
    """Gold tasks to add to `selected` ones so that they make up `rate` of all tasks."""
    return round(selected * rate / (1 - rate)) if 0 < rate < 1 else 0


def gold_tasks(records: Sequence[PreferenceRecord], n: int, seed: int, exclude: Collection[str] = (),
               origin: str = "gold") -> list[Task]:
    """`n` tasks drawn (seeded) from preferences with known answers, responses in a random order; `gold` is the
    index of the chosen response."""
    rng = random.Random(seed)
    pool: dict[str, Task] = {}
    for i, rec in enumerate(records, start=1):
        if len(rec.chosen) != 1 or len(rec.rejected) != 1:
            raise DataError(f"{origin}[{i}]: gold chosen/rejected must be single assistant messages")
        task = make_task(rec.prompt, (rec.chosen[0]["content"], rec.rejected[0]["content"]), f"{origin}[{i}]",
                         gold=0)
        if task.task_id not in exclude:
            pool.setdefault(task.task_id, task)
    picked = rng.sample(list(pool.values()), min(n, len(pool)))
    return [replace(shuffled(t, rng), selection={"method": "gold"}) for t in picked]


def mix_gold(selected: Sequence[Task], gold: Sequence[Task], seed: int) -> list[Task]:
    """Selected tasks in their order with the gold tasks inserted at seeded random places."""
    rng = random.Random(seed + 1)
    out = list(selected)
    for task in gold:
        out.insert(rng.randrange(len(out) + 1), task)
    return out


def gold_report(answers: Iterable[tuple[str | None, bool]], min_accuracy: float) -> dict[str, dict[str, Any]]:
    """Per annotator (by id; '' when unknown): gold labels, correct ones, accuracy, and `dropped` when the
    accuracy is below `min_accuracy`. `answers` is (annotator, label matches the known answer) per gold label."""
    counts: dict[str, list[int]] = {}
    for who, correct in answers:
        c = counts.setdefault(who or "", [0, 0])
        c[0] += 1
        c[1] += bool(correct)
    return {who: {"gold_labels": n, "correct": ok, "accuracy": round(ok / n, 4), "dropped": ok / n < min_accuracy}
            for who, (n, ok) in sorted(counts.items())}


# ---- what each tool imports -------------------------------------------------------------------------------

def is_ranking(tasks: Sequence[Task]) -> bool:
    """True when some task has more than two responses: a ranking interface instead of a pairwise one."""
    return any(len(t.responses) > 2 for t in tasks)


def labelstudio_tasks(tasks: Sequence[Task]) -> list[dict[str, Any]]:
    """Label Studio tasks ({data: ...}) for `labelstudio_config`: answer1/answer2 for the Pairwise template,
    items [{id, title, body}] for the Ranker one; `task_id` and `prompt_id` ride along in data."""
    ranking = is_ranking(tasks)
    out = []
    for t in tasks:
        data: dict[str, Any] = {"task_id": t.task_id, "prompt_id": t.prompt_id, "prompt": prompt_text(t.prompt)}
        if ranking:
            data["items"] = [{"id": str(i), "title": f"Answer {i}", "body": r} for i, r in enumerate(t.responses, 1)]
        else:
            data["answer1"], data["answer2"] = t.responses
        out.append({"data": data})
    return out


def labelstudio_config(ranking: bool) -> str:
    """The labeling config XML (Settings > Labeling Interface > Code) matching `labelstudio_tasks`."""
    if ranking:
        body = ('  <Header value="Drag the answers into order, best first"/>\n'
                '  <List name="answers" value="$items" title="Answers"/>\n'
                '  <Ranker name="rank" toName="answers"/>\n')
    else:
        body = ('  <Header value="Which answer is better? Click it."/>\n'
                '  <View style="display: grid; grid-template-columns: 1fr 1fr; column-gap: 1em">\n'
                '    <Text name="answer1" value="$answer1"/>\n'
                '    <Text name="answer2" value="$answer2"/>\n'
                '  </View>\n'
                '  <Pairwise name="comparison" toName="answer1,answer2"/>\n')
    return ('<View>\n  <Header value="Prompt"/>\n  <Text name="prompt" value="$prompt"/>\n' + body + '</View>\n')


def argilla_records(tasks: Sequence[Task]) -> list[dict[str, Any]]:
    """Argilla 2.x records as flat dicts (`dataset.records.log(records)`): id, the fields prompt and
    response-1..k, and the metadata task_id / prompt_id."""
    out = []
    for t in tasks:
        row: dict[str, Any] = {"id": t.task_id, "prompt": prompt_text(t.prompt)}
        row.update({f"response-{i}": r for i, r in enumerate(t.responses, 1)})
        out.append({**row, "task_id": t.task_id, "prompt_id": t.prompt_id})
    return out


def argilla_settings(k: int) -> dict[str, Any]:
    """Argilla 2.x dataset settings (`rg.Settings.from_json(path)`): a text field per response (the first two
    required) and one ranking question over them."""
    def text_field(name: str, title: str, required: bool) -> dict[str, Any]:
        return {"name": name, "title": title, "required": required, "description": None, "type": "text",
                "settings": {"type": "text", "use_markdown": False}}

    def terms(name: str) -> dict[str, Any]:
        return {"name": name, "title": name, "visible_for_annotators": False,
                "settings": {"type": "terms", "values": None, "visible_for_annotators": False}}

    options = [{"value": f"response-{i}", "text": f"Response {i}"} for i in range(1, k + 1)]
    return {"guidelines": "Read the prompt and rank the responses, best first.",
            "fields": [text_field("prompt", "Prompt", True)]
            + [text_field(f"response-{i}", f"Response {i}", i <= 2) for i in range(1, k + 1)],
            "questions": [{"name": "ranking", "title": "Rank the responses, best first", "description": None,
                           "required": True, "type": "ranking", "settings": {"type": "ranking", "options": options}}],
            "metadata": [terms("task_id"), terms("prompt_id")], "vectors": [], "allow_extra_metadata": False}


def plain_rows(tasks: Sequence[Task], *, text_prompt: bool) -> list[dict[str, Any]]:
    """Rows for a spreadsheet or an in-house tool: {task_id, prompt_id, prompt, response_a, response_b,
    preference: '' (fill in a | b | tie), annotator: ''}, or, when some task has more than two responses,
    {..., responses: [...], ranks: [] (fill in, 1 = best), annotator: ''}. Both import as they are."""
    ranking = is_ranking(tasks)
    out = []
    for t in tasks:
        row: dict[str, Any] = {"task_id": t.task_id, "prompt_id": t.prompt_id,
                               "prompt": prompt_text(t.prompt) if text_prompt else t.prompt}
        if ranking:
            row.update(responses=list(t.responses), ranks=[], annotator="")
        else:
            row.update(response_a=t.responses[0], response_b=t.responses[1], preference="", annotator="")
        out.append(row)
    return out
