"""report: a self-contained HTML page (plus PNG plots) for a pipeline run folder.

Shows training curves per stage (from each stage's `tb/` TensorBoard folder: loss, accuracy, reward, KL,
length), the evaluation table and side-by-side samples (from the eval stage's `eval.json`), data statistics
(import and judge manifests) and lineage (configs, input hashes, package versions, git sha).
Works on a pipeline folder (stage order from its manifest), any folder of stage run folders, or one run folder.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from align.config import opt
from align.errors import DataError
from align.report import png_data_uri, render_html
from align.report.plots import group_curves, plot_curves, read_scalars
from align.runs import atomic_write_text, now, read_manifest, start_run

STANDARD_KEYS = {"stage", "status", "config", "inputs", "outputs", "metrics", "versions", "git_sha", "started_at",
                 "finished_at"}
DATA_STAGES = ("import", "judge", "preferences")


@dataclass(frozen=True)
class Config:
    run_dir: str = opt("runs/pipeline", "pipeline run folder (or a folder of stage runs, or one stage run)")
    output_dir: str = opt("", "where report.html and plots/ go ('' = <run_dir>/report; <run_dir>-report for a "
                              "single stage run)")
    overwrite: bool = opt(True, "replace an existing report folder (a report is cheap to redo)")
    seed: int = opt(0, "unused (every stage has one)", ge=0)
    title: str = opt("align pipeline report", "page title")
    embed_images: bool = opt(True, "embed the PNG plots in the HTML (self-contained) instead of linking plots/")
    max_samples: int = opt(8, "side-by-side samples shown", ge=0)


@dataclass
class StageRun:
    name: str  # the step name in the pipeline (or the folder name)
    dir: Path
    manifest: dict[str, Any]


def find_stage_runs(run_dir: Path) -> list[StageRun]:
    """Stage runs in `run_dir`: the pipeline manifest's steps in order, else subfolders by start time."""
    run_dir = Path(run_dir)
    top = read_manifest(run_dir)
    if top and top.get("stage") != "pipeline":
        return [StageRun(run_dir.name, run_dir, top)]
    runs: list[StageRun] = []
    if top and top.get("steps"):
        for name, step in top["steps"].items():
            folder = run_dir / step.get("dir", name)
            manifest = read_manifest(folder)
            if manifest is not None:
                runs.append(StageRun(name, folder, manifest))
        return runs
    for folder in sorted(p for p in run_dir.iterdir() if p.is_dir()) if run_dir.is_dir() else []:
        manifest = read_manifest(folder)
        if manifest is not None:
            runs.append(StageRun(folder.name, folder, manifest))
    return sorted(runs, key=lambda r: r.manifest.get("started_at") or "")


def load_eval(runs: list[StageRun], max_samples: int) -> dict[str, Any] | None:
    """The newest eval stage's eval.json, side-by-side samples cut to `max_samples`."""
    for r in reversed(runs):
        if r.manifest.get("stage") == "eval":
            path = r.dir / r.manifest.get("outputs", {}).get("eval", "eval.json")
            if path.is_file():
                data = json.loads(path.read_text())
                data["side_by_side"] = data.get("side_by_side", [])[:max_samples]
                return data
    return None


def step_rows(run_dir: Path) -> tuple[list[dict[str, Any]], float | None, str | None]:
    """(pipeline steps with status and seconds, total seconds, pipeline status) from the pipeline manifest."""
    top = read_manifest(run_dir)
    if not top or top.get("stage") != "pipeline":
        return [], None, None
    rows = [{"name": name, "status": "writing this report" if name == "report" and s.get("status") == "running"
             else s.get("status"), "seconds": s.get("seconds"), "run_seconds": s.get("run_seconds"),
             "run_dir": str(Path(run_dir) / s.get("dir", name))} for name, s in top.get("steps", {}).items()]
    total = sum(r["run_seconds"] or 0.0 for r in rows)
    return rows, total, top.get("status") if top.get("status") != "running" else None


