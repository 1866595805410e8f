"""LLM-as-judge: Chinese rubrics per family, single-answer scores and a blind best-of-3 free of position bias.

Two kinds of judgement, both through ``brandcopy.llm`` (any OpenAI-compatible endpoint, cached,
retried, resumable):

- Single answer: one copy scored 1-5 on five dimensions (brand tone, accuracy against the
  product's facts, structure for the type, persuasion / CTA, instruction following), with the
  product facts and, for model outputs, the golden copy as reference.
- Best of 3: golden, a fine-tuned model and the base model, shown blind under random labels in a
  random order, and judged again in a rotated order (every candidate moves). Verdicts that
  disagree become ties, as MT-Bench does with swapped pairs, so a judge that always picks the
  first position produces ties rather than wins.

The judge runs at temperature 0 and must answer strict JSON; answers are parsed leniently (code
fences, text around the object, full-width punctuation). An answer that still cannot be parsed,
or a request that failed, is counted as a failure and reported, never scored as 0.
"""

import hashlib
import json
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from brandcopy.llm import LLMClient, LLMConfig, Request, read_jsonl_records, run_requests
from brandcopy.prompts import product_facts

DIMENSIONS = ("tone", "accuracy", "structure", "persuasion", "instruction")
DIMENSION_NAMES = {
    "tone": "品牌调性",
    "accuracy": "事实准确",
    "structure": "结构完整",
    "persuasion": "说服力与行动号召",
    "instruction": "指令遵循",
}
# What each dimension means for each family; the content type's own structure and length are
# added to the prompt from content_types.yaml, and the fact words ({fact_scope}, {material},
# {claim}, {composition}) come from the brand's wording (brand.yaml).
FAMILY_RUBRICS = {
    "social": {
        "tone": "像品牌人设本人在分享：真诚、克制、有温度；遵守品牌语气规则，不用禁用词、不用绝对化用语。",
        "accuracy": "{fact_scope}与产品资料完全一致；不编造资料里没有的{material}、数字或{claim}。",
        "structure": "按该内容类型的结构展开，段落清楚，篇幅在规定字数内；像一篇真实的社交媒体笔记，而不是说明书。",
        "persuasion": "有真实场景、细节或故事让读者信服，有自然的互动或收藏引导，不生硬推销、不制造焦虑。",
        "instruction": "写的是指定产品、指定内容类型，满足指令中的全部要求。",
    },
    "ecommerce": {
        "tone": "专业可信、条理清楚，符合品牌语气规则；不用禁用词、不用绝对化用语。",
        "accuracy": "{fact_scope}以及规格、价格与产品资料完全一致；不编造任何信息。",
        "structure": "按该内容类型的结构完整覆盖卖点、{composition}、使用方法、适用人群与注意事项，篇幅在规定字数内。",
        "persuasion": "卖点清楚、场景具体，给出充分的购买理由，并有明确的购买引导。",
        "instruction": "写的是指定产品、指定内容类型，满足指令中的全部要求。",
    },
    "paid_ad": {
        "tone": "短促有力但不夸张，符合品牌语气规则；不用禁用词、不用绝对化用语、不滥用感叹号。",
        "accuracy": "广告中出现的{fact_scope}都能在产品资料中找到依据；不做资料不支持的承诺。",
        "structure": "严格遵循该广告框架（如痛点-放大-解决、特性-优势-利益、前后对比）的顺序，篇幅在规定字数内。",
        "persuasion": "开头抓人、利益点明确，结尾有清晰、具体的行动号召（CTA）；缺少 CTA 最高只能得 2 分。",
        "instruction": "写的是指定产品、指定广告类型，满足指令中的全部要求。",
    },
}
LABEL_POOL = "ABCDEFGHJKMNPQRSTUVWXYZ"
FULL_WIDTH = str.maketrans({"｛": "{", "｝": "}", "：": ":", "，": ",", "“": '"', "”": '"', "＂": '"', "［": "[", "］": "]"})
JUDGE_PARAMS = {"temperature": 0.0, "max_tokens": 512}
SYSTEM_PROMPT = "你是一位严格、公正的品牌文案评审专家。你只依据给定的评分标准和产品资料评审，只输出一个 JSON 对象，不输出任何其他内容。"


class JudgeParseError(ValueError):
    """A judge answer that is not the JSON the prompt asked for."""


