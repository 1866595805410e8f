"""DPO stage: direct preference optimisation of the SFT adapter on chosen/rejected pairs.

Reads the pairs ``dpo_pairs`` names (``synthetic``: ``<run>/data/preference_train.jsonl``;
``onpolicy``: ``preference_onpolicy_train.jsonl`` from ``brandcopy data improve``; ``both``) and
the adapter of ``<run>/<dpo_from>`` (``sft`` by default); writes the trained adapter to ``<run>/dpo``
(``dpo-onpolicy``, ``dpo-both``), so the variants can be evaluated side by side. Every variant is
validated on the same held-out synthetic pairs, ``preference_val.jsonl``. The reference policy is a
frozen copy of the starting adapter (TRL adds it as the ``ref`` adapter), not the bare base.
"""

from pathlib import Path

# trl.<Name> is looked up when a stage runs, not bound at import: importing unsloth (first, on the
# unsloth backend) rebinds trl's trainers and configs to its patched classes.
import trl

from brandcopy.backend import prepare_backend
from brandcopy.config import DPOStageConfig
from brandcopy.modeling import fix_special_tokens, load_adapter_model
from brandcopy.run import (
    DATA_KINDS,
    MetricsCallback,
    begin_stage,
    data_file,
    finish_stage,
    read_data_file,
    require_stage,
    spread,
)
from brandcopy.train.common import (
    changed_params,
    final_eval,
    load_split,
    param_fingerprint,
    save_adapter,
    trl_config,
)

__all__ = ["DPOStageConfig", "run_dpo", "dpo_config"]

PAIR_FILES = {"synthetic": ("preference",), "onpolicy": ("preference_onpolicy",), "both": ("preference", "preference_onpolicy")}


def train_pairs(cfg: DPOStageConfig):
    """The training pairs ``dpo_pairs`` names, as one dataset of ``prompt`` / ``chosen`` / ``rejected``.

    Raises:
        StageInputError: A pair file is missing or empty.
    """
    from datasets import Dataset

    fields = DATA_KINDS["preference"]
    rows = [row for kind in PAIR_FILES[cfg.dpo_pairs] for row in read_data_file(data_file(cfg.data_path, kind, "train"), fields)]
    return Dataset.from_list([{name: row[name] for name in fields} for row in rows])


def dpo_config(cfg: DPOStageConfig) -> "trl.DPOConfig":
    """The TRL DPOConfig for a stage config (``dpo_beta`` and the other TRL-named keys passed through)."""
    return trl_config(trl.DPOConfig, cfg, max_length=cfg.max_seq_length, eval_strategy="steps",
                      eval_steps=cfg.save_steps)


def run_dpo(cfg: DPOStageConfig, callbacks: list | tuple = ()) -> Path:
    """Train the DPO adapter from ``<run>/<dpo_from>`` and write ``<run>/dpo``.

    Args:
        cfg: The stage config.
        callbacks: Extra ``transformers.TrainerCallback`` objects.

    Returns:
        The stage folder.

    Raises:
        StageInputError: The starting stage is missing or unfinished, or a data file is missing or empty.
    """
    prepare_backend(cfg.backend, require_cuda=cfg.require_cuda)  # GPU checks; unsloth before trl
    dpo_config(cfg)  # the TRL arguments (a preset's passed-through keys too) checked before a model loads
    train = train_pairs(cfg)
    val = load_split(cfg.data_path, "preference", "val")
    if cfg.dpo_eval_pairs:  # every evaluation scores each pair with the policy and the reference: keep it small
        val = val.select(spread(len(val), cfg.dpo_eval_pairs))
    source = require_stage(cfg.run_dir, cfg.dpo_from, "dpo")
    resume_from = begin_stage(cfg)
    model, tokenizer = load_adapter_model(source, trainable=True, **cfg.load_options,
                                          gradient_checkpointing=cfg.gradient_checkpointing)
    fix_special_tokens(model, tokenizer)  # a no-op for adapters saved by run_sft; fixes any other
    trainer = trl.DPOTrainer(model=model, args=dpo_config(cfg), train_dataset=train, eval_dataset=val,
                         processing_class=tokenizer,
                         callbacks=[MetricsCallback(cfg.out_dir / "metrics.jsonl"), *callbacks])
    before = param_fingerprint(trainer.model)
    result = trainer.train(resume_from_checkpoint=resume_from)
    changed = changed_params(before, trainer.model)
    metrics = final_eval(trainer)
    save_adapter(trainer.model, tokenizer, cfg.out_dir)
    files = [data_file(cfg.data_path, kind, "train") for kind in PAIR_FILES[cfg.dpo_pairs]]
    files.append(data_file(cfg.data_path, "preference", "val"))
    extra = {"train_loss": result.training_loss, "global_step": result.global_step, "resumed_from": resume_from,
             "started_from": str(source), "changed_tensors": len(changed),
             "eval_reward_accuracy": metrics.get("eval_rewards/accuracies"), "pairs": cfg.dpo_pairs,
             "train_pairs": len(train)}
    return finish_stage(cfg, files, ("loss", "rewards/margins", "rewards/accuracies", "eval_loss"), extra)
