"""The run directory: stage folders, training data files, manifest, metrics.jsonl and curve plots.

``outputs/<run>/<stage>/`` holds one stage's adapter or model, tokenizer, ``config.yaml``,
``metrics.jsonl``, ``curve.png`` and ``manifest.json``. The manifest is written last: a stage
folder without it is unfinished, and later stages refuse to start from it.
"""

import hashlib
import json
import math
import platform
import shutil
import subprocess
import sys
import time
import zipfile
from importlib import metadata
from pathlib import Path

from transformers import TrainerCallback

from brandcopy.config import config_dict, save_config
from brandcopy.files import atomic_path, atomic_write_jsonl, atomic_write_text, read_jsonl, read_jsonl_log, weights_follow_umask

PACKAGES = ("brandcopy", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes",
            "unsloth", "unsloth_zoo", "vllm")
DATA_KINDS = {  # data file kind -> each row's fields and what they hold
    "sft": {"messages": "messages"},
    "preference": {"prompt": "messages", "chosen": "messages", "rejected": "messages"},
    "grpo": {"prompt": "messages", "product_id": "text", "content_type": "text"},
}
_STARTING: dict[Path, object] = {}  # stage folder -> config of a run starting afresh, until its training starts
CHECKPOINT_STATE_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")  # what a resume reads besides the weights


class StageInputError(FileNotFoundError):
    """A stage's input (an earlier stage or a data file) is missing or empty."""


def stage_dir(run_dir: str | Path, stage: str) -> Path:
    """``<run_dir>/<stage>``."""
    return Path(run_dir) / stage


def is_complete(path: str | Path) -> bool:
    """True when a stage folder finished (its manifest, written last, exists)."""
    return (Path(path) / "manifest.json").is_file()


def require_stage(run_dir: str | Path, stage: str, needed_by: str) -> Path:
    """Return a finished stage folder of this run, or raise naming what to run first.

    Raises:
        StageInputError: The folder is missing or has no manifest.json (never finished).
    """
    path = stage_dir(run_dir, stage)
    if not is_complete(path):
        state = "is unfinished (no manifest.json)" if path.exists() else "does not exist"
        raise StageInputError(
            f"{needed_by} starts from the {stage} stage, but {path} {state}: "
            f"run `brandcopy train {stage}` with the same run name first"
        )
    return path


def data_file(data_dir: str | Path, kind: str, split: str) -> Path:
    """``<data_dir>/<kind>_<split>.jsonl``, e.g. ``outputs/demo/data/sft_train.jsonl``."""
    return Path(data_dir) / f"{kind}_{split}.jsonl"


def read_data_file(path: str | Path, required: tuple[str, ...] | dict[str, str] = ()) -> list[dict]:
    """The rows of a data file a stage reads (``files.read_jsonl``: each row's fields checked).

    Raises:
        StageInputError: The file is missing or has no rows.
        DataFileError: A line is not what it should be (see ``files.read_jsonl``).
    """
    path = Path(path)
    if not path.is_file():
        raise StageInputError(f"{path}: data file not found (export the data with `brandcopy data export`)")
    rows = read_jsonl(path, required)
    if not rows:
        raise StageInputError(f"{path}: no rows for this split")
    return rows


