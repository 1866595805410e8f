"""On-policy preference pairs by judge-and-improve (``brandcopy data improve``).

The synthetic pairs of ``datagen`` pair good copy with a negative made on purpose. These pairs
go the other way: a finished stage (``sft`` by default) writes k samples per train prompt, each
sample is graded by lint + the fact check and by an LLM judge in one request (a verdict, the
reasons and an improved text, in JSON), and a sample that lint or the judge finds wanting becomes
``rejected`` with the judge's improved text as ``chosen``. Because the rejected side is what the
policy itself writes, DPO learns from the mistakes it actually makes (on-policy data).

- The improved text must pass lint and the fact check; a rejected one goes back to the judge with
  the problems listed (the repair loop of generation), then to the failures file with its reason.
- An answer that is not the JSON asked for is repaired the same way and counted as unparseable
  when it never parses.
- A pair whose two sides are nearly the same (character ROUGE-L above ``max_similarity``) teaches
  almost nothing and is dropped and counted.

Layout under the data folder (every step resumable, every LLM answer cached by ``llm.py``)::

    improve/samples.jsonl                           the policy's samples (appended per batch)
    improve/judged.jsonl, improve/judged.failures.jsonl   judge answers (run_requests)
    onpolicy_<split>.jsonl                          pair records with verdict, reasons, similarity
    preference_onpolicy_<split>.jsonl               TRL conversational pairs, ``source: onpolicy``
    llamafactory/dpo_onpolicy_<split>.jsonl         LLaMA-Factory pairs (+ dataset_info.json entry)
"""

import gc
import hashlib
import json
import logging
import re
import random
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from brandcopy import prompts
from brandcopy.datagen import ONPOLICY_PREFIX, dataset_info
from brandcopy.files import atomic_write_jsonl, atomic_write_text
from brandcopy.generation import GenerationParams, generate_batch
from brandcopy.judge import SYSTEM_PROMPT, JudgeParseError, _rubric, fact_sheet, parse_json_object
from brandcopy.lint import lint_text
from brandcopy.llm import JsonlAppender, LLMClient, LLMConfig, Request, RunSummary, read_jsonl_records, run_requests
from brandcopy.metrics import rouge_l

logger = logging.getLogger(__name__)

IMPROVE_TASK = "评审并改进"  # first line of every improve prompt (mockserver's scripted judge keys on it)
VERDICTS = ("good", "bad")
IMPROVE_PARAMS = {"temperature": 0.0, "max_tokens": 2048}  # deterministic; room for a full long-form copy
SAMPLE_PARAMS = GenerationParams("onpolicy", max_new_tokens=768, do_sample=True, temperature=1.0, top_p=0.95, seed=0)
CANDIDATE_BLOCK = re.compile(r"【待评文案】\n(.*?)\n【待评文案结束】", re.S)
HEADER = re.compile(rf"任务：{IMPROVE_TASK}\n产品编号：(\S+)\n文案类型：(\S+)")


@dataclass
class Judgement:
    """A parsed judge answer: ``verdict`` good or bad, ``reasons``, and ``improved`` (empty when good)."""

    verdict: str
    reasons: list[str]
    improved: str


# --- prompts -------------------------------------------------------------------------------------


def policy_prompts(brand, split: str = "train", content_types=None, max_prompts: int = 0) -> list[tuple[str, str]]:
    """(product id, content type) of every prompt of a split, in order; when ``max_prompts`` is positive, that many
    drawn at random (a fixed draw, kept in order) so that they cover products and content types alike: a prefix would
    sample the first products only, an even stride can land on one content type."""
    pairs = [(pid, ct) for pid in brand.split()[split] for ct in content_types or brand.content_types]
    if max_prompts <= 0 or max_prompts >= len(pairs):
        return pairs
    return [pairs[i] for i in sorted(random.Random(0).sample(range(len(pairs)), max_prompts))]


