"""GRPO rewards: plain functions ``(completions, **kwargs) -> list[float]``, each in [0, 1].

They grade with ``lint.lint_text``, the same grader evaluation uses, so training and evaluation
score alike. TRL passes the dataset's columns as keyword arguments: every GRPO row carries
``product_id`` and ``content_type`` (from datagen) and ``brand`` (added by the GRPO stage);
``reward_model`` (the reward stage's folder) and ``judge`` (the judge's endpoint and folder as
JSON, ``judge_spec``) are added when those rewards are used.
"""

import dataclasses
import json
import logging
import math
from functools import lru_cache
from pathlib import Path

from brandcopy.brand import load_brand
from brandcopy.judge import JudgeItem, judge_single
from brandcopy.lint import CTA_KIND, FACT_KINDS, MARKUP_KIND, copy_length, lint_text
from brandcopy.llm import LLMClient, LLMConfig

logger = logging.getLogger(__name__)


def completion_text(completion) -> str:
    """The text of one completion: a string, or TRL's conversational ``[{"role": "assistant", ...}]``."""
    if isinstance(completion, str):
        return completion
    return "".join(message["content"] for message in completion)


@lru_cache(maxsize=8)
def cached_brand(name_or_path: str):
    """``load_brand`` once per brand for the whole run."""
    return load_brand(name_or_path)


@lru_cache(maxsize=4096)
def cached_lint(brand: str, text: str, content_type: str, product_id: str | None):
    """``lint_text`` once per completion: four rewards read the same result."""
    return lint_text(cached_brand(brand), text, content_type, product_id)


def _lints(completions, brand, content_type, product_id) -> list:
    return [cached_lint(b, completion_text(c), t, p) for c, b, t, p in zip(completions, brand, content_type, product_id)]


def _kinds(result) -> set[str]:
    return {v.kind for v in result.violations}


def lint_reward(completions, brand, content_type, product_id, **kwargs) -> list[float]:
    """The lint score (1.0 clean, lower with every rule violation or fact error)."""
    return [result.score for result in _lints(completions, brand, content_type, product_id)]


def fact_reward(completions, brand, content_type, product_id, **kwargs) -> list[float]:
    """1.0 when the fact check against the catalog passes, minus 0.5 per factual error (floor 0)."""
    results = _lints(completions, brand, content_type, product_id)
    return [max(0.0, 1.0 - 0.5 * sum(v.kind in FACT_KINDS for v in r.violations)) for r in results]


def length_score(text: str, low: int, high: int) -> float:
    """1.0 inside [low, high]; outside, the ratio of the length to the nearest bound (0 for empty)."""
    n = copy_length(text)
    if n < low:
        return n / low
    return 1.0 if n <= high else high / n


def format_reward(completions, brand, content_type, product_id, **kwargs) -> list[float]:
    """Length within the content type's range (graded by distance), 0 when markup or tags remain."""
    scores = []
    for c, b, t, result in zip(completions, brand, content_type, _lints(completions, brand, content_type, product_id)):
        low, high = cached_brand(b).content_type(t).length
        scores.append(0.0 if MARKUP_KIND in _kinds(result) else length_score(completion_text(c), low, high))
    return scores


def cta_reward(completions, brand, content_type, product_id, **kwargs) -> list[float]:
    """0.0 when the type requires a call to action and lint finds none, else 1.0."""
    results = _lints(completions, brand, content_type, product_id)
    return [0.0 if CTA_KIND in _kinds(r) else 1.0 for r in results]


def reward_model_reward(prompts, completions, reward_model, **kwargs) -> list[float]:
    """The trained reward model's score of prompt + completion, squashed to (0, 1) by a sigmoid."""
    from brandcopy.modeling import load_reward_model, score_conversations

    model, tokenizer = load_reward_model(reward_model[0])
    conversations = [p + ([{"role": "assistant", "content": c}] if isinstance(c, str) else c)
                     for p, c in zip(prompts, completions)]
    return [1 / (1 + math.exp(-s)) for s in score_conversations(model, tokenizer, conversations)]


JUDGE_CONCURRENCY = 8  # judge requests in flight while scoring one batch of completions


def judge_spec(judge: LLMConfig, out_dir: str | Path) -> str:
    """The ``judge`` column: the judge's endpoint (the key variable's NAME, never the key) and the
    folder of its answers, as JSON (dataset columns hold plain values)."""
    return json.dumps({"config": dataclasses.asdict(judge), "out_dir": str(out_dir)}, ensure_ascii=False)


@lru_cache(maxsize=8)
def cached_judge_client(spec: str) -> LLMClient:
    """One judge client per ``judge_spec`` for the whole run (a missing key variable fails here)."""
    return LLMClient(LLMConfig(**json.loads(spec)["config"]))


def prompt_text(prompt) -> str:
    """The instruction of one prompt: a string, or the last message of a conversational prompt."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def judge_reward(prompts, completions, brand, content_type, product_id, judge, log_metric=None, **kwargs) -> list[float]:
    """The LLM judge's mean single-answer score (``judge.judge_single``, evaluation's rubric) mapped
    from 1-5 to [0, 1].

    ``judge`` is a column of ``judge_spec`` values (the endpoint and the answers' folder). Completions are scored
    without a reference copy (GRPO prompts have none). A failed judgement (request or parse)
    scores 0.0 and is counted: a warning with the count, and ``judge/failed`` through TRL's
    ``log_metric`` when given.
    """
    scores = [0.0] * len(completions)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, key in enumerate(zip(judge, brand)):
        groups.setdefault(key, []).append(i)
    failed = []
    for (spec, brand_name), rows in groups.items():
        items = [JudgeItem(str(i), product_id[i], content_type[i], prompt_text(prompts[i]), "",
                           {"policy": completion_text(completions[i])}) for i in rows]
        results = judge_single(cached_judge_client(spec), cached_brand(brand_name), items, ["policy"],
                               json.loads(spec)["out_dir"])
        for i, result in zip(rows, results):
            if result.scores is None:
                failed.append(result.error)
            else:
                scores[i] = (result.mean - 1) / 4
    if failed:
        logger.warning("judge reward: %d of %d judgements failed and scored 0.0 (first: %s)",
                       len(failed), len(completions), failed[0])
    if log_metric is not None:
        log_metric("judge/failed", len(failed) / len(completions))
    return scores


# Config name (``grpo_reward_weights`` keys) -> reward function.
REWARD_FUNCTIONS = {
    "lint": lint_reward,
    "fact": fact_reward,
    "format": format_reward,
    "cta": cta_reward,
    "reward_model": reward_model_reward,
    "judge": judge_reward,
}
