"""SFT stage: LoRA (4-bit QLoRA on GPU) supervised fine-tuning with assistant-only loss.

Reads ``<run>/data/sft_{train,val}.jsonl`` (``messages``), writes the adapter and tokenizer to
``<run>/sft``. Sequences are packed best-fit-decreasing into ``max_seq_length`` rows without
padding (TRL's ``packing``, padding-free): attention stays within each example through
position_ids, so no compute is spent on pad tokens.
"""

import logging
from pathlib import Path

# trl.<Name> is looked up when a stage runs, not bound at import: importing unsloth (first, on the
# unsloth backend) rebinds trl's trainers and configs to its patched classes.
import trl

from brandcopy.backend import prepare_backend
from brandcopy.config import SFTStageConfig
from brandcopy.files import atomic_write_text
from brandcopy.modeling import check_training_example, fix_special_tokens, load_model, save_tokenizer
from brandcopy.run import MetricsCallback, begin_stage, data_file, finish_stage
from brandcopy.train.common import (
    changed_params,
    final_eval,
    load_split,
    lora_settings,
    param_fingerprint,
    trl_config,
)

__all__ = ["SFTStageConfig", "run_sft", "sft_config", "sft_trainer"]

logger = logging.getLogger(__name__)


def sft_config(cfg: SFTStageConfig) -> "trl.SFTConfig":
    """The TRL SFTConfig for a stage config (``sft_packing`` and the other TRL-named keys passed through)."""
    return trl_config(trl.SFTConfig, cfg, max_length=cfg.max_seq_length, assistant_only_loss=True,
                      packing_strategy="bfd", eval_strategy="steps" if cfg.sft_eval else "no",
                      eval_steps=cfg.save_steps, dataset_num_proc=None)


def sft_trainer(cfg: SFTStageConfig, model, tokenizer, train, val=None, callbacks: list | tuple = ()) -> "trl.SFTTrainer":
    """The SFTTrainer for a loaded model and fixed tokenizer, logging to ``<run>/sft/metrics.jsonl``."""
    return trl.SFTTrainer(model=model, args=sft_config(cfg), train_dataset=train, eval_dataset=val,
                      processing_class=tokenizer, callbacks=[MetricsCallback(cfg.out_dir / "metrics.jsonl"), *callbacks])


def run_sft(cfg: SFTStageConfig, callbacks: list | tuple = ()) -> Path:
    """Train the SFT adapter and write ``<run>/sft``.

    Steps: read the data (fails before loading the model if a split is missing or empty), load
    the base with a fresh LoRA, fix EOS/pad/template, check one rendered training example and
    log which tokens carry loss, train (resuming from the last checkpoint), check the adapter
    moved, save adapter + tokenizer, plot, write the manifest.

    Args:
        cfg: The stage config.
        callbacks: Extra ``transformers.TrainerCallback`` objects (progress display, early stop).

    Returns:
        The stage folder ``<run>/sft``.

    Raises:
        StageInputError: A data file is missing or has no rows.
        TrainingExampleError: The rendered example would not train the end-of-turn token.
    """
    prepare_backend(cfg.backend, require_cuda=cfg.require_cuda)  # GPU checks; unsloth before trl
    sft_config(cfg)  # the TRL arguments (a preset's passed-through keys too) checked before a model loads
    train = load_split(cfg.data_path, "sft", "train")
    val = load_split(cfg.data_path, "sft", "val") if cfg.sft_eval else None
    resume_from = begin_stage(cfg)
    model, tokenizer = load_model(cfg.model, **cfg.load_options, lora=lora_settings(cfg),
                                  gradient_checkpointing=cfg.gradient_checkpointing)
    changes = fix_special_tokens(model, tokenizer)
    logger.info("fix_special_tokens changed: %s", changes or "nothing")
    report = check_training_example(tokenizer, train[0])
    logger.info("training example, trained spans in [[ ]]:\n%s", report)
    trainer = sft_trainer(cfg, model, tokenizer, train, val, callbacks)
    before = param_fingerprint(model)
    result = trainer.train(resume_from_checkpoint=resume_from)
    metrics = final_eval(trainer) if val is not None else {}
    changed = changed_params(before, model)
    # written after training: a rerun that fails before training leaves a finished stage untouched
    atomic_write_text(cfg.out_dir / "training_example.txt", str(report))  # same text from every process
    trainer.save_model(str(cfg.out_dir))  # writes from the main process only
    if trainer.is_world_process_zero():
        save_tokenizer(tokenizer, cfg.out_dir)  # plain chat template, as the base shipped it
    files = [data_file(cfg.data_path, "sft", "train")] + ([data_file(cfg.data_path, "sft", "val")] if val else [])
    extra = {"train_loss": result.training_loss, "global_step": result.global_step,
             "resumed_from": resume_from, "changed_tensors": len(changed), "eval_loss": metrics.get("eval_loss"),
             "special_token_changes": {k: [str(v) for v in pair] for k, pair in changes.items()},
             "trained_text_of_first_example": report.trained_text}
    return finish_stage(cfg, files, ("loss", "eval_loss"), extra)
