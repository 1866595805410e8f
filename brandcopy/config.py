"""Stage configs: one dataclass per training stage, loaded from one flat YAML preset.

A preset (``configs/*.yaml``) is one flat mapping. Keys shared by every stage (``run``, ``model``,
``backend``, ``lora_rank``, ``lr_scheduler_type``, ...) have plain names; keys that belong to one stage
carry its prefix (``sft_learning_rate``, ``grpo_num_generations``, ``merge_from``). A stage reads the
keys it knows and ignores the other stages' keys; a key no stage knows is an error naming the file and line.

Where a key is a transformers ``TrainingArguments`` or TRL config argument it has that library's
name (``lr_scheduler_type``; ``sft_`` + ``learning_rate``), and ``train.common.trl_config`` passes it
through: a new TRL setting is one field here and one line in each preset. brandcopy's own concepts
(``run``, ``brand``, ``backend``, ``lora_*``, ``*_from``, ``dpo_pairs``, ``eval_*`` ...) keep their own
names. Keys renamed to the library names (``RENAMED``) are errors naming the new name.

Command-line overrides are ``key=value`` strings parsed as YAML values
(``sft_learning_rate=1e-4``, ``lora_target_modules=[q_proj,v_proj]``). On a stage's command line the
stage prefix may be left out: ``brandcopy train sft learning_rate=1e-4`` sets ``sft_learning_rate``.
"""

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from brandcopy.files import NotUTF8Error, atomic_write_text, read_text

LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DPO_FOLDERS = {"synthetic": "dpo", "onpolicy": "dpo-onpolicy", "both": "dpo-both"}  # dpo_pairs -> stage folder
REWARD_NAMES = ("lint", "fact", "format", "cta", "reward_model", "judge")
REPORT_TO = ("none", "tensorboard", "wandb", "trackio", "mlflow", "swanlab", "comet_ml", "all")  # transformers' integrations
# A trainer stage's key without its prefix -> its TRL name, and every key of older presets -> its transformers / TRL name
_RENAMED_STAGE_KEYS = {"lr": "learning_rate", "epochs": "num_train_epochs", "batch_size": "per_device_train_batch_size",
                       "grad_accum": "gradient_accumulation_steps"}
RENAMED = {
    "lr_scheduler": "lr_scheduler_type",
    "warmup_ratio": "warmup_steps",
    **{f"{prefix}_{old}": f"{prefix}_{new}" for prefix in ("sft", "reward", "dpo", "grpo")
       for old, new in _RENAMED_STAGE_KEYS.items()},
}


class ConfigError(ValueError):
    """A preset or override that cannot become a stage config (unknown key, wrong type, bad value)."""


def _choices(*values: str) -> dict:
    return {"choices": values}


@dataclass
class CommonConfig:
    """Keys every stage reads. Each stage config adds its own prefixed keys."""

    stage: ClassVar[str] = ""
    prefix: ClassVar[str] = ""

    run: str = "default"
    output_root: str = "outputs"
    brand: str = "yuansu"
    model: str = "Qwen/Qwen2.5-7B-Instruct"
    backend: str = field(default="auto", metadata=_choices("auto", "unsloth", "hf"))
    require_cuda: bool = False  # a GPU preset: refuse to start without a usable CUDA device
    load_in_4bit: bool = True
    max_seq_length: int = 2048
    lora_rank: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGET_MODULES))
    lora_modules_to_save: list[str] = field(default_factory=list)
    gradient_checkpointing: bool = True
    optim: str = "adamw_8bit"
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.03  # transformers 5: below 1 a share of the total steps, else a step count
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 1
    save_steps: int = 50
    save_total_limit: int = 2
    seed: int = 3407
    data_dir: str = ""
    resume: bool = True
    report_to: str = field(default="none", metadata=_choices(*REPORT_TO))  # transformers' report_to, passed through
    # TRL arguments brandcopy does not declare, set as <prefix>_<name> (``grpo_loss_type``): key -> (value, where
    # it was set). Not a preset key itself; checked against the installed TRL when the stage starts
    # (``train.common.check_trl_passthrough``).
    trl_passthrough: dict = field(default_factory=dict, repr=False, metadata={"internal": True})

    @property
    def run_dir(self) -> Path:
        """``<output_root>/<run>``: the folder every stage of this run writes into."""
        return Path(self.output_root) / self.run

    @property
    def out_dir(self) -> Path:
        """``<output_root>/<run>/<stage>``: this stage's output folder."""
        return self.run_dir / self.stage

    @property
    def load_options(self) -> dict:
        """The keyword arguments that load this run's models (``modeling.load_model``, ``load_adapter_model``)."""
        return {"backend": self.backend, "load_in_4bit": self.load_in_4bit, "max_seq_length": self.max_seq_length}

    @property
    def data_path(self) -> Path:
        """Folder with the exported training data (``<run>/data`` unless ``data_dir`` is set)."""
        return Path(self.data_dir) if self.data_dir else self.run_dir / "data"


