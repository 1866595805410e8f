"""Brand-gated writing: n candidates per request, each linted and fact-checked, the best clean one kept.

A request is a (product, content type). For each, the trained model writes ``n`` sampled
candidates from the same prompt the model was trained on (``prompts.chat_messages``). Every
candidate goes through ``lint.lint_text`` with the product, the grader that rewards and evaluation
share (rules and the fact check against the catalog); a candidate that did not stop before its
token budget fails too. The clean candidates are ranked by the reward model when one is given,
else by lint score, and the best is returned. A request whose candidates all fail is reported as
failed with the reasons; its text is never returned as if it passed.

Candidates come from one of three places:
- a local model (a merged folder, a plain model, or an adapter folder): batched transformers
  generation (``generation.generate_batch``), or vLLM for a plain model folder where vLLM and a
  GPU are present;
- an OpenAI-compatible endpoint (``vllm serve`` or ``transformers serve`` of the merged folder):
  ``write_with_endpoint``.

Output (``write_outputs``): ``results.jsonl`` (one line per request: status, text, every
candidate with its findings) and ``results.md`` (readable: the chosen copy, or why none passed).
"""

import csv
import importlib.util
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from brandcopy.brand import BrandDataError, read_records
from brandcopy.files import atomic_write_jsonl, atomic_write_text
from brandcopy.generation import GenerationParams, generate_batch
from brandcopy.lint import lint_text
from brandcopy.llm import LLMClient, Request, read_jsonl_records, run_requests
from brandcopy.prompts import chat_messages

WRITE_PARAMS = GenerationParams("write", max_new_tokens=768, do_sample=True, temperature=0.8, top_p=0.95)
TRUNCATED = "truncated"  # a candidate that reached max_new_tokens without stopping
REQUEST_FAILED = "request_failed"  # the endpoint gave no text for this candidate


@dataclass
class Draft:
    """One raw candidate: its text, whether it stopped on its own, or why the endpoint gave none."""

    text: str
    stopped: bool = True
    error: str | None = None


@dataclass
class WriteRequest:
    """One piece of copy to write: ``id`` names it in the outputs."""

    id: str
    product_id: str
    content_type: str


@dataclass
class Candidate:
    """One sampled copy and what the grader found in it.

    Attributes:
        text: The copy.
        violations: ``{kind, text, message}`` of every lint or fact-check finding (empty: clean).
        lint_score: ``1 / (1 + number of violations)``.
        reward: The reward model's score (clean candidates, when a reward model was given).
    """

    text: str
    violations: list[dict]
    lint_score: float
    reward: float | None = None

    @property
    def clean(self) -> bool:
        return not self.violations


@dataclass
class WriteResult:
    """The outcome of one request.

    Attributes:
        request: What was asked.
        status: ``passed`` (``text`` is the best clean candidate) or ``failed`` (``text`` is None).
        text: The chosen copy, or None when no candidate passed.
        ranked_by: ``reward_model`` or ``lint_score``.
        reasons: For a failed request, each distinct finding with how many candidates had it.
        candidates: Every candidate, best first among the clean ones.
    """

    request: WriteRequest
    status: str
    text: str | None
    ranked_by: str
    reasons: list[str] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)

    def as_dict(self) -> dict:
        """The JSONL record (null, never NaN)."""
        return {**asdict(self.request), "status": self.status, "text": self.text, "ranked_by": self.ranked_by,
                "reasons": self.reasons, "candidates": [asdict(c) for c in self.candidates]}


# --- requests ------------------------------------------------------------------------------------


