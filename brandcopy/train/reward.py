"""Reward-model stage: a scalar head on the base model, LoRA, trained on chosen/rejected pairs.

Reads ``<run>/data/preference_{train,val}.jsonl`` and writes ``<run>/reward``: the LoRA adapter
with the score head saved in full (PEFT's ``modules_to_save`` for sequence classification),
the tokenizer, and the pairwise accuracy on the held-out pairs before and after training.
GRPO's ``reward_model`` reward loads it with ``load_reward_model``.
"""

import json
from functools import lru_cache
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer
# trl.<Name> is looked up when a stage runs, not bound at import: importing unsloth (first, on the
# unsloth backend) rebinds trl's trainers and configs to its patched classes.
import trl

from brandcopy.backend import prepare_backend
from brandcopy.config import RewardStageConfig
from brandcopy.modeling import bnb_4bit_config, default_dtype, process_device
from brandcopy.run import MetricsCallback, begin_stage, data_file, finish_stage
from brandcopy.train.common import changed_params, load_split, param_fingerprint, trl_config

__all__ = ["RewardStageConfig", "run_reward", "load_reward_model", "score_conversations", "pairwise_accuracy"]


def reward_lora(cfg: RewardStageConfig) -> LoraConfig:
    """LoRA for sequence classification: PEFT then trains and saves the ``score`` head in full."""
    return LoraConfig(task_type="SEQ_CLS", r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), modules_to_save=["score"])


def reward_config(cfg: RewardStageConfig) -> "trl.RewardConfig":
    """The TRL RewardConfig for a stage config."""
    return trl_config(trl.RewardConfig, cfg, max_length=cfg.max_seq_length, eval_strategy="steps",
                      eval_steps=cfg.save_steps, model_init_kwargs={"dtype": default_dtype()})


@torch.no_grad()
def score_conversations(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
    """The reward model's scalar score of each full conversation (prompt + assistant answer).

    Conversations are rendered with the chat template, as RewardTrainer renders them.
    """
    was_training = model.training
    model.eval()
    scores = []
    for start in range(0, len(conversations), batch_size):
        ids = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]
               for c in conversations[start:start + batch_size]]
        batch = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(model.device)
        scores += model(**batch).logits[:, 0].float().tolist()
    model.train(was_training)
    return scores


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
    train = load_split(cfg.data_path, "preference", "train")
    val = load_split(cfg.data_path, "preference", "val")
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


def reward_model_in_4bit(reward_dir: str | Path) -> bool:
    """Whether the reward model was trained on a 4-bit base (its stage's ``config.yaml``): it is loaded so again."""
    config = yaml.safe_load((Path(reward_dir) / "config.yaml").read_text(encoding="utf-8"))
    return bool(config["load_in_4bit"])


@lru_cache(maxsize=2)
def load_reward_model(reward_dir: str):
    """Load a trained reward model (base + LoRA + score head) for scoring, frozen.

    The base is quantized to 4 bits when the reward stage trained on a 4-bit base: beside GRPO's
    policy and vLLM share on a 24 GB card a 7B classifier in bf16 (~14 GiB) does not fit; in NF4
    it takes ~5 GiB. Cached: GRPO's reward function calls this on every step.

    Returns:
        (model, tokenizer).
    """
    base = json.loads((Path(reward_dir) / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    quantization = bnb_4bit_config(default_dtype()) if reward_model_in_4bit(reward_dir) else None
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=default_dtype(),
                                                               quantization_config=quantization,
                                                               device_map=process_device())
    model.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(model, reward_dir).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, tokenizer
