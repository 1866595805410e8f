"""DPO stage: starts from the SFT adapter (which is also its reference) and moves the preference margin."""

import json

import pytest
from conftest import REPO

from brandcopy.config import DPOStageConfig, load_stage_config
from brandcopy.run import StageInputError, read_metrics
from brandcopy.train.dpo import run_dpo


def test_dpo_from_sft_raises_the_margin(sft_run):
    overrides, _ = sft_run
    cfg = load_stage_config(DPOStageConfig, REPO / "configs" / "tiny-cpu.yaml",
                            overrides + ["dpo_max_steps=4", "dpo_learning_rate=3e-3"])
    out = run_dpo(cfg)
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    # The reference is a frozen copy of the SFT adapter, so the first loss is exactly -log(sigmoid(0)).
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["rewards/margins"] > 0
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["changed_tensors"] > 0 and manifest["started_from"].endswith("sft")
    assert (out / "curve.png").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "ref").exists()  # TRL's reference copy is not saved


def test_dpo_without_sft_names_the_missing_stage(tmp_path):
    from train_data import write_tiny_data

    write_tiny_data(tmp_path / "t" / "data")
    cfg = load_stage_config(DPOStageConfig, REPO / "configs" / "tiny-cpu.yaml", [f"output_root={tmp_path}", "run=t"])
    with pytest.raises(StageInputError, match=r"dpo starts from the sft stage, but .*t/sft does not exist"):
        run_dpo(cfg)