@dataclass
class JudgeItem:
    """One val prompt and every copy written for it.

    Attributes:
        key: Unique id of the prompt (the golden record's id).
        product_id: Catalog id of the product.
        content_type: Content type key.
        instruction: The user instruction the models answered.
        golden: The golden copy.
        outputs: Model name -> generated copy (e.g. ``{"base": ..., "sft": ...}``).
    """

    key: str
    product_id: str
    content_type: str
    instruction: str
    golden: str
    outputs: dict[str, str] = field(default_factory=dict)

    def text(self, name: str) -> str:
        """The copy of ``name``: ``golden`` or a model name."""
        return self.golden if name == "golden" else self.outputs[name]


@dataclass
class SingleScore:
    """Single-answer judgement of one copy. ``scores`` is None when the judgement failed (``error``)."""

    key: str
    content_type: str
    candidate: str
    scores: dict[str, int] | None
    error: str | None = None

    @property
    def mean(self) -> float:
        """Mean over the five dimensions."""
        return sum(self.scores.values()) / len(self.scores)


@dataclass
class BestOfVerdict:
    """Blind best-of-3 judged in two orders.

    Attributes:
        key: Prompt id.
        content_type: Content type key.
        model: The fine-tuned model compared with golden and base.
        orders: Candidate names in the order shown, per round.
        winners: Winning candidate per round; None where that round failed.
        errors: Failure reason per round (None where it parsed).
    """

    key: str
    content_type: str
    model: str
    orders: list[list[str]]
    winners: list[str | None]
    errors: list[str | None]

    @property
    def verdict(self) -> str:
        """The winner when both rounds agree, ``tie`` when they disagree, ``failed`` when one failed."""
        if None in self.winners:
            return "failed"
        return self.winners[0] if self.winners[0] == self.winners[1] else "tie"


# --- prompts -------------------------------------------------------------------------------------


def fact_sheet(product) -> str:
    """The judge's reference facts: product id and name, then the catalog facts of ``prompts.product_facts``."""
    return f"产品编号：{product.id}\n产品名称：{product.name}\n{product_facts(product)}"


def _fact_words(brand) -> dict[str, str]:
    """The brand's words for the rubric's fact placeholders."""
    return {"fact_scope": brand.wording.fact_scope, "material": brand.composition.material_word,
            "claim": brand.wording.claim_word, "composition": brand.composition.label}


def _rubric(brand, content_type: str) -> str:
    """Brand rules, the content type's spec and the family's five dimensions."""
    spec = brand.content_type(content_type)
    low, high = spec.length
    dims = "\n".join(
        f"- {key}（{DIMENSION_NAMES[key]}）：{text.format(**_fact_words(brand))}" for key, text in FAMILY_RUBRICS[spec.family].items()
    )
    structure = "；".join(spec.structure)
    return (
        f"品牌：{brand.name}。品牌人设：{brand.persona}\n"
        f"品牌语气规则：{'；'.join(brand.tone_rules)}\n"
        f"禁用词：{'、'.join(brand.banned_words)}\n"
        f"内容类型：{content_type}（{spec.name_zh}），目的：{spec.purpose}\n"
        f"结构要求：{structure}\n"
        f"篇幅：{low}–{high} 字（不含空白）；{'必须有行动号召（CTA）' if spec.cta_required else '不强制行动号召'}\n"
        f"评分维度：\n{dims}"
    )


