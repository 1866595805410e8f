"""The eval stage: generate with every model of a run over the val split, score, judge, report.

``run_eval`` writes ``<run>/eval/``:

- ``generations.jsonl``: every model's copy for every val prompt, per generation setting;
- ``judge/``: the judge's raw answers and failures (resumable; answers are cached by llm.py);
- ``results.json``: every number of the report;
- ``report.md``: "what each stage changed" (stop rate, lint, facts ok, brand reward, preference
  accuracy, eval loss per model, with ``charts/stages.png``), the seed's table per content type (n, golden / fine-tuned / base mean score,
  best-model counts), a position-bias line, offline metrics, and bar charts ``charts/*.png``;
- ``side_by_side.md``: N prompts x models, with the generation parameters and times on top;
- ``manifest.json`` (written last).

A report that lacks something (judge off or failed, judgements that failed to parse, no base to
compare with) starts with a PARTIAL line saying what is missing.
"""

import gc
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from brandcopy.backend import prepare_backend
from brandcopy.brand import load_brand, load_golden
from brandcopy.config import ConfigError, EvalStageConfig, save_config
from brandcopy.files import atomic_path, atomic_write_jsonl, atomic_write_text
from brandcopy.generation import Generation, GenerationParams, timed_generate
from brandcopy.ifeval import load_prompts as load_ifeval_prompts
from brandcopy.ifeval import regressions, run_ifeval
from brandcopy.judge import (
    DIMENSION_NAMES,
    DIMENSIONS,
    BestOfVerdict,
    JudgeItem,
    SingleScore,
    best_counts,
    dimension_means,
    failure_counts,
    judge_best_of,
    judge_config,
    judge_single,
    mean_scores,
    position_bias,
)
from brandcopy.llm import LLMClient, LLMConfig, LLMConfigError, LLMError
from brandcopy.metrics import Sample, completion_loss, offline_metrics, preference_accuracy
from brandcopy.modeling import fix_special_tokens, load_adapter_model, load_model
from brandcopy.prompts import chat_messages
from brandcopy.rewards import cta_reward, fact_reward, format_reward, lint_reward
from brandcopy.run import DATA_KINDS, data_file, is_complete, read_data_file, require_stage, spread, write_manifest

__all__ = ["EvalStageConfig", "run_eval", "models_to_evaluate", "judge_endpoint"]

logger = logging.getLogger(__name__)

MODELS = ("base", "sft", "dpo", "dpo-onpolicy", "dpo-both", "grpo", "merged")
ADAPTERS = ("sft", "dpo", "dpo-onpolicy", "dpo-both", "grpo")
METRIC_COLUMNS = {  # offline metric -> report column
    "n": "n",
    "empty_rate": "empty",
    "stop_rate": "stopped",
    "length": "length",
    "length_ratio": "len/golden",
    "distinct_1": "distinct-1",
    "distinct_2": "distinct-2",
    "rouge_l": "ROUGE-L",
    "lint_score": "lint",
    "fact_pass_rate": "facts ok",
    "cta_rate": "CTA (ads)",
}
BRAND_REWARDS = (lint_reward, fact_reward, format_reward, cta_reward)  # GRPO's rule-based rewards, equally weighted
STAGE_COLUMNS = {  # "what each stage changed": key of stage_changes() -> column
    "stop_rate": "stopped",
    "lint_score": "lint",
    "fact_pass_rate": "facts ok",
    "brand_reward": "brand reward",
    "preference_accuracy": "pref. acc.",
    "eval_loss": "eval loss",
}


