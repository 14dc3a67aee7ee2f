"""Run logging: metrics.jsonl, samples.jsonl, a progress bar with the live reward, the trackers of
`train.report_to` (tensorboard, wandb, mlflow, trackio), report.png."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from alignment.config import ConfigError

log = logging.getLogger("alignment")

REPORT_PANELS = [
    ("reward/mean", "reward"),
    ("eval/accuracy", "held-out accuracy"),
    ("eval/reward", "held-out reward"),
    ("kl", "KL to the rollout policy"),
    ("response_length/mean", "response length"),
    ("loss", "loss"),
    ("entropy", "entropy"),
]


def setup_console(is_main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # httpx logs every request at INFO: hundreds per step against vLLM servers or remote rewards
    logging.getLogger("httpx").setLevel(logging.WARNING)


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
# the module each tracker imports, and how to install it
_TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "pip install tensorboard"),
                     "wandb": ("wandb", "pip install -e .[trackers]"),
                     "mlflow": ("mlflow", "pip install -e .[trackers]"),
                     "trackio": ("trackio", "pip install -e .[trackers]")}


def check_trackers(names: list[str]) -> None:
    """`train.report_to` names known trackers whose packages are installed (checked before anything loads)."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"train.report_to: unknown tracker {name!r}; valid: {', '.join(TRACKERS)}")
        module, install = _TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.report_to: {name} needs the {module} package, which is not installed: "
                              f"{install}")


def _drop_after(path: Path, start_step: int) -> None:
    """Drop the lines of a per-step jsonl file past `start_step` (a resume runs those steps again)."""
    kept = [m for m in read_metrics(path) if m.get("step", 0) <= start_step]
    path.write_text("".join(json.dumps(m) + "\n" for m in kept))


class RunLogger:
    """metrics.jsonl, samples.jsonl, eval_samples.jsonl and the trackers of `train.report_to`; only the
    main rank writes. A step's metrics are added with `add`; `flush(step)` writes the mean of each
    metric over the steps added since the last flush (the steps between two `train.log_every` points)."""

    def __init__(self, output_dir: Path, is_main: bool, start_step: int, total_steps: int,
                 report_to: list[str] | tuple[str, ...] = ("tensorboard",), config: dict | None = None):
        self.is_main = is_main
        self.output_dir = output_dir
        self.path = output_dir / "metrics.jsonl"
        self.bar = None
        self.trackers: list[Tracker] = []
        self.window: dict[str, list[float]] = {}  # every rank keeps it: train() returns the same everywhere
        if not is_main:
            return
        # On resume, drop lines past the checkpoint: those steps run again.
        for name in ("metrics", "samples", "eval_samples"):
            _drop_after(output_dir / f"{name}.jsonl", start_step)
        check_trackers(list(report_to))
        run = {"output_dir": output_dir, "name": output_dir.resolve().name, "config": config or {},
               "start_step": start_step}
        self.trackers = [TRACKER_CLASSES[name](**run) for name in report_to]
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def add(self, metrics: dict[str, float]) -> None:
        """One step's metrics, averaged into the next `flush`; advances the progress bar."""
        for key, value in metrics.items():
            if value is not None and math.isfinite(float(value)):
                self.window.setdefault(key, []).append(float(value))
        if self.bar is not None:
            self.bar.update(1)

    def flush(self, step: int, extra: dict[str, float] | None = None) -> dict[str, float]:
        """Logs at `step` the mean of each metric added since the last flush (over the steps that have
        it), with `extra` (evaluation metrics, computed at this step) as they are; returns what it logged."""
        means = {key: sum(values) / len(values) for key, values in self.window.items()}
        self.window = {}
        metrics = {**means, **(extra or {})}
        self.log(step, metrics, advance=False)
        return metrics

    def log(self, step: int, metrics: dict[str, float], advance: bool = True) -> None:
        if not self.is_main:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        for tracker in self.trackers:
            tracker.log(step, clean)
        if advance:
            self.bar.update(1)
        shown = {"reward": "reward/mean", "loss": "loss", "eval_acc": "eval/accuracy"}
        self.bar.set_postfix({name: f"{clean[key]:.3f}" for name, key in shown.items() if key in clean})

    def samples(self, name: str, step: int, rows: list[dict]) -> None:
        """Appends `rows` (one dict per sample) at `step` to `<name>.jsonl` and logs them to the trackers as
        a table `name` (samples, eval_samples)."""
        if not self.is_main or not rows:
            return
        rows = [{"step": step, **row} for row in rows]
        with open(self.output_dir / f"{name}.jsonl", "a") as f:
            f.write("".join(json.dumps(row) + "\n" for row in rows))
        columns = list(dict.fromkeys(key for row in rows for key in row))
        cells = [[_cell(row.get(key)) for key in columns] for row in rows]
        for tracker in self.trackers:
            tracker.table(name, step, columns, cells)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def flatten(values: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _cell(value):
    """A table cell: numbers, strings and None as they are, anything else (chat messages) as JSON text."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return json.dumps(value)


def _run_ids(output_dir: Path) -> dict:
    """Tracker run ids kept in <output_dir>/trackers.json, so that a resume continues the same runs."""
    path = output_dir / "trackers.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def _keep_run_id(output_dir: Path, tracker: str, run_id: str) -> None:
    (output_dir / "trackers.json").write_text(json.dumps({**_run_ids(output_dir), tracker: run_id}))


class Tracker:
    """One experiment tracker of `train.report_to`, on the main rank: gets the run's resolved config when
    created, then every logged metric and the sample tables. `name` is the output_dir's name."""

    def __init__(self, output_dir: Path, name: str, config: dict, start_step: int):
        raise NotImplementedError

    def log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def table(self, name: str, step: int, columns: list[str], rows: list[list]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    """<output_dir>/tensorboard: scalars; the config and the sample tables as text (markdown)."""

    def __init__(self, output_dir: Path, name: str, config: dict, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # a resume purges the events past its checkpoint: those steps run again
        self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), start_step)

    def log(self, step, metrics):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def table(self, name, step, columns, rows):
        def md(value) -> str:
            return "" if value is None else str(value).replace("|", "\\|").replace("\n", "<br>")

        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(md(v) for v in row) + " |" for row in rows]
        self.writer.add_text(name, "\n".join(lines), step)

    def close(self):
        self.writer.close()