def improve_messages(brand, product_id: str, content_type: str, text: str, problems: list[str]) -> list[dict]:
    """One judge request: verdict, reasons and an improved text, in JSON.

    Args:
        brand: A loaded Brand.
        product_id: Product the copy is about.
        content_type: Its content type.
        text: The copy the policy wrote.
        problems: Lint and fact-check findings on it (one line each); the judge must fix them.

    Returns:
        System and user messages.
    """
    found = "\n".join(f"- {p}" for p in problems) if problems else "- 规则检查未发现问题"
    user = (
        f"任务：{IMPROVE_TASK}\n产品编号：{product_id}\n文案类型：{content_type}\n"
        f"{_rubric(brand, content_type)}\n\n"
        f"【产品资料】\n{fact_sheet(brand.product(product_id))}\n【产品资料结束】\n\n"
        f"【写作指令】\n{prompts.build_instruction(brand, product_id, content_type)}\n【写作指令结束】\n\n"
        f"【规则检查结果】\n{found}\n【规则检查结果结束】\n\n"
        f"【待评文案】\n{text}\n【待评文案结束】\n\n"
        "请按评分维度审读待评文案。规则检查发现问题，或任一维度低于良好，判为 bad；否则判为 good。"
        "判为 bad 时，请在原文基础上写出改进后的完整文案：修正全部问题，只用产品资料中的成分、浓度和功效，"
        "不用禁用词、绝对化用语和感叹号堆叠，符合篇幅与结构要求；原文可取之处尽量保留。\n"
        '只输出一个 JSON 对象：{"verdict": "good 或 bad", "reasons": ["理由一", "理由二"], '
        '"improved": "改进后的完整文案；判为 good 时为空字符串"}'
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def repair_messages(messages: list[dict], answer: str, problem: str) -> list[dict]:
    """The judge conversation plus its answer and the problems to fix (unparseable JSON or a failing text)."""
    ask = (
        f"任务：{prompts.REPAIR}\n你的回答有以下问题：\n{problem}\n"
        "请逐条修正后重新回答，仍然只输出一个 JSON 对象（verdict、reasons、improved 三个字段）。"
    )
    return messages + [{"role": "assistant", "content": answer}, {"role": "user", "content": ask}]


# --- parsing and checks --------------------------------------------------------------------------


def parse_judgement(text: str) -> Judgement:
    """The verdict, reasons and improved text of an answer (code fences, text around, full-width tolerated).

    Raises:
        JudgeParseError: No JSON object, a verdict other than good/bad, or a bad verdict without text.
    """
    data = parse_json_object(text)
    verdict = str(data.get("verdict", "")).strip().lower()
    if verdict not in VERDICTS:
        raise JudgeParseError(f"verdict must be good or bad, got {data.get('verdict')!r}")
    reasons = data.get("reasons", [])
    reasons = [str(r) for r in reasons] if isinstance(reasons, list) else [str(reasons)]
    improved = str(data.get("improved") or "").strip()
    if verdict == "bad" and not improved:
        raise JudgeParseError("verdict is bad but 'improved' is empty")
    return Judgement(verdict, reasons, improved)


def lint_problems(brand, text: str, content_type: str, product_id: str) -> list[str]:
    """One readable line per lint or fact-check violation."""
    found = [f"{v.kind}：{v.message}（「{v.text}」）" for v in lint_text(brand, text, content_type, product_id).violations]
    return list(dict.fromkeys(found))


def _validator(brand):
    """Accept an answer that parses and, when the sample needs improving, whose improved text passes lint."""

    def validate(request: Request, text: str) -> str | None:
        meta = request.meta
        try:
            judgement = parse_judgement(text)
        except JudgeParseError as err:
            return f"unparseable: {err}"
        if judgement.verdict == "good" and meta["problems"]:
            return "规则检查发现了问题，verdict 应为 bad，并给出改进后的文案：\n" + "\n".join(meta["problems"])
        if judgement.verdict == "bad":
            problems = lint_problems(brand, judgement.improved, meta["content_type"], meta["product_id"])
            if problems:
                return "改进后的文案仍有问题：\n" + "\n".join(problems)
        return None

    return validate


def _repair(request: Request, text: str, problem: str) -> list[dict]:
    return repair_messages(request.messages, text, problem)


# --- steps ---------------------------------------------------------------------------------------


def sample_policy(model, tokenizer, brand, pairs: list[tuple[str, str]], out_path: str | Path, k: int = 2,
                  params: GenerationParams = SAMPLE_PARAMS, batch_size: int = 8, policy: str = "") -> list[dict]:
    """k samples per prompt from the policy, appended to ``out_path`` batch by batch (resumable).

    Args:
        model: The policy (a finished stage), on its device.
        tokenizer: Its tokenizer, EOS/pad fixed.
        brand: A loaded Brand.
        pairs: (product id, content type) prompts.
        out_path: JSONL of samples; keys already there are not generated again.
        k: Samples per prompt.
        params: Decoding parameters (sampled, so the k samples differ).
        batch_size: Prompts per ``generate`` call.
        policy: Identifies the policy in the keys (``policy_id``), so a retrained stage samples anew.

    Returns:
        Every sample of ``pairs`` (``key``, ``product_id``, ``content_type``, ``text``, ``stopped``), in order.
    """
    wanted = [(f"{policy}:{pid}/{ct}/{i}", pid, ct) for pid, ct in pairs for i in range(k)]
    done = {r["key"]: r for r in read_jsonl_records(out_path)}
    todo = [job for job in wanted if job[0] not in done]
    appender = JsonlAppender(out_path)
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            messages = [prompts.chat_messages(brand, pid, ct) for _, pid, ct in chunk]
            batch_params = replace(params, seed=params.seed + start)  # new draws per batch
            for (key, pid, ct), gen in zip(chunk, generate_batch(model, tokenizer, messages, batch_params, batch_size)):
                record = {"key": key, "product_id": pid, "content_type": ct, "text": gen.text, "stopped": gen.stopped}
                appender.write(record)
                done[key] = record
    finally:
        appender.close()
    return [done[key] for key, _, _ in wanted]


def policy_id(stage_dir: str | Path) -> str:
    """A short hash of a finished stage's manifest: changes whenever the stage is trained again."""
    return hashlib.sha256((Path(stage_dir) / "manifest.json").read_bytes()).hexdigest()[:12]


def _request_key(sample: dict, model: str, messages: list[dict]) -> str:
    """Keyed by sample and a hash of the judge model and the prompt (the sample's text and lint findings), so a
    new sample, judge or prompt never reuses an old answer from the resumable results file."""
    digest = hashlib.sha256(json.dumps([model, messages], ensure_ascii=False).encode("utf-8")).hexdigest()[:12]
    return f"{sample['key']}:{digest}"


def judge_requests(brand, samples: list[dict], model: str) -> list[Request]:
    """One improve request per sample, with its lint findings in the prompt and the meta."""
    requests = []
    for s in samples:
        problems = lint_problems(brand, s["text"], s["content_type"], s["product_id"])
        meta = {"sample": s["key"], "product_id": s["product_id"], "content_type": s["content_type"],
                "text": s["text"], "problems": problems}
        messages = improve_messages(brand, s["product_id"], s["content_type"], s["text"], problems)
        requests.append(Request(_request_key(s, model, messages), messages, dict(IMPROVE_PARAMS), meta))
    return requests


def build_pairs(judged: list[dict], max_similarity: float) -> tuple[list[dict], Counter]:
    """Pair records from judge results, dropping good samples and near-identical pairs.

    Args:
        judged: ``run_requests`` result records (``text`` the judge answer, ``meta`` the sample).
        max_similarity: Largest character ROUGE-L F1 between chosen and rejected that is kept.

    Returns:
        Pair records (``id``, ``product_id``, ``content_type``, ``source``, ``chosen``, ``rejected``,
        ``verdict``, ``reasons``, ``lint``, ``rouge_l``) and counts (``judged_good``, ``too_similar``, ``pairs``).
    """
    pairs, counts = [], Counter()
    for record in sorted(judged, key=lambda r: r["key"]):
        meta, judgement = record["meta"], parse_judgement(record["text"])
        if judgement.verdict == "good" and not meta["problems"]:
            counts["judged_good"] += 1
            continue
        similarity = rouge_l(judgement.improved, meta["text"])
        if similarity > max_similarity:
            counts["too_similar"] += 1
            continue
        pairs.append({"id": meta["sample"], "product_id": meta["product_id"], "content_type": meta["content_type"],
                      "source": "onpolicy", "chosen": judgement.improved, "rejected": meta["text"],
                      "verdict": judgement.verdict, "reasons": judgement.reasons, "lint": meta["problems"],
                      "rouge_l": round(similarity, 4)})
        counts["pairs"] += 1
    return pairs, counts


def failure_counts(failures: list[dict]) -> Counter:
    """Judge failures by kind: ``unparseable`` (never valid JSON), ``improved_failed_lint``, ``request_failed``."""
    counts = Counter()
    for record in failures:
        reason = record["reason"]
        kind = "unparseable" if ": unparseable" in reason else "improved_failed_lint" if reason.startswith("rejected") else "request_failed"
        counts[kind] += 1
    return counts


def write_pairs(brand, pairs: list[dict], data_dir: Path, split: str) -> dict[str, Path]:
    """``onpolicy_<split>.jsonl``, TRL ``preference_onpolicy_<split>.jsonl`` and LLaMA-Factory ``dpo_onpolicy_<split>.jsonl``."""
    trl_rows, lf_rows = [], []
    for p in pairs:
        prompt = prompts.chat_messages(brand, p["product_id"], p["content_type"])
        trl_rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": p["chosen"]}],
                         "rejected": [{"role": "assistant", "content": p["rejected"]}], "source": "onpolicy"})
        lf_rows.append({"instruction": prompt[1]["content"], "input": "", "system": prompt[0]["content"],
                        "chosen": p["chosen"], "rejected": p["rejected"], "source": "onpolicy"})
    paths = {"onpolicy": data_dir / f"onpolicy_{split}.jsonl",
             "preference_onpolicy": data_dir / f"preference_onpolicy_{split}.jsonl",
             "llamafactory": data_dir / "llamafactory" / f"{ONPOLICY_PREFIX}{split}.jsonl"}
    atomic_write_jsonl(paths["onpolicy"], pairs)
    atomic_write_jsonl(paths["preference_onpolicy"], trl_rows)
    atomic_write_jsonl(paths["llamafactory"], lf_rows)
    paths["dataset_info"] = _add_dataset_info(data_dir / "llamafactory" / "dataset_info.json", f"{ONPOLICY_PREFIX}{split}")
    return paths


