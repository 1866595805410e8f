"""Stage configs: flat YAML presets, key=value overrides, type checks, and every shipped preset."""

from pathlib import Path

import pytest

from brandcopy.config import (
    RENAMED,
    STAGE_CONFIGS,
    ConfigError,
    DPOStageConfig,
    EvalStageConfig,
    GRPOStageConfig,
    MergeStageConfig,
    SFTStageConfig,
    all_keys,
    load_stage_config,
    save_config,
)

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "configs").glob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "preset.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_presets_exist():
    assert {p.name for p in PRESETS} >= {"tiny-cpu.yaml", "qwen2.5-7b-24gb.yaml", "qwen2.5-0.5b.yaml"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
@pytest.mark.parametrize("cls", STAGE_CONFIGS, ids=lambda c: c.__name__)
def test_every_preset_loads_for_every_stage(preset, cls):
    cfg = load_stage_config(cls, preset)
    assert cfg.out_dir == Path(cfg.output_root) / cfg.run / cls.stage


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_presets_set_every_key_once_with_a_comment(preset):
    """Each field explained once, next to the setting: every key present, each line commented."""
    lines = [line for line in preset.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]
    keys = [line.split(":", 1)[0] for line in lines]
    assert sorted(keys) == sorted(all_keys())
    assert all("  # " in line for line in lines)


def test_24gb_preset_is_the_issue_recipe():
    cfg = load_stage_config(GRPOStageConfig, REPO / "configs" / "qwen2.5-7b-24gb.yaml")
    assert (cfg.backend, cfg.load_in_4bit, cfg.max_seq_length) == ("unsloth", True, 2048)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.optim) == (64, 128, "adamw_8bit")
    assert len(cfg.lora_target_modules) == 7 and cfg.gradient_checkpointing
    assert cfg.grpo_use_vllm and cfg.grpo_vllm_mode == "colocate"


def test_overrides_apply_with_or_without_stage_prefix(tmp_path):
    path = write(tmp_path, "run: a\nsft_learning_rate: 1e-4\ndpo_beta: 0.2\n")
    cfg = load_stage_config(SFTStageConfig, path, ["learning_rate=3e-4", "lora_rank=8", "model=123", "lora_target_modules=[q_proj]"])
    assert (cfg.run, cfg.sft_learning_rate, cfg.lora_rank, cfg.model, cfg.lora_target_modules) == ("a", 3e-4, 8, "123", ["q_proj"])
    assert load_stage_config(DPOStageConfig, path, ["beta=0.3"]).dpo_beta == 0.3


def test_yaml_scientific_notation_and_ints_become_floats(tmp_path):
    cfg = load_stage_config(SFTStageConfig, write(tmp_path, "sft_learning_rate: 2e-4\nsft_num_train_epochs: 3\n"))
    assert cfg.sft_learning_rate == pytest.approx(2e-4) and isinstance(cfg.sft_num_train_epochs, float)


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    path = write(tmp_path, "run: a\n# comment\nlora_rnak: 8\n")
    with pytest.raises(ConfigError, match=r"preset.yaml:3: unknown key 'lora_rnak' \(did you mean 'lora_rank'\?\)"):
        load_stage_config(SFTStageConfig, path)


def test_removed_keys_name_what_replaces_them(tmp_path):
    path = write(tmp_path, "run: a\neval_judge_mock: true\n")
    with pytest.raises(ConfigError, match=r"preset.yaml:2: key 'eval_judge_mock' was removed; use eval_judge_base_url: scripted"):
        load_stage_config(EvalStageConfig, path)
    with pytest.raises(ConfigError, match=r"override 'grpo_judge_mock=true': key 'grpo_judge_mock' was removed; use grpo_judge_base_url"):
        load_stage_config(GRPOStageConfig, None, ["grpo_judge_mock=true"])


def test_wrong_type_names_file_line_and_key(tmp_path):
    path = write(tmp_path, "run: a\nlora_rank: eight\n")
    with pytest.raises(ConfigError, match=r"preset.yaml:2: key 'lora_rank': expected int"):
        load_stage_config(SFTStageConfig, path)
    with pytest.raises(ConfigError, match=r"key 'load_in_4bit': expected bool"):
        load_stage_config(SFTStageConfig, write(tmp_path, "load_in_4bit: 1\n"))


def test_bad_overrides_are_clear_errors():
    with pytest.raises(ConfigError, match="override 'lora_rank=1.5': expected int"):
        load_stage_config(SFTStageConfig, None, ["lora_rank=1.5"])
    with pytest.raises(ConfigError, match="unknown key 'lr_typo'"):
        load_stage_config(SFTStageConfig, None, ["lr_typo=1"])
    with pytest.raises(ConfigError, match="'grpo_beta' is not read by the sft stage"):
        load_stage_config(SFTStageConfig, None, ["grpo_beta=0.1"])
    with pytest.raises(ConfigError, match="overrides are key=value"):
        load_stage_config(SFTStageConfig, None, ["lora_rank"])
    with pytest.raises(ConfigError, match="'cuda' is not one of auto, unsloth, hf"):
        load_stage_config(SFTStageConfig, None, ["backend=cuda"])
    with pytest.raises(ConfigError, match=r"unknown reward \['judge_typo'\]"):
        load_stage_config(GRPOStageConfig, None, ["grpo_reward_weights={judge_typo: 1}"])


def test_renamed_keys_name_their_new_name(tmp_path):
    path = write(tmp_path, "run: a\nlr_scheduler: cosine\n")
    with pytest.raises(ConfigError, match=r"preset.yaml:2: 'lr_scheduler' was renamed to 'lr_scheduler_type'"):
        load_stage_config(DPOStageConfig, path)
    with pytest.raises(ConfigError, match=r"preset.yaml:1: 'grpo_grad_accum' was renamed to 'grpo_gradient_accumulation_steps'"):
        load_stage_config(SFTStageConfig, write(tmp_path, "grpo_grad_accum: 2\n"))  # also a key another stage read
    with pytest.raises(ConfigError, match=r"override 'warmup_ratio=0.1': 'warmup_ratio' was renamed to 'warmup_steps'"):
        load_stage_config(SFTStageConfig, None, ["warmup_ratio=0.1"])
    with pytest.raises(ConfigError, match=r"override 'epochs=2': 'epochs' was renamed to 'num_train_epochs'"):
        load_stage_config(GRPOStageConfig, None, ["epochs=2"])
    assert set(RENAMED.values()) <= all_keys() and not set(RENAMED) & all_keys()


def test_not_a_mapping_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="one flat mapping"):
        load_stage_config(SFTStageConfig, write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="preset file not found"):
        load_stage_config(SFTStageConfig, tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_stage_config(MergeStageConfig, REPO / "configs" / "tiny-cpu.yaml", ["merge_from=dpo"])
    path = save_config(cfg, tmp_path / "config.yaml")
    assert load_stage_config(MergeStageConfig, path) == cfg


def test_reward_names_match_reward_functions():
    from brandcopy.config import REWARD_NAMES
    from brandcopy.rewards import REWARD_FUNCTIONS

    assert set(REWARD_NAMES) == set(REWARD_FUNCTIONS)
