"""Screenshots of the MLflow UI for the README: a run page, its energy charts and artifacts, compare views.

Starts ``mlflow server`` on a tracking store (e.g. the ``sqlite:///mlflow.db`` that ``make demo``
fills), drives headless Chromium with Playwright, writes PNGs, and stops the server. Works against
any store: it picks the runs itself (a run with ``energy/power.png``, the experiment with the most
runs, a sweep parent) unless told which.

Set-up (browsers cannot be downloaded here; Debian's chromium is used instead)::

    apt-get install -y chromium
    pip install playwright            # the Python package only: no `playwright install`
    python docs/screenshots.py --store sqlite:///mlflow.db --out docs/img

Shots (each skipped with a note when the store has nothing to show for it):

- ``run-overview.png``: the run page of the training run (params, metrics, tags);
- ``run-metrics.png``: its "Model metrics" tab (the ``energy/*`` charts next to the user's own);
- ``artifact-power.png``: its ``energy/power.png`` artifact in the artifact viewer;
- ``compare-table.png`` / ``compare-chart.png``: the runs table and chart view of the compared
  experiment (e.g. ``bert-compress``); ``compare-runs.png``: MLflow's "compare runs" page of its
  runs (up to 10);
- ``artifact-pareto.png``: a sweep parent's ``sweep/pareto.png``.

Only the standard library and ``playwright`` are imported; ``mlflow`` runs as a subprocess
(``--mlflow``, default ``<this python> -m mlflow``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

UI_PREFERENCES = """
try {
  localStorage.setItem("mlflow.workflowType_v1", JSON.stringify("machine_learning"));
  localStorage.setItem("mlflow.assistant.panelOpen_v1", JSON.stringify(false));
} catch (e) {}
"""
"""MLflow UI settings (its own localStorage keys): the "Model training" view, the assistant panel closed."""

DEFAULT_CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


@dataclass
class Shots:
    """What was written and what was skipped (with why)."""

    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def mlflow_server(
    mlflow_cmd: list[str], store: str, port: int, log_path: Path, timeout_s: float
) -> Iterator[str]:
    """``mlflow server`` on ``store`` at 127.0.0.1:``port``; yields its base URL; stopped on exit."""
    cmd = [
        *mlflow_cmd,
        "server",
        "--backend-store-uri",
        store,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = log_path.open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}; see {log_path}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not up after {timeout_s:.0f} s; see {log_path}")
            time.sleep(0.5)
        yield base
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (its workers)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        log.close()


class Rest:
    """The few MLflow REST calls the script needs (no mlflow import)."""

    def __init__(self, base: str) -> None:
        self.base = base

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        url = f"{self.base}/api/2.0/mlflow/{path}"
        data = None
        if method == "GET" and body:
            url += "?" + urllib.parse.urlencode(body)
        elif body is not None:
            data = json.dumps(body).encode()
        req = urllib.request.Request(
            url, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"{}")

    def experiments(self) -> list[dict[str, Any]]:
        return self._call("POST", "experiments/search", {"max_results": 1000}).get("experiments", [])

    def runs(
        self, exp_ids: list[str], filter_string: str = "", max_results: int = 1000
    ) -> list[dict[str, Any]]:
        body = {
            "experiment_ids": exp_ids,
            "filter": filter_string,
            "max_results": max_results,
            "order_by": ["attributes.start_time DESC"],
        }
        return self._call("POST", "runs/search", body).get("runs", [])

    def artifacts(self, run_id: str, path: str) -> set[str]:
        try:
            files = self._call("GET", "artifacts/list", {"run_id": run_id, "path": path}).get("files", [])
        except urllib.error.HTTPError:
            return set()
        return {f["path"] for f in files}

    def run(self, run_id: str) -> dict[str, Any]:
        return self._call("GET", "runs/get", {"run_id": run_id})["run"]


def _tags(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t.get("value", "") for t in run.get("data", {}).get("tags", [])}


def pick_runs(api: Rest, run_id: str | None, compare_experiment: str | None) -> dict[str, Any]:
    """The training run, the compared experiment and a sweep parent to show (None where there is none)."""
    exps = [e for e in api.experiments() if e.get("lifecycle_stage", "active") == "active"]
    ids = [e["experiment_id"] for e in exps]
    picked: dict[str, Any] = {"run": None, "compare": None, "sweep": None}
    if not ids:
        return picked
    if run_id:
        picked["run"] = api.run(run_id)
    else:
        runs = api.runs(ids)
        with_trace = [
            r
            for r in runs
            if _tags(r).get("wattlog.role") != "sweep" and r["info"].get("status") == "FINISHED"
        ]
        ranked = sorted(with_trace, key=lambda r: "finetune" not in _exp_name(exps, r).lower())
        for r in ranked[:50]:
            if "energy/power.png" in api.artifacts(r["info"]["run_id"], "energy"):
                picked["run"] = r
                break
        else:
            picked["run"] = ranked[0] if ranked else None
    if compare_experiment:
        found = [
            e for e in exps if e["name"] == compare_experiment or e["experiment_id"] == compare_experiment
        ]
        if not found:
            raise SystemExit(
                f"no experiment {compare_experiment!r}; there are: {', '.join(e['name'] for e in exps)}"
            )
        picked["compare"] = found[0]
    else:
        counts = {e["experiment_id"]: len(api.runs([e["experiment_id"]], max_results=200)) for e in exps}
        ranked_exps = sorted(
            exps, key=lambda e: ("compress" not in e["name"].lower(), -counts[e["experiment_id"]])
        )
        picked["compare"] = ranked_exps[0] if counts[ranked_exps[0]["experiment_id"]] > 1 else None
    if picked["compare"] is not None:  # the runs to compare side by side: not the sweep parents
        runs = api.runs([picked["compare"]["experiment_id"]], max_results=50)
        picked["compare_runs"] = [
            r["info"]["run_id"] for r in runs if _tags(r).get("wattlog.role") != "sweep"
        ]
    sweeps = api.runs(ids, "tags.`wattlog.role` = 'sweep'", max_results=20)
    picked["sweep"] = sweeps[0] if sweeps else None
    return picked


def _exp_name(exps: list[dict[str, Any]], run: dict[str, Any]) -> str:
    eid = run["info"]["experiment_id"]
    return next((e["name"] for e in exps if e["experiment_id"] == eid), "")


def take(
    base: str,
    picked: dict[str, Any],
    out: Path,
    chromium: str,
    size: tuple[int, int],
    settle_s: float,
) -> Shots:
    """Opens each page in headless Chromium and writes its screenshot into ``out``."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    shots = Shots()
    out.mkdir(parents=True, exist_ok=True)
    pages: list[tuple[str, str | None, str]] = []  # (file, url or None, why skipped)
    run = picked["run"]
    if run is not None:
        eid, rid = run["info"]["experiment_id"], run["info"]["run_id"]
        page = f"{base}/#/experiments/{eid}/runs/{rid}"
        pages += [("run-overview.png", page, ""), ("run-metrics.png", f"{page}/model-metrics", "")]
        pages.append(("artifact-power.png", f"{page}/artifactPath/energy/power.png", ""))
    else:
        pages += [
            (n, None, "no finished run in the store")
            for n in ("run-overview.png", "run-metrics.png", "artifact-power.png")
        ]
    exp = picked["compare"]
    if exp is not None:
        eid = exp["experiment_id"]
        url = f"{base}/#/experiments/{eid}/runs"
        runs = json.dumps(picked.get("compare_runs", [])[:10])
        exps = urllib.parse.quote(json.dumps([eid]))
        compare = f"{base}/#/compare-runs?runs={urllib.parse.quote(runs)}&experiments={exps}"
        pages += [
            ("compare-table.png", f"{url}?compareRunsMode=TABLE", ""),
            ("compare-chart.png", f"{url}?compareRunsMode=CHART", ""),
            ("compare-runs.png", compare, ""),
        ]
    else:
        pages += [
            (n, None, "no experiment with 2 or more runs")
            for n in ("compare-table.png", "compare-chart.png", "compare-runs.png")
        ]
    sweep = picked["sweep"]
    if sweep is not None:
        eid, rid = sweep["info"]["experiment_id"], sweep["info"]["run_id"]
        pages.append(
            (
                "artifact-pareto.png",
                f"{base}/#/experiments/{eid}/runs/{rid}/artifactPath/sweep/pareto.png",
                "",
            )
        )
    else:
        pages.append(("artifact-pareto.png", None, "no sweep parent run (tag wattlog.role=sweep)"))

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium,
            headless=True,
            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
        )
        try:
            context = browser.new_context(
                viewport={"width": size[0], "height": size[1]}, device_scale_factor=1
            )
            context.add_init_script(UI_PREFERENCES)
            if exp is not None:  # the runs table shows energy and accuracy, not only Source and Models
                context.add_init_script(_table_columns_script(exp["experiment_id"]))
            for name, url, why in pages:
                if url is None:
                    shots.skipped.append(f"{name}: {why}")
                    continue
                tab = context.new_page()
                try:
                    tab.goto(url, wait_until="load", timeout=60_000)
                    with contextlib.suppress(PlaywrightError):  # the UI polls (auto-refresh): best effort
                        tab.wait_for_load_state("networkidle", timeout=10_000)
                    tab.keyboard.press("Escape")  # close a "what's new" dialog, if any
                    if name.startswith("compare-") and name != "compare-runs.png":
                        _expand_parents(tab)
                    if name.endswith(("metrics.png", "chart.png", "compare-runs.png")):
                        with contextlib.suppress(PlaywrightError):  # plotly charts: wait until some are drawn
                            tab.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
                    if name.startswith("artifact-"):
                        with contextlib.suppress(PlaywrightError):
                            tab.wait_for_selector(
                                "img[src*='get-artifact'], img[src^='blob:']", timeout=30_000
                            )
                    tab.wait_for_timeout(int(settle_s * 1000))  # charts animate in
                    path = out / name
                    tab.screenshot(path=str(path))
                    shots.written.append(path)
                except PlaywrightError as exc:
                    shots.skipped.append(f"{name}: {str(exc).splitlines()[0]}")
                finally:
                    tab.close()
        finally:
            browser.close()
    return shots