def _add_dataset_info(path: Path, name: str) -> Path:
    """Adds the on-policy file to LLaMA-Factory's dataset_info.json, keeping the entries ``export`` wrote."""
    info = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return atomic_write_text(path, json.dumps(info | dataset_info([name]), ensure_ascii=False, indent=2) + "\n")


@dataclass
class ImproveReport:
    """What ``improve`` did: counts of samples, judgements, failures and pairs, and the judge run."""

    samples: int
    counts: dict
    llm: RunSummary
    files: dict[str, Path]

    def __str__(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        return f"{self.samples} samples judged; {counts}; judge: {self.llm.produced} answered, {self.llm.skipped} reused"


def improve(client: LLMClient, brand, samples: list[dict], data_dir: str | Path, split: str = "train",
            max_similarity: float = 0.8, max_repairs: int = 2) -> ImproveReport:
    """Judge every sample, keep improved texts that pass lint as ``chosen``, write the pair files.

    Args:
        client: The judge's client (any OpenAI-compatible endpoint; cached, resumable).
        brand: A loaded Brand.
        samples: The policy's samples (``sample_policy``).
        data_dir: The run's data folder.
        split: Split name of the files written.
        max_similarity: Pairs whose character ROUGE-L F1 exceeds it are dropped and counted.
        max_repairs: Repair rounds before an answer goes to the failures file.

    Returns:
        The counts (``judged_good``, ``too_similar``, ``pairs``, ``unparseable``,
        ``improved_failed_lint``, ``request_failed``), the judge run summary and the files written.
    """
    data_dir = Path(data_dir)
    requests = judge_requests(brand, samples, client.config.model)
    out, failures = data_dir / "improve" / "judged.jsonl", data_dir / "improve" / "judged.failures.jsonl"
    summary = run_requests(client, requests, out, failures, validate=_validator(brand), repair=_repair,
                           max_repairs=max_repairs, desc="improve")
    wanted = {r.key for r in requests}
    judged = [r for r in read_jsonl_records(out) if r["key"] in wanted]
    pairs, counts = build_pairs(judged, max_similarity)
    counts.update(failure_counts([r for r in read_jsonl_records(failures) if r["key"] in wanted]))
    files = write_pairs(brand, pairs, data_dir, split)
    report = ImproveReport(len(samples), dict(counts), summary, files)
    logger.info("improve: %s", report)
    return report


# --- the command ---------------------------------------------------------------------------------


def run_improve(cfg, llm_config: LLMConfig, stage: str = "sft", k: int = 2, split: str = "train", content_types=None,
                max_prompts: int = 0, params: GenerationParams = SAMPLE_PARAMS, max_similarity: float = 0.8,
                max_repairs: int = 2) -> ImproveReport:
    """``brandcopy data improve``: sample from a finished stage, free it, judge and improve, write pairs.

    Args:
        cfg: An ``EvalStageConfig`` (run, brand, base model, backend, ``eval_batch_size``).
        llm_config: The judge's endpoint.
        stage: Finished stage whose adapter (or merged model) samples.
        k: Samples per prompt.
        split: Products whose prompts are sampled.
        content_types: Content type ids; default all.
        max_prompts: Prompts sampled, spread evenly over products and content types (0: all).
        params: Sampling parameters.
        max_similarity: ROUGE-L threshold above which a pair is dropped.
        max_repairs: Repair rounds of the judge's answer.

    Raises:
        StageInputError: ``stage`` is missing or unfinished.
    """
    from brandcopy.brand import load_brand
    from brandcopy.evaluate import load_eval_model
    from brandcopy.run import require_stage

    source = require_stage(cfg.run_dir, stage, "data improve")
    brand = load_brand(cfg.brand)
    pairs = policy_prompts(brand, split, content_types, max_prompts)
    model, tokenizer = load_eval_model(cfg, stage)
    out = cfg.data_path / "improve" / f"samples_{stage}.jsonl"
    samples = sample_policy(model, tokenizer, brand, pairs, out, k, params, cfg.eval_batch_size, policy_id(source))
    del model
    gc.collect()
    return improve(LLMClient(llm_config), brand, samples, cfg.data_path, split, max_similarity, max_repairs)