@dataclass
class SFTStageConfig(CommonConfig):
    """Supervised fine-tuning on ``sft_{train,val}.jsonl`` (``messages``), assistant-only loss."""

    stage: ClassVar[str] = "sft"  # output folder <run>/sft
    prefix: ClassVar[str] = "sft"  # prefix of this stage's own keys

    sft_learning_rate: float = 2e-4
    sft_num_train_epochs: float = 2.0
    sft_max_steps: int = -1
    sft_per_device_train_batch_size: int = 2
    sft_gradient_accumulation_steps: int = 4
    sft_packing: bool = True
    sft_eval: bool = True


@dataclass
class RewardStageConfig(CommonConfig):
    """Reward model: sequence-classification head on the base, LoRA, ``preference_*.jsonl``."""

    stage: ClassVar[str] = "reward"  # output folder <run>/reward
    prefix: ClassVar[str] = "reward"  # prefix of this stage's own keys

    reward_learning_rate: float = 1e-4
    reward_num_train_epochs: float = 1.0
    reward_max_steps: int = -1
    reward_per_device_train_batch_size: int = 2
    reward_gradient_accumulation_steps: int = 4
    reward_eval_pairs: int = 0  # held-out pairs scored at each evaluation and before/after training; 0 = all


@dataclass
class DPOStageConfig(CommonConfig):
    """DPO on ``preference_*.jsonl`` starting from another stage's adapter (``dpo_from``)."""

    stage: ClassVar[str] = "dpo"  # output folder <run>/dpo
    prefix: ClassVar[str] = "dpo"  # prefix of this stage's own keys

    dpo_from: str = field(default="sft", metadata=_choices("sft", "grpo"))
    dpo_learning_rate: float = 5e-6
    dpo_beta: float = 0.1
    dpo_num_train_epochs: float = 1.0
    dpo_max_steps: int = -1
    dpo_per_device_train_batch_size: int = 1
    dpo_gradient_accumulation_steps: int = 8
    dpo_eval_pairs: int = 64
    dpo_pairs: str = field(default="synthetic", metadata=_choices(*DPO_FOLDERS))  # synthetic / onpolicy / both
    dpo_onpolicy_prompts: int = 0  # train prompts `data improve` samples for on-policy pairs, spread evenly; 0 = all

    @property
    def out_dir(self) -> Path:
        """``<run>/dpo`` on synthetic pairs, ``<run>/dpo-onpolicy`` or ``<run>/dpo-both``: all can sit in one run."""
        return self.run_dir / DPO_FOLDERS[self.dpo_pairs]


