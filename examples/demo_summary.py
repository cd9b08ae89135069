"""The last lines of ``make demo``: what was measured, where it is, what to look at next.

Usage: ``python -m examples.demo_summary [--tracking-uri URI]`` after the demo's fine-tune
(experiment ``bert-finetune``) and compression sweep (experiment ``bert-compress``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

FINETUNE_EXPERIMENT = "bert-finetune"
SWEEP_EXPERIMENT = "bert-compress"
PARETO_PNG = "outputs/bert_finetune/pareto.png"


def _latest_run(client, experiment: str, extra_filter: str = ""):  # noqa: ANN001, ANN202
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None, None
    runs = client.search_runs([exp.experiment_id], filter_string=extra_filter, order_by=["attributes.start_time DESC"],
                              max_results=1)
    return exp, (runs[0] if runs else None)


def finetune_line(client) -> list[str]:  # noqa: ANN001
    """The fine-tune's energy, accuracy and run id, and where its power chart is."""
    from wattlog import keys, render

    exp, run = _latest_run(client, FINETUNE_EXPERIMENT, "attributes.status = 'FINISHED'")
    if run is None:
        return [f"fine-tune: no finished run in experiment {FINETUNE_EXPERIMENT!r}"]
    m, tags = run.data.metrics, run.data.tags
    estimated = tags.get(keys.T_ESTIMATED, "none")
    honesty = "measured" if estimated == "none" else f"estimated: {estimated}"
    acc = f", test_acc {m['test_acc']:.3f}" if "test_acc" in m else ""
    return [
        f"fine-tune: {render.format_energy(m.get(keys.TOTAL_J), 'J')} "
        f"({render.format_energy(m.get(keys.stage_j('train')), 'J')} training, {honesty}){acc}; "
        f"run {run.info.run_id} in experiment {FINETUNE_EXPERIMENT!r}",
        f"  its power chart: {run.info.artifact_uri}/{keys.ARTIFACT_DIR}/{keys.POWER_PNG}",
    ]


def sweep_lines(tracking_uri: str | None) -> list[str]:
    """The compression sweep's verdict: the best variant and what it saves, inside the noise or not."""
    from wattlog.compare import compare_runs, group_runs, verdict

    try:
        df = compare_runs(SWEEP_EXPERIMENT, metric="test_acc", baseline="first", tracking_uri=tracking_uri)
    except Exception as exc:  # noqa: BLE001 - the summary must not hide the demo's real output
        return [f"compression sweep: could not be read ({type(exc).__name__}: {exc})"]
    if df.empty:
        return [f"compression sweep: no runs in experiment {SWEEP_EXPERIMENT!r}"]
    groups = group_runs(df, "test_acc")
    groups = groups[~groups["missing_energy"]]  # the sweep's parent run holds no energy of its own
    line = verdict(groups, "test_acc").text
    runs = int(groups["n"].sum())
    return [f"compression sweep ({len(groups)} variants, {runs} runs; evaluation energy vs the first variant): {line}",
            f"  Pareto chart: {os.path.abspath(PARETO_PNG)} (and sweep/pareto.png in the sweep's parent run)"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    args = parser.parse_args(argv)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(args.tracking_uri)
    lines = ["== summary", *finetune_line(client), *sweep_lines(args.tracking_uri),
             f"browse it all: {os.path.dirname(sys.executable)}/mlflow ui --backend-store-uri {args.tracking_uri}"
             "  (then open http://127.0.0.1:5000)"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
