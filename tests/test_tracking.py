"""Watching a run (report_to: TensorBoard offline) and the accelerate configs of the multi-GPU route."""

from pathlib import Path

import pytest
from conftest import REPO, tiny_overrides
from train_data import write_tiny_data

from brandcopy.config import ConfigError, SFTStageConfig, load_stage_config
from brandcopy.train.sft import run_sft

PRESET = REPO / "configs" / "tiny-cpu.yaml"


def scalar_steps(log_dir: Path, tag: str) -> list[int]:
    """Steps of one scalar in every TensorBoard event file under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            steps += [event.step for event in accumulator.Scalars(tag)]
    return steps


def test_report_to_tensorboard_writes_event_files_offline(tiny_model_dir, tmp_path, monkeypatch):
    """The preset key reaches the trainer: an SFT run with report_to=tensorboard leaves event files with
    the training loss of every logged step (no network involved)."""
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    write_tiny_data(tmp_path / "t" / "data")
    cfg = load_stage_config(SFTStageConfig, PRESET, tiny_overrides(tmp_path, tiny_model_dir)
                            + ["sft_max_steps=3", "sft_eval=false", "report_to=tensorboard"])
    out = run_sft(cfg)
    assert scalar_steps(out / "checkpoints" / "runs", "train/loss") == [1, 2, 3]


def test_report_to_is_checked_before_anything_loads():
    with pytest.raises(ConfigError, match=r"report_to=tensorbord'.*not one of none, tensorboard, wandb"):
        load_stage_config(SFTStageConfig, PRESET, ["report_to=tensorbord"])


@pytest.mark.parametrize("name, kind, zero_stage", [("ddp", "MULTI_GPU", None), ("zero2", "DEEPSPEED", 2), ("zero3", "DEEPSPEED", 3)])
def test_accelerate_configs_load(name, kind, zero_stage):
    """Each shipped accelerate config is one accelerate itself reads: the right kind, ZeRO stage and
    gradient accumulation left to the stage config (``auto``)."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == kind and config.num_processes == 2 and not config.use_cpu
    if zero_stage is not None:
        assert config.deepspeed_config["zero_stage"] == zero_stage
        assert config.deepspeed_config["gradient_accumulation_steps"] == "auto"
