"""Reward-model stage: it learns to rank chosen over rejected, saves the score head, and scores for GRPO."""

import json

from conftest import REPO, tiny_overrides
from safetensors import safe_open
from train_data import write_tiny_data

from brandcopy.config import RewardStageConfig, load_stage_config
from brandcopy.rewards import reward_model_reward
from brandcopy.run import read_metrics
from brandcopy.train.reward import run_reward


def test_reward_model_learns_and_scores_chosen_above_rejected(tiny_model_dir, tmp_path):
    data = write_tiny_data(tmp_path / "t" / "data")
    cfg = load_stage_config(RewardStageConfig, REPO / "configs" / "tiny-cpu.yaml",
                            tiny_overrides(tmp_path, tiny_model_dir) + ["reward_max_steps=9", "reward_learning_rate=3e-3"])
    out = run_reward(cfg)
    rows = read_metrics(out / "metrics.jsonl")
    train_losses = [r["loss"] for r in rows if "loss" in r]
    assert train_losses[-1] < train_losses[0]
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["changed_tensors"] > 0 and manifest["heldout_pairs"] == 4
    assert manifest["heldout_pairwise_accuracy"] == 1.0  # the tiny pairs are easy: "!!!" and absolute claims
    assert (out / "curve.png").is_file() and any("heldout_pairwise_accuracy" in r for r in rows)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert any("score" in key for key in f.keys())  # the head is saved with the adapter
    val = [json.loads(line) for line in (data / "preference_val.jsonl").read_text(encoding="utf-8").splitlines()]
    prompts = [r["prompt"] for r in val] * 2
    completions = [r["chosen"] for r in val] + [r["rejected"] for r in val]
    scores = reward_model_reward(prompts, completions, reward_model=[str(out)] * len(prompts))
    assert all(0 < s < 1 for s in scores)
    assert all(c > r for c, r in zip(scores[:4], scores[4:]))