@dataclass
class GRPOStageConfig(CommonConfig):
    """GRPO on ``grpo_train.jsonl`` prompts from another stage's adapter, rewards from rewards.py."""

    stage: ClassVar[str] = "grpo"  # output folder <run>/grpo
    prefix: ClassVar[str] = "grpo"  # prefix of this stage's own keys

    grpo_from: str = field(default="sft", metadata=_choices("sft", *DPO_FOLDERS.values()))
    grpo_learning_rate: float = 5e-6
    grpo_num_train_epochs: float = 1.0
    grpo_max_steps: int = -1
    grpo_per_device_train_batch_size: int = 4
    grpo_gradient_accumulation_steps: int = 1
    grpo_num_generations: int = 4
    grpo_max_completion_length: int = 512
    grpo_temperature: float = 1.0
    grpo_beta: float = 0.0
    grpo_reward_weights: dict[str, float] = field(
        default_factory=lambda: {"lint": 1.0, "fact": 1.0, "format": 0.5, "cta": 0.5, "reward_model": 0.0, "judge": 0.0}
    )
    grpo_use_vllm: bool = False
    grpo_vllm_mode: str = field(default="colocate", metadata=_choices("colocate", "server"))
    grpo_vllm_gpu_memory_utilization: float = 0.5
    grpo_judge_model: str = "deepseek-chat"
    grpo_judge_base_url: str = "https://api.deepseek.com"  # "scripted": the CLI/demo wiring starts mockserver's judge
    grpo_judge_api_key_env: str | None = "DEEPSEEK_API_KEY"  # NAME of the key variable; null: local server


@dataclass
class MergeStageConfig(CommonConfig):
    """Merge an adapter onto the 16-bit base and save safetensors (+ GGUF with Unsloth)."""

    stage: ClassVar[str] = "merged"  # output folder <run>/merged
    prefix: ClassVar[str] = "merge"  # prefix of this stage's own keys

    merge_from: str = field(default="grpo", metadata=_choices("sft", *DPO_FOLDERS.values(), "grpo"))
    merge_dtype: str = field(default="bfloat16", metadata=_choices("bfloat16", "float16", "float32"))
    merge_gguf: str = ""


# --- evaluation (owned by evaluate.py; added here so presets may hold eval_* keys) ---


@dataclass
class EvalStageConfig(CommonConfig):
    """Evaluation of base / sft / dpo / grpo / merged on the val split: metrics, judge, report."""

    stage: ClassVar[str] = "eval"  # output folder <run>/eval
    prefix: ClassVar[str] = "eval"  # prefix of this stage's own keys

    eval_models: list[str] = field(default_factory=list)  # [] = every model found in the run dir
    eval_max_samples: int = 0  # val prompts to evaluate; 0 = all
    eval_batch_size: int = 8  # prompts per generate() call
    eval_max_new_tokens: int = 768  # generation budget; a copy that reaches it did not stop
    eval_sampled: bool = True  # also generate with the sampled setting (offline metrics only)
    eval_temperature: float = 0.7  # sampled setting
    eval_top_p: float = 0.9  # sampled setting
    eval_rouge_unit: str = field(default="char", metadata=_choices("char", "word"))  # word = jieba
    eval_judge: bool = True  # run the LLM judge (the report is PARTIAL without it)
    eval_judge_model: str = "deepseek-chat"
    eval_judge_base_url: str = "https://api.deepseek.com"  # "scripted": the CLI/demo wiring starts mockserver's judge
    eval_judge_api_key_env: str | None = "DEEPSEEK_API_KEY"  # NAME of the key variable; null: local server
    eval_judge_concurrency: int = 8
    eval_side_by_side: int = 5  # prompts shown in side_by_side.md
    eval_preference_pairs: int = 0  # held-out preference pairs scored per model (preference accuracy); 0 = all
    eval_ifeval: bool = True  # general instruction-following regression check (data/ifeval_zh.jsonl), base vs every stage
    eval_ifeval_max_samples: int = 0  # prompts of the check; 0 = all
    eval_ifeval_max_new_tokens: int = 0  # generation budget of the check; 0 = eval_max_new_tokens
    eval_ifeval_margin: float = 0.05  # flag a model whose prompt-level strict pass rate is this much below the base's


STAGE_CONFIGS = (SFTStageConfig, RewardStageConfig, DPOStageConfig, GRPOStageConfig, MergeStageConfig, EvalStageConfig)