def single_messages(brand, item: JudgeItem, candidate: str) -> list[dict]:
    """Messages asking for 1-5 scores of one copy; model outputs get the golden copy as reference.

    The golden copy itself is scored without a reference (it would be compared with itself), and
    so is any copy of an item with an empty ``golden`` (GRPO prompts have no golden copy).
    """
    reference = "" if candidate == "golden" or not item.golden else f"【参考文案（人工撰写的标准答案）】\n{item.golden}\n【参考文案结束】\n\n"
    keys = ", ".join(f'"{key}": 1-5 的整数' for key in DIMENSIONS)
    user = (
        f"{_rubric(brand, item.content_type)}\n\n"
        f"【产品资料】\n{fact_sheet(brand.product(item.product_id))}\n【产品资料结束】\n\n"
        f"【写作指令】\n{item.instruction}\n【写作指令结束】\n\n"
        f"{reference}"
        f"【待评文案】\n{item.text(candidate)}\n【待评文案结束】\n\n"
        "请按评分维度逐项给待评文案打分：5 分优秀，4 分良好，3 分合格，2 分较差，1 分很差。"
        "事实与产品资料不符的，事实准确最高 2 分。\n"
        f'只输出一个 JSON 对象：{{{keys}, "reason": "一句话理由"}}'
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def best_of_messages(brand, item: JudgeItem, shown: list[tuple[str, str]]) -> list[dict]:
    """Messages asking which of the shown ``(label, text)`` copies is best, blind (no names, no reference)."""
    blocks = "\n\n".join(f"【候选 {label}】\n{text}\n【候选 {label} 结束】" for label, text in shown)
    labels = "、".join(label for label, _ in shown)
    user = (
        f"{_rubric(brand, item.content_type)}\n\n"
        f"【产品资料】\n{fact_sheet(brand.product(item.product_id))}\n【产品资料结束】\n\n"
        f"【写作指令】\n{item.instruction}\n【写作指令结束】\n\n"
        f"{blocks}\n\n"
        f"请综合全部评分维度，从候选 {labels} 中选出最好的一篇。候选的顺序和标签是随机的，与质量无关；"
        "不要因为位置或篇幅偏向任何一篇。\n"
        f'只输出一个 JSON 对象：{{"best": "{shown[0][0]}", "reason": "一句话理由"}}，其中 best 是 {labels} 之一。'
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def best_of_layouts(key: str, names: list[str], seed: int) -> list[list[tuple[str, str]]]:
    """Two presentations of the same candidates: a random order and its rotation by one.

    Labels are drawn at random for each round, so neither a position nor a label can carry a
    preference from one round to the other. Deterministic in (seed, key), so reruns hit the cache.

    Returns:
        Two lists of ``(label, candidate name)`` in the order shown.
    """
    rng = random.Random(f"{seed}:{key}")
    order = rng.sample(names, len(names))
    rounds = []
    for shown in (order, order[1:] + order[:1]):
        labels = rng.sample(LABEL_POOL, len(shown))
        rounds.append(list(zip(labels, shown)))
    return rounds


# --- parsing -------------------------------------------------------------------------------------


def parse_json_object(text: str) -> dict:
    """The first JSON object in a judge answer, tolerating code fences, text around it and
    full-width punctuation (tried only when the plain text does not parse).

    Raises:
        JudgeParseError: No JSON object in the text.
    """
    decoder = json.JSONDecoder()
    for candidate in (text, text.translate(FULL_WIDTH)):
        start = candidate.find("{")
        while start != -1:
            try:
                value, _ = decoder.raw_decode(candidate, start)
            except json.JSONDecodeError:
                start = candidate.find("{", start + 1)
                continue
            if isinstance(value, dict):
                return value
            start = candidate.find("{", start + 1)
    raise JudgeParseError(f"no JSON object in the answer: {text[:200]!r}")


def _score(value, key: str) -> int:
    """A 1-5 integer score from an int, an integral float or a digit string."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 5:
        raise JudgeParseError(f"{key}: expected an integer 1-5, got {value!r}")
    return value


def parse_scores(text: str) -> dict[str, int]:
    """The five dimension scores of a single-answer judgement.

    Raises:
        JudgeParseError: No JSON object, a missing dimension, or a score outside 1-5.
    """
    data = parse_json_object(text)
    missing = [key for key in DIMENSIONS if key not in data]
    if missing:
        raise JudgeParseError(f"missing score(s) {missing} in {data}")
    return {key: _score(data[key], key) for key in DIMENSIONS}


def parse_best(text: str, labels: list[str]) -> str:
    """The label a best-of answer picked (``"B"``, ``"候选B"``, ``"[b]"`` all read as ``B``).

    Raises:
        JudgeParseError: No JSON object, no ``best`` field, or a label that was not shown.
    """
    data = parse_json_object(text)
    if "best" not in data:
        raise JudgeParseError(f"field 'best' missing in {data}")
    label = re.sub(r"[\s\[\]()（）【】\"'“”]|候选|文案", "", str(data["best"])).upper()
    if label not in labels:
        raise JudgeParseError(f"best={data['best']!r} is not one of the shown labels {labels}")
    return label


# --- running -------------------------------------------------------------------------------------


def judge_config(model: str, base_url: str, api_key_env: str | None, concurrency: int, cache_dir: str) -> LLMConfig:
    """The judge's client config: deterministic (temperature 0) with the judge's answer budget.

    Args:
        model: Judge model name.
        base_url: OpenAI-compatible endpoint.
        api_key_env: NAME of the key's environment variable; None for a local server.
        concurrency: Requests in flight.
        cache_dir: On-disk answer cache.
    """
    return LLMConfig(model, base_url, api_key_env, concurrency=concurrency, cache_dir=cache_dir,
                     temperature=JUDGE_PARAMS["temperature"], max_tokens=JUDGE_PARAMS["max_tokens"])


def _key(kind: str, item_key: str, name: str, model: str, messages: list[dict]) -> str:
    """Request key; its hash changes with the judge model and the prompt (new generations), so a
    rerun never reuses another judge's or a stale answer from the resumable results file."""
    blob = json.dumps([model, messages], ensure_ascii=False).encode("utf-8")
    digest = hashlib.sha256(blob).hexdigest()[:16]
    return f"{kind}:{item_key}:{name}:{digest}"


def _answers(client: LLMClient, requests: list[Request], out_dir: Path, name: str) -> tuple[dict, dict]:
    """Run requests (resumable) and return ``(answers by key, failure reasons by key)``."""
    out_path, failures_path = out_dir / f"{name}.jsonl", out_dir / f"{name}_failures.jsonl"
    run_requests(client, requests, out_path, failures_path, desc=f"judge {name}")
    wanted = {request.key for request in requests}
    answers = {r["key"]: r["text"] for r in read_jsonl_records(out_path) if r["key"] in wanted}
    failures = {r["key"]: r["reason"] for r in read_jsonl_records(failures_path) if r["key"] in wanted}
    return answers, failures


def _parsed(key: str, answers: dict, failures: dict, parse):
    """``(value, None)`` for a parsed answer, ``(None, reason)`` for a failed request or parse."""
    if key not in answers:
        return None, f"request failed: {failures.get(key, 'no answer')}"
    try:
        return parse(answers[key]), None
    except JudgeParseError as err:
        return None, f"unparseable answer: {err}"


def judge_single(
    client: LLMClient, brand, items: list[JudgeItem], candidates: list[str], out_dir: str | Path
) -> list[SingleScore]:
    """Score every candidate's copy of every item on the five dimensions.

    Args:
        client: Judge client (its config's endpoint and model; temperature 0 is forced).
        brand: The loaded brand.
        items: Prompts with their copies.
        candidates: ``golden`` and/or model names present in ``item.outputs``.
        out_dir: Folder for ``single.jsonl`` / ``single_failures.jsonl`` (resumable).

    Returns:
        One ``SingleScore`` per (item, candidate); failures have ``scores=None`` and an ``error``.
    """
    jobs = []
    for item in items:
        for name in candidates:
            messages = single_messages(brand, item, name)
            key = _key("single", item.key, name, client.config.model, messages)
            jobs.append((item, name, Request(key, messages, dict(JUDGE_PARAMS))))
    answers, failures = _answers(client, [job[2] for job in jobs], Path(out_dir), "single")
    results = []
    for item, name, request in jobs:
        scores, error = _parsed(request.key, answers, failures, parse_scores)
        results.append(SingleScore(item.key, item.content_type, name, scores, error))
    return results


def judge_best_of(
    client: LLMClient, brand, items: list[JudgeItem], model: str, out_dir: str | Path, seed: int = 0, base: str = "base"
) -> list[BestOfVerdict]:
    """Blind best-of-3 (golden / ``model`` / ``base``), each judged in two orders.

    Args:
        client: Judge client.
        brand: The loaded brand.
        items: Prompts whose ``outputs`` hold ``model`` and ``base``.
        model: The fine-tuned model's name.
        out_dir: Folder for ``best_of.jsonl`` / ``best_of_failures.jsonl`` (resumable).
        seed: Seed of the random orders and labels.
        base: Name of the base model's outputs.

    Returns:
        One ``BestOfVerdict`` per item.
    """
    jobs = []
    for item in items:
        layouts = best_of_layouts(f"{item.key}:{model}", ["golden", model, base], seed)
        requests = []
        for number, shown in enumerate(layouts):
            messages = best_of_messages(brand, item, [(label, item.text(name)) for label, name in shown])
            key = _key(f"best{number}", item.key, model, client.config.model, messages)
            requests.append(Request(key, messages, dict(JUDGE_PARAMS)))
        jobs.append((item, layouts, requests))
    answers, failures = _answers(client, [r for job in jobs for r in job[2]], Path(out_dir), "best_of")
    results = []
    for item, layouts, requests in jobs:
        winners, errors = [], []
        for shown, request in zip(layouts, requests):
            labels = [label for label, _ in shown]
            label, error = _parsed(request.key, answers, failures, lambda text: parse_best(text, labels))
            winners.append(dict(shown)[label] if label else None)
            errors.append(error)
        orders = [[name for _, name in shown] for shown in layouts]
        results.append(BestOfVerdict(item.key, item.content_type, model, orders, winners, errors))
    return results


# --- summaries -----------------------------------------------------------------------------------


def position_bias(verdicts: list[BestOfVerdict]) -> dict[str, float | int]:
    """How often the first position won, per round, and how often the two rounds agreed.

    An unbiased judge picks the first position about 1/3 of the time in both rounds; a judge that
    always picks it wins it 100% of the time and never agrees with itself (every verdict a tie).

    Returns:
        ``first_won_original``, ``first_won_swapped`` (fractions of parsed rounds),
        ``agreement`` (fraction of verdicts with both rounds parsed that agreed), ``ties``,
        ``failed`` and ``n``.
    """
    rates = []
    for number in (0, 1):
        parsed = [v for v in verdicts if v.winners[number] is not None]
        first = sum(v.winners[number] == v.orders[number][0] for v in parsed)
        rates.append(first / len(parsed) if parsed else float("nan"))
    complete = [v for v in verdicts if v.verdict != "failed"]
    return {
        "first_won_original": rates[0],
        "first_won_swapped": rates[1],
        "agreement": sum(v.verdict != "tie" for v in complete) / len(complete) if complete else float("nan"),
        "ties": sum(v.verdict == "tie" for v in verdicts),
        "failed": sum(v.verdict == "failed" for v in verdicts),
        "n": len(verdicts),
    }


def mean_scores(scores: list[SingleScore]) -> dict[str, dict[str, float]]:
    """Mean single-answer score (over dimensions, then copies) per content type and candidate.

    Failed judgements are left out of the mean and counted by ``failure_counts``.

    Returns:
        ``{content_type or "overall": {candidate: mean}}``; a candidate without any parsed
        score in a group is absent from it.
    """
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for score in scores:
        if score.scores is not None:
            groups[score.content_type][score.candidate].append(score.mean)
            groups["overall"][score.candidate].append(score.mean)
    return {group: {name: sum(v) / len(v) for name, v in by_name.items()} for group, by_name in groups.items()}


def dimension_means(scores: list[SingleScore], content_type: str | None = None) -> dict[str, dict[str, float]]:
    """Mean score per dimension per candidate, for one content type or all (``None``)."""
    sums: dict[str, Counter] = defaultdict(Counter)
    counts: Counter = Counter()
    for score in scores:
        if score.scores is not None and content_type in (None, score.content_type):
            sums[score.candidate].update(score.scores)
            counts[score.candidate] += 1
    return {name: {dim: sums[name][dim] / counts[name] for dim in DIMENSIONS} for name in sums}


def best_counts(verdicts: list[BestOfVerdict]) -> dict[str, Counter]:
    """Verdict counts (golden / model / base / tie / failed) per content type and ``overall``."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for verdict in verdicts:
        counts[verdict.content_type][verdict.verdict] += 1
        counts["overall"][verdict.verdict] += 1
    return counts


def failure_counts(scores: list[SingleScore], verdicts: list[BestOfVerdict]) -> dict[str, int]:
    """Judge failures by kind: single-answer and best-of rounds that failed to parse or to run."""
    rounds = [error for verdict in verdicts for error in verdict.errors if error]
    singles = [score.error for score in scores if score.error]
    return {
        "single_total": len(scores),
        "single_failed": len(singles),
        "single_unparseable": sum(e.startswith("unparseable") for e in singles),
        "best_of_rounds": 2 * len(verdicts),
        "best_of_rounds_failed": len(rounds),
        "best_of_rounds_unparseable": sum(e.startswith("unparseable") for e in rounds),
    }