TABLE_COLUMNS = [
    "metrics.`energy/total_j`", "metrics.`energy/test_j_per_sample`", "metrics.`test_acc`",
    "params.`prune.name`", "params.`quantize.name`", "tags.`energy.estimated`",
]
"""Columns of the runs-table shot (MLflow 3.17 keeps them in the experiment page's localStorage state)."""


def _table_columns_script(experiment_id: str) -> str:
    key = f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment_id}"]-ReactComponentState'
    state = json.dumps({"selectedColumns": TABLE_COLUMNS})
    return f"try {{ localStorage.setItem({json.dumps(key)}, {json.dumps(state)}); }} catch (e) {{}}"


EXPANDER = "button[data-component-id*='runnamecellrenderer']"
"""The +/- button in a parent run's name cell (MLflow 3.17's runs table): it folds the sweep's children."""


def _expand_parents(tab: Any) -> None:
    """Unfold every parent run, so that the table and charts show the sweep's children."""
    from playwright.sync_api import Error as PlaywrightError

    links = "a[href*='/runs/']"
    with contextlib.suppress(PlaywrightError):
        tab.wait_for_selector(EXPANDER, timeout=10_000)
        for _attempt in range(5):  # the table re-renders while its metrics arrive: retry until it unfolds
            tab.wait_for_timeout(1500)
            before = tab.locator(links).count()
            for i in range(tab.locator(EXPANDER).count()):
                tab.locator(EXPANDER).nth(i).dispatch_event("click")  # a real click only focuses the cell
            tab.wait_for_timeout(1500)
            if tab.locator(links).count() > before:
                return