def config_keys(cls: type) -> dict[str, dataclasses.Field]:
    """Fields of a stage config by name (the YAML keys it declares)."""
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def all_keys() -> set[str]:
    """Every key some stage declares (a preset may also hold TRL arguments: ``passthrough_stage``)."""
    return {name for cls in STAGE_CONFIGS for name in config_keys(cls)}


TRL_PREFIXES = ("sft", "reward", "dpo", "grpo")  # the stages that build a TRL config


def passthrough_stage(key: str) -> str | None:
    """The trainer stage whose TRL config receives an undeclared ``<prefix>_<name>`` key, else None.

    ``grpo_loss_type: dr_grpo`` reaches ``trl.GRPOConfig(loss_type="dr_grpo")`` without a brandcopy
    field. Loading a config must not import TRL (on the unsloth backend Unsloth has to be imported
    first), so here only the form is checked, and a near miss of a brandcopy key (``sft_learnig_rate``)
    stays an unknown key at once; the stage checks the name against TRL when it starts.
    """
    prefix, sep, name = str(key).partition("_")
    if not (sep and prefix in TRL_PREFIXES and name.isidentifier()) or key in {*all_keys(), *RENAMED, *REMOVED_KEYS}:
        return None
    if difflib.get_close_matches(key, [*all_keys(), *RENAMED], n=1, cutoff=0.9):
        return None  # a typo of a declared key (grpo_num_iterations, a TRL argument, is 0.87 from grpo_num_generations)
    return prefix


