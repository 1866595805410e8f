"""The run directory survives faults: failed reruns, kills during a checkpoint save, torn metrics, file modes."""

import json
import stat
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_overrides
from safetensors.torch import save_file
from train_data import write_tiny_data
from transformers import TrainerCallback

from brandcopy.config import SFTStageConfig, load_stage_config
from brandcopy.run import checkpoint_problem, last_complete_checkpoint, read_metrics
from brandcopy.train.sft import run_sft

PRESET = REPO / "configs" / "tiny-cpu.yaml"


def stage_files(stage: Path) -> dict[str, bytes]:
    return {str(p.relative_to(stage)): p.read_bytes() for p in sorted(stage.rglob("*")) if p.is_file()}


def sft_config(tmp_path: Path, model_dir, *extra: str) -> SFTStageConfig:
    return load_stage_config(SFTStageConfig, PRESET, tiny_overrides(tmp_path, model_dir) + ["sft_eval=false", *extra])


def test_failed_rerun_leaves_the_finished_stage_byte_identical(tiny_model_dir, tmp_path, capsys, monkeypatch):
    write_tiny_data(tmp_path / "t" / "data")
    finished = run_sft(sft_config(tmp_path, tiny_model_dir, "sft_max_steps=2"))
    before = stage_files(finished)
    assert {"manifest.json", "metrics.jsonl", "adapter_model.safetensors", "config.yaml"} <= set(before)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_sft(sft_config(tmp_path, tiny_model_dir, "sft_max_steps=3", f"model={tmp_path / 'mistyped'}"))
    assert stage_files(finished) == before  # manifest, metrics, adapter, config: not a byte changed
    assert "holds a finished run; it stays untouched" in capsys.readouterr().out

    def trainer_fails(*args, **kwargs):  # the rerun gets past loading and the rendered example, then fails
        raise RuntimeError("trainer could not be built")

    train_file = tmp_path / "t" / "data" / "sft_train.jsonl"
    rows = train_file.read_text(encoding="utf-8").splitlines(keepends=True)
    train_file.write_text("".join(reversed(rows)), encoding="utf-8")  # another first example to render
    with monkeypatch.context() as patch:
        patch.setattr("brandcopy.train.sft.sft_trainer", trainer_fails)
        with pytest.raises(RuntimeError, match="could not be built"):
            run_sft(sft_config(tmp_path, tiny_model_dir, "sft_max_steps=3"))
    assert stage_files(finished) == before  # training_example.txt too: it is written after training

    rerun = run_sft(sft_config(tmp_path, tiny_model_dir, "sft_max_steps=3"))  # a good rerun replaces it
    assert "replacing the finished run" in capsys.readouterr().out
    manifest = json.loads((rerun / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["global_step"] == 3 and manifest["config"]["sft_max_steps"] == 3
    assert [row["step"] for row in read_metrics(rerun / "metrics.jsonl") if "loss" in row] == [1, 2, 3]
    assert "sft_max_steps: 3" in (rerun / "config.yaml").read_text(encoding="utf-8")


class StopAt(TrainerCallback):
    """Simulates a kill: raise when a step begins after ``step`` steps are done."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated interruption")


def test_resume_skips_torn_checkpoints_and_a_torn_metrics_line(tiny_model_dir, tmp_path, capsys):
    write_tiny_data(tmp_path / "t" / "data")
    cfg = sft_config(tmp_path, tiny_model_dir, "sft_max_steps=6", "save_steps=2", "save_total_limit=5")
    with pytest.raises(KeyboardInterrupt):
        run_sft(cfg, callbacks=[StopAt(5)])
    checkpoints = cfg.out_dir / "checkpoints"
    torn = checkpoints / "checkpoint-4" / "adapter_model.safetensors"
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])  # killed while saving step 4's weights
    (checkpoints / "checkpoint-5").mkdir()  # killed right after creating the folder
    with (cfg.out_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"step": 5, "lo')  # killed while logging

    run_sft(cfg)
    out = capsys.readouterr().out
    assert "skipping incomplete checkpoint" in out and "checkpoint-5" in out and "adapter_model.safetensors is torn" in out
    assert "resuming the interrupted run from step 2" in out
    manifest = json.loads((cfg.out_dir / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["resumed_from"].endswith("checkpoint-2") and manifest["global_step"] == 6
    assert [row["step"] for row in read_metrics(cfg.out_dir / "metrics.jsonl") if "loss" in row] == [1, 2, 3, 4, 5, 6]


def write_checkpoint(path: Path) -> Path:
    """The files a trainer checkpoint holds, written the way the trainer writes them."""
    path.mkdir(parents=True)
    save_file({"w": torch.zeros(64, 64)}, str(path / "adapter_model.safetensors"))
    torch.save({"state": {}}, path / "optimizer.pt")
    torch.save({"last_epoch": 1}, path / "scheduler.pt")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": int(path.name.split("-")[1])}), encoding="utf-8")
    return path


def halve(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(("damage", "problem"), [
    (lambda c: halve(c / "adapter_model.safetensors"), "adapter_model.safetensors is torn"),
    (lambda c: (c / "adapter_model.safetensors").unlink(), "no *.safetensors weights"),
    (lambda c: halve(c / "optimizer.pt"), "optimizer.pt is torn"),
    (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt is missing"),
    (lambda c: halve(c / "trainer_state.json"), "trainer_state.json is torn"),
])
def test_checkpoint_problem_names_the_torn_file(tmp_path, damage, problem):
    good = write_checkpoint(tmp_path / "checkpoints" / "checkpoint-2")
    bad = write_checkpoint(tmp_path / "checkpoints" / "checkpoint-4")
    assert checkpoint_problem(good) is None and checkpoint_problem(bad) is None
    damage(bad)
    assert problem in checkpoint_problem(bad)
    assert last_complete_checkpoint(tmp_path / "checkpoints") == str(good)
    assert not bad.exists()  # removed: the resumed run saves that step again


def test_metrics_torn_last_line_is_dropped_but_a_bad_middle_line_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo', encoding="utf-8")
    assert [row["step"] for row in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="metrics.jsonl:2: not valid JSON"):
        read_metrics(path)


def test_saved_weights_follow_the_umask_not_safetensors_0600(tiny_model_dir, sft_run):
    _, stage = sft_run
    for folder, reference in ((tiny_model_dir, "config.json"), (stage, "manifest.json")):
        expected = stat.S_IMODE((folder / reference).stat().st_mode)
        assert {stat.S_IMODE(p.stat().st_mode) for p in folder.glob("*.safetensors")} == {expected}


def test_spread_picks_held_out_rows_across_the_whole_file():
    from brandcopy.run import spread

    assert spread(10, 4) == [0, 2, 5, 7]  # not the first four: pair files are grouped by product
    assert spread(3, 0) == [0, 1, 2] and spread(3, 8) == [0, 1, 2]
