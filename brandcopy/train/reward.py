"""Reward-model stage: a scalar head on the base model, LoRA, trained on chosen/rejected pairs.

Reads ``<run>/data/preference_{train,val}.jsonl`` and writes ``<run>/reward``: the LoRA adapter
with the score head saved in full (PEFT's ``modules_to_save`` for sequence classification),
the tokenizer, and the pairwise accuracy on the held-out pairs before and after training.
GRPO's ``reward_model`` reward loads it with ``modeling.load_reward_model``.
"""

from pathlib import Path

from peft import LoraConfig
from transformers import AutoTokenizer
# trl.<Name> is looked up when a stage runs, not bound at import: importing unsloth (first, on the
# unsloth backend) rebinds trl's trainers and configs to its patched classes.
import trl

from brandcopy.backend import prepare_backend
from brandcopy.config import RewardStageConfig
from brandcopy.modeling import bnb_4bit_config, default_dtype, score_conversations
from brandcopy.run import MetricsCallback, begin_stage, data_file, finish_stage, spread
from brandcopy.train.common import changed_params, load_split, param_fingerprint, trl_config

__all__ = ["RewardStageConfig", "run_reward", "pairwise_accuracy"]


def reward_lora(cfg: RewardStageConfig) -> LoraConfig:
    """LoRA for sequence classification: PEFT then trains and saves the ``score`` head in full."""
    return LoraConfig(task_type="SEQ_CLS", r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), modules_to_save=["score"])


def reward_config(cfg: RewardStageConfig) -> "trl.RewardConfig":
    """The TRL RewardConfig for a stage config."""
    return trl_config(trl.RewardConfig, cfg, max_length=cfg.max_seq_length, eval_strategy="steps",
                      eval_steps=cfg.save_steps, model_init_kwargs={"dtype": default_dtype()})


def pairwise_accuracy(model, tokenizer, rows) -> float:
    """Share of preference rows whose chosen answer scores above the rejected one."""
    chosen = score_conversations(model, tokenizer, [r["prompt"] + r["chosen"] for r in rows])
    rejected = score_conversations(model, tokenizer, [r["prompt"] + r["rejected"] for r in rows])
    return sum(c > r for c, r in zip(chosen, rejected)) / len(chosen)


def run_reward(cfg: RewardStageConfig, callbacks: list | tuple = ()) -> Path:
    """Train the reward model and write ``<run>/reward``.

    Args:
        cfg: The stage config.
        callbacks: Extra ``transformers.TrainerCallback`` objects.

    Returns:
        The stage folder.

    Raises:
        StageInputError: A preference data file is missing or has no rows.
    """
    prepare_backend(cfg.backend, require_cuda=cfg.require_cuda)  # GPU checks; unsloth before trl
    reward_config(cfg)  # the TRL arguments (a preset's passed-through keys too) checked before a model loads
    train = load_split(cfg.data_path, "preference", "train")
    val = load_split(cfg.data_path, "preference", "val")
    val = val.select(spread(len(val), cfg.reward_eval_pairs))  # scored at every evaluation and twice more
    resume_from = begin_stage(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    quantization = bnb_4bit_config(default_dtype()) if cfg.load_in_4bit else None
    trainer = trl.RewardTrainer(model=cfg.model, args=reward_config(cfg), train_dataset=train, eval_dataset=val,
                            processing_class=tokenizer, quantization_config=quantization, peft_config=reward_lora(cfg),
                            callbacks=[MetricsCallback(cfg.out_dir / "metrics.jsonl"), *callbacks])
    accuracy_before = pairwise_accuracy(trainer.model, tokenizer, val)
    before = param_fingerprint(trainer.model)
    result = trainer.train(resume_from_checkpoint=resume_from)
    changed = changed_params(before, trainer.model)
    accuracy = pairwise_accuracy(trainer.model, tokenizer, val)
    trainer.log({"heldout_pairwise_accuracy": accuracy})
    trainer.save_model(str(cfg.out_dir))  # writes from the main process only
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(cfg.out_dir))
    files = [data_file(cfg.data_path, "preference", s) for s in ("train", "val")]
    extra = {"train_loss": result.training_loss, "global_step": result.global_step, "resumed_from": resume_from,
             "changed_tensors": len(changed), "heldout_pairs": len(val),
             "heldout_pairwise_accuracy_before": accuracy_before, "heldout_pairwise_accuracy": accuracy}
    return finish_stage(cfg, files, ("loss", "eval_loss", "eval_accuracy", "heldout_pairwise_accuracy"), extra)