def read_requests(path: str | Path, brand) -> list[WriteRequest]:
    """Requests from a JSONL or CSV file with ``product_id``, ``content_type`` and an optional ``id``.

    Every line is validated before anything is written.

    Raises:
        BrandDataError: A malformed line, a missing field, an unknown product or content type, or a
            duplicate id (file, line, field).
    """
    path = Path(path)
    rows = _csv_rows(path, brand) if path.suffix.lower() == ".csv" else _jsonl_rows(path, brand)
    requests, seen = [], set()
    for number, row in rows:
        request = WriteRequest(str(row.get("id") or f"{row['product_id']}/{row['content_type']}"),
                               row["product_id"], row["content_type"])
        if request.id in seen:
            raise BrandDataError(path, number, "id", f"duplicate id {request.id!r} (set 'id' to tell requests apart)")
        seen.add(request.id)
        requests.append(request)
    if not requests:
        raise BrandDataError(path, None, None, "no requests in the file")
    return requests


def _jsonl_rows(path: Path, brand) -> list[tuple[int, dict]]:
    rows = read_records(path, brand, require_text=False)
    for number, row in rows:
        if not row.get("product_id"):
            raise BrandDataError(path, number, "product_id", "missing: copy is written for one product")
    return rows


def _csv_rows(path: Path, brand) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise BrandDataError(path, None, None, "file not found")
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = [(reader.line_num, row) for row in reader]
    for number, row in rows:
        for key, known in (("product_id", brand.products), ("content_type", brand.content_types)):
            value = (row.get(key) or "").strip()
            if not value:
                raise BrandDataError(path, number, key, "missing")
            if value not in known:
                raise BrandDataError(path, number, key, f"unknown {key} {value!r}")
            row[key] = value
    return rows


def single_request(brand, product_id: str, content_type: str) -> WriteRequest:
    """A request from command-line arguments.

    Raises:
        KeyError: Unknown product or content type (the message names it).
    """
    brand.product(product_id)
    brand.content_type(content_type)
    return WriteRequest(f"{product_id}/{content_type}", product_id, content_type)


# --- grading and choosing ------------------------------------------------------------------------


def grade(brand, request: WriteRequest, draft: Draft) -> Candidate:
    """Lint and fact-check one candidate; one that did not stop fails as ``truncated``, one the
    endpoint did not deliver as ``request_failed``."""
    if draft.error is not None:
        return Candidate("", [{"kind": REQUEST_FAILED, "text": "", "message": draft.error}], 0.0)
    result = lint_text(brand, draft.text, request.content_type, request.product_id)
    violations = [{"kind": v.kind, "text": v.text, "message": v.message} for v in result.violations]
    if not draft.stopped:
        violations.append({"kind": TRUNCATED, "text": draft.text[-20:], "message": "没有写完：达到生成长度上限仍未结束"})
    return Candidate(draft.text, violations, 1 / (1 + len(violations)))


