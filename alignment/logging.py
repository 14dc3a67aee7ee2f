"""Run logging: metrics.jsonl, a progress bar with the live reward, tensorboard, report.png."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from tqdm.auto import tqdm

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


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLogger:
    """Writes one JSON object per logged step; only the main rank writes."""

    def __init__(self, output_dir: Path, is_main: bool, start_step: int, total_steps: int):
        self.is_main = is_main
        self.path = output_dir / "metrics.jsonl"
        self.bar = None
        self.tb = None
        if not is_main:
            return
        # On resume, drop lines past the checkpoint: those steps run again.
        kept = [m for m in read_metrics(self.path) if m.get("step", 0) <= start_step]
        self.path.write_text("".join(json.dumps(m) + "\n" for m in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output_dir / "tensorboard"))
        except ImportError:
            pass
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float], advance: bool = True) -> None:
        if not self.is_main:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self.tb is not None:
            for key, value in clean.items():
                self.tb.add_scalar(key, value, step)
        if advance:
            self.bar.update(1)
        shown = {"reward": "reward/mean", "loss": "loss", "eval_acc": "eval/accuracy"}
        self.bar.set_postfix({name: f"{clean[key]:.3f}" for name, key in shown.items() if key in clean})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


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
