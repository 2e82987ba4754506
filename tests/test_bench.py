"""The bench driver (`python -m align.bench`): A/B alternation, the numbers it derives, and one tiny end-to-end run."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import REPO

from align.bench.__main__ import Measure, compare, fmt_seconds, ppo_parts, run_child, sft_mfu
from align.errors import AlignError

LAST_LINE = re.compile(r"^bench: sft_vs_trl=(\S+) reward_vs_trl=(\S+) dpo_vs_trl=(\S+) generate_vs_plain=(\S+) "
                       r"ppo_step_s=(\S+)( .*)?$")


def test_compare_alternates_and_reports_the_median_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[str] = []
    align_values, raw_values = iter([6.0, 2.0, 9.0]), iter([2.0, 2.0, 3.0])  # ratios 3, 1, 3

    def side(name: str, values, rss: float):
        def run() -> Measure:
            calls.append(name)
            return Measure(next(values), rss, 0.0)
        return run

    med, a, b = compare("SFT", "tokens/s", (side("A", align_values, 100.0), side("B", raw_values, 50.0)), 3)
    assert calls == ["A", "B", "A", "B", "A", "B"]
    assert med == 3.0 and [x.value for x in a] == [6.0, 2.0, 9.0] and [x.value for x in b] == [2.0, 2.0, 3.0]
    assert capsys.readouterr().out.strip() == "| SFT | tokens/s | 6.0 | 2.0 | 3.00 | 1.00-3.00 | 100 | 50 |"


def test_sft_mfu_is_4n_flop_per_token_over_the_peak() -> None:
    # 1,000 frozen parameters (1,100 total, 100 trainable): 4,000 FLOP/token; 500 tokens/s = 2e6 FLOP/s of 1e7.
    mfu, flop = sft_mfu(500.0, {"total_params": 1100.0, "trainable_params": 100.0}, peak_gflops=0.01)
    assert flop == 4000
    assert mfu == pytest.approx(0.2)


def test_ppo_parts_medians_per_key_and_per_step_total() -> None:
    rows = [{"time/generate": 1.0, "time/score": 0.5, "time/train": 2.0, "step": 1},
            {"time/generate": 3.0, "time/score": 0.1, "time/train": 1.0, "step": 2},
            {"time/generate": 2.0, "time/score": 0.2, "time/train": 4.0, "step": 3}]
    parts, step_s = ppo_parts(rows)
    assert parts == {"generate": 2.0, "score": 0.2, "train": 2.0}
    assert step_s == pytest.approx(4.1)  # per-step totals 3.5, 4.1, 6.2


def test_ppo_step_seconds_keep_small_numbers_readable() -> None:
    assert [fmt_seconds(25.06), fmt_seconds(1.0), fmt_seconds(0.0123), fmt_seconds(float("nan"))] == [
        "25.1", "1.0", "0.0123", "nan"]


def test_a_failing_child_raises_with_the_tail_of_its_log(tmp_path) -> None:
    with pytest.raises(AlignError, match=r"failed \(exit 3\).*\n.*boom"):
        run_child([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], tmp_path / "child.log")
    _, rss = run_child([sys.executable, "-c", "x = bytearray(64 * 2**20)"], tmp_path / "ok.log")
    assert rss > 64  # MiB: the child's own peak, which held 64 MiB


@pytest.mark.slow  # ~14 child processes (each imports torch + transformers + trl): 1.5-3 minutes on 2 cores
def test_tiny_bench_prints_every_row_and_the_machine_readable_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "align.bench", "--tiny", "--repeats", "1", "--steps", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    for row in ("| SFT vs TRL SFTTrainer | tokens/s |", "| reward vs TRL RewardTrainer | pairs/s |",
                "| DPO vs TRL DPOTrainer | pairs/s |", "| hf Sampler vs plain generate | new tokens/s |"):
        assert any(line.startswith(row) for line in lines), row
    assert any(line.startswith("SFT MFU: align ") for line in lines)
    assert any(line.startswith("| generate |") for line in lines) and any(line.startswith("| score |") for line in lines)
    assert any(line.startswith("max deviation of s/example from their mean: ") for line in lines)
    match = LAST_LINE.match(lines[-1])
    assert match, lines[-1]
    values = [float(v) for v in match.groups()[:5]]
    assert all(v > 0 for v in values), lines[-1]
    assert re.search(r" sft_mfu=\S+ ppo_tokens_s=\S+ ppo_step_exact_s=\S+ scale_dev_pct=\S+ sft_tokens_s=\S+ "
                     r"reward_pairs_s=\S+ dpo_pairs_s=\S+ generate_tokens_s=\S+$", lines[-1])
    assert all(float(v) > 0 for v in re.findall(r"_(?:tokens|pairs)_s=(\S+)", lines[-1])), lines[-1]
