"""judge: turn samples (from `align generate`) into AI preference records with a judge from judges/.

Outputs in the run folder: preferences.jsonl (canonical records, meta.source = "ai", the judge id and its
rationale), verdicts.jsonl (every judged pair, ties and abstains included), failures.jsonl (unparseable answers,
HTTP errors after retries, missing scores: counted, never turned into preferences) and judge_cache.jsonl
(unless cache_dir is set), which lets a re-run with resume=true skip every judgement already made.

Every input (samples, `human=` pairs, the judge spec) is resolved and read before anything is judged. When more
than `max_failure_rate` of the judgements fail, the stage writes what it has (so resume=true continues from the
cache) and then fails with the counts. With `human=`, the manifest gets a `judge_report` (align.judges.report):
agreement, Cohen's kappa, position and length bias, abstain and failure rates against the human labels.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from align.config import opt
from align.data.records import Message, check_messages, prompt_id, read_jsonl, read_preferences, write_jsonl
from align.errors import AlignError, ConfigError, DataError
from align.judges import Verdict, failure, redact, verdict_from_scores
from align.judges.cache import JudgeCache, cache_key
from align.judges.registry import LoadedJudge, load_judge
from align.judges.report import Row, format_report, judge_report
from align.log import progress
from align.runs import Run, resolve_input, start_run, until_stopped

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    # how the judging runs, not what it decides: a resume may change them (the cache keys on the verdict's inputs)
    RESUME_IGNORES: ClassVar[tuple[str, ...]] = (
        "batch_size", "max_failure_rate", "cache_dir", "judge_options.timeout_s", "judge_options.max_retries",
        "judge_options.backoff_s", "judge_options.max_backoff_s", "judge_options.concurrency",
        "judge_options.base_url")

    samples: str = opt("runs/generate", "samples.jsonl from `align generate`, or its run folder")
    judge: str = opt("house_style", "judge spec: a name under judges/, a YAML path, or package.module:ClassName")
    judge_options: dict[str, Any] = opt({}, "override the spec's options, e.g. judge_options.path=runs/reward2")
    output_dir: str = opt("runs/judge", "where preferences.jsonl and the manifest go")
    overwrite: bool = opt(False, "replace an existing output_dir")
    resume: bool = opt(False, "keep output_dir (and its judge cache): judgements already made are not redone")
    seed: int = opt(0, "seed for the order in which human pairs are shown to the judge", ge=0)
    pairing: Literal["best_worst", "all"] = opt(
        "best_worst", "score judges: best_worst (one pair per prompt) | all (every pair past min_margin); "
                      "pairwise judges always compare every pair")
    min_margin: float = opt(0.0, "score judges: a pair is a preference only when the scores differ by this much",
                            ge=0.0)
    human: str = opt("", "optional human preference JSONL (or `align import` run folder) for the same prompts: "
                         "the judge labels those pairs too and the manifest gets a judge_report (agreement, "
                         "kappa, position and length bias)")
    human_max: int = opt(500, "judge at most this many human pairs", ge=0)
    cache_dir: str = opt("", "folder for judge_cache.jsonl shared across runs ('': the run folder)")
    batch_size: int = opt(32, "pairs (or responses) per judge call; the cache is saved after each", ge=1)
    max_prompts: int = opt(0, "judge only the first N prompts (0: all)", ge=0)
    max_failure_rate: float = opt(0.2, "fail the stage (after writing what it has; resume=true continues) when "
                                       "more than this share of judgements failed", ge=0.0, le=1.0)


@dataclass
class Item:
    """One thing to judge: a pair (pairwise judges) or a single response (score judges)."""

    prompt: list[Message]
    responses: tuple[str, ...]


def read_samples(path: Path) -> list[dict[str, Any]]:
    rows = []
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict) or not isinstance(obj.get("responses"), list):
            raise DataError(f"{where}: a samples row needs 'prompt' and a list 'responses' (from align generate)")
        if not all(isinstance(r, str) for r in obj["responses"]):
            raise DataError(f"{where}: responses must be strings")
        rows.append({**obj, "prompt": check_messages(obj.get("prompt"), where, field_name="prompt"),
                     "origin": where})
    return rows


def candidates(responses: list[str]) -> list[str]:
    """Distinct non-empty responses in their original order (identical texts cannot make a preference)."""
    seen: dict[str, None] = {}
    for r in responses:
        if r.strip() and r not in seen:
            seen[r] = None
    return list(seen)


def run_judge(loaded: LoadedJudge, cache: JudgeCache, items: list[Item], batch_size: int,
              counts: dict[str, int]) -> list[Any]:
    """Judge every item not in the cache, in batches (cache saved after each); returns one result per item:
    a Verdict (pairwise) or a float | None (score)."""
    keys = [cache_key(loaded.identity, it.prompt, list(it.responses)) for it in items]
    fresh: dict[str, Any] = {}
    todo = list(dict.fromkeys(k for k in keys if k not in cache))
    first = {k: i for i, k in reversed(list(enumerate(keys)))}
    counts["cached"] += len(set(keys)) - len(todo)
    shown = time.monotonic()
    def saved(start: int) -> str:  # said when a stop signal ends the run after the batch at `start`
        return f" after judging {min(start + batch_size, len(todo))}/{len(todo)} (verdicts cached in {cache.path})"

    # a stop signal (SIGTERM, Ctrl-C, SIGUSR1) lets the batch in flight finish and be cached, then stops
    batches = until_stopped(range(0, len(todo), batch_size), saved)
    for start in progress(batches, total=-(-len(todo) // batch_size), desc="judge", unit="batch"):
        chunk = [items[first[k]] for k in todo[start:start + batch_size]]
        prompts = [it.prompt for it in chunk]
        if loaded.mode == "pairwise":
            results: list[Any] = loaded.judge.judge(prompts, [(it.responses[0], it.responses[1]) for it in chunk])
        else:
            results = loaded.judge.score(prompts, [it.responses[0] for it in chunk])
        if len(results) != len(chunk):
            raise ConfigError(f"judge {loaded.name} returned {len(results)} results for {len(chunk)} inputs")
        batch_keys = todo[start:start + batch_size]
        fresh.update(zip(batch_keys, results))
        cache.put([(k, r.to_json() if isinstance(r, Verdict) else {"score": r}) for k, r in zip(batch_keys, results)
                   if (r.error is None if isinstance(r, Verdict) else r is not None)])
        done = min(start + batch_size, len(todo))
        if time.monotonic() - shown >= 5 or done == len(todo):  # a progress line every few seconds, not per batch
            shown = time.monotonic()
            log.info(f"  judged {done}/{len(todo)} new ({counts['cached']} from cache)")
    out = []
    for k in keys:
        if k in fresh:
            out.append(fresh[k])
        elif loaded.mode == "pairwise":
            out.append(Verdict.from_json(cache.get(k)))
        else:
            out.append(cache.get(k)["score"])
    counts["judgements"] = counts.get("judgements", 0) + len(out)
    counts["failed"] = counts.get("failed", 0) + sum((r.failed if isinstance(r, Verdict) else r is None) for r in out)
    return out


def judge_rows(loaded: LoadedJudge, cache: JudgeCache, rows: list[dict[str, Any]], cfg: Config,
               counts: dict[str, int]) -> list[tuple[dict[str, Any], str, str, Verdict, list[float] | None]]:
    """(row, response_a, response_b, verdict, scores) for every pair the judge decided on or failed at."""
    per_row = [candidates(r["responses"]) for r in rows]
    counts["prompts_without_pair"] = sum(len(c) < 2 for c in per_row)
    results = []
    if loaded.mode == "pairwise":
        pairs = [(row, a, b) for row, cands in zip(rows, per_row) for a, b in itertools.combinations(cands, 2)]
        verdicts = run_judge(loaded, cache, [Item(row["prompt"], (a, b)) for row, a, b in pairs], cfg.batch_size,
                             counts)
        return [(row, a, b, v, None) for (row, a, b), v in zip(pairs, verdicts)]
    singles = [(row, r) for row, cands in zip(rows, per_row) if len(cands) >= 2 for r in cands]
    scores = run_judge(loaded, cache, [Item(row["prompt"], (r,)) for row, r in singles], cfg.batch_size, counts)
    by_row: dict[int, list[tuple[str, float | None]]] = {}
    for (row, r), s in zip(singles, scores):
        by_row.setdefault(id(row), []).append((r, s))
    for row in rows:
        scored = by_row.get(id(row), [])
        for r, s in scored:
            if s is None:
                results.append((row, r, "", failure("the judge returned no score for this response"), None))
        ok = [(r, s) for r, s in scored if s is not None]
        if len(ok) < 2:
            continue
        if cfg.pairing == "best_worst":
            ranked = sorted(ok, key=lambda rs: rs[1], reverse=True)
            chosen_pairs = [(ranked[0], ranked[-1])]
        else:
            chosen_pairs = list(itertools.combinations(ok, 2))
        for (a, sa), (b, sb) in chosen_pairs:
            results.append((row, a, b, verdict_from_scores(sa, sb, cfg.min_margin), [sa, sb]))
    return results


def preference(row: dict[str, Any], a: str, b: str, v: Verdict, scores: list[float] | None,
               loaded: LoadedJudge) -> dict[str, Any]:
    chosen, rejected = (a, b) if v.winner == "a" else (b, a)
    meta: dict[str, Any] = {"source": "ai", "judge": loaded.id, "judge_kind": loaded.kind, "rationale": v.reason,
                            "prompt_id": row.get("id"), "origin": row["origin"],
                            "policy": (row.get("generation") or {}).get("model")}
    if v.confidence is not None:
        meta["confidence"] = v.confidence
    if scores is not None:
        s_chosen, s_rejected = scores if v.winner == "a" else scores[::-1]
        meta["scores"] = {"chosen": s_chosen, "rejected": s_rejected}
        meta["margin"] = s_chosen - s_rejected  # what `align reward use_margin=true` reads
    return {"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "meta": meta}


@dataclass
class HumanPairs:
    """Human-labelled pairs to show the judge: `rows` like samples rows (responses in a seeded random order) and
    `truth`, the index (0 or 1) of the response the humans chose."""

    path: Path
    records: int
    rows: list[dict[str, Any]]
    truth: list[int]
    prompt_ids: list[str]


def read_human(cfg: Config) -> HumanPairs | None:
    """Resolve and read `human=` (before anything is judged): a preference JSONL or an import run folder."""
    if not cfg.human:
        return None
    path = resolve_input(cfg.human, what="human preferences", stages=("import", "preferences"),
                         outputs=("preferences", "train"))
    records = read_preferences(path)[: cfg.human_max]
    rng = random.Random(cfg.seed)
    rows, truth = [], []
    for i, rec in enumerate(records):
        chosen, rejected = rec.chosen[-1]["content"], rec.rejected[-1]["content"]
        flip = rng.random() < 0.5
        rows.append({"prompt": rec.prompt, "responses": [rejected, chosen] if flip else [chosen, rejected],
                     "origin": f"{path}#{i}"})
        truth.append(1 if flip else 0)
    return HumanPairs(path, len(records), rows, truth, [prompt_id(r.prompt) for r in records])


def report_rows(human: HumanPairs, results: list[tuple[dict[str, Any], str, str, Verdict, Any]]) -> list[Row]:
    """One report Row per human pair the judge was asked about, in the pair's shown order (responses[0] is "a");
    pairs it could not be asked about (identical or empty responses) are left out."""
    by_row: dict[int, list[tuple[str, Verdict]]] = {}
    for row, a, _, v, _ in results:
        by_row.setdefault(id(row), []).append((a, v))
    out = []
    for row, truth in zip(human.rows, human.truth):
        found = by_row.get(id(row))
        if not found:
            continue
        first, second = row["responses"]
        lengths = {"human": "ab"[truth], "len_a": len(first), "len_b": len(second)}
        if any(v.failed for _, v in found):
            out.append(Row(verdict="failed", **lengths))
            continue
        a, v = found[0]
        swapped = a != first  # score judges list the better-scored response first
        swap = {"a": "b", "b": "a"}
        verdict = swap.get(v.winner, v.winner) if swapped else v.winner
        picks = tuple(swap.get(p, p) for p in v.orders) if swapped else v.orders
        out.append(Row(verdict=verdict, picks=picks, shown_first=("a", "b")[: len(picks)], **lengths))
    return out


def human_metrics(human: HumanPairs, report: dict[str, Any], sample_ids: set[str]) -> dict[str, float]:
    """The manifest's flat human_* metrics (the full numbers are in judge_report)."""
    return {"human_pairs": human.records, "human_decisive": report["decisive"],
            "human_agreement": report["agreement"] or 0.0,
            "human_coverage": report["decisive"] / human.records if human.records else 0.0,
            "human_prompts_in_samples": sum(pid in sample_ids for pid in human.prompt_ids)}


