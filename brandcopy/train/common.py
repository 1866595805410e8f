"""What every training stage shares around its TRL trainer: data splits, TRL arguments, LoRA, checks, saving.

The run directory itself (stage folders, manifest, metrics, curves, checkpoints) is ``brandcopy.run``'s.
"""

from pathlib import Path

from brandcopy.run import DATA_KINDS, data_file, is_main_process, read_jsonl


def load_split(data_dir: str | Path, kind: str, split: str):
    """Load one exported data file as a ``datasets.Dataset`` (see ``read_jsonl`` for errors; fields checked per kind)."""
    from datasets import Dataset

    return Dataset.from_list(read_jsonl(data_file(data_dir, kind, split), DATA_KINDS[kind]))


def on_gpu() -> bool:
    """Whether training runs on a CUDA device."""
    import torch

    return torch.cuda.is_available()


def training_args(cfg, *, lr: float, epochs: float, max_steps: int, batch_size: int, grad_accum: int) -> dict:
    """Keyword arguments every TRL config of a stage shares (output, schedule, precision, saving).

    On CPU: ``use_cpu`` and fp32 (TRL configs default to bf16). On GPU: bf16 where supported,
    else fp16.
    """
    import torch

    gpu = on_gpu()
    bf16 = gpu and torch.cuda.is_bf16_supported()
    return {
        "output_dir": str(cfg.out_dir / "checkpoints"),
        "learning_rate": lr,
        "num_train_epochs": epochs,
        "max_steps": max_steps,
        "per_device_train_batch_size": batch_size,
        "per_device_eval_batch_size": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "optim": cfg.optim,
        "lr_scheduler_type": cfg.lr_scheduler,
        "warmup_steps": cfg.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the total steps
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm,
        "logging_steps": cfg.logging_steps,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "save_total_limit": cfg.save_total_limit,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "use_cpu": not gpu,
        "bf16": bf16,
        "fp16": gpu and not bf16,
        "report_to": cfg.report_to,  # tensorboard: event files under <stage>/checkpoints/runs/
        "dataloader_num_workers": 0,
    }


def lora_settings(cfg):
    """The run's LoRA settings as ``modeling.LoraSettings``."""
    from brandcopy.modeling import LoraSettings

    return LoraSettings(r=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                        target_modules=list(cfg.lora_target_modules), seed=cfg.seed,
                        modules_to_save=list(cfg.lora_modules_to_save))


def param_fingerprint(model) -> dict[str, tuple[float, float]]:
    """(sum, sum of squares) of every trainable tensor: enough to tell whether training moved it."""
    return {name: (p.detach().float().sum().item(), p.detach().float().pow(2).sum().item())
            for name, p in model.named_parameters() if p.requires_grad}


def changed_params(before: dict, model) -> list[str]:
    """Names of the trainable tensors whose fingerprint differs from ``before``.

    Raises:
        RuntimeError: No trainable tensor changed (the optimizer never stepped, or gradients
            never reached the adapter).
    """
    after = param_fingerprint(model)
    changed = [name for name, value in after.items() if before.get(name) != value]
    if not changed:
        raise RuntimeError(f"training finished but none of the {len(after)} trainable tensors changed")
    return changed


def final_eval(trainer) -> dict:
    """Eval metrics at the last step: the periodic evaluation's, or a fresh one if it missed that step."""
    state = trainer.state
    evals = [row for row in state.log_history if "eval_loss" in row and row["step"] == state.global_step]
    return evals[-1] if evals else trainer.evaluate()


def save_adapter(model, tokenizer, out_dir: Path) -> None:
    """Save the trained ("default") adapter and the tokenizer; TRL's frozen "ref" copy stays out.

    The tokenizer is saved with the plain chat template; the next stage's fix_special_tokens puts
    the training markers back.
    """
    if is_main_process():
        from brandcopy.modeling import save_tokenizer

        model.save_pretrained(str(out_dir), selected_adapters=["default"])
        save_tokenizer(tokenizer, out_dir)  # plain chat template: the saved adapter is for inference too