class WandbTracker(Tracker):
    """wandb: project $WANDB_PROJECT (else "alignment"), files under $WANDB_DIR (else output_dir), and
    WANDB_MODE=offline to run without a network. The run id is kept in output_dir/trackers.json: a
    resume continues the same run (resume="allow"); wandb keeps the first values of the steps that ran
    between the checkpoint and the interruption (it ignores steps below its latest)."""

    def __init__(self, output_dir: Path, name: str, config: dict, start_step: int):
        import wandb

        self.wandb = wandb
        run_id = _run_ids(output_dir).get("wandb") if start_step else None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "alignment", name=name, id=run_id,
                              resume="allow", dir=None if os.environ.get("WANDB_DIR") else str(output_dir),
                              config=config)
        _keep_run_id(output_dir, "wandb", self.run.id)

    def log(self, step, metrics):
        self.run.log(metrics, step=step)

    def table(self, name, step, columns, rows):
        self.run.log({name: self.wandb.Table(columns=columns, data=rows, allow_mixed_types=True)}, step=step)

    def close(self):
        self.run.finish()


class MlflowTracker(Tracker):
    """mlflow: $MLFLOW_TRACKING_URI, else a file store at <output_dir>/mlruns (mlflow 3.7+ refuses the file
    store unless MLFLOW_ALLOW_FILE_STORE=true, which this default sets: mlflow-skinny has no SQLAlchemy
    for a sqlite store); experiment $MLFLOW_EXPERIMENT_NAME (else "alignment"); the flattened config as
    params; each table as the artifact <name>.json, its rows appended at every log. A resume continues
    the run whose id output_dir/trackers.json keeps."""

    def __init__(self, output_dir: Path, name: str, config: dict, start_step: int):
        uri = None  # MlflowClient reads MLFLOW_TRACKING_URI
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (output_dir / "mlruns").resolve().as_uri()
        # log_table appends by downloading the table first: no progress bar over the training one each time
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.Metric, self.client = Metric, MlflowClient(uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "alignment"
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        run, run_id = None, _run_ids(output_dir).get("mlflow") if start_step else None
        if run_id:
            try:
                run = self.client.get_run(run_id)
                self.client.update_run(run_id, status="RUNNING")
            except MlflowException:
                run = None  # another tracking URI than the first part's: a new run
        if run is None:
            run = self.client.create_run(experiment_id, run_name=name)
        self.run_id = run.info.run_id
        _keep_run_id(output_dir, "mlflow", self.run_id)
        # mlflow refuses to change a logged param: a resume adds only keys the run lacks
        params = [Param(key, str(value)[:6000]) for key, value in flatten(config).items()
                  if key not in run.data.params]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step, metrics):
        now = int(time.time() * 1000)
        metrics = [self.Metric(key, value, now, step) for key, value in metrics.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def table(self, name, step, columns, rows):
        self.client.log_table(self.run_id, {c: [row[j] for row in rows] for j, c in enumerate(columns)},
                              artifact_file=f"{name}.json")

    def close(self):
        self.client.set_terminated(self.run_id)


class TrackioTracker(Tracker):
    """trackio: a local SQLite store in $TRACKIO_DIR, else <output_dir>/trackio (trackio reads the variable
    when first imported, so in a process that imported it before, its own setting stays); project
    $TRACKIO_PROJECT (else "alignment"); a resume continues the run of the same name."""

    def __init__(self, output_dir: Path, name: str, config: dict, start_step: int):
        if "trackio" not in sys.modules:
            os.environ.setdefault("TRACKIO_DIR", str(output_dir.resolve() / "trackio"))
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT") or "alignment", name=name,
                                config=flatten(config), resume="allow" if start_step else "never")

    def log(self, step, metrics):
        self.run.log(metrics, step=step)

    def table(self, name, step, columns, rows):
        import pandas as pd

        self.run.log({name: self.trackio.Table(dataframe=pd.DataFrame(rows, columns=columns))}, step=step)

    def close(self):
        self.run.finish()


TRACKER_CLASSES: dict[str, type[Tracker]] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker,
                                             "mlflow": MlflowTracker, "trackio": TrackioTracker}


def plot_report(metrics_path: Path, out_path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    panels = [(k, label) for k, label in REPORT_PANELS if any(k in r for r in rows)]
    if not panels:
        panels = [("loss", "loss")]
    cols = min(3, len(panels))
    n_rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.5 * cols, 3.2 * n_rows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, panels):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, alpha=0.5 if len(points) > 10 else 1)
            if len(points) > 10:  # per-step values are noisy with small batches: show a moving average
                window = max(3, len(points) // 10)
                smooth = []
                for i in range(len(ys)):
                    recent = ys[max(0, i - window + 1): i + 1]
                    smooth.append(sum(recent) / len(recent))
                ax.plot(xs, smooth, color="C1", label=f"mean of {window}")
                ax.legend(fontsize=7)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