def clean(v: Verdict) -> Verdict:
    """The verdict with any credential-looking text (Bearer tokens, user:password@ in URLs) redacted."""
    return dataclasses.replace(v, reason=redact(v.reason), error=None if v.error is None else redact(v.error))


def fail_on_failures(run_: Run, counts: dict[str, int], max_rate: float, judge_id: str) -> None:
    """Mark the run failed and raise when more than `max_rate` of the judgements failed."""
    total, failed = counts.get("judgements", 0), counts.get("failed", 0)
    if not total or failed / total <= max_rate:
        return
    message = (f"judge {judge_id}: {failed} of {total} judgements failed ({failed / total:.0%} > "
               f"max_failure_rate={max_rate:g}); see {run_.dir / 'failures.jsonl'}. Fix the judge or its "
               f"endpoint and re-run with resume=true (finished judgements are cached)")
    run_.fail(message)
    raise AlignError(message)


def run(cfg: Config) -> Path:
    samples_path = resolve_input(cfg.samples, what="samples", stages=("generate",), outputs=("samples",))
    rows = read_samples(samples_path)
    if cfg.max_prompts > 0:
        rows = rows[: cfg.max_prompts]
    human = read_human(cfg)
    loaded = load_judge(cfg.judge, cfg.judge_options)
    log.info(f"judge {loaded.id} ({loaded.kind}, {loaded.mode}) on {len(rows)} prompts from {samples_path}")
    run_ = start_run("judge", cfg, resume=cfg.resume)
    run_.add_input(samples_path)
    if human is not None:
        run_.add_input(human.path)
    cache = JudgeCache((Path(cfg.cache_dir) if cfg.cache_dir else run_.dir) / "judge_cache.jsonl")
    counts = {"cached": 0}

    results = [(row, a, b, clean(v), s) for row, a, b, v, s in judge_rows(loaded, cache, rows, cfg, counts)]
    prefs = [preference(row, a, b, v, s, loaded) for row, a, b, v, s in results if v.winner in ("a", "b")]
    fails = [{"origin": row["origin"], "prompt_id": row.get("id"), "prompt": row["prompt"],
              "responses": [r for r in (a, b) if r], "error": v.error, "judge": loaded.id}
             for row, a, b, v, _ in results if v.failed]
    verdicts = [{"origin": row["origin"], "prompt_id": row.get("id"), "response_a": a, "response_b": b,
                 **v.to_json(), **({"scores": s} if s is not None else {})} for row, a, b, v, s in results]
    report = None
    if human is not None:  # pairs in a seeded random order; score judges always pair best with worst
        human_cfg = dataclasses.replace(cfg, pairing="best_worst")
        human_results = [(row, a, b, clean(v), s)
                         for row, a, b, v, s in judge_rows(loaded, cache, human.rows, human_cfg, counts)]
        report = judge_report(report_rows(human, human_results))
        fails += [{"origin": row["origin"], "prompt": row["prompt"], "responses": [r for r in (a, b) if r],
                   "error": v.error, "judge": loaded.id, "human_pair": True}
                  for row, a, b, v, _ in human_results if v.failed]
    write_jsonl(run_.dir / "preferences.jsonl", prefs)
    write_jsonl(run_.dir / "verdicts.jsonl", verdicts)
    write_jsonl(run_.dir / "failures.jsonl", fails)
    for name in ("preferences", "verdicts", "failures"):
        run_.add_output(name, run_.dir / f"{name}.jsonl")

    judged = [v for _, _, _, v, _ in results if not v.failed]
    both = [v for v in judged if len(v.orders) == 2]
    confident = [v.confidence for v in judged if v.confidence is not None]
    run_.metrics.update({
        "prompts": len(rows), "pairs_judged": len(judged), "preferences": len(prefs),
        "ties": sum(v.winner == "tie" for v in judged), "abstains": sum(v.winner == "abstain" for v in judged),
        "abstain_rate": sum(v.winner == "abstain" for v in judged) / len(judged) if judged else 0.0,
        "position_flips": sum(v.orders[0] != v.orders[1] for v in both),
        "position_flip_rate": sum(v.orders[0] != v.orders[1] for v in both) / len(both) if both else 0.0,
        "failures": sum(v.failed for _, _, _, v, _ in results), "cached_judgements": counts["cached"],
        "judgements": counts.get("judgements", 0), "failed_judgements": counts.get("failed", 0),
        "failure_rate": counts.get("failed", 0) / counts["judgements"] if counts.get("judgements") else 0.0,
        "prompts_without_pair": counts.get("prompts_without_pair", 0),
        **({"mean_confidence": sum(confident) / len(confident)} if confident else {})})
    run_.extra["judge"] = {"id": loaded.id, "name": loaded.name, "kind": loaded.kind, "mode": loaded.mode,
                           "config": loaded.config}
    if human is not None and report is not None:
        run_.metrics.update(human_metrics(human, report, {str(r.get("id")) for r in rows}))
        run_.extra["judge_report"] = report
    m = run_.metrics
    print(f"{m['preferences']:.0f} preferences from {m['pairs_judged']:.0f} judged pairs "
          f"({m['ties']:.0f} ties, {m['abstains']:.0f} abstains, {m['failures']:.0f} failures, "
          f"position flips {m['position_flip_rate']:.0%}) -> {run_.dir / 'preferences.jsonl'}", flush=True)
    if report is not None:
        print(format_report(report), flush=True)
    fail_on_failures(run_, counts, cfg.max_failure_rate, loaded.id)
    if not prefs:
        log.warning("warning: no preferences were produced (every pair tied, abstained or failed); see verdicts.jsonl")
    return run_.finish()
