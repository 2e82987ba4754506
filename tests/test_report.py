"""The HTML report on a fake pipeline run folder; a screenshot in headless Chromium when it is installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from align.config import load_config
from align.report.plots import group_curves, panel_of, read_scalars
from align.runs import atomic_write_json
from align.stages import report

CHROMIUM = Path("/usr/bin/chromium")


def _manifest(folder: Path, stage: str, metrics: dict, **extra) -> None:
    atomic_write_json(folder / "manifest.json", {
        "stage": stage, "status": "completed", "config": {"output_dir": str(folder), "seed": 1},
        "inputs": {"data/x.jsonl": "ab" * 32}, "outputs": extra.pop("outputs", {}), "metrics": metrics,
        **extra, "versions": {"torch": "2.13.0", "align": "0.1.0"}, "git_sha": "0123456789abcdef",
        "started_at": "2026-11-22T10:00:00+00:00", "finished_at": "2026-11-22T10:05:00+00:00"})


def _scalars(folder: Path, series: dict[str, list[float]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(folder / "tb"))
    for tag, values in series.items():
        for step, v in enumerate(values):
            writer.add_scalar(tag, v, step)
    writer.close()


def fake_pipeline(root: Path) -> Path:
    """A pipeline folder with sft/reward/ppo curves, an import manifest and an eval.json."""
    steps = {}
    for name in ("sft", "import", "reward", "ppo", "eval"):
        (root / name).mkdir(parents=True)
        steps[name] = {"dir": name, "status": "ran", "seconds": 12.5, "run_seconds": 12.5, "fingerprint": "f" * 64}
    _scalars(root / "sft", {"train/loss": [2.0, 1.5, 1.2, 1.1], "eval/loss": [1.9, 1.4]})
    _manifest(root / "sft", "sft", {"eval_loss_after": 1.4}, outputs={"model": "model"})
    _manifest(root / "import", "import", {"read": 40, "accepted": 36, "rejected": 4, "agreement": 0.85},
              rejected_by_reason={"empty": 3, "duplicate": 1})
    _scalars(root / "reward", {"eval/accuracy": [0.6, 0.8], "train/loss": [0.7, 0.5, 0.4]})
    _manifest(root / "reward", "reward", {"eval_accuracy": 0.8})
    _scalars(root / "ppo", {"ppo/reward_mean": [0.1, 0.3, 0.5], "ppo/kl": [0.0, 0.02, 0.05],
                            "ppo/response_length": [60, 50, 40], "train/learning_rate": [1e-4] * 3})
    _manifest(root / "ppo", "ppo", {"reward_mean": 0.5})
    win = {"wins": 14, "losses": 4, "ties": 2, "abstains": 0, "n": 20, "rate": 0.75, "low": 0.53, "high": 0.89}
    eval_data = {
        "judge": {"name": "align.judges.house_style:house_style_score", "kind": "score",
                  "training_judges": ["llm"], "differs_from_training_judge": True},
        "prompts": {"file": "data/prompts/eval.jsonl", "n": 20}, "baseline": "sft",
        "sampling": {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 64, "seed": 0},
        "policies": [
            {"name": "sft", "reward_mean": 0.12, "judge_mean": 0.4, "win_rate": None, "kl_to_reference": 0.3,
             "reference": "base", "length_tokens_mean": 55.0, "finished_fraction": 0.9},
            {"name": "ppo", "reward_mean": 0.81, "judge_mean": 0.7, "win_rate": win, "kl_to_reference": 0.05,
             "reference": "sft", "length_tokens_mean": 31.5, "finished_fraction": 1.0}],
        "kl": {"estimator": "exact", "reference": "sft", "definition": "Σ_v π(v|prefix)·(log π − log π_ref) <per token>"},
        "side_by_side": [{"prompt": "How do I store <basil>?",
                          "responses": {"sft": {"text": "Great question! <script>alert(1)</script>", "reward": 0.1,
                                                "judge": 0.2},
                                        "ppo": {"text": "Keep basil in water. Tip: trim stems.", "reward": 0.9,
                                                "judge": 0.9, "outcome": "win"}}}],
    }
    atomic_write_json(root / "eval" / "eval.json", eval_data)
    _manifest(root / "eval", "eval", {"ppo_win_rate": 0.75}, outputs={"eval": "eval.json"})
    atomic_write_json(root / "manifest.json", {"stage": "pipeline", "status": "completed", "steps": steps,
                                               "git_sha": "0123456789abcdef", "config": {}})
    return root


def test_panels_and_scalars(tmp_path: Path) -> None:
    assert panel_of("train/rewards/accuracies") == "accuracy"
    assert panel_of("ppo/kl") == "KL" and panel_of("ppo/reward_mean") == "reward"
    assert panel_of("train/loss") == "loss" and panel_of("train/learning_rate") is None
    assert panel_of("time/score") is None  # a timing, not a score
    _scalars(tmp_path, {"train/loss": [3.0, 2.0, 1.0]})
    scalars = read_scalars(tmp_path / "tb")
    assert scalars["train/loss"] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert list(group_curves(scalars)) == ["loss"]
    assert read_scalars(tmp_path / "missing") == {}


def test_report_on_fake_pipeline(tmp_path: Path) -> None:
    root = fake_pipeline(tmp_path / "pipe")
    out = report.run(load_config(report.Config, Path("stages/report.yaml"), [f"run_dir={root}"]))
    assert out == root / "report"
    html = (out / "report.html").read_text()
    # one embedded curve figure per stage that logged scalars (sft, reward, ppo), PNGs beside the HTML too
    assert len(re.findall(r'<img class="curves"[^>]*src="data:image/png;base64,', html)) == 3
    assert sorted(p.name for p in (out / "plots").glob("*.png")) == ["ppo.png", "reward.png", "sft.png"]
    # the eval table has one row per policy with the win rate and its interval
    assert html.count('<tr class="eval-row">') == 2
    assert "75.0% [53.0%, 89.0%]" in html and "14 / 4 / 2 / 0" in html
    assert "a different one" in html and "<b>llm</b>" in html and "house_style_score" in html
    # how the KL column was estimated, with the definition escaped like every other text
    assert re.search(r'id="kl-estimator">KL to reference \(exact estimator, reference\s+<b>sft</b>\): '
                     r'Σ_v π\(v\|prefix\)·\(log π − log π_ref\) &lt;per token&gt;', html)
    # data statistics, lineage, and escaping of model output
    assert "1m 02.5s" in html  # the steps table: 5 steps of 12.5 s
    assert "agreement" in html and "rejected_by_reason" in html and "0123456789ab" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>" not in html
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["metrics"]["curve_figures"] == 3


def test_report_of_one_stage_run_goes_beside_it(tmp_path: Path) -> None:
    root = fake_pipeline(tmp_path / "pipe")
    out = report.run(report.Config(run_dir=str(root / "sft")))
    assert out == root / "sft-report" and not (root / "sft" / "report").exists()
    assert '<img class="curves"' in (out / "report.html").read_text()


def test_report_errors_on_empty_folder(tmp_path: Path) -> None:
    from align.errors import DataError

    with pytest.raises(DataError, match="no stage run"):
        report.run(report.Config(run_dir=str(tmp_path)))


def _count(pixels, colour: tuple[int, int, int], tol: int = 30) -> int:
    return sum(1 for p in pixels if all(abs(a - b) <= tol for a, b in zip(p[:3], colour)))


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (/usr/bin/chromium)")
def test_report_screenshot_shows_table_and_curves(tmp_path: Path) -> None:
    from PIL import Image

    root = fake_pipeline(tmp_path / "pipe")
    out = report.run(report.Config(run_dir=str(root)))
    shot = tmp_path / "shot.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
           "--hide-scrollbars", (out / "report.html").resolve().as_uri()]
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 2000)
    width, height = img.size
    # The eval table sits near the top: its header row is the report's blue (#3b6ea5).
    top = list(img.crop((0, 0, width, 700)).getdata())
    assert _count(top, (0x3B, 0x6E, 0xA5), tol=12) > 2000
    # The curves lie below it: matplotlib's first line colour (#1f77b4) and orange (#ff7f0e) appear there.
    below = list(img.crop((0, 300, width, height)).getdata())
    assert _count(below, (0x1F, 0x77, 0xB4)) > 300
    assert _count(below, (0xFF, 0x7F, 0x0E)) > 100
    # and the page is not blank
    assert sum(1 for p in below if sum(p) < 600) > 10_000
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
