"""SFT stage on the tiny model: it learns, writes a complete stage folder, resumes, and fails early on bad data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, tiny_overrides
from train_data import write_jsonl, write_tiny_data
from transformers import TrainerCallback

from brandcopy.config import SFTStageConfig, load_stage_config
from brandcopy.run import StageInputError, read_metrics
from brandcopy.train.sft import run_sft

PRESET = REPO / "configs" / "tiny-cpu.yaml"


def losses(stage: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(stage / "metrics.jsonl") if "loss" in row]


def test_sft_learns_and_writes_the_stage_folder(sft_run):
    _, out = sft_run
    trained = losses(out)
    assert sum(trained[-5:]) / 5 < sum(trained[:5]) / 5 - 1.0  # the tiny model memorises quickly
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "config.yaml", "metrics.jsonl", "curve.png", "manifest.json", "training_example.txt"} <= names
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["changed_tensors"] > 0 and manifest["seed"] == 3407
    assert manifest["packages"]["trl"] and "commit" in manifest["git"]
    assert all(len(digest) == 64 for digest in manifest["data"].values()) and len(manifest["data"]) == 2
    # The logged training example: the assistant answer and its end-of-turn token carry loss.
    example = (out / "training_example.txt").read_text(encoding="utf-8")
    assert "<|im_end|>\n]]" in example and manifest["trained_text_of_first_example"].endswith("<|im_end|>\n")


class StopAt(TrainerCallback):
    """Simulates a crash: raise when a step begins after ``step`` steps are done."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated interruption")


def test_interrupted_and_resumed_sft_ends_at_the_same_loss(tiny_model_dir, tmp_path):
    write_tiny_data(tmp_path / "a" / "data")
    write_tiny_data(tmp_path / "b" / "data")
    settings = ["sft_max_steps=6", "save_steps=2", "sft_eval=false"]
    straight = load_stage_config(SFTStageConfig, PRESET, tiny_overrides(tmp_path, tiny_model_dir, "a") + settings)
    resumed = load_stage_config(SFTStageConfig, PRESET, tiny_overrides(tmp_path, tiny_model_dir, "b") + settings)
    run_sft(straight)
    with pytest.raises(KeyboardInterrupt):
        run_sft(resumed, callbacks=[StopAt(5)])
    assert not (resumed.out_dir / "manifest.json").exists()
    run_sft(resumed)
    manifest = json.loads((resumed.out_dir / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["resumed_from"].endswith("checkpoint-4")
    assert losses(resumed.out_dir) == pytest.approx(losses(straight.out_dir), rel=1e-5)
    assert [r["step"] for r in read_metrics(resumed.out_dir / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_empty_split_and_bad_rows_fail_before_training(tmp_path):
    data = write_tiny_data(tmp_path / "t" / "data")
    overrides = [f"output_root={tmp_path}", "run=t", "model=/nonexistent-model"]  # never loaded
    cfg = load_stage_config(SFTStageConfig, PRESET, overrides)
    write_jsonl(data / "sft_val.jsonl", [])
    with pytest.raises(StageInputError, match=r"sft_val.jsonl: no rows for this split"):
        run_sft(cfg)
    (data / "sft_val.jsonl").unlink()
    with pytest.raises(StageInputError, match=r"sft_val.jsonl: data file not found"):
        run_sft(cfg)
    (data / "sft_train.jsonl").write_text('{"messages": []}\n{"text": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"sft_train.jsonl:2: missing field 'messages'"):
        run_sft(cfg)
    assert not cfg.out_dir.exists()


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tiny_model_dir, tmp_path):
    """The multi-GPU route is accelerate's: 2 CPU processes (gloo) run the same SFT command."""
    write_tiny_data(tmp_path / "t" / "data")
    overrides = tiny_overrides(tmp_path, tiny_model_dir) + ["sft_max_steps=3", "sft_eval=false"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
               "-m", "brandcopy.cli", "train", "sft", "--config", str(PRESET), *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "t" / "sft"
    assert json.loads((out / "manifest.json").read_text(encoding="utf-8"))["global_step"] == 3
    assert (out / "adapter_model.safetensors").is_file()


def test_packed_rows_keep_attention_within_each_example(tiny_model_dir):
    """Padding-free packing relies on transformers building a block-diagonal mask from position_ids
    (SDPA here, no flash-attention): logits of a packed row equal each example's own logits. The mask is
    only built without a KV cache, which TRL's compute_loss guarantees by passing use_cache=False."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    a, b = torch.arange(5, 17), torch.arange(40, 49)
    packed = torch.cat([a, b])[None]
    positions = torch.cat([torch.arange(len(a)), torch.arange(len(b))])[None]
    with torch.no_grad():
        together = model(input_ids=packed, position_ids=positions, use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=a[None]).logits[0], model(input_ids=b[None]).logits[0]])
    assert torch.allclose(together, alone, atol=1e-5)