def curve_images(runs: list[StageRun], plots_dir: Path, embed: bool) -> list[dict[str, str]]:
    """Write plots/<step>.png for every stage with TensorBoard scalars; return {stage, src} for the template."""
    out = []
    for r in runs:
        grouped = group_curves(read_scalars(r.dir / "tb"))
        if not grouped:
            continue
        png = plot_curves(f"{r.name} ({r.manifest.get('stage')})", grouped)
        path = plots_dir / f"{r.name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        out.append({"stage": r.name, "src": png_data_uri(png) if embed else f"plots/{path.name}"})
    return out


def data_stats(runs: list[StageRun]) -> list[dict[str, Any]]:
    """Metrics of the data-producing stages (import: read/accepted/rejected/agreement; judge: pairs, abstains)."""
    out = []
    for r in runs:
        if r.manifest.get("stage") not in DATA_STAGES:
            continue
        details = {k: json.dumps(v, indent=2, default=str) for k, v in r.manifest.items() if k not in STANDARD_KEYS}
        out.append({"stage": f"{r.name} ({r.manifest.get('stage')})", "metrics": r.manifest.get("metrics", {}),
                    "details": details})
    return out


def lineage(runs: list[StageRun]) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """(package versions of the first stage, one entry per stage with config YAML, inputs, outputs, git sha)."""
    versions = next((r.manifest.get("versions") for r in runs if r.manifest.get("versions")), {}) or {}
    rows = []
    for r in runs:
        m = r.manifest
        rows.append({"name": r.name, "stage": m.get("stage"), "status": m.get("status"), "git_sha": m.get("git_sha"),
                     "started_at": m.get("started_at"), "finished_at": m.get("finished_at"),
                     "inputs": m.get("inputs", {}), "outputs": m.get("outputs", {}),
                     "config": yaml.safe_dump(m.get("config", {}), sort_keys=False),
                     "versions": m.get("versions", {}), "versions_differ": m.get("versions", versions) != versions})
    return versions, rows


def build_context(cfg: Config, plots_dir: Path) -> dict[str, Any]:
    run_dir = Path(cfg.run_dir)
    runs = [r for r in find_stage_runs(run_dir) if r.manifest.get("stage") != "report"]
    steps, total, status = step_rows(run_dir)
    versions, stage_lineage = lineage(runs)
    top = read_manifest(run_dir) or {}
    return {
        "title": cfg.title, "run_dir": str(run_dir), "generated_at": now(),
        "git_sha": top.get("git_sha") or next((r.manifest.get("git_sha") for r in runs if r.manifest.get("git_sha")),
                                               None),
        "pipeline_status": status, "steps": steps, "total_seconds": total,
        "eval": load_eval(runs, cfg.max_samples), "curves": curve_images(runs, plots_dir, cfg.embed_images),
        "data_stats": data_stats(runs), "versions": versions, "lineage": stage_lineage,
    }


def run(cfg: Config) -> Path:
    run_dir = Path(cfg.run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run_dir {run_dir} not found; point run_dir= at a pipeline (or stage) run folder")
    if not find_stage_runs(run_dir):
        raise DataError(f"{run_dir} holds no stage run (no manifest.json in it or its subfolders); "
                        f"run `align pipeline` first or pass run_dir=<a run folder>")
    top = read_manifest(run_dir)
    single = top is not None and top.get("stage") != "pipeline"
    # a report beside a single stage run, not inside it (its folder is that stage's own)
    out_dir = cfg.output_dir or str(run_dir.parent / f"{run_dir.name}-report" if single else run_dir / "report")
    run_ = start_run("report", dataclasses.replace(cfg, output_dir=out_dir))
    context = build_context(cfg, run_.dir / "plots")
    for r in find_stage_runs(run_dir):
        if r.manifest.get("stage") != "report":
            run_.add_input(r.dir / "manifest.json")
    html = render_html(context)
    atomic_write_text(run_.dir / "report.html", html)
    run_.add_output("report", run_.dir / "report.html")
    run_.add_output("plots", run_.dir / "plots")
    run_.metrics.update({"stages": len(context["lineage"]), "curve_figures": len(context["curves"]),
                         "has_eval": int(context["eval"] is not None)})
    print(f"report: {run_.dir / 'report.html'} ({len(context['curves'])} curve figures, "
          f"{'with' if context['eval'] else 'no'} evaluation)", flush=True)
    return run_.finish()