@dataclass
class EvalResults:
    """Everything the report shows; ``results.json`` is its ``as_dict``."""

    models: list[str]
    params: list[GenerationParams]
    records: list[dict]
    generations: dict[str, dict[str, list[Generation]]] = field(default_factory=dict)  # setting -> model -> copies
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)  # setting -> model -> wall time
    losses: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> eval_loss / perplexity
    preference: dict[str, float] = field(default_factory=dict)  # model -> held-out preference accuracy
    rewards: dict[str, float] = field(default_factory=dict)  # model -> mean brand reward of its greedy copy
    metrics: dict[str, dict[str, dict]] = field(default_factory=dict)  # setting -> model -> group -> metric
    scores: list[SingleScore] = field(default_factory=list)
    verdicts: dict[str, list[BestOfVerdict]] = field(default_factory=dict)  # fine-tuned model -> verdicts
    judge: str = ""
    missing: list[str] = field(default_factory=list)
    ifeval: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> IFEval-style pass rates
    ifeval_scored: dict[str, list[dict]] = field(default_factory=dict)  # model -> per-prompt verdicts

    def as_dict(self) -> dict:
        return {
            "models": self.models,
            "params": [p.describe() for p in self.params],
            "n_prompts": len(self.records),
            "seconds": self.seconds,
            "losses": self.losses,
            "metrics": self.metrics,
            "stages": stage_changes(self),
            "judge": self.judge,
            "judge_means": mean_scores(self.scores),
            "best_counts": {m: {g: dict(c) for g, c in best_counts(v).items()} for m, v in self.verdicts.items()},
            "position_bias": {m: position_bias(v) for m, v in self.verdicts.items()},
            "judge_failures": failure_counts(self.scores, [v for vs in self.verdicts.values() for v in vs]),
            "partial": self.missing,
            "ifeval": self.ifeval,
        }


def json_ready(value):
    """``value`` for ``json.dumps``: a number that was not measured (NaN: no paid ads, no parsed round) becomes
    None, JSON's null; NaN is not JSON, and strict readers (JavaScript, ``jq``) reject it.

    Numbers of other types (numpy, torch scalars) become floats, as ``json.dumps(default=float)`` made them.
    """
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if value is None or isinstance(value, (str, bool, int)):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


# --- inputs --------------------------------------------------------------------------------------


def models_to_evaluate(cfg: EvalStageConfig) -> list[str]:
    """The models to evaluate: ``eval_models`` if set (each must exist), else base + every finished stage.

    Raises:
        ConfigError: A name that is not one of base / sft / dpo / grpo / merged.
        StageInputError: A requested stage is missing or unfinished in the run directory.
    """
    if not cfg.eval_models:
        return ["base"] + [name for name in MODELS[1:] if is_complete(cfg.run_dir / name)]
    for name in cfg.eval_models:
        if name not in MODELS:
            raise ConfigError(f"eval_models: {name!r} is not one of {', '.join(MODELS)}")
        if name != "base":
            require_stage(cfg.run_dir, name, "eval")
    return list(cfg.eval_models)


def val_records(brand, max_samples: int) -> list[dict]:
    """Golden records of the val products, in id order (at most ``max_samples`` when positive).

    Raises:
        ValueError: No golden record belongs to a val product.
    """
    val = set(brand.split()["val"])
    records = sorted((r for r in load_golden(brand) if r["product_id"] in val), key=lambda r: r["id"])
    if not records:
        raise ValueError(
            f"{brand.path / 'golden.jsonl'}: no golden record for the val products {sorted(val)}; "
            "the val split is empty, so there is nothing to evaluate"
        )
    return records[:max_samples] if max_samples > 0 else records


def generation_settings(cfg: EvalStageConfig) -> list[GenerationParams]:
    """Greedy, plus the sampled setting when ``eval_sampled``."""
    greedy = GenerationParams("greedy", cfg.eval_max_new_tokens, seed=cfg.seed)
    if not cfg.eval_sampled:
        return [greedy]
    sampled = GenerationParams("sampled", cfg.eval_max_new_tokens, True, cfg.eval_temperature, cfg.eval_top_p, cfg.seed)
    return [greedy, sampled]


