"""The CPU demo's goals on a short run of ``run_demo`` (every stage, the tiny preset, fewer steps).

What a newcomer is told must be what the demo shows: the pre-trained tiny base does not stop, SFT
makes it emit ``<|im_end|>`` itself (no extra stop strings, the preset's 200-token budget), SFT lowers
the loss on the golden copy, the reward model ranks held-out pairs, and the merge keeps the adapter's
greedy copy. Measured on the val split by the demo's own evaluation.
"""

import json
import shutil

import pytest

from brandcopy.demo import run_demo

SHORT_RUN = [  # every stage runs; SFT keeps the preset's 128 steps, enough to learn when a turn ends (90 left 8 of
    # 12 prompts stopping). save_steps is pinned: an evaluation mid-run changes the SFT trajectory, and the goal
    # must not move when the preset's evaluation schedule is retuned.
    "sft_max_steps=128", "save_steps=1000", "dpo_max_steps=4", "grpo_max_steps=2",  # the preset's reward model (30 s)
    "eval_max_samples=12", "eval_batch_size=12", "eval_sampled=false", "eval_ifeval=false", "eval_preference_pairs=8",
]


@pytest.mark.cpu_only
def test_short_demo_run_meets_the_stop_loss_and_reward_model_goals(pretrained_tiny_model_dir, tmp_path):
    run_dir = tmp_path / "outputs" / "goals"
    shutil.copytree(pretrained_tiny_model_dir, run_dir / "tiny-model")  # the demo's own pre-trained base, built once
    result = run_demo(overrides=["run=goals", f"output_root={tmp_path / 'outputs'}", f"model={run_dir / 'tiny-model'}",
                                 *SHORT_RUN])
    stages = {row["model"]: row for row in json.loads((run_dir / "eval" / "results.json").read_text())["stages"]}
    assert list(stages) == ["base", "sft", "dpo", "grpo", "merged"], result.changes
    assert stages["base"]["stop_rate"] <= 0.25  # plain-text pre-training: the base never learned when a turn ends
    assert stages["sft"]["stop_rate"] >= 0.9, result.changes  # the EOS fix: the model itself emits <|im_end|>
    assert stages["sft"]["eval_loss"] < stages["base"]["eval_loss"]
    assert stages["sft"]["lint_score"] > stages["base"]["lint_score"]  # 0.472 against 0.389
    assert stages["sft"]["brand_reward"] > stages["base"]["brand_reward"]
    reward = json.loads((run_dir / "reward" / "manifest.json").read_text())
    # Goal 0.8 (measured 0.833: 40 of 48 held-out pairs); one pair of slack for another CPU's float rounding.
    assert reward["heldout_pairwise_accuracy"] >= 0.78 > reward["heldout_pairwise_accuracy_before"], reward
    merged, grpo = stages["merged"], stages["grpo"]  # a float32 merge writes what the adapter wrote
    assert [merged[k] for k in ("stop_rate", "lint_score", "brand_reward")] == [grpo[k] for k in ("stop_rate", "lint_score", "brand_reward")]
    assert merged["eval_loss"] == pytest.approx(grpo["eval_loss"], abs=1e-3)
    assert "What each stage changed" in result.changes and "## What each stage changed" in (run_dir / "eval" / "report.md").read_text()
    assert (run_dir / "eval" / "charts" / "stages.png").stat().st_size > 0
