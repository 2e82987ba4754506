"""align's labeling loop against a real Label Studio server (label-studio 1.23.2, SQLite, on loopback).

`align label` -> a project created through the REST API with align's labeling config XML (Pairwise; Ranker for
k > 2) -> align's tasks imported -> annotations posted for several annotators (users made on the server, a
cancelled annotation among them, gold tasks mixed in) -> exported by the server as JSON, JSON_MIN and CSV ->
`align import EXPORT tasks=RUN` -> exactly the expected pairs, annotator ids and gold accuracies. Then the
project's labeling page in headless Chromium: the config renders in the real UI with both answers.

The simulated annotators, the expected pairs and the hand-computed gold accuracies are those of
tests/test_label_roundtrip.py, which checks the same loop on files; here only the server is new.
"""

from __future__ import annotations

import functools
import html.parser
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_label_roundtrip import ANNOTATORS, GOLD, expected, got, labelled, tasks_of

from align.cli import main
from align.data.records import read_preferences

from .servers import CACHE, auth_proxy, call, free_port, request, serving, venv_python

TOKEN = "align-integration-token"
# Label Studio's outbound calls off (the machine has no network; a user's CI should not phone home either);
# legacy tokens on, so `Authorization: Token ...` works as the docs show (1.23 creates orgs with them off)
QUIET = {"SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "", "COLLECT_ANALYTICS": "false", "LATEST_VERSION_CHECK": "false",
         "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true"}
EXPORTS = {"JSON": "json", "JSON_MIN": "json", "CSV": "csv"}
# what /usr/bin/chromium needs as root on a machine without network (env/machines/python.md, "Known to work")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1400,1000"]


@dataclass
class LabelStudio:
    """A running server and the REST calls the test makes (each as a user's HTTP call would be)."""

    url: str
    token: str

    def api(self, path: str, body: object = None, **kw: object) -> object:
        return call(f"{self.url}/api/{path}", body, token=self.token, **kw)

    def project(self, title: str, label_run: Path) -> tuple[int, dict[str, int]]:
        """A project with the run's labeling config and tasks: (project id, {align task_id: server task id})."""
        config = (label_run / "labelstudio_config.xml").read_text()
        project = self.api("projects/", {"title": title, "label_config": config})
        tasks = json.loads((label_run / "labelstudio_tasks.json").read_text())
        imported = self.api(f"projects/{project['id']}/import", tasks)
        assert imported["task_count"] == len(tasks)
        listed = self.api(f"projects/{project['id']}/tasks/?page_size=1000")
        return project["id"], {t["data"]["task_id"]: t["id"] for t in listed}

    def user(self, email: str) -> int:
        return self.api("users/", {"email": email, "username": email.split("@")[0]})["id"]

    def annotate(self, task: int, user: int, result: list[dict], cancelled: bool = False) -> None:
        self.api(f"tasks/{task}/annotations/", {"result": result, "completed_by": user, "was_cancelled": cancelled,
                                                "lead_time": 4.2})

    def export(self, project: int, fmt: str, path: Path) -> Path:
        status, raw = request(f"{self.url}/api/projects/{project}/export?exportType={fmt}", token=self.token)
        assert status == 200, f"export {fmt}: {status} {raw[:300]!r}"
        path.write_bytes(raw)
        return path

    @functools.cached_property
    def access_token(self) -> str:
        """A JWT access token for the admin: `Authorization: Bearer` logs a browser's page views in too (a user
        has one personal token: a second POST /api/token/ is refused)."""
        refresh = self.api("token/", {})["token"]
        return call(f"{self.url}/api/token/refresh/", {"refresh": refresh})["access"]


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudio]:
    python = venv_python("labelstudio")
    if isinstance(python, str):
        pytest.skip(python)
    home = tmp_path_factory.mktemp("label-studio")
    port = free_port()
    cmd = [str(python.parent / "label-studio"), "start", "--no-browser", "--internal-host", "127.0.0.1",
           "--port", str(port), "--username", "admin@example.com", "--password", "align-admin",
           "--user-token", TOKEN]
    env = {**QUIET, "LABEL_STUDIO_BASE_DATA_DIR": str(home / "data"), "HOME": str(home)}
    start = time.monotonic()
    with serving(cmd, f"http://127.0.0.1:{port}/health", home / "server.log", env=env, timeout=240):
        print(f"label-studio ready in {time.monotonic() - start:.1f} s")
        yield LabelStudio(f"http://127.0.0.1:{port}", TOKEN)