def spread(count: int, n: int) -> list[int]:
    """``n`` indices spread evenly over ``range(count)`` (all of them when ``n`` is 0 or at least ``count``).

    Held-out pair files are grouped by product and content type: a prefix would score a few
    products only, an even spread scores them all.
    """
    if not n or n >= count:
        return list(range(count))
    return [i * count // n for i in range(n)]


def begin_stage(cfg) -> str | None:
    """Prepare ``cfg.out_dir`` for a (re)run and say on the console what happens to it.

    - An interrupted run (checkpoints, no manifest) resumes from its newest complete checkpoint
      when ``cfg.resume``; torn checkpoints (a kill during a save) are reported and removed.
    - A finished stage run again starts over, but nothing of the finished run is touched until
      the new run's training starts (``MetricsCallback.on_train_begin`` replaces it then): a
      rerun that fails while loading the model or building the trainer leaves it as it was.
    - A new stage folder is not created here either: a run that fails before training leaves
      nothing behind. Its ``config.yaml`` is written when training starts.

    Also seeds every RNG with ``cfg.seed``, so the LoRA initialisation (done before the trainer
    seeds anything) is the same in every run.

    Returns:
        The checkpoint to resume from, or None.
    """
    from accelerate import PartialState
    from transformers import set_seed

    set_seed(cfg.seed)

    # With several processes (accelerate launch) the main one decides and cleans up first; the
    # others then see the cleaned folder and reach the same decision.
    with PartialState().main_process_first():
        return _prepare_stage_dir(cfg)


def _prepare_stage_dir(cfg) -> str | None:
    out = cfg.out_dir
    if is_complete(out) or not out.exists():
        _STARTING[out] = cfg  # written, and a finished run replaced, by MetricsCallback.on_train_begin
        if is_complete(out):
            say(f"{cfg.stage}: {out} holds a finished run; it stays untouched until the new run starts training, "
                "and is replaced then")
        return None
    checkpoints = out / "checkpoints"
    resume_from = last_complete_checkpoint(checkpoints) if cfg.resume and checkpoints.is_dir() else None
    if resume_from is None:
        shutil.rmtree(checkpoints, ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    else:
        trim_metrics(out / "metrics.jsonl", checkpoint_step(resume_from))
        say(f"{cfg.stage}: resuming the interrupted run from step {checkpoint_step(resume_from)} ({resume_from})")
    save_config(cfg, out / "config.yaml")
    return resume_from


def say(message: str) -> None:
    """One line on the console about what happens to a stage folder (main process only)."""
    if is_main_process():
        print(message, flush=True)


def start_training(stage: Path) -> None:
    """Training starts in ``stage``: replace the finished run kept there until now, and write ``config.yaml``.

    The old manifest goes first, so from here on the folder reads as unfinished (and a kill
    resumes from the new run's checkpoints); the old metrics, curve and checkpoints follow. Does
    nothing for a resumed run (``begin_stage`` wrote its config) or a trainer outside a stage.
    """
    cfg = _STARTING.pop(Path(stage), None)
    if cfg is None:
        return
    if is_complete(stage):
        say(f"{cfg.stage}: training started; replacing the finished run in {stage}")
        (stage / "manifest.json").unlink()
    # the old run's checkpoints only: the trackers (TensorBoard's checkpoints/runs/) opened their files a moment ago
    for old in (stage / "checkpoints").glob("checkpoint-*"):
        shutil.rmtree(old, ignore_errors=True)
    for name in ("metrics.jsonl", "curve.png"):
        (stage / name).unlink(missing_ok=True)
    save_config(cfg, stage / "config.yaml")


def checkpoint_problem(path: Path) -> str | None:
    """Why a ``checkpoint-<step>`` folder cannot be resumed from, or None when it is complete.

    Checks what ``Trainer.train(resume_from_checkpoint=...)`` reads: ``trainer_state.json`` (valid
    JSON), the optimizer and scheduler archives (whole zip files, as ``torch.save`` writes them)
    and the weights (every ``*.safetensors`` file opens: its header matches the file's length).
    """
    from safetensors import SafetensorError, safe_open

    for name in CHECKPOINT_STATE_FILES:
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return "trainer_state.json is torn (not valid JSON)"
    for name in CHECKPOINT_STATE_FILES[1:]:
        if not zipfile.is_zipfile(path / name):
            return f"{name} is torn (not a whole torch archive)"
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        return "no *.safetensors weights"
    for weight in weights:
        try:
            with safe_open(str(weight), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            return f"{weight.name} is torn ({err})"
    return None


def last_complete_checkpoint(checkpoints: Path) -> str | None:
    """The newest complete ``checkpoint-<step>`` in ``checkpoints``; incomplete ones are reported and removed.

    A kill during a save leaves a checkpoint folder that is empty or holds a torn file; resuming
    from it fails, so it is skipped (and deleted: the resumed run saves that step again).
    """
    found = sorted((p for p in checkpoints.glob("checkpoint-*") if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()),
                   key=checkpoint_step, reverse=True)
    for path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        say(f"skipping incomplete checkpoint {path} ({problem}): removed it")
        shutil.rmtree(path)
    return None


def checkpoint_step(path: str | Path) -> int:
    """The global step of a ``checkpoint-<step>`` folder."""
    return int(Path(path).name.rsplit("-", 1)[1])


def trim_metrics(path: Path, step: int) -> None:
    """Drop metric rows logged after ``step`` (a resumed run logs those steps again) and a torn last line."""
    if path.is_file():
        rows = read_metrics(path)
        atomic_write_jsonl(path, [r for r in rows if r["step"] <= step])


class MetricsCallback(TrainerCallback):
    """Append every log event (loss, eval metrics, rewards) to a JSONL file, one line per event.

    Every stage's trainer has one, logging into the stage folder; so it also marks the moment
    training starts, when a finished run of the stage being rerun is replaced (``begin_stage``).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        """The first moment of training: a finished run this one reruns is replaced now, not earlier."""
        if state.is_world_process_zero:
            start_training(self.path.parent)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch, **logs}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False, default=float) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl file (``files.read_jsonl_log``: empty when missing, a torn last line left out).

    Raises:
        DataFileError: A complete line is not valid JSON (file and line named).
    """
    return read_jsonl_log(path)


def metric_series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of one metric (rows without it, or non-finite, are skipped)."""
    pairs = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in pairs], [v for _, v in pairs]


def plot_metrics(metrics_path: str | Path, png_path: str | Path, keys: tuple[str, ...], title: str = "") -> Path:
    """Plot the given metrics against step, one panel each, into a PNG.

    Keys absent from the log are left out; a panel is drawn even for a single point.

    Returns:
        The PNG path.

    Raises:
        ValueError: None of the keys was logged.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    series = {k: metric_series(rows, k) for k in keys}
    series = {k: v for k, v in series.items() if v[0]}
    if not series:
        raise ValueError(f"{metrics_path}: none of {', '.join(keys)} was logged")
    columns = min(3, len(series))  # GRPO logs 7 series: one row of 7 panels is unreadable once scaled to a page
    rows_of_panels = -(-len(series) // columns)
    fig, axes = plt.subplots(rows_of_panels, columns, figsize=(4.5 * columns, 3.5 * rows_of_panels), squeeze=False)
    for ax in axes.flat[len(series):]:
        ax.set_visible(False)
    for ax, (key, (steps, values)) in zip(axes.flat, series.items()):
        ax.plot(steps, values, marker="o", markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return Path(png_path)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a run depends on (None: not installed)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> dict[str, str | bool | None]:
    """The commit of the source tree this package runs from, and whether it has local changes."""
    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, check=True)
    except (FileNotFoundError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def write_manifest(cfg, data_files: list[Path], extra: dict | None = None) -> Path:
    """Write ``manifest.json`` into the stage folder; written last, it marks the stage finished.

    Args:
        cfg: The stage config.
        data_files: The data files the stage read (hashed).
        extra: Stage results to record (final metrics, trainable parameter count, ...).

    Returns:
        The manifest path.
    """
    import torch

    manifest = {
        "stage": cfg.stage,
        "run": cfg.run,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seed": cfg.seed,
        "torch_initial_seed": torch.initial_seed(),
        "git": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "packages": package_versions(),
        "data": {str(p): sha256_file(p) for p in data_files},
        "config": config_dict(cfg),
        **(extra or {}),
    }
    path = atomic_write_text(cfg.out_dir / "manifest.json", json.dumps(manifest, ensure_ascii=False, indent=2))
    weights_follow_umask(cfg.out_dir, path)
    return path


def is_main_process() -> bool:
    """True in the process that writes shared files (the only one without accelerate launch)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def finish_stage(cfg, data_files: list[Path], plot_keys: tuple[str, ...], extra: dict) -> Path:
    """Plot the curve and write the manifest (last): the stage folder is then complete.

    Only the main process writes; the others return the folder.
    """
    if not is_main_process():
        return cfg.out_dir
    plot_metrics(cfg.out_dir / "metrics.jsonl", cfg.out_dir / "curve.png", plot_keys, title=f"{cfg.run} / {cfg.stage}")
    write_manifest(cfg, data_files, extra)
    return cfg.out_dir