def choose(request: WriteRequest, candidates: list[Candidate], ranked_by: str) -> WriteResult:
    """The best clean candidate, or a failed result listing why every candidate failed.

    Clean candidates are ordered by reward when scored, else by lint score (every clean candidate
    scores 1.0, so they keep their sampling order), best first; failing ones follow in their order.
    """
    clean = sorted((c for c in candidates if c.clean), key=lambda c: -(c.reward if c.reward is not None else c.lint_score))
    failing = [c for c in candidates if not c.clean]
    if clean:
        return WriteResult(request, "passed", clean[0].text, ranked_by, [], clean + failing)
    counts: dict[str, int] = {}
    for candidate in failing:
        for v in {f"{v['kind']}：{v['message']}" for v in candidate.violations}:
            counts[v] = counts.get(v, 0) + 1
    reasons = [f"{reason}（{n}/{len(failing)} 篇）" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    return WriteResult(request, "failed", None, ranked_by, reasons, failing)


def score_with_reward_model(reward_dir: str | Path, brand, request: WriteRequest, candidates: list[Candidate]) -> None:
    """Sets ``reward`` (sigmoid of the reward model's score) on the clean candidates."""
    from brandcopy.modeling import load_reward_model, score_conversations

    clean = [c for c in candidates if c.clean]
    if not clean:
        return
    model, tokenizer = load_reward_model(str(reward_dir))
    prompt = chat_messages(brand, request.product_id, request.content_type)
    scores = score_conversations(model, tokenizer, [prompt + [{"role": "assistant", "content": c.text}] for c in clean])
    for candidate, score in zip(clean, scores):
        candidate.reward = 1 / (1 + math.exp(-score))


def finish(brand, requests: list[WriteRequest], drafts: list[list[Draft]],
           reward_model: str | Path | None = None) -> list[WriteResult]:
    """Grade every draft of every request, rank the clean ones, choose."""
    results = []
    for request, request_drafts in zip(requests, drafts):
        candidates = [grade(brand, request, draft) for draft in request_drafts]
        if reward_model:
            score_with_reward_model(reward_model, brand, request, candidates)
        results.append(choose(request, candidates, "reward_model" if reward_model else "lint_score"))
    return results


# --- where candidates come from ------------------------------------------------------------------


def load_writer(source: str | Path, **load_options):
    """``(model, tokenizer)`` for writing: an adapter folder (on its base) or a plain/merged model folder.

    Args:
        source: A folder with ``adapter_config.json`` (sft, dpo, grpo) or a model folder (merged).
        **load_options: ``backend``, ``load_in_4bit``, ``max_seq_length`` for ``modeling``.
    """
    from brandcopy.modeling import fix_special_tokens, load_adapter_model, load_model

    source = Path(source)
    if (source / "adapter_config.json").is_file():
        model, tokenizer = load_adapter_model(source, trainable=False, **load_options)
    else:
        model, tokenizer = load_model(source, **load_options)
    fix_special_tokens(model, tokenizer)
    return model, tokenizer


def local_candidates(model, tokenizer, brand, requests: list[WriteRequest], n: int,
                     params: GenerationParams = WRITE_PARAMS, batch_size: int = 8) -> list[list[Draft]]:
    """``n`` sampled drafts per request with batched transformers generation."""
    messages = [chat_messages(brand, r.product_id, r.content_type) for r in requests for _ in range(n)]
    generations = generate_batch(model, tokenizer, messages, params, batch_size)
    return [[Draft(g.text, g.stopped) for g in generations[i * n:(i + 1) * n]] for i in range(len(requests))]


def vllm_available() -> bool:
    """Whether vLLM is installed and a GPU is present (vLLM needs one)."""
    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def vllm_candidates(model_dir: str | Path, brand, requests: list[WriteRequest], n: int,
                    params: GenerationParams = WRITE_PARAMS) -> list[list[Draft]]:
    """``n`` sampled drafts per request from vLLM (a plain or merged model folder; GPU)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), seed=params.seed)
    sampling = SamplingParams(n=n, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens)
    outputs = llm.chat([chat_messages(brand, r.product_id, r.content_type) for r in requests], sampling)
    return [[Draft(o.text.strip(), o.finish_reason == "stop") for o in out.outputs] for out in outputs]


def endpoint_candidates(client: LLMClient, brand, requests: list[WriteRequest], n: int, work_dir: str | Path,
                        params: GenerationParams = WRITE_PARAMS) -> list[list[Draft]]:
    """``n`` sampled drafts per request from an OpenAI-compatible endpoint (``vllm serve``, ``transformers serve``).

    Requests go through ``llm.run_requests`` (concurrent, retried, resumable in ``work_dir``).
    The client refuses answers cut off at ``max_tokens``, so a returned text always stopped; a
    candidate whose request failed for good becomes a draft with its ``error`` (the client's reason).
    The client's config should have ``cache_dir=None``: identical prompts must give fresh samples.
    A rerun into the same ``work_dir`` reuses the answers already there.
    """
    sampling = {"temperature": params.temperature, "top_p": params.top_p, "max_tokens": params.max_new_tokens}
    calls = [Request(f"{r.id}#{i}", chat_messages(brand, r.product_id, r.content_type), sampling, {"request": r.id})
             for r in requests for i in range(n)]
    work_dir = Path(work_dir)
    run_requests(client, calls, work_dir / "candidates.jsonl", work_dir / "failures.jsonl", desc="write")
    answers = {rec["key"]: Draft(rec["text"]) for rec in read_jsonl_records(work_dir / "candidates.jsonl")}
    failures = {rec["key"]: Draft("", False, rec["reason"]) for rec in read_jsonl_records(work_dir / "failures.jsonl")}
    return [[answers.get(f"{r.id}#{i}") or failures[f"{r.id}#{i}"] for i in range(n)] for r in requests]


# --- outputs -------------------------------------------------------------------------------------


def render_markdown(brand, results: list[WriteResult]) -> str:
    """A readable report: per request, the chosen copy with its score, or why nothing passed."""
    passed = sum(r.status == "passed" for r in results)
    lines = [f"# {brand.name} 文案（{passed}/{len(results)} 条通过品牌与事实检查）", ""]
    for r in results:
        product = brand.product(r.request.product_id)
        kind = brand.content_type(r.request.content_type).name_zh
        lines.append(f"## {r.request.id}：{product.name} · {kind}")
        if r.status == "passed":
            best = r.candidates[0]
            score = f"奖励模型 {best.reward:.3f}" if best.reward is not None else f"lint 得分 {best.lint_score:.2f}"
            clean = sum(c.clean for c in r.candidates)
            lines += [f"通过（{clean}/{len(r.candidates)} 篇候选通过检查；按{score}选出）", "", r.text, ""]
        else:
            lines += [f"**未通过**：{len(r.candidates)} 篇候选全部未通过检查，不提供文案。原因：", ""]
            lines += [f"- {reason}" for reason in r.reasons]
            lines.append("")
    return "\n".join(lines)


def write_outputs(brand, results: list[WriteResult], out_dir: str | Path) -> tuple[Path, Path]:
    """Writes ``results.jsonl`` and ``results.md`` atomically; returns their paths."""
    out_dir = Path(out_dir)
    atomic_write_jsonl(out_dir / "results.jsonl", [r.as_dict() for r in results])
    markdown = atomic_write_text(out_dir / "results.md", render_markdown(brand, results))
    return out_dir / "results.jsonl", markdown


def write_copy(brand, requests: list[WriteRequest], out_dir: str | Path, *, n: int = 4, model_dir: str | Path | None = None,
               client: LLMClient | None = None, reward_model: str | Path | None = None,
               params: GenerationParams = WRITE_PARAMS, batch_size: int = 8, load_options: dict | None = None) -> list[WriteResult]:
    """Write, check and choose copy for every request; the library entry point behind ``brandcopy write``.

    Args:
        brand: The loaded brand.
        requests: What to write (``read_requests`` or ``single_request``).
        out_dir: Folder for ``results.jsonl`` and ``results.md`` (and the endpoint's raw answers).
        n: Candidates per request.
        model_dir: A merged/plain model folder or an adapter folder (local generation).
        client: An endpoint client instead of ``model_dir`` (a served model).
        reward_model: The reward stage's folder; ranks the clean candidates when given.
        params: Sampling parameters.
        batch_size: Prompts per ``generate`` call (local transformers generation).
        load_options: ``backend``, ``load_in_4bit``, ``max_seq_length`` for loading ``model_dir``.

    Returns:
        One ``WriteResult`` per request, in order.

    Raises:
        ValueError: Neither or both of ``model_dir`` and ``client``, or ``n`` < 1.
    """
    if (model_dir is None) == (client is None):
        raise ValueError("give exactly one of model_dir (a local model) and client (a served model)")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if client is not None:
        drafts = endpoint_candidates(client, brand, requests, n, Path(out_dir) / "endpoint", params)
    elif vllm_available() and not (Path(model_dir) / "adapter_config.json").is_file():
        drafts = vllm_candidates(model_dir, brand, requests, n, params)
    else:
        model, tokenizer = load_writer(model_dir, **(load_options or {}))
        drafts = local_candidates(model, tokenizer, brand, requests, n, params, batch_size)
    results = finish(brand, requests, drafts, reward_model)
    write_outputs(brand, results, out_dir)
    return results

