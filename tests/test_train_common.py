"""The TRL configs the stages build: TRL-named keys pass through, brandcopy's own keys stay out."""

from dataclasses import dataclass

import pytest
import trl
from conftest import REPO

from brandcopy.config import ConfigError, DPOStageConfig, GRPOStageConfig, SFTStageConfig, load_stage_config, save_config
from brandcopy.demo import stage_config
from brandcopy.train.common import trl_args, trl_config
from brandcopy.train.grpo import grpo_config
from brandcopy.train.sft import sft_config

PRESET = REPO / "configs" / "tiny-cpu.yaml"


def test_stage_and_shared_keys_reach_the_trl_config_by_their_trl_names(tmp_path):
    cfg = load_stage_config(SFTStageConfig, PRESET, [f"output_root={tmp_path}", "sft_learning_rate=0.003",
                                                     "sft_num_train_epochs=3", "sft_per_device_train_batch_size=5",
                                                     "sft_gradient_accumulation_steps=2", "sft_packing=false",
                                                     "lr_scheduler_type=constant", "warmup_steps=0.2", "save_steps=20"])
    args = sft_config(cfg)
    assert (args.learning_rate, args.num_train_epochs, args.gradient_accumulation_steps) == (0.003, 3.0, 2)
    assert args.per_device_train_batch_size == args.per_device_eval_batch_size == 5
    assert (args.lr_scheduler_type, args.warmup_steps, args.packing) == ("constant", 0.2, False)
    assert (args.save_steps, args.seed, args.data_seed) == (20, 3407, 3407)
    # optim is checked where brandcopy passes it: Unsloth's CPU fallback, once imported in the process, turns
    # a config's adamw_torch into adamw_torch_fused
    assert trl_args(cfg, trl.SFTConfig)["optim"] == "adamw_torch"
    assert args.output_dir == str(tmp_path / "tiny" / "sft" / "checkpoints") and args.use_cpu
    assert args.max_length == cfg.max_seq_length and args.assistant_only_loss  # the stage's own settings


def test_brandcopy_keys_stay_out_and_the_stage_settings_win(tmp_path):
    dpo = trl_args(load_stage_config(DPOStageConfig, PRESET, ["dpo_max_steps=40"]), trl.DPOConfig)
    assert dpo["beta"] == 0.1 and dpo["max_steps"] == 40
    assert not {"run", "model", "backend", "lora_rank", "from", "pairs", "eval_pairs", "dpo_beta"} & set(dpo)
    grpo = grpo_config(load_stage_config(GRPOStageConfig, PRESET, [f"output_root={tmp_path}"]))
    assert grpo.reward_weights == [1.0, 1.0, 1.0, 0.5, 0.5]  # grpo_reward_weights is a mapping; TRL takes the list
    assert (grpo.num_generations, grpo.max_completion_length, grpo.use_vllm) == (4, 96, False)


@dataclass
class NoisySFTConfig(SFTStageConfig):
    sft_neftune_noise_alpha: float = 5.0  # a TRL setting the presets do not have


def test_a_new_trl_setting_is_one_field(tmp_path):
    cfg = NoisySFTConfig(output_root=str(tmp_path), sft_max_steps=1)
    assert trl_config(trl.SFTConfig, cfg).neftune_noise_alpha == 5.0


def test_any_trl_argument_passes_through_by_its_stage_prefix(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text(PRESET.read_text(encoding="utf-8") + "grpo_loss_type: dr_grpo\ndpo_label_smoothing: 0.1\n", encoding="utf-8")
    cfg = load_stage_config(GRPOStageConfig, preset, [f"output_root={tmp_path}", "grpo_epsilon_high=0.28",
                                                      "grpo_mask_truncated_completions=true"])
    args = grpo_config(cfg)
    assert (args.loss_type, args.epsilon_high, args.mask_truncated_completions) == ("dr_grpo", 0.28, True)
    assert "label_smoothing" not in trl_args(cfg, trl.GRPOConfig)  # another stage's argument stays with it
    assert trl_args(load_stage_config(DPOStageConfig, preset), trl.DPOConfig)["label_smoothing"] == 0.1
    assert "loss_type" not in trl_args(load_stage_config(SFTStageConfig, preset), trl.SFTConfig)
    saved = save_config(cfg, tmp_path / "resolved.yaml")  # the stage folder's config.yaml loads back the same
    assert grpo_config(load_stage_config(GRPOStageConfig, saved, [f"output_root={tmp_path}"])).loss_type == "dr_grpo"


@pytest.mark.parametrize("line, words", [
    ("grpo_los_type: dr_grpo", ["preset.yaml:", "unknown key 'grpo_los_type'", "trl.GRPOConfig", "did you mean 'grpo_loss_type'"]),
    ("grpo_max_length: 64", ["preset.yaml:", "'grpo_max_length'", "max_seq_length"]),  # no such GRPO argument
    ("grpo_output_dir: elsewhere", ["preset.yaml:", "'grpo_output_dir' is set by the grpo stage itself"]),
])
def test_a_passed_through_key_trl_does_not_take_fails_naming_its_line(line, words, tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text(PRESET.read_text(encoding="utf-8") + line + "\n", encoding="utf-8")
    cfg = load_stage_config(GRPOStageConfig, preset, [f"output_root={tmp_path}"])  # the form alone: no TRL import
    with pytest.raises(ConfigError) as err:
        grpo_config(cfg)
    line_no = len(preset.read_text(encoding="utf-8").splitlines())
    assert f"preset.yaml:{line_no}" in str(err.value) and all(w in str(err.value) for w in words), err.value


def test_a_near_miss_of_a_brandcopy_key_is_still_an_unknown_key_at_load(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'grpo_learnig_rate' .did you mean 'grpo_learning_rate'"):
        load_stage_config(GRPOStageConfig, PRESET, ["grpo_learnig_rate=1e-4"])
    with pytest.raises(ConfigError, match="takes the stage's prefix: 'grpo_loss_type'"):
        load_stage_config(GRPOStageConfig, PRESET, ["loss_type=dr_grpo"])
    with pytest.raises(ConfigError, match="'dpo_label_smoothing' is a TRL argument of the dpo stage, not read by the grpo"):
        load_stage_config(GRPOStageConfig, PRESET, ["dpo_label_smoothing=0.1"])


def test_one_override_list_hands_a_trl_argument_to_its_stage_alone():
    overrides = ["grpo_loss_type=dr_grpo", "sft_max_steps=3"]  # what `brandcopy demo` and the notebooks pass every stage
    assert stage_config(GRPOStageConfig, PRESET, overrides).trl_passthrough == {
        "grpo_loss_type": ("dr_grpo", "override 'grpo_loss_type=dr_grpo'")}
    assert stage_config(SFTStageConfig, PRESET, overrides).trl_passthrough == {}