def read_preset(path: str | Path) -> tuple[dict, dict[str, int]]:
    """Read a flat YAML preset.

    Args:
        path: The YAML file.

    Returns:
        The mapping and, for each key, its 1-based line in the file.

    Raises:
        ConfigError: The file is missing, is not valid YAML, or is not one flat mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: preset file not found")
    try:
        text = read_text(path)
    except NotUTF8Error as err:
        raise ConfigError(str(err)) from None
    try:
        node = yaml.compose(text)
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if values is None:
        return {}, {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a preset is one flat mapping of key: value, got {type(values).__name__}")
    lines = {key.value: key.start_mark.line + 1 for key, _ in node.value}
    return values, lines


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce_value(tp, value, where: str):
    """Check ``value`` against the field type ``tp`` and return it converted where lossless.

    Ints are accepted for floats, and numeric strings too (PyYAML reads ``1e-4`` as a string).

    Raises:
        ConfigError: The value does not fit the type; the message starts with ``where``.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce_value(inner, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of {_type_name(args[0])}, got {value!r}")
        return [coerce_value(args[0], item, where) for item in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {_type_name(args[1])}, got {value!r}")
        return {coerce_value(args[0], k, where): coerce_value(args[1], v, f"{where}[{k}]") for k, v in value.items()}
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and tp is not bool:
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got the boolean {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _check_field(cls: type, key: str, value, where: str):
    f = config_keys(cls)[key]
    value = coerce_value(typing.get_type_hints(cls)[key], value, where)
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}")
    if key == "grpo_reward_weights":
        unknown = set(value) - set(REWARD_NAMES)
        if unknown:
            raise ConfigError(f"{where}: unknown reward {sorted(unknown)}; rewards are {', '.join(REWARD_NAMES)}")
    return value


# Keys that existed once: a preset or override still setting one fails with what replaces it.
REMOVED_KEYS = {
    "eval_judge_mock": "eval_judge_base_url: scripted (the scripted judge) or a real endpoint",
    "grpo_judge_mock": "grpo_judge_base_url: scripted (the scripted judge) or a real endpoint",
}


def _unknown_key(key: str, where: str) -> ConfigError:
    if key in REMOVED_KEYS:
        return ConfigError(f"{where}: key '{key}' was removed; use {REMOVED_KEYS[key]}")
    close = difflib.get_close_matches(str(key), sorted(all_keys()), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


def _renamed(key: str, where: str) -> ConfigError:
    return ConfigError(f"{where}: '{key}' was renamed to '{RENAMED.get(key) or _RENAMED_STAGE_KEYS[key]}'")


def _override_key(cls: type, key: str, where: str) -> str:
    """The field an override names: the key itself, or the key with this stage's prefix."""
    keys = config_keys(cls)
    if key in keys:
        return key
    if f"{cls.prefix}_{key}" in keys:
        return f"{cls.prefix}_{key}"
    if key in RENAMED or key in _RENAMED_STAGE_KEYS:
        raise _renamed(key, where)
    if key in all_keys():
        raise ConfigError(f"{where}: '{key}' is not read by the {cls.stage} stage")
    stage = passthrough_stage(key)
    if stage == cls.prefix:
        return key  # a TRL argument of this stage
    if stage is not None:
        raise ConfigError(f"{where}: '{key}' is a TRL argument of the {stage} stage, not read by the {cls.stage} stage")
    full = f"{cls.prefix}_{key}"
    if passthrough_stage(full) == cls.prefix and not difflib.get_close_matches(key, sorted(all_keys()), n=1):
        raise ConfigError(f"{where}: unknown key '{key}' (an argument of TRL's config that brandcopy does not "
                          f"declare takes the stage's prefix: '{full}')")
    raise _unknown_key(key, where)


def parse_override(cls: type, item: str) -> tuple[str, object]:
    """Parse one ``key=value`` override for stage ``cls``.

    Returns:
        The field name and the checked value.

    Raises:
        ConfigError: Not ``key=value``, an unknown key, or a value of the wrong type.
    """
    key, sep, raw = item.partition("=")
    where = f"override '{item}'"
    if not sep or not key.strip():
        raise ConfigError(f"{where}: overrides are key=value")
    key = _override_key(cls, key.strip(), where)
    if key not in config_keys(cls):  # a TRL argument: the value as YAML reads it, checked by TRL
        try:
            return key, yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"{where}: value is not valid YAML: {err}") from err
    hint = typing.get_type_hints(cls)[key]
    # A string field takes the text as written: "model=123" is the folder "123", not the int 123.
    if hint is str:
        return key, _check_field(cls, key, raw, where)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: value is not valid YAML: {err}") from err
    return key, _check_field(cls, key, value, where)


def load_stage_config(cls: type, path: str | Path | None = None, overrides: list[str] | tuple = ()):
    """Build a stage config from a preset file and ``key=value`` overrides.

    Args:
        cls: One of the stage config classes (``SFTStageConfig``, ...).
        path: A flat YAML preset; None uses the dataclass defaults.
        overrides: ``key=value`` strings applied after the file.

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: An unknown or renamed key, a wrong-typed value or a value outside the allowed
            choices, naming the file and line or the override.
    """
    values, lines = read_preset(path) if path is not None else ({}, {})
    known, mine = all_keys(), config_keys(cls)
    kwargs, passthrough = {}, {}
    for key, value in values.items():
        where = f"{path}:{lines.get(key, '?')}: key '{key}'"
        if key in RENAMED:
            raise _renamed(key, f"{path}:{lines.get(key, '?')}")
        if key not in known:
            stage = passthrough_stage(key)
            if stage is None:
                raise _unknown_key(key, f"{path}:{lines.get(key, '?')}")
            if stage == cls.prefix:
                passthrough[key] = (value, f"{path}:{lines.get(key, '?')}")
        elif key in mine:
            kwargs[key] = _check_field(cls, key, value, where)
    for item in overrides:
        key, value = parse_override(cls, item)
        if key in mine:
            kwargs[key] = value
        else:
            passthrough[key] = (value, f"override '{item}'")
    return cls(**kwargs, trl_passthrough=passthrough)


def config_dict(cfg) -> dict:
    """The config as a plain dict, keys in field order, then the TRL arguments passed through by name."""
    values = dataclasses.asdict(cfg)
    passthrough = values.pop("trl_passthrough")
    return values | {key: value for key, (value, _) in passthrough.items()}


def save_config(cfg, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically); ``load_stage_config`` reads it back."""
    text = f"# resolved {type(cfg).__name__}\n" + yaml.safe_dump(config_dict(cfg), sort_keys=False, allow_unicode=True)
    return atomic_write_text(path, text)