def preference_rows(cfg: EvalStageConfig) -> list[dict]:
    """The held-out preference pairs (``preference_val.jsonl`` of the run's data), [] when there are none."""
    path = data_file(cfg.data_path, "preference", "val")
    return read_data_file(path, DATA_KINDS["preference"]) if path.is_file() else []


def load_eval_model(cfg: EvalStageConfig, name: str):
    """``(model, tokenizer)`` of one evaluated model, frozen, with EOS/pad fixed."""
    if name in ADAPTERS:
        model, tokenizer = load_adapter_model(cfg.run_dir / name, trainable=False, **cfg.load_options)
    else:
        model, tokenizer = load_model(cfg.model if name == "base" else cfg.run_dir / name, **cfg.load_options)
    fix_special_tokens(model, tokenizer)  # the base model's tokenizer has not been through training
    return model, tokenizer


# --- steps ---------------------------------------------------------------------------------------


def release_memory() -> None:
    """Collect what no name refers to any more and hand cached GPU blocks back, before the next load."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate_model(cfg: EvalStageConfig, name: str, prompts: list, golden: list, pairs: list, checks: list,
                   results: EvalResults) -> None:
    """Load one model, score the golden copy and the held-out pairs, generate every setting, run the
    general-ability regression check; the model dies with this frame."""
    model, tokenizer = load_eval_model(cfg, name)
    results.losses[name] = completion_loss(model, tokenizer, golden, cfg.eval_batch_size)
    if pairs:
        results.preference[name] = preference_accuracy(model, tokenizer, pairs, cfg.eval_batch_size)
    for params in results.params:
        copies, seconds = timed_generate(model, tokenizer, prompts, params, cfg.eval_batch_size)
        results.generations.setdefault(params.name, {})[name] = copies
        results.seconds.setdefault(params.name, {})[name] = seconds
        logger.info("%s / %s: %d copies in %.1fs", name, params.name, len(copies), seconds)
    if checks:  # the general-ability regression check, on the same loaded model
        budget = cfg.eval_ifeval_max_new_tokens or cfg.eval_max_new_tokens
        ifeval_params = GenerationParams("ifeval", budget, seed=cfg.seed)
        results.ifeval[name], results.ifeval_scored[name] = run_ifeval(model, tokenizer, checks, ifeval_params,
                                                                         cfg.eval_batch_size)


def generate_all(cfg: EvalStageConfig, brand, results: EvalResults) -> None:
    """Load each model once, one at a time, and free it before the next one loads: completion loss on
    the golden copy, preference accuracy on the held-out pairs, then every generation setting.

    On a 24 GB card two models at once (the 4-bit GRPO policy beside the 16-bit merged model) do
    not fit, so no name in this loop may keep a model alive across iterations.
    """
    prompts = [chat_messages(brand, r["product_id"], r["content_type"]) for r in results.records]
    golden = [chat_messages(brand, r["product_id"], r["content_type"], r["text"]) for r in results.records]
    rows = preference_rows(cfg)
    pairs = [rows[i] for i in spread(len(rows), cfg.eval_preference_pairs)]
    checks = load_ifeval_prompts(max_prompts=cfg.eval_ifeval_max_samples) if cfg.eval_ifeval else []
    for name in results.models:
        evaluate_model(cfg, name, prompts, golden, pairs, checks, results)
        release_memory()


def write_generations(path: Path, results: EvalResults) -> None:
    """``generations.jsonl``: one row per (setting, model, prompt)."""
    rows = []
    for setting, by_model in results.generations.items():
        for name, copies in by_model.items():
            for record, copy in zip(results.records, copies):
                rows.append({"id": record["id"], "setting": setting, "model": name, "product_id": record["product_id"],
                             "content_type": record["content_type"], "text": copy.text,
                             "new_tokens": copy.new_tokens, "stopped": copy.stopped})
    atomic_write_jsonl(path, rows)


def score_offline(cfg: EvalStageConfig, brand, results: EvalResults) -> None:
    """Offline metrics per setting and model."""
    for setting, by_model in results.generations.items():
        for name, copies in by_model.items():
            samples = [Sample(r["content_type"], r["product_id"], c.text, r["text"], c.stopped)
                       for r, c in zip(results.records, copies)]
            results.metrics.setdefault(setting, {})[name] = offline_metrics(brand, samples, cfg.eval_rouge_unit)


def brand_reward(cfg: EvalStageConfig, records: list[dict], copies: list[Generation]) -> float:
    """Mean over copies of GRPO's rule-based rewards (lint, fact, format, CTA; the functions GRPO trains
    with, equally weighted), each in [0, 1]."""
    columns = {"brand": [cfg.brand] * len(records), "content_type": [r["content_type"] for r in records],
               "product_id": [r["product_id"] for r in records]}
    texts = [c.text for c in copies]
    per_reward = [reward(texts, **columns) for reward in BRAND_REWARDS]
    return sum(map(sum, per_reward)) / (len(BRAND_REWARDS) * len(texts))


def score_rewards(cfg: EvalStageConfig, results: EvalResults) -> None:
    """Each model's mean brand reward on its greedy copy."""
    for name, copies in results.generations["greedy"].items():
        results.rewards[name] = brand_reward(cfg, results.records, copies)


