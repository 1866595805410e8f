"""The whole pipeline as library calls: what ``make demo`` runs and what the notebooks wire together.

``run_demo`` runs every stage on the CPU default (``configs/tiny-cpu.yaml``) in one run directory:
the tiny model, the data through the scripted OpenAI-compatible server (or a real endpoint), SFT,
the reward model, GRPO, the merge and the evaluation with the judge. Each stage is its own entry
point (``run_sft(cfg)``, ..., ``run_eval(cfg)``) called with a config loaded from the preset; this
module only chooses the preset, builds the tiny model when the preset asks for it, and starts the
scripted server (``mockserver.endpoint``) when no endpoint is given or a preset's judge is ``scripted``.

The helpers here are the ones the numbered notebooks call: ``use_repo_root``, ``preset_path``,
``explain_preset``, ``stage_config``, ``ensure_tiny_model``, ``llm_endpoint``, ``build_data``, ``judge_overrides``,
``judged``, ``stage_summary`` and ``eval_samples``.
"""

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from brandcopy.bootstrap import default_output_root
from brandcopy.config import (STAGE_CONFIGS, EvalStageConfig, config_keys, load_stage_config, parse_override,
                              passthrough_stage)
from brandcopy.files import read_jsonl

REPO = Path(__file__).resolve().parents[1]
# The tiny tokenizer's text is the repository's data only: were the docs part of it, every README edit would
# change the tiny model and with it every number the demo reports.
CORPUS_GLOBS = ("data/*.txt", "data/*.yaml", "data/brands/*/*.yaml")
# The tiny model's shape and its pre-training pass (the demo's stand-in for a pre-trained base model).
TINY_MODEL_SHAPE = {"vocab_size": 8192, "hidden_size": 64, "num_layers": 2}
TINY_PRETRAIN = {"steps": 80, "batch_size": 8, "block_size": 128, "lr": 3e-3}
CPU_PRESET = "tiny-cpu"
GPU_PRESET = "qwen2.5-7b-24gb"
# `auto` by the card's memory: (at least GiB, preset), largest first; below the last, SMALL_GPU_PRESET.
GPU_PRESETS = ((22.0, GPU_PRESET), (14.0, "qwen2.5-7b-16gb"))
SMALL_GPU_PRESET = "qwen2.5-0.5b"
TINY_MODEL_NAME = "tiny-model"  # a preset whose `model` is a folder of this name gets the tiny model built there
CONFIG_BY_STAGE = {cls.stage: cls for cls in STAGE_CONFIGS}  # stage folder -> config class, in run order
MANIFEST_RESULTS = ("train_loss", "eval_loss", "global_step", "changed_tensors", "heldout_pairwise_accuracy_before",
                    "heldout_pairwise_accuracy", "eval_reward_accuracy", "rewards", "merged_from", "partial")


# --- presets and run configs ---------------------------------------------------------------------


def find_repo_root(start: str | Path | None = None) -> Path:
    """The repository root: the first folder at or above ``start`` (default: cwd) with configs/ and data/brands/.

    Raises:
        FileNotFoundError: No such folder above ``start``.
    """
    start = Path(start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "configs").is_dir() and (folder / "data" / "brands").is_dir():
            return folder
    raise FileNotFoundError(f"no brandcopy checkout (a folder with configs/ and data/brands/) at or above {start}")


def use_repo_root() -> Path:
    """Change into the repository root so that presets' relative paths (``outputs/...``) mean the same
    thing from a notebook in ``notebooks/`` as from the command line. Returns the root."""
    root = find_repo_root()
    os.chdir(root)
    return root


def gpu_memory_gib() -> float | None:
    """Total memory of the first CUDA card in GiB, or None without CUDA.

    Raises:
        GPUSetupError: nvidia-smi sees a GPU that torch cannot use (driver older than torch's CUDA):
            ``auto`` must not fall back to the CPU preset silently then.
    """
    import torch

    from brandcopy.backend import check_cuda

    check_cuda(required=False)
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 1024**3