def pairwise(best: int) -> list[dict]:
    """What the Pairwise tag saves when the annotator clicks answer1 (best 0) or answer2 (best 1)."""
    return [{"from_name": "comparison", "to_name": "answer1,answer2", "type": "pairwise",
             "value": {"selected": "left" if best == 0 else "right"}}]


def ranked(order: list[str]) -> list[dict]:
    """What the Ranker tag (no buckets) saves: item ids best first under the Ranker's own name (the UI's
    RankerModel uses its name as the only column when there are no buckets)."""
    return [{"from_name": "rank", "to_name": "answers", "type": "ranker", "value": {"ranker": {"rank": order}}}]


def import_export(export: Path, label_run: Path, out: Path, **settings: object) -> SimpleNamespace:
    """`align import EXPORT tasks=RUN`: the pairs it wrote, and its manifest."""
    args = [f"{k}={v}" for k, v in settings.items()]
    assert main(["import", str(export), f"tasks={label_run}", "max_length=0", "validation_fraction=0",
                 f"output_dir={out}", *args]) == 0
    return SimpleNamespace(records=read_preferences(out / "train.jsonl"),
                           manifest=json.loads((out / "manifest.json").read_text()))


def test_pairwise_labels_round_trip_through_the_server(label_studio: LabelStudio, tmp_path: Path):
    run = labelled(tmp_path)  # align label: 5 pairs + 4 gold tasks, the Pairwise config
    tasks = tasks_of(run)
    project, ids = label_studio.project("align pairwise", run)
    users = {name: label_studio.user(f"annotator{name}@example.com") for name in ANNOTATORS}
    for task in json.loads((run / "labelstudio_tasks.json").read_text()):
        data = task["data"]
        for name, rank in ANNOTATORS.items():
            label_studio.annotate(ids[data["task_id"]], users[name], pairwise(rank([data["answer1"],
                                                                                   data["answer2"]])[0]))
    # a fourth annotator skips (cancels) the first task that is not gold
    skipper = label_studio.user("skipper@example.com")
    label_studio.annotate(ids[next(t["task_id"] for t in tasks if t["gold"] is None)], skipper, [], cancelled=True)

    uid = {name: str(users[name]) for name in ANNOTATORS}  # the server's user ids are the annotator ids
    gold = {uid[int(name)]: score for name, score in GOLD.items()}
    want_all = expected(tasks, [uid[1], uid[2], uid[7]])
    assert len(want_all) == 5
    for fmt, ext in EXPORTS.items():
        export = label_studio.export(project, fmt, tmp_path / f"pairwise-{fmt}.{ext}")
        every = import_export(export, run, tmp_path / f"import-{fmt}")
        assert every.manifest["formats"] == {str(export): "labelstudio"}, fmt
        assert got(every) == want_all, fmt
        assert every.manifest["gold"] == gold, fmt
        dropped = every.manifest["counts"]["labels_dropped_by_reason"]
        assert dropped.get("cancelled", 0) == (1 if fmt == "JSON" else 0), fmt  # flat exports leave it out
        strict = import_export(export, run, tmp_path / f"import-{fmt}-strict", min_gold_accuracy=0.5)
        assert got(strict) == expected(tasks, [uid[1], uid[7]]), fmt
        assert strict.manifest["gold"] == {who: {**v, "dropped": v["accuracy"] < 0.5} for who, v in gold.items()}