def stage_changes(results: EvalResults) -> list[dict]:
    """One row per model in pipeline order: greedy stop rate, lint, facts ok, brand reward, preference
    accuracy and eval loss (None where a number was not measured, e.g. no preference pairs)."""
    rows = []
    for name in results.models:
        overall = results.metrics["greedy"][name]["overall"]
        rows.append({"model": name, "stop_rate": overall["stop_rate"], "lint_score": overall["lint_score"],
                     "fact_pass_rate": overall["fact_pass_rate"], "brand_reward": results.rewards[name],
                     "preference_accuracy": results.preference.get(name),
                     "eval_loss": results.losses[name]["eval_loss"]})
    return rows


def stage_table(rows: list[dict]) -> str:
    """"What each stage changed" as a markdown table (rows of ``stage_changes``; None shows as –)."""
    cells = [[r["model"], *[math.nan if r[k] is None else r[k] for k in STAGE_COLUMNS]] for r in rows]
    return _table(["model", *STAGE_COLUMNS.values()], cells)


def plot_stage_chart(rows: list[dict], path: Path) -> Path:
    """``stages.png``: each [0, 1] measure of ``stage_changes`` across the models, eval loss on its own axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    names = [r["model"] for r in rows]
    fig, (rates, loss) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 1]})
    for key, label in list(STAGE_COLUMNS.items())[:-1]:
        rates.plot(names, [math.nan if r[key] is None else r[key] for r in rows], marker="o", label=label)
    rates.set_ylim(0, 1.05)
    rates.set_title("what each stage changed (greedy, val split)")
    rates.legend(fontsize=8)
    loss.bar(names, [r["eval_loss"] for r in rows], color="grey")
    loss.set_title("eval loss on golden copy")
    loss.tick_params(axis="x", labelrotation=45)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path


def judge_items(results: EvalResults) -> list[JudgeItem]:
    """One judge item per val prompt with every model's greedy copy."""
    greedy = results.generations["greedy"]
    return [
        JudgeItem(r["id"], r["product_id"], r["content_type"], r["instruction"], r["text"],
                  {name: greedy[name][i].text for name in results.models})
        for i, r in enumerate(results.records)
    ]


def judge_endpoint(cfg: EvalStageConfig) -> LLMConfig:
    """The judge's endpoint from the ``eval_judge_*`` keys; answers are cached in ``<output_root>/llm-cache``."""
    return judge_config(cfg.eval_judge_model, cfg.eval_judge_base_url, cfg.eval_judge_api_key_env,
                        cfg.eval_judge_concurrency, str(Path(cfg.output_root) / "llm-cache"))