def auto_preset(gpu_gib: float | None) -> tuple[str, str]:
    """The preset ``auto`` picks for a card of ``gpu_gib`` (None: no CUDA), and why.

    At least 22 GiB (RTX 3090/4090, A10, L4): the 24 GB preset. 14 to 22 GiB (Colab's T4, 15 GiB
    usable): the 16 GB preset. Less: the 0.5B model. No CUDA: the tiny CPU preset.
    """
    if gpu_gib is None:
        return CPU_PRESET, "no CUDA device: the tiny CPU preset"
    for least, preset in GPU_PRESETS:
        if gpu_gib >= least:
            return preset, f"CUDA card with {gpu_gib:.1f} GiB (>= {least:g} GiB)"
    return SMALL_GPU_PRESET, f"CUDA card with {gpu_gib:.1f} GiB (< {GPU_PRESETS[-1][0]:g} GiB): the 0.5B model only"


def explain_preset(preset: str = "auto") -> str:
    """The preset file a notebook's ``PRESET`` resolves to, and for ``auto`` why it was picked."""
    if preset != "auto":
        return str(preset_path(preset))
    name, reason = auto_preset(gpu_memory_gib())
    return f"{preset_path(name)} (auto: {reason})"


def preset_path(preset: str = "auto") -> Path:
    """The preset file for a name, a path, or ``auto``.

    Args:
        preset: ``auto`` (by the card's memory, see ``auto_preset``), a preset name under ``configs/``
            (``tiny-cpu``) or a YAML path.

    Raises:
        FileNotFoundError: The preset does not exist; the message lists the shipped ones.
    """
    if preset == "auto":
        preset = auto_preset(gpu_memory_gib())[0]
    path = Path(preset)
    if path.suffix not in (".yaml", ".yml"):
        path = find_repo_root() / "configs" / f"{preset}.yaml"
    if not path.is_file():
        shipped = ", ".join(p.stem for p in sorted((find_repo_root() / "configs").glob("*.yaml")))
        raise FileNotFoundError(f"{path}: no such preset (shipped presets: {shipped})")
    return path


def run_overrides(run: str = "", output_root: str = "", overrides: list[str] | tuple = ()) -> list[str]:
    """``run=`` and ``output_root=`` (when given) followed by the user's ``key=value`` overrides.

    An empty ``output_root`` is the host's default (``bootstrap.default_output_root``: Google Drive on
    Colab when mounted, the data disk on AutoDL), else the preset's.
    """
    output_root = output_root or default_output_root()
    return [f"run={run}"] * bool(run) + [f"output_root={output_root}"] * bool(output_root) + list(overrides)


def stage_config(cls: type, preset: str | Path, overrides: list[str] | tuple = ()):
    """A stage's config from a preset and the overrides that stage reads.

    One override list serves every stage of a run: keys another stage reads (``grpo_max_steps=2``
    while loading the SFT config) are skipped here instead of being an error. Unknown keys still
    fail, naming the key.

    Args:
        cls: A stage config class (``SFTStageConfig``, ..., ``EvalStageConfig``).
        preset: Preset name, path or ``auto`` (see ``preset_path``).
        overrides: ``key=value`` strings; a key without its stage prefix (``lr=1e-4``) sets it for
            every stage that has it.

    Raises:
        ConfigError: An unknown key or a wrong-typed value.
    """
    own = [item for item in overrides if _reads(cls, _key(item))]
    for item in overrides:
        if not any(_reads(other, _key(item)) for other in STAGE_CONFIGS):
            parse_override(cls, item)  # raises the unknown-key error, with a did-you-mean hint
    return load_stage_config(cls, preset_path(str(preset)), own)


def _key(item: str) -> str:
    return item.partition("=")[0].strip()