def _find_chromium(given: str | None) -> str:
    for candidate in [given] if given else [*DEFAULT_CHROMIUM, shutil.which("chromium") or ""]:
        if candidate and Path(candidate).exists():
            return candidate
    raise SystemExit("no Chromium found: apt-get install -y chromium, or pass --chromium PATH")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--store", default="sqlite:///mlflow.db", help="backend store URI (default: sqlite:///mlflow.db)"
    )
    p.add_argument("--out", default="docs/img", type=Path, help="folder for the PNGs (default: docs/img)")
    p.add_argument(
        "--run", default=None, help="run id for the run page (default: a run with energy/power.png)"
    )
    p.add_argument("--experiment", default=None, help="experiment name or id for the compare view")
    p.add_argument("--chromium", default=None, help="Chromium executable (default: /usr/bin/chromium)")
    p.add_argument("--mlflow", default=None, help="mlflow command (default: '<this python> -m mlflow')")
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument("--size", default="1440x900", help="viewport WIDTHxHEIGHT (default: 1440x900)")
    p.add_argument("--settle", type=float, default=3.0, help="seconds to let charts render (default: 3)")
    p.add_argument("--server-timeout", type=float, default=120.0, help="seconds to wait for the server")
    args = p.parse_args(argv)
    if args.store.startswith("sqlite:///"):
        db = args.store[len("sqlite:///") :]
        if not Path(db).exists():
            raise SystemExit(f"no MLflow database at {db}: run `make demo` first, or pass --store")
    chromium = _find_chromium(args.chromium)
    try:
        import playwright  # noqa: F401
    except ImportError:
        raise SystemExit(
            "the playwright package is missing: pip install playwright (no browser download needed)"
        )
    width, height = (int(x) for x in args.size.lower().split("x"))
    mlflow_cmd = shlex.split(args.mlflow) if args.mlflow else [sys.executable, "-m", "mlflow"]
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "mlflow-server.log"
    with mlflow_server(
        mlflow_cmd, args.store, args.port or _free_port(), log_path, args.server_timeout
    ) as base:
        picked = pick_runs(Rest(base), args.run, args.experiment)
        shots = take(base, picked, args.out, chromium, (width, height), args.settle)
    log_path.unlink(missing_ok=True)
    for path in shots.written:
        print(f"wrote {path}")
    for note in shots.skipped:
        print(f"skipped {note}", file=sys.stderr)
    return 0 if shots.written else 1


if __name__ == "__main__":
    sys.exit(main())