def run_judge(cfg: EvalStageConfig, brand, results: EvalResults, judge: LLMConfig) -> None:
    """Single-answer scores for golden and every model, and best-of-3 for every fine-tuned model."""
    items = judge_items(results)
    tuned = [name for name in results.models if name != "base"]
    results.judge = f"{judge.model} at {judge.base_url}"
    client = LLMClient(judge)
    results.scores = judge_single(client, brand, items, ["golden", *results.models], cfg.out_dir / "judge")
    if "base" in results.models:
        for name in tuned:
            results.verdicts[name] = judge_best_of(client, brand, items, name, cfg.out_dir / "judge", cfg.seed)


def missing_parts(cfg: EvalStageConfig, results: EvalResults) -> list[str]:
    """What the report lacks (empty when complete)."""
    missing = list(results.missing)
    if not cfg.eval_judge:
        missing.append("the LLM judge was not run (eval_judge: false)")
    if cfg.eval_judge and "base" not in results.models:
        missing.append("best-of-3 not run: the base model is not among the evaluated models")
    if cfg.eval_judge and results.models == ["base"]:
        missing.append("best-of-3 not run: no fine-tuned model in the run")
    failures = failure_counts(results.scores, [v for vs in results.verdicts.values() for v in vs])
    if failures["single_failed"] or failures["best_of_rounds_failed"]:
        missing.append(
            f"{failures['single_failed']} of {failures['single_total']} single-answer judgements and "
            f"{failures['best_of_rounds_failed']} of {failures['best_of_rounds']} best-of rounds failed "
            "(unparseable answers or failed requests; left out of the averages, see 'Judge failures')"
        )
    return missing


# --- report --------------------------------------------------------------------------------------


def _fmt(value) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _groups(results: EvalResults) -> list[str]:
    return sorted({r["content_type"] for r in results.records}) + ["overall"]


def judge_table(results: EvalResults, model: str | None) -> str:
    """The seed's table: per content type n, golden / model / base mean score, best-model counts.

    With ``model=None`` (only the base was evaluated) the table compares golden and base.
    """
    means, counts = mean_scores(results.scores), best_counts(results.verdicts.get(model, []))
    n = {g: sum(r["content_type"] == g for r in results.records) for g in _groups(results)}
    n["overall"] = len(results.records)
    names = ["golden", model, "base"] if model else ["golden", "base"]
    header = ["content_type", "n", *[f"{x} avg" for x in names], *[f"best: {x}" for x in names], "tie", "failed"]
    rows = [
        [g, n[g], *[means.get(g, {}).get(x, float("nan")) for x in names],
         *[counts[g][x] for x in names], counts[g]["tie"], counts[g]["failed"]]
        for g in _groups(results)
    ]
    return _table(header, rows)


def bias_line(verdicts: list[BestOfVerdict]) -> str:
    """The position-bias sentence of one fine-tuned model's best-of-3."""
    b = position_bias(verdicts)
    return (
        f"Position bias: the first position won {b['first_won_original']:.0%} of rounds in the original order and "
        f"{b['first_won_swapped']:.0%} after swapping (an unbiased judge: about 33%); the two orders agreed on "
        f"{b['agreement']:.0%} of prompts; {b['ties']} disagreements reported as ties, "
        f"{b['failed']} failed, of {b['n']}."
    )


def metrics_tables(results: EvalResults) -> str:
    """Offline metrics: overall per model and setting (with eval loss), then per content type."""
    header = ["model", "setting", "eval loss", "ppl", *METRIC_COLUMNS.values()]
    rows = [
        [name, setting, results.losses[name]["eval_loss"], results.losses[name]["perplexity"],
         *[by_model[name]["overall"][key] for key in METRIC_COLUMNS]]
        for setting, by_model in results.metrics.items() for name in by_model
    ]
    parts = ["### Overall", _table(header, rows)]
    greedy = results.metrics["greedy"]
    for group in _groups(results)[:-1]:
        rows = [[name, *[greedy[name][group][key] for key in METRIC_COLUMNS]] for name in greedy]
        parts += [f"### {group} (greedy)", _table(["model", *METRIC_COLUMNS.values()], rows)]
    return "\n\n".join(parts)