def _reads(cls: type, key: str) -> bool:
    """Whether a stage reads ``key``, written in full or without the stage's prefix (``learning_rate`` for ``sft_learning_rate``)."""
    keys = config_keys(cls)
    return key in keys or f"{cls.prefix}_{key}" in keys or passthrough_stage(key) == cls.prefix


# --- model and endpoint ----------------------------------------------------------------------------


def repo_texts(root: Path = REPO) -> list[str]:
    """The tiny tokenizer's training text: non-empty lines of the data folder's text and YAML files
    (``CORPUS_GLOBS``: never the docs) and ``brand_corpus`` (so no val golden copy)."""
    files = sorted({path for pattern in CORPUS_GLOBS for path in root.glob(pattern)})
    lines = [line for path in files for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines + brand_corpus(root)


def brand_corpus(root: Path = REPO) -> list[str]:
    """The tiny base model's pre-training text: the domain's language, without the evaluation's answers.

    For every brand under ``data/brands``: its system prompt (persona, philosophy, tone rules), each
    product's name and facts, each content type's brief, and the golden copy of the **train** products
    only. The val products' golden copy, which evaluation compares against, is left out. Plus
    ``data/tiny_corpus.txt``. Plain text: no chat markup and no ``<|im_end|>``, so the base model learns
    the language but not when an answer ends (that is SFT's job).
    """
    from brandcopy.brand import load_brand, load_golden
    from brandcopy.prompts import product_facts, system_prompt

    corpus = [line for line in (root / "data" / "tiny_corpus.txt").read_text(encoding="utf-8").splitlines()
              if line.strip() and not line.startswith("#")]
    for folder in sorted(p for p in (root / "data" / "brands").iterdir() if (p / "brand.yaml").is_file()):
        brand = load_brand(folder)
        val = set(brand.split()["val"])
        corpus.append(system_prompt(brand))
        corpus += [f"{product.name}\n{product_facts(product)}" for product in brand.products.values()]
        corpus += [f"{kind.name_zh}：{kind.instruction}" for kind in brand.content_types.values()]
        corpus += [record["text"] for record in load_golden(brand) if record["product_id"] not in val]
    return corpus


def ensure_tiny_model(model: str | Path) -> Path | None:
    """Build the tiny 2-layer Qwen2 model at ``model`` when a preset names a ``tiny-model`` folder.

    Does nothing for a hub id or any other folder (a real base model), and reuses a tiny model
    that was already built, so every notebook and stage of a run trains the same base.

    Returns:
        The tiny model folder, or None when ``model`` is not a tiny-model folder.
    """
    from brandcopy.tiny import PretrainSettings, build_tiny_model

    path = Path(model)
    if path.name != TINY_MODEL_NAME:
        return None
    if (path / "config.json").is_file():
        return path
    pretrain = PretrainSettings(brand_corpus(), **TINY_PRETRAIN)
    return build_tiny_model(path, repo_texts(), **TINY_MODEL_SHAPE, pretrain=pretrain)


@contextmanager
def llm_endpoint(brand, base_url: str = "", model: str = "deepseek-chat", api_key_env: str = "DEEPSEEK_API_KEY",
                 cache_dir: str | Path = "outputs/llm-cache", concurrency: int = 16) -> Iterator:
    """The data pipeline's ``LLMConfig``: a real endpoint, or the built-in scripted server when ``base_url`` is empty.

    The scripted server answers generation and cleaning prompts with the brand's golden copy,
    negative prompts with programmatic negatives and judge-and-improve prompts with lint's verdict
    (``mockserver.scripted_responder``); it runs while the block runs.

    Args:
        brand: A loaded Brand.
        base_url: OpenAI-compatible endpoint (``https://api.deepseek.com``, ``https://api.openai.com/v1``,
            ``http://127.0.0.1:8000/v1`` for vLLM); empty for the scripted server.
        model: Model name the endpoint expects.
        api_key_env: NAME of the environment variable holding the key ('' for a server without one).
        cache_dir: On-disk response cache of the real endpoint.
        concurrency: Requests in flight.
    """
    from brandcopy.llm import LLMConfig
    from brandcopy.mockserver import SCRIPTED, endpoint

    config = LLMConfig(model=model, base_url=base_url or SCRIPTED, api_key_env=api_key_env or None,
                       concurrency=concurrency, cache_dir=str(cache_dir))
    with endpoint(config, brand) as config:
        yield config


def judge_overrides(base_url: str = "", model: str = "deepseek-chat", api_key_env: str = "DEEPSEEK_API_KEY") -> list[str]:
    """Eval overrides that point the judge at ``base_url``; none (the preset's judge) when it is empty."""
    if not base_url:
        return []
    return [f"eval_judge_base_url={base_url}", f"eval_judge_model={model}",
            f"eval_judge_api_key_env={api_key_env or 'null'}"]


def build_data(llm_config, brand, data_dir: str | Path, content_types: list[str] | None = None) -> dict:
    """Steps 1-4 of the data pipeline in order: generate (train and val products), clean, negatives, export.

    Returns:
        ``{"generate_train": RunSummary, "generate_val": ..., "clean": ..., "negatives": ..., "export": {name: path}}``.
    """
    from brandcopy.datagen import clean, export, generate, make_negatives
    from brandcopy.llm import LLMClient

    data_dir = Path(data_dir)
    client = LLMClient(llm_config)
    report = {f"generate_{split}": generate(client, brand, data_dir, split, content_types) for split in ("train", "val")}
    report["clean"] = clean(client, brand, data_dir / "generated.jsonl", data_dir)
    report["negatives"] = make_negatives(client, brand, data_dir / "cleaned.jsonl", data_dir)
    report["export"] = export(brand, data_dir / "cleaned.jsonl", data_dir, data_dir / "negatives.jsonl")
    return report


# --- reading results -------------------------------------------------------------------------------


def stage_summary(stage_folder: str | Path) -> dict:
    """The headline results a finished stage recorded in its manifest (loss, steps, accuracy, ...)."""
    manifest = json.loads((Path(stage_folder) / "manifest.json").read_text(encoding="utf-8"))
    return {key: manifest[key] for key in MANIFEST_RESULTS if key in manifest}


def eval_samples(eval_dir: str | Path, n: int = 3, setting: str = "greedy") -> list[dict]:
    """The first ``n`` val prompts of an evaluation: golden copy and every model's copy.

    Returns:
        ``[{"id", "content_type", "product_id", "golden", "models": {model: text}}]``.
    """
    from brandcopy.brand import load_brand, load_golden

    eval_dir = Path(eval_dir)
    config = load_stage_config(EvalStageConfig, eval_dir / "config.yaml")
    golden = {r["id"]: r["text"] for r in load_golden(load_brand(config.brand))}
    rows = read_jsonl(eval_dir / "generations.jsonl")
    samples = {}
    for row in rows:
        if row["setting"] != setting:
            continue
        sample = samples.setdefault(row["id"], {"id": row["id"], "content_type": row["content_type"],
                                                "product_id": row["product_id"], "golden": golden[row["id"]], "models": {}})
        sample["models"][row["model"]] = row["text"]
    return list(samples.values())[:n]


# --- the demo --------------------------------------------------------------------------------------


@dataclass
class DemoResult:
    """What the demo produced.

    Attributes:
        run_dir: The run directory holding every stage's folder.
        report: ``<run>/eval/report.md``.
        samples: A few val prompts with the golden copy and every model's greedy copy.
        summaries: Headline results of each training stage (``stage_summary``).
        seconds: Wall time of each step.
        changes: "What each stage changed": the evaluation's table (stop rate, lint, facts ok, brand reward,
            preference accuracy, eval loss for base, SFT, DPO, GRPO, merged).
    """

    run_dir: Path
    report: Path
    samples: list[dict]
    summaries: dict[str, dict] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    changes: str = ""


def run_demo(preset: str | Path = CPU_PRESET, overrides: list[str] | tuple = (), *, base_url: str = "",
             api_model: str = "deepseek-chat", api_key_env: str = "DEEPSEEK_API_KEY", n_samples: int = 3) -> DemoResult:
    """The whole pipeline in one run directory: tiny model, data, SFT, reward model, DPO, GRPO, merge, evaluation.

    Args:
        preset: Preset name or path; the CPU default ``tiny-cpu`` runs in minutes on 2 cores.
        overrides: ``key=value`` overrides for any stage (``run=demo``, ``grpo_max_steps=4``).
        base_url: A real OpenAI-compatible endpoint for the data and the judge; empty: the scripted
            server writes the data and the scripted heuristic judge scores.
        api_model: Model name at ``base_url``.
        api_key_env: NAME of the environment variable holding the endpoint's key.
        n_samples: Val prompts returned with every model's copy.

    Returns:
        The run directory, the report's path, samples, stage results and timings.
    """
    from brandcopy import evaluate
    from brandcopy.evaluate import run_eval, stage_table
    from brandcopy.train import grpo
    from brandcopy.train.dpo import run_dpo
    from brandcopy.train.grpo import run_grpo
    from brandcopy.train.merge import run_merge
    from brandcopy.train.reward import run_reward
    from brandcopy.train.sft import run_sft

    configs = {name: stage_config(cls, preset, overrides) for name, cls in CONFIG_BY_STAGE.items()}
    configs["eval"] = stage_config(EvalStageConfig, preset, [*overrides, *judge_overrides(base_url, api_model, api_key_env)])
    sft = configs["sft"]
    result = DemoResult(sft.run_dir, configs["eval"].out_dir / "report.md", [])
    steps = [
        ("tiny-model", lambda: ensure_tiny_model(sft.model)),
        ("data", lambda: _demo_data(sft, base_url, api_model, api_key_env)),
        ("sft", lambda: run_sft(sft)),
        ("reward", lambda: run_reward(configs["reward"])),
        ("dpo", lambda: run_dpo(configs["dpo"])),
        ("grpo", lambda: judged(run_grpo, configs["grpo"], grpo.judge_endpoint)),
        ("merged", lambda: run_merge(configs["merged"])),
        ("eval", lambda: judged(run_eval, configs["eval"], evaluate.judge_endpoint)),
    ]
    for number, (name, step) in enumerate(steps, start=1):
        print(f"\n=== [{number}/{len(steps)}] {name} ===", flush=True)
        started = time.perf_counter()
        step()
        result.seconds[name] = round(time.perf_counter() - started, 1)
        if name in ("sft", "reward", "dpo", "grpo"):
            result.summaries[name] = stage_summary(sft.run_dir / name)
    result.samples = eval_samples(configs["eval"].out_dir, n_samples)
    results = json.loads((configs["eval"].out_dir / "results.json").read_text(encoding="utf-8"))
    result.changes = "What each stage changed (greedy, val split):\n" + stage_table(results["stages"])
    return result


def judged(run, cfg, judge_endpoint):
    """``run(cfg, judge=...)`` with the stage's judge endpoint, served by the scripted server for the
    whole stage when the preset's judge is ``scripted`` (``mockserver.endpoint``).

    Args:
        run: A judged stage's entry point (``run_grpo``, ``run_eval``).
        cfg: Its config.
        judge_endpoint: The stage's ``judge_endpoint(cfg) -> LLMConfig``.
    """
    from brandcopy.brand import load_brand
    from brandcopy.mockserver import endpoint

    with endpoint(judge_endpoint(cfg), load_brand(cfg.brand)) as judge:
        return run(cfg, judge=judge)


def _demo_data(cfg, base_url: str, api_model: str, api_key_env: str) -> dict:
    from brandcopy.brand import load_brand

    brand = load_brand(cfg.brand)
    with llm_endpoint(brand, base_url, api_model, api_key_env, Path(cfg.output_root) / "llm-cache") as config:
        return build_data(config, brand, cfg.data_path)