def test_ranker_labels_round_trip_through_the_server(label_studio: LabelStudio, tmp_path: Path):
    run = labelled(tmp_path, compare="all", gold="")  # one ranking per prompt: k = 3, 2, 2 -> the Ranker config
    assert "<Ranker" in (run / "labelstudio_config.xml").read_text()
    tasks = tasks_of(run)
    project, ids = label_studio.project("align ranker", run)
    users = {name: label_studio.user(f"ranker{name}@example.com") for name in ANNOTATORS}
    ls_tasks = json.loads((run / "labelstudio_tasks.json").read_text())
    for task in ls_tasks[1:]:  # nobody ranks the first task: it was only skipped
        items = task["data"]["items"]
        for name, rank in ANNOTATORS.items():
            order = [items[i]["id"] for i in rank([it["body"] for it in items])]
            label_studio.annotate(ids[task["data"]["task_id"]], users[name], ranked(order))
    skipper = label_studio.user("ranker-skipper@example.com")
    label_studio.annotate(ids[ls_tasks[0]["data"]["task_id"]], skipper, [], cancelled=True)

    uid = [str(users[name]) for name in ANNOTATORS]
    want = expected(tasks, uid, skip={ls_tasks[0]["data"]["task_id"]})
    assert len(want) == 2
    for fmt, ext in EXPORTS.items():
        export = label_studio.export(project, fmt, tmp_path / f"ranker-{fmt}.{ext}")
        result = import_export(export, run, tmp_path / f"import-{fmt}")
        assert got(result) == want, fmt


def render(label_studio: LabelStudio, page: str, out: Path) -> str:
    """The DOM of `page` after its scripts ran, in headless Chromium logged in as the admin; a screenshot goes
    to `out`."""
    chromium = shutil.which("chromium")
    if chromium is None:
        failed = CACHE / "chromium.failed"
        pytest.skip(failed.read_text().strip() if failed.exists() else
                    "chromium is not installed: as root, tests/integrations/setup.sh chromium")
    with auth_proxy(label_studio.url, f"Bearer {label_studio.access_token}") as url:
        def browse(*what: str) -> str:
            profile = out.parent / f"chromium-profile-{os.getpid()}-{time.monotonic_ns()}"
            done = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                   "--virtual-time-budget=30000", *what, url + page],
                                  check=False, capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, done.stderr[-2000:]
            return done.stdout

        dom = browse("--dump-dom")
        browse(f"--screenshot={out}")
    out.with_suffix(".html").write_text(dom)
    return dom


class _LabelingText(html.parser.HTMLParser):
    """The text inside the labeling panel (`.lsf-main-view`), not the data manager's task table beside it."""

    VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, bool]] = []  # (tag, inside the panel)
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in self.VOID:
            inside = bool(self.stack and self.stack[-1][1]) or "lsf-main-view" in (dict(attrs).get("class") or
                                                                                    "").split()
            self.stack.append((tag, inside))

    def handle_endtag(self, tag: str) -> None:
        while tag not in self.VOID and self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data: str) -> None:
        if self.stack and self.stack[-1][1]:
            self.parts.append(data)


def labeling_text(dom: str) -> str:
    parser = _LabelingText()
    parser.feed(dom)
    return "".join(parser.parts)


@pytest.mark.parametrize("compare", ["pairs", "all"])
def test_the_labeling_config_renders_in_the_real_ui(label_studio: LabelStudio, tmp_path: Path, compare: str):
    run = labelled(tmp_path, compare=compare, gold="")
    project, ids = label_studio.project(f"align ui {compare}", run)
    task = tasks_of(run)[0]
    png = tmp_path / f"labeling-{compare}.png"
    dom = render(label_studio, f"/projects/{project}/data?task={ids[task['task_id']]}", png)
    assert png.stat().st_size > 10_000  # a rendered page, not a blank one
    shown = labeling_text(dom)
    assert task["prompt"][-1]["content"] in shown
    for response in task["responses"]:
        assert response in shown, response[:40]
    assert 'class="lsf-errors"' not in dom  # where the labeling UI lists config and data errors


def test_a_task_the_config_cannot_show_is_not_taken_for_rendered(label_studio: LabelStudio, tmp_path: Path):
    """The check above can fail: a ranking task whose items are not a list imports (the server only checks the
    key) but the UI never shows its answers."""
    run = labelled(tmp_path, compare="all", gold="")
    task = tasks_of(run)[0]
    broken = json.loads((run / "labelstudio_tasks.json").read_text())[:1]
    broken[0]["data"]["items"] = " | ".join(task["responses"])
    (run / "labelstudio_tasks.json").write_text(json.dumps(broken))
    project, ids = label_studio.project("align ui broken", run)
    dom = render(label_studio, f"/projects/{project}/data?task={ids[task['task_id']]}", tmp_path / "broken.png")
    shown = labeling_text(dom)
    assert task["prompt"][-1]["content"] in shown  # the labeling panel itself rendered
    assert not any(response in shown for response in task["responses"])