def plot_judge_charts(results: EvalResults, charts_dir: Path) -> dict[str, Path]:
    """One bar chart per content type: mean score per dimension for golden and each model.

    Returns:
        ``{content_type: png path}`` for the groups with parsed scores.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for group in _groups(results):
        means = dimension_means(results.scores, None if group == "overall" else group)
        if not means:
            continue
        fig, ax = plt.subplots(figsize=(8, 3.8))
        width = 0.8 / len(means)
        for offset, (name, by_dim) in enumerate(means.items()):
            xs = [i + offset * width for i in range(len(DIMENSIONS))]
            ax.bar(xs, [by_dim[d] for d in DIMENSIONS], width, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(DIMENSIONS))], list(DIMENSIONS))
        ax.set_ylim(0, 6)  # headroom above 5 for the legend
        ax.set_yticks(range(6))
        ax.set_ylabel("judge score (1-5)")
        ax.set_title(f"{group}: mean judge score per dimension")
        ax.legend(fontsize=8, ncols=len(means))
        fig.tight_layout()
        paths[group] = charts_dir / f"{group}.png"
        with atomic_path(paths[group]) as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)
    return paths


def failures_section(results: EvalResults) -> str:
    """Counts of failed judgements and the first few reasons."""
    verdicts = [v for vs in results.verdicts.values() for v in vs]
    counts = failure_counts(results.scores, verdicts)
    reasons = [f"- single {s.key} / {s.candidate}: {s.error}" for s in results.scores if s.error]
    reasons += [f"- best-of {v.key} / {v.model} round {i + 1}: {e}"
                for v in verdicts for i, e in enumerate(v.errors) if e]
    lines = [", ".join(f"{key}: {value}" for key, value in counts.items())]
    return "\n".join(lines + reasons[:20] + ([f"- … {len(reasons) - 20} more"] if len(reasons) > 20 else []))


def header_lines(cfg: EvalStageConfig, results: EvalResults, started: str) -> list[str]:
    """Run, date, prompts, models, generation parameters and times."""
    lines = [f"- run: `{cfg.run}`, brand: {cfg.brand}, base model: `{cfg.model}`, started {started}",
             f"- val prompts: {len(results.records)}; models: {', '.join(results.models)}",
             f"- judge: {results.judge or 'not run'}"]
    for params in results.params:
        times = ", ".join(f"{m} {s:.1f}s" for m, s in results.seconds.get(params.name, {}).items())
        lines.append(f"- generation {params.describe()}; wall time: {times}")
    return lines


def render_report(cfg: EvalStageConfig, results: EvalResults, charts: dict[str, Path], started: str) -> str:
    """``report.md`` text."""
    parts = [f"# Evaluation report: {cfg.run}"]
    if results.missing:
        parts.append("> **PARTIAL**: this report is incomplete.\n" + "\n".join(f"> - {m}" for m in results.missing))
    drops = regressions(results.ifeval, cfg.eval_ifeval_margin)
    if drops:
        parts.append("> **REGRESSION** in general instruction following (see below): " + ", ".join(
            f"{name} {drop:.0%} below base" for name, drop in drops.items()))
    parts.append("\n".join(header_lines(cfg, results, started)))
    parts.append("## What each stage changed\n\nGreedy copy of the val prompts: share that ended with the model's own "
                 "`<|im_end|>` (stopped), lint score, share without a fact error, mean brand reward (GRPO's lint, fact, "
                 "format and CTA rewards), share of held-out preference pairs whose chosen answer is more likely "
                 "than the rejected one, and the loss on the golden copy.\n\n"
                 f"{stage_table(stage_changes(results))}\n\n![what each stage changed](charts/stages.png)")
    if results.scores:
        parts.append("## Judge: golden vs fine-tuned vs base\n\nMean single-answer score (1-5, mean of "
                     f"{', '.join(DIMENSION_NAMES.values())}); best-of-3 blind, judged in two orders, "
                     "disagreements counted as ties.")
        for name in [m for m in results.models if m != "base"] or [None]:
            parts.append(f"### {name or 'base only'}\n\n{judge_table(results, name)}")
            if name in results.verdicts:
                parts.append(bias_line(results.verdicts[name]))
        parts.append("### Charts\n\n" + "\n".join(f"![{g}](charts/{p.name})" for g, p in charts.items()))
        parts.append("### Judge failures\n\n" + failures_section(results))
    if dpo_variants(results):
        parts.append(dpo_pairs_section(cfg, results))
    parts.append("## Offline metrics\n\n" + metrics_tables(results))
    if results.ifeval:
        parts.append(ifeval_section(cfg, results))
    parts.append("Side by side: [side_by_side.md](side_by_side.md). Raw numbers: results.json.")
    return "\n\n".join(parts) + "\n"


def ifeval_section(cfg: EvalStageConfig, results: EvalResults) -> str:
    """Pass rates of the IFEval-style check per model, the change from the base and the regression flag."""
    drops = regressions(results.ifeval, cfg.eval_ifeval_margin)
    base = results.ifeval.get("base", {}).get("prompt_strict", float("nan"))
    rows = [[name, r["prompt_strict"], r["prompt_loose"], r["instruction_strict"], r["instruction_loose"],
             r["prompt_strict"] - base, "REGRESSION" if name in drops else ""] for name, r in results.ifeval.items()]
    n = len(next(iter(results.ifeval_scored.values())))
    header = ["model", "prompt strict", "prompt loose", "instruction strict", "instruction loose", "Δ strict vs base", "flag"]
    return (f"## General instruction following (regression check)\n\n{n} Chinese prompts with code-verified constraints "
            "(length, required / forbidden words, paragraphs, lists, JSON, punctuation; nothing about the brand), "
            "greedy, no system prompt. Strict checks the answer as written; loose also accepts it without its first or "
            f"last line or Markdown `*`. A prompt-level strict drop of more than {cfg.eval_ifeval_margin:.0%} below the "
            "base is flagged: brand training should not cost ordinary instruction following.\n\n" + _table(header, rows))


def dpo_variants(results: EvalResults) -> list[str]:
    """The DPO models evaluated when more than one kind of pairs was trained (dpo, dpo-onpolicy, dpo-both)."""
    variants = [name for name in ("dpo", "dpo-onpolicy", "dpo-both") if name in results.models]
    return variants if len(variants) > 1 else []


def dpo_pairs_section(cfg: EvalStageConfig, results: EvalResults) -> str:
    """DPO on synthetic pairs against DPO on on-policy pairs (and both): the same numbers side by side."""
    means, greedy = mean_scores(results.scores).get("overall", {}), results.metrics["greedy"]
    header = ["model", "pairs", "train pairs", "judge avg", "best-of wins", "lint", "facts ok", "stopped", "IFEval strict"]
    rows = []
    for name in dpo_variants(results):
        manifest = json.loads((cfg.run_dir / name / "manifest.json").read_text(encoding="utf-8"))
        wins = best_counts(results.verdicts.get(name, []))["overall"][name]
        overall = greedy[name]["overall"]
        rows.append([name, manifest.get("pairs", "synthetic"), manifest.get("train_pairs", "–"), means.get(name, float("nan")),
                     wins, overall["lint_score"], overall["fact_pass_rate"], overall["stop_rate"],
                     results.ifeval.get(name, {}).get("prompt_strict", float("nan"))])
    return ("## DPO: synthetic vs on-policy pairs\n\nThe same start (`dpo_from`) and recipe, trained on different pairs "
            "(`dpo_pairs`): synthetic negatives of golden copy, or the policy's own samples improved by the judge.\n\n"
            + _table(header, rows))


def render_side_by_side(cfg: EvalStageConfig, results: EvalResults, brand, started: str) -> str:
    """``side_by_side.md``: the first N val prompts, golden and every model's greedy copy."""
    parts = [f"# Side by side: {cfg.run}", "\n".join(header_lines(cfg, results, started))]
    greedy = results.generations["greedy"]
    for i, record in enumerate(results.records[: cfg.eval_side_by_side]):
        product = brand.product(record["product_id"])
        block = [f"## {record['id']} · {record['content_type']} · {product.name}", f"### golden\n\n{record['text']}"]
        for name in results.models:
            copy = greedy[name][i]
            note = "" if copy.stopped else f" (did not stop within {copy.new_tokens} tokens)"
            block.append(f"### {name}{note}\n\n{copy.text or '*(empty)*'}")
        parts.append("\n\n".join(block))
    return "\n\n".join(parts) + "\n"


