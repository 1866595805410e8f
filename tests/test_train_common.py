"""The TRL configs the stages build: TRL-named keys pass through, brandcopy's own keys stay out."""

from dataclasses import dataclass

import trl
from conftest import REPO

from brandcopy.config import DPOStageConfig, GRPOStageConfig, SFTStageConfig, load_stage_config
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
