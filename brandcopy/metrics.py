"""Offline metrics: no API needed.

Text metrics (empty rate, stop rate, length vs reference, distinct-1/2, ROUGE-L on Chinese),
the shared grader's results (lint score, fact-check pass rate, CTA presence for ads) and the
completion-only eval loss / perplexity. Reported per content type and overall.
"""

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from brandcopy.lint import CTA_KIND, FACT_KINDS, copy_length, lint_text

AD_FAMILY = "paid_ad"


@dataclass
class Sample:
    """One generated copy with what the metrics need.

    Attributes:
        content_type: Content type key, e.g. ``paid_ad_pas``.
        product_id: Catalog id of the product the copy is about.
        text: The generated copy.
        reference: The golden copy for the same prompt.
        stopped: Whether the model emitted the end-of-turn token before the budget ran out.
    """

    content_type: str
    product_id: str
    text: str
    reference: str
    stopped: bool


def _chars(text: str) -> list[str]:
    """Characters of a text without whitespace: ROUGE-L's and distinct-n's tokens."""
    return [ch for ch in text if not ch.isspace()]


def tokens(text: str, unit: str = "char") -> list[str]:
    """Split Chinese copy into characters (``char``) or jieba words (``word``), whitespace dropped."""
    if unit == "char":
        return _chars(text)
    if unit == "word":
        import jieba  # imported lazily: loading its dictionary takes a second

        return [word for word in jieba.lcut(text) if word.strip()]
    raise ValueError(f"unit must be 'char' or 'word', got {unit!r}")


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, bit-parallel (Hyyrö 2004), O(len(a) * len(b) / 64).

    Bit i of ``v`` is 0 once position i of ``a`` is part of the LCS of ``a`` and the prefix of
    ``b`` seen so far; the LCS length is the number of zero bits.
    """
    masks: dict[str, int] = {}
    for i, item in enumerate(a):
        masks[item] = masks.get(item, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for item in b:
        u = v & masks.get(item, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l(candidate: str, reference: str, unit: str = "char") -> float:
    """ROUGE-L F1 between two texts on characters or jieba words; 0.0 when either is empty."""
    cand, ref = tokens(candidate, unit), tokens(reference, unit)
    lcs = lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n over a set of texts: unique character n-grams / all character n-grams (0.0 if none)."""
    grams = [tuple(chars[i : i + n]) for chars in map(_chars, texts) for i in range(len(chars) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _group_metrics(brand, samples: list[Sample], unit: str) -> dict[str, float]:
    """All text and grader metrics for one group of samples."""
    lints = [lint_text(brand, s.text, s.content_type, s.product_id) for s in samples]
    kinds = [{v.kind for v in result.violations} for result in lints]
    ads = [k for s, k in zip(samples, kinds) if brand.content_type(s.content_type).family == AD_FAMILY]
    lengths = [copy_length(s.text) for s in samples]
    ref_lengths = [copy_length(s.reference) for s in samples]
    return {
        "n": len(samples),
        "empty_rate": _mean([float(not s.text.strip()) for s in samples]),
        "stop_rate": _mean([float(s.stopped) for s in samples]),
        "length": _mean(lengths),
        "reference_length": _mean(ref_lengths),
        "length_ratio": _mean([n / r for n, r in zip(lengths, ref_lengths) if r]),
        "distinct_1": distinct_n([s.text for s in samples], 1),
        "distinct_2": distinct_n([s.text for s in samples], 2),
        "rouge_l": _mean([rouge_l(s.text, s.reference, unit) for s in samples]),
        "lint_score": _mean([result.score for result in lints]),
        "fact_pass_rate": _mean([float(not (k & FACT_KINDS)) for k in kinds]),
        "cta_rate": _mean([float(CTA_KIND not in k) for k in ads]),
    }


def offline_metrics(brand, samples: list[Sample], unit: str = "char") -> dict[str, dict[str, float]]:
    """Offline metrics per content type and ``overall``.

    Rates are fractions in [0, 1]; ``cta_rate`` covers paid ads only and is NaN for groups
    without ads; ``length_ratio`` is the mean of generated / golden length in characters.

    Args:
        brand: The loaded brand (for lint and the content types' families).
        samples: Generated copies with their references.
        unit: ROUGE-L unit, ``char`` or ``word`` (jieba).

    Returns:
        ``{content_type or "overall": {metric: value}}``.

    Raises:
        ValueError: If ``samples`` is empty.
    """
    if not samples:
        raise ValueError("no samples to score: the val split produced no generations")
    groups: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        groups[sample.content_type].append(sample)
    result = {name: _group_metrics(brand, group, unit) for name, group in sorted(groups.items())}
    result["overall"] = _group_metrics(brand, samples, unit)
    return result


def _completion_example(tokenizer, messages: list[dict]) -> tuple[list[int], int]:
    """Ids of prompt + completion + end-of-turn, and the prompt length (the part not scored).

    The completion is tokenized on its own and appended to the rendered prompt, i.e. exactly the
    sequence the model produces at generation time.
    """
    prompt_ids = tokenizer.apply_chat_template(
        messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    completion_ids = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
    return list(prompt_ids) + completion_ids + [tokenizer.eos_token_id], len(prompt_ids)


def _completion_nll(model, batch: list[tuple[list[int], int]], pad_id: int) -> tuple[list[float], list[int]]:
    """Per row of a right-padded batch: the summed negative log-likelihood of its completion tokens, and their count.

    Logits are computed only from the earliest completion position on (``logits_to_keep``) and turned into float32
    one row at a time: the prompt's logits are never scored, and over a 152k vocabulary they are most of the time
    and memory (12 rows of 1,500 tokens would be 11 GB of float32 logits). A model whose forward ignores
    ``logits_to_keep`` returns every position; the same positions are then sliced here.
    """
    width = max(len(ids) for ids, _ in batch)
    start = min(prompt_length for _, prompt_length in batch) - 1  # this position's logits predict the first scored token
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, prompt_length : len(ids)] = torch.tensor(ids[prompt_length:])
    lengths = torch.tensor([len(ids) for ids, _ in batch])
    attention = (torch.arange(width)[None, :] < lengths[:, None]).long()
    logits = model(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device),
                   logits_to_keep=width - start).logits
    logits = logits[:, -(width - start) :]  # positions start .. width-1
    targets = labels[:, start + 1 :].to(logits.device)  # the tokens positions start .. width-2 predict
    nll = [torch.nn.functional.cross_entropy(logits[row, :-1].float(), targets[row], ignore_index=-100,
                                             reduction="sum").item() for row in range(len(batch))]
    return nll, (targets != -100).sum(dim=1).tolist()


@torch.inference_mode()
def completion_loss(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8) -> dict[str, float]:
    """Eval loss and perplexity on the assistant completions only (prompt tokens are not scored).

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer (pad and eos set).
        conversations: Conversations whose last message is the reference assistant answer.
        batch_size: Sequences per forward pass.

    Returns:
        ``{"eval_loss": mean NLL per completion token, "perplexity": exp(eval_loss), "tokens": n}``.

    Raises:
        ValueError: If there are no conversations or a last message is not from the assistant.
    """
    if not conversations:
        raise ValueError("no conversations to score")
    for index, messages in enumerate(conversations):
        if messages[-1]["role"] != "assistant":
            role = messages[-1]["role"]
            raise ValueError(f"conversation {index}: last message must be the assistant's, got {role!r}")
    model.eval()
    examples = [_completion_example(tokenizer, messages) for messages in conversations]
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        nll, counts = _completion_nll(model, examples[start : start + batch_size], tokenizer.pad_token_id)
        total, count = total + sum(nll), count + sum(counts)
    loss = total / count
    return {"eval_loss": loss, "perplexity": math.exp(loss), "tokens": count}


@torch.inference_mode()
def preference_accuracy(model, tokenizer, rows: list[dict], batch_size: int = 8) -> float:
    """Share of preference pairs whose chosen answer the model finds more likely than the rejected one.

    The likelihood is the summed log-probability of the answer's tokens and its end-of-turn token
    given the prompt, the quantity DPO raises for chosen and lowers for rejected answers.

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer (pad and eos set).
        rows: Conversational preference rows (``prompt``, ``chosen``, ``rejected`` message lists).
        batch_size: Sequences per forward pass.

    Raises:
        ValueError: If there are no rows.
    """
    if not rows:
        raise ValueError("no preference pairs to score")
    model.eval()
    scores = {}
    for side in ("chosen", "rejected"):
        examples = [_completion_example(tokenizer, row["prompt"] + row[side]) for row in rows]
        scores[side] = [-nll for start in range(0, len(examples), batch_size)
                        for nll in _completion_nll(model, examples[start : start + batch_size], tokenizer.pad_token_id)[0]]
    return sum(c > r for c, r in zip(scores["chosen"], scores["rejected"])) / len(rows)