# --- the stage -----------------------------------------------------------------------------------


def run_eval(cfg: EvalStageConfig, judge: LLMConfig | None = None) -> Path:
    """Evaluate the run's models on the val split and write ``<run>/eval``.

    Steps: resolve the models (fails before loading anything when a requested stage is missing),
    read the val golden records (fails when there are none), per model: completion loss on the
    golden copy and generation with every setting; offline metrics; the judge (single scores and
    best-of-3 in two orders); report, charts, side by side; manifest last.

    A judge that cannot be reached or whose key is missing leaves a PARTIAL report with the
    offline metrics; unparseable answers are counted and the report is marked PARTIAL.

    Args:
        cfg: The stage config.
        judge: The judge's endpoint; None: the ``eval_judge_*`` keys (``judge_endpoint``).

    Returns:
        The stage folder ``<run>/eval``.

    Raises:
        ConfigError: An unknown name in ``eval_models``.
        StageInputError: A requested stage is missing or unfinished.
        ValueError: The val split has no golden records.
    """
    prepare_backend(cfg.backend, require_cuda=cfg.require_cuda)  # GPU checks; unsloth before trl
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    models = models_to_evaluate(cfg)
    brand = load_brand(cfg.brand)
    results = EvalResults(models, generation_settings(cfg), val_records(brand, cfg.eval_max_samples))
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    save_config(cfg, out / "config.yaml")
    generate_all(cfg, brand, results)
    write_generations(out / "generations.jsonl", results)
    score_offline(cfg, brand, results)
    score_rewards(cfg, results)
    if cfg.eval_judge:
        try:
            run_judge(cfg, brand, results, judge or judge_endpoint(cfg))
        except (LLMError, LLMConfigError) as err:
            results.missing.append(f"the LLM judge did not finish: {err}")
    results.missing = missing_parts(cfg, results)
    charts = plot_judge_charts(results, out / "charts") if results.scores else {}
    plot_stage_chart(stage_changes(results), out / "charts" / "stages.png")
    atomic_write_text(out / "results.json", json.dumps(json_ready(results.as_dict()), ensure_ascii=False, indent=2,
                                                       allow_nan=False))
    atomic_write_text(out / "side_by_side.md", render_side_by_side(cfg, results, brand, started))
    atomic_write_jsonl(out / "ifeval.jsonl", [{"model": name, **row} for name, rows in results.ifeval_scored.items() for row in rows])
    atomic_write_text(out / "report.md", render_report(cfg, results, charts, started))
    write_manifest(cfg, [brand.path / "golden.jsonl"], {"models": models, "partial": results.missing})
    return out
