"""GRPO stage: the mean reward rises on a reward the tiny model can learn, and bad batch settings fail early."""

import json

import pytest
from conftest import REPO
from train_data import grpo_row, products, write_jsonl

from brandcopy.config import ConfigError, GRPOStageConfig, load_stage_config
from brandcopy.llm import LLMConfigError
from brandcopy.run import read_metrics
from brandcopy.train.grpo import run_grpo

PRESET = REPO / "configs" / "tiny-cpu.yaml"


def test_grpo_raises_the_format_reward(sft_run, tmp_path):
    """format_reward on social-media prompts (200-600 characters): 48 tokens fall short, so the reward
    grows with every extra character; the policy learns to spend its tokens on longer ones."""
    overrides, _ = sft_run
    write_jsonl(tmp_path / "grpo_train.jsonl", [grpo_row(p, "social_media_review") for p in products(12)])
    cfg = load_stage_config(GRPOStageConfig, PRESET, overrides + [
        f"data_dir={tmp_path}", "grpo_max_steps=8", "grpo_learning_rate=3e-3", "grpo_per_device_train_batch_size=8",
        "grpo_num_generations=8",
        "grpo_max_completion_length=48", "grpo_reward_weights={format: 1.0}"])
    out = run_grpo(cfg)
    rewards = [r["reward"] for r in read_metrics(out / "metrics.jsonl") if "reward" in r]
    assert len(rewards) == 8
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["rewards"] == ["format_reward"] and manifest["changed_tensors"] > 0
    assert (out / "curve.png").is_file() and (out / "adapter_model.safetensors").is_file()


def test_batch_must_hold_whole_groups_and_some_reward(tmp_path):
    base = [f"output_root={tmp_path}"]
    with pytest.raises(ConfigError, match=r"grpo_per_device_train_batch_size \(6\) x grpo_gradient_accumulation_steps \(1\) "
                                          "must be a multiple"):
        run_grpo(load_stage_config(GRPOStageConfig, PRESET, base + ["grpo_per_device_train_batch_size=6"]))
    zero = "grpo_reward_weights={lint: 0, fact: 0, format: 0, cta: 0, reward_model: 0}"
    with pytest.raises(ConfigError, match="every weight is zero"):
        run_grpo(load_stage_config(GRPOStageConfig, PRESET, base + [zero]))


def test_judge_reward_without_its_key_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.delenv("BRANDCOPY_TEST_MISSING_KEY", raising=False)
    write_jsonl(tmp_path / "grpo_train.jsonl", [grpo_row(p, "paid_ad_cta") for p in products(2)])
    cfg = load_stage_config(GRPOStageConfig, PRESET, [
        f"output_root={tmp_path}", f"data_dir={tmp_path}", "grpo_reward_weights={judge: 1.0}",
        "grpo_judge_base_url=https://api.deepseek.com", "grpo_judge_api_key_env=BRANDCOPY_TEST_MISSING_KEY"])
    with pytest.raises(LLMConfigError, match="BRANDCOPY_TEST_MISSING_KEY"):
        run_grpo(cfg)
    assert not (tmp_path / cfg.run / "grpo").exists()  # nothing was started


def test_judge_reward_reads_the_endpoint_it_is_given(tmp_path):
    """The preset's ``scripted`` judge is the wiring's to start: unstarted it fails before training; the
    endpoint passed in (what ``mockserver.endpoint`` yields) is the one the judge column carries."""
    from brandcopy.brand import load_brand
    from brandcopy.mockserver import endpoint
    from brandcopy.train.grpo import grpo_dataset, judge_endpoint

    write_jsonl(tmp_path / "grpo_train.jsonl", [grpo_row(p, "paid_ad_cta") for p in products(2)])
    cfg = load_stage_config(GRPOStageConfig, PRESET, [
        f"output_root={tmp_path}", f"data_dir={tmp_path}", "grpo_reward_weights={judge: 1.0}"])
    assert cfg.grpo_judge_base_url == "scripted"  # the tiny preset's judge
    with pytest.raises(LLMConfigError, match="'scripted' is not an http"):
        run_grpo(cfg)
    assert not (tmp_path / cfg.run / "grpo").exists()
    with endpoint(judge_endpoint(cfg), load_brand(cfg.brand)) as judge:
        rows = grpo_dataset(cfg, "train", judge)
    specs = {json.loads(spec)["config"]["base_url"] for spec in rows["judge"]}
    assert specs == {judge.base_url} and judge.base_url.startswith("http://127.0.0.1:")
