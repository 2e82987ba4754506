"""The `openai` judge against a real llama.cpp server: llama-cpp-python[server] (0.3.36, built from source by
tests/integrations/setup.sh) serving the embedded default GGUF (SmolLM2-135M-Instruct Q4_1) on loopback.

`align judge judge=openai` in each verdict mode (plain text, `constrain: json_schema`, log-prob confidences)
labels the fixture samples and a few human pairs: every pair ends as a verdict or a counted failure and the judge
report adds up. Then `align online` runs one round with the same server as its judge. What each mode gave is
recorded in judges/README.md ("Measured against llama.cpp").
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from align.cli import main
from align.config import load_config
from align.models.load import GGUF_FILE, _gguf_folder
from align.stages import online

from .servers import call, free_port, serving, venv_python

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "labelstudio"
MODEL = "smollm2-135m"  # the alias the server answers to, sent as `model` by the judge
MODES = {"text": ["judge_options.constrain=none", "judge_options.logprobs=false"],
         # refused by this server (HTTP 500, a validation error): no retries, it would only be refused again
         "json_schema": ["judge_options.constrain=json_schema", "judge_options.logprobs=false",
                         "judge_options.max_retries=0"],
         "json_object": ["judge_options.constrain=json_object", "judge_options.logprobs=false"],
         # one order: the 135M model's two orders nearly always disagree (abstain), leaving no confidence to check
         "logprobs": ["judge_options.constrain=none", "judge_options.logprobs=true", "judge_options.both_orders=false"]}


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL (…/v1) of a llama.cpp server serving the default model's GGUF."""
    python = venv_python("llamacpp")
    if isinstance(python, str):
        pytest.skip(python)
    home = tmp_path_factory.mktemp("llama-cpp")
    port = free_port()
    cmd = [str(python), "-m", "llama_cpp.server", "--model", str(_gguf_folder() / GGUF_FILE),
           "--model_alias", MODEL, "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
           "--n_threads", "2"]
    start = time.monotonic()
    with serving(cmd, f"http://127.0.0.1:{port}/v1/models", home / "server.log", timeout=120):
        print(f"llama.cpp server ready in {time.monotonic() - start:.1f} s", file=sys.stderr)
        yield f"http://127.0.0.1:{port}/v1"


def judge_run(base_url: str, out: Path, *options: str) -> dict:
    """`align judge judge=openai` on the fixture samples (5 pairs) and 4 human pairs; its manifest."""
    argv = ["judge", str(REPO / "stages" / "judge.yaml"), "judge=openai", f"samples={FIXTURES / 'samples.jsonl'}",
            f"human={FIXTURES / 'gold.jsonl'}", f"output_dir={out}", "max_failure_rate=1.0",
            f"judge_options.base_url={base_url}", f"judge_options.model={MODEL}", "judge_options.concurrency=2",
            *options]
    start = time.monotonic()
    assert main(argv) == 0
    print(f"judge {' '.join(options)}: {time.monotonic() - start:.1f} s", file=sys.stderr)
    return json.loads((out / "manifest.json").read_text())


def test_the_server_is_the_default_model(llama_server: str):
    served = call(f"{llama_server}/models")
    assert [m["id"] for m in served["data"]] == [MODEL]


@pytest.mark.parametrize("mode", list(MODES))
def test_openai_judge_against_llama_cpp(llama_server: str, tmp_path: Path, mode: str):
    manifest = judge_run(llama_server, tmp_path / mode, *MODES[mode])
    m = manifest["metrics"]
    verdicts = [json.loads(line) for line in (tmp_path / mode / "verdicts.jsonl").read_text().splitlines()]
    failures = [json.loads(line) for line in (tmp_path / mode / "failures.jsonl").read_text().splitlines()]
    # every pair is a verdict or a counted failure; nothing is lost or double-counted
    assert len(verdicts) == 5 and m["pairs_judged"] + m["failures"] == 5
    assert sum(v["error"] is not None for v in verdicts) == m["failures"]
    assert all(v["winner"] in ("a", "b", "tie", "abstain") for v in verdicts if v["error"] is None)
    assert m["judgements"] == 9  # 5 sample pairs + 4 human pairs (each asked in both orders)
    report = manifest["judge_report"]
    assert report["pairs"] == 4
    assert report["decisive"] + report["abstains"] + report["ties"] + report["failures"] == 4
    assert len(failures) == m["failures"] + report["failures"]
    print(f"{mode}: {json.dumps({k: m[k] for k in ('pairs_judged', 'failures', 'abstains', 'ties')})} "
          f"report {json.dumps(report)}", file=sys.stderr)
    if mode == "json_schema":  # llama-cpp-python 0.3.36 takes response_format types text | json_object only
        assert m["failed_judgements"] == 9 and all("HTTP 500" in f["error"] for f in failures)
    if mode == "json_object":  # the server constrains the answer to the schema: every answer parses
        assert m["failed_judgements"] == 0
    if mode == "logprobs":  # the server returns top log-probabilities: every decisive verdict has a confidence
        decisive = [v for v in verdicts if v["winner"] in ("a", "b")]
        # not always >= 0.5: the 135M model's text can name the letter its own log-probabilities rank lower
        assert all(0 <= v["confidence"] <= 1 for v in decisive), decisive
        assert decisive and "mean_confidence" in m
    else:
        assert all(v["confidence"] is None for v in verdicts)


def test_online_round_with_llama_cpp_as_the_judge(llama_server: str, toy_policy: Path, tmp_path: Path,
                                                  one_thread: None):
    # one order only: the 135M judge nearly always picks the answer shown first, so asking both ways would
    # abstain on every pair and leave DPO nothing; here the point is the loop, not the judge's quality
    options = {"base_url": llama_server, "model": MODEL, "both_orders": False, "logprobs": True,
               "constrain": "json_object", "concurrency": 2}
    judge = ["judge.spec=openai", f"judge.options={json.dumps(options)}"]  # the whole dict: no `function:` left
    cfg = load_config(online.Config, REPO / "stages" / "tiny" / "online.yaml",
                      [f"policy={toy_policy}", f"output_dir={tmp_path / 'online'}", "rounds=1",
                       "prompts_per_round=4", "k=2", "train.max_steps=2", *judge])
    start = time.monotonic()
    out = online.run(cfg)
    print(f"online, one round: {time.monotonic() - start:.1f} s", file=sys.stderr)
    manifest = json.loads((out / "manifest.json").read_text())
    (round_1,) = manifest["rounds"]
    judged = json.loads((out / "round-1" / "judge" / "manifest.json").read_text())
    assert manifest["status"] == "completed" and judged["status"] == "completed"
    assert judged["judge"]["kind"] == "openai"
    assert judged["metrics"]["pairs_judged"] + judged["metrics"]["failures"] == 4  # 4 prompts x one pair of k=2
    assert round_1["ai_pairs"] == judged["metrics"]["preferences"] > 0
