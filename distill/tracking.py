"""
Metric trackers for a run's logs (config key report_to): none (the default), tensorboard, wandb or trackio, the three
that training stacks in this field send their metrics to, to compare runs as curves. checkpoints.RunLog hands the
tracker every metrics.jsonl row as scalars at its step, and every evaluation's shown completions (samples.jsonl) as
text; only the main process (FSDP: rank 0) opens one. Each tracker is an optional package: config.load_config stops
with one line when report_to names one that is not installed, before any model loads; nothing here is imported
otherwise.

  - tensorboard: event files in <out_dir>/tensorboard (`tensorboard --logdir runs`); the samples as a markdown table
    under the TEXT tab. A resumed run purges what the interrupted one logged after its checkpoint (purge_step).
  - wandb: project $WANDB_PROJECT (default trb), files under <out_dir>/wandb, offline with WANDB_MODE=offline; the
    samples as a wandb.Table. A resumed run continues the same wandb run (its id is kept in <out_dir>/wandb_run_id);
    wandb drops rows at steps it has already seen, so steps logged after the checkpoint keep their first values.
  - trackio: project $TRACKIO_PROJECT (default trb), a local SQLite database under $TRACKIO_DIR (trackio's default
    ~/.cache/huggingface/trackio; `trackio show`); the samples as a trackio.Table. A resumed run continues the run of
    the same name.
"""
import dataclasses
import math
import os
import shutil
from pathlib import Path

from distill.config import die, missing_package

COLUMNS = ("problem", "question", "completion", "answer", "correct")  # of a shown completion, as the table shows it


def run_name(out_dir):
    """A run's name in a tracker: the last two parts of out_dir (runs/small -> runs-small, runs/compare/trb_seed0 ->
    compare-trb_seed0)."""
    return "-".join(Path(os.path.abspath(out_dir)).parts[-2:])


def scalars(row):
    """The numbers of a metrics row, without its step; a NaN marks a metric the step did not measure and is left out."""
    return {k: float(v) for k, v in row.items() if k != "step" and type(v) in (int, float) and math.isfinite(v)}


def open_tracker(report_to, out_dir, start, resumed, cfg):
    """The tracker for a run starting at `start` (resumed from a checkpoint, or fresh), or None for report_to none."""
    if report_to == "none":
        return None
    package = missing_package(report_to)
    if package:
        die(f"report_to: {report_to} needs the {package} package (pip install -r requirements-dev.txt)")
    return {"tensorboard": TensorBoard, "wandb": WandB, "trackio": Trackio}[report_to](Path(out_dir), start, resumed,
                                                                                      cfg)


class TensorBoard:
    def __init__(self, out, start, resumed, cfg):
        from torch.utils.tensorboard import SummaryWriter
        if not resumed:  # a fresh run's curves never continue an earlier run's (RunLog empties its logs too)
            shutil.rmtree(out / "tensorboard", ignore_errors=True)
        # A resumed run recomputes every step after its checkpoint: its session start at start + 1 makes TensorBoard
        # drop what was logged from there on. A fresh run starts a session too: readers take the first start they
        # see for the first session, not a restart.
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start + 1 if resumed else 0)

    def scalars(self, step, values):
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def samples(self, step, model_name, rows):
        lines = ["| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
        lines += ["| " + " | ".join(str(r[c]).replace("|", "\\|").replace("\n", "\\n") for c in COLUMNS) + " |"
                  for r in rows]
        self.writer.add_text(f"samples/{model_name}", "\n".join(lines), step)

    def close(self):
        self.writer.close()


class _RunApi:
    """What wandb and trackio share (trackio follows wandb's API): a run whose log() takes scalars and Tables."""

    def scalars(self, step, values):
        self.run.log(values, step=step)

    def samples(self, step, model_name, rows):
        table = self.module.Table(columns=list(COLUMNS), data=[[r[c] for c in COLUMNS] for r in rows])
        self.run.log({f"samples/{model_name}": table}, step=step)

    def close(self):
        self.run.finish()


class WandB(_RunApi):
    def __init__(self, out, start, resumed, cfg):
        import wandb
        self.module = wandb
        id_file = out / "wandb_run_id"
        run_id = id_file.read_text().strip() if resumed and id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "trb"), name=run_name(out), id=run_id,
                              dir=str(out), config=dataclasses.asdict(cfg), resume="allow" if resumed else None)


class Trackio(_RunApi):
    def __init__(self, out, start, resumed, cfg):
        import trackio
        self.module = trackio
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "trb"), name=run_name(out),
                                config=dataclasses.asdict(cfg), resume="allow" if resumed else "never", embed=False,
                                auto_log_cpu=False, auto_log_gpu=False)  # the run's metrics only, no system monitor
