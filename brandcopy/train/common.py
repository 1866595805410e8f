"""What every training stage shares around its TRL trainer: data splits, TRL config, LoRA, checks, saving.

The run directory itself (stage folders, manifest, metrics, curves, checkpoints) is ``brandcopy.run``'s.
"""

import dataclasses
import difflib
from pathlib import Path

from brandcopy.config import ConfigError, config_dict, config_keys
from brandcopy.run import DATA_KINDS, data_file, is_main_process, read_data_file


def load_split(data_dir: str | Path, kind: str, split: str):
    """Load one exported data file as a ``datasets.Dataset`` (see ``run.read_data_file`` for errors; fields checked per kind)."""
    from datasets import Dataset

    return Dataset.from_list(read_data_file(data_file(data_dir, kind, split), DATA_KINDS[kind]))


def on_gpu() -> bool:
    """Whether training runs on a CUDA device."""
    import torch

    return torch.cuda.is_available()


def trl_args(cfg, config_class: type) -> dict:
    """The stage config's keys that are arguments of ``config_class``, by the library's own names.

    A shared key passes through when it is a ``transformers.TrainingArguments`` field (``optim``,
    ``lr_scheduler_type``, ``warmup_steps``, ``save_steps``, ``seed``, ``report_to``, ...); a stage key
    ``<prefix>_<name>`` when ``<name>`` is a field of ``config_class`` (``sft_learning_rate``,
    ``dpo_beta``, ``grpo_num_generations``, ...). brandcopy's own keys (``run``, ``lora_*``,
    ``dpo_from``, ...) are not arguments of any TRL config and stay out.
    """
    from transformers import TrainingArguments

    check_trl_passthrough(cfg, config_class)  # an argument this TRL does not take fails, never drops silently
    shared = {f.name for f in dataclasses.fields(TrainingArguments)}
    own = {f.name for f in dataclasses.fields(config_class)}
    prefix = f"{cfg.prefix}_"
    args = {}
    for name, value in config_dict(cfg).items():
        if name.startswith(prefix):
            if name.removeprefix(prefix) in own:
                args[name.removeprefix(prefix)] = value
        elif name in shared:
            args[name] = value
    return args


def check_trl_passthrough(cfg, config_class: type, fixed=()) -> None:
    """Checks the undeclared ``<prefix>_<name>`` keys (``cfg.trl_passthrough``) against the installed TRL.

    Args:
        cfg: The stage config.
        config_class: The stage's TRL config class (``trl.GRPOConfig``, ...).
        fixed: Arguments the stage sets itself (``max_length`` from ``max_seq_length``, ...).

    Raises:
        ConfigError: A name that is no argument of ``config_class`` (a typo, or an argument of another
            TRL release), or one the stage sets itself, naming the preset file and line or the override.
    """
    import trl

    names = {f.name for f in dataclasses.fields(config_class) if f.init}
    declared = {key.removeprefix(f"{cfg.prefix}_") for key in config_keys(type(cfg))}
    for key, (_, where) in cfg.trl_passthrough.items():
        name = key.removeprefix(f"{cfg.prefix}_")
        if name == "output_dir" or name in fixed:
            raise ConfigError(f"{where}: '{key}' is set by the {cfg.stage} stage itself (the stage folder, "
                              "max_seq_length, save_steps, ...): set the brandcopy key instead")
        if name not in names:
            close = difflib.get_close_matches(name, sorted(names | declared), n=1)
            hint = f" (did you mean '{cfg.prefix}_{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key '{key}': neither a brandcopy key nor an argument of "
                              f"trl.{config_class.__name__} (trl {trl.__version__}){hint}")


def trl_config(config_class: type, cfg, **settings):
    """A stage's TRL config: its keys passed through (``trl_args``), then what brandcopy fixes, then ``settings``.

    Fixed for every stage: checkpoints in ``<stage>/checkpoints`` every ``save_steps``, the eval batch
    as large as the training batch, ``data_seed`` = ``seed``, non-reentrant gradient checkpointing,
    no dataloader workers; on CPU ``use_cpu`` and fp32 (TRL configs default to bf16), on GPU bf16
    where supported, else fp16.

    Args:
        config_class: ``trl.SFTConfig``, ``trl.DPOConfig``, ... (looked up when the stage runs, so
            Unsloth's patched class on the unsloth backend).
        cfg: The stage config.
        **settings: What the stage sets itself (``max_length``, ``eval_strategy``, ...); they win,
            also over a key of the same name (GRPO's ``reward_weights`` list from ``grpo_reward_weights``).
    """
    import torch

    check_trl_passthrough(cfg, config_class, settings)
    args = trl_args(cfg, config_class)
    gpu = on_gpu()
    bf16 = gpu and torch.cuda.is_bf16_supported()
    try:
        return config_class(**{
            "output_dir": str(cfg.out_dir / "checkpoints"),
            "per_device_eval_batch_size": args["per_device_train_batch_size"],
            "save_strategy": "steps",
            "data_seed": cfg.seed,
            "gradient_checkpointing_kwargs": {"use_reentrant": False},
            "use_cpu": not gpu,
            "bf16": bf16,
            "fp16": gpu and not bf16,
            "dataloader_num_workers": 0,
            **args,  # report_to: tensorboard writes its event files under <stage>/checkpoints/runs/
            **settings,
        })
    except (TypeError, ValueError) as err:  # TRL's own checks of the values; name the keys it may be about
        if not cfg.trl_passthrough:
            raise
        where = "; ".join(f"{key} ({origin})" for key, (_, origin) in cfg.trl_passthrough.items())
        raise ConfigError(f"trl.{config_class.__name__} refused its arguments: {str(err).splitlines()[0]} "
                          f"(TRL arguments passed through: {where})") from None


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
