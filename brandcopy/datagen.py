"""The data pipeline: generate, clean, preference negatives, export.

Every step reads and writes JSONL under one data folder (``outputs/<run>/data``) and is resumable:
LLM steps go through ``llm.run_requests`` (keyed results, fsynced as they finish, failures with
their reason), and the files a later step reads are rewritten atomically from those results.

A *sample* has the golden set's schema: ``id``, ``product_id``, ``content_type``,
``instruction`` (``prompts.build_instruction``), ``text``. ``generate`` writes samples, ``clean``
reads and writes samples, ``make_negatives`` reads samples, ``export`` turns samples (and
negatives) into training files through ``prompts.chat_messages``, so training and inference use
the same system prompt and instruction.

Layout of the data folder::

    generate/results.jsonl, generate/failures.jsonl   raw LLM results (resumable)
    generated.jsonl                                    samples that passed lint and the fact check
    clean/<pass>.jsonl, clean/<pass>.failures.jsonl   one LLM rewrite pass each
    cleaned.jsonl, clean/rejected.jsonl                clean samples (with before/after) / the rest
    negatives/llm.jsonl, negatives/llm.failures.jsonl  LLM negatives (resumable)
    negatives.jsonl                                    every negative, with its kind
    sft_<split>.jsonl, preference_<split>.jsonl, grpo_<split>.jsonl    TRL
    llamafactory/*.jsonl + dataset_info.json           LLaMA-Factory
"""

import json
import random
import re
import unicodedata
from collections import defaultdict
from pathlib import Path

from brandcopy import prompts
from brandcopy.brand import load_golden, read_records
from brandcopy.files import atomic_write_jsonl, atomic_write_text
from brandcopy.lint import CTA_KIND, EXAGGERATION_KINDS, FACT_KINDS, MARKUP_KIND, lint_text, name_spans
from brandcopy.llm import LLMClient, Request, RunSummary, read_jsonl_records, run_requests

LLM_NEGATIVE_MIX = {"weak": 0.5, "exaggerated": 0.3, "fake": 0.2}


# --- lint as a validator ---------------------------------------------------------------------


def violation_kinds(brand, text: str, content_type: str, product_id: str) -> set[str]:
    """The kinds of lint and fact-check violations in a text."""
    return {v.kind for v in lint_text(brand, text, content_type, product_id).violations}


def lint_problems(brand, text: str, content_type: str, product_id: str) -> list[str]:
    """One readable line per lint or fact-check violation (what a repair prompt lists)."""
    problems = [f"{v.kind}：{v.message}（「{v.text}」）" for v in lint_text(brand, text, content_type, product_id).violations]
    return list(dict.fromkeys(problems))


def _lint_validator(brand):
    def validate(request: Request, text: str) -> str | None:
        problems = lint_problems(brand, text, request.meta["content_type"], request.meta["product_id"])
        return "\n".join(problems) or None

    return validate


def _repair(request: Request, text: str, problem: str) -> list[dict]:
    return prompts.repair_messages(request.messages, text, problem.splitlines())


# --- samples -----------------------------------------------------------------------------------


def read_samples(path: str | Path, brand) -> list[dict]:
    """Reads samples (golden schema), every line validated first.

    Raises:
        BrandDataError: A malformed line, missing field, unknown product or content type (file, line, field).
    """
    return [record for _, record in read_records(Path(path), brand)]


def _sample(brand, sample_id: str, product_id: str, content_type: str, text: str, **extra) -> dict:
    instruction = prompts.build_instruction(brand, product_id, content_type)
    return {"id": sample_id, "product_id": product_id, "content_type": content_type, "instruction": instruction, "text": text} | extra


# --- 1. generate -------------------------------------------------------------------------------


def generation_requests(brand, split: str = "train", content_types=None, samples_per_pair: int = 1, n_examples: int = 2, seed: int = 0) -> list[Request]:
    """One request per (content type, sample index, product of the split), in that order.

    Few-shot examples are golden texts of the same content type from other TRAIN products (never
    val products, whose golden copy is the evaluation reference). They come from one seeded order
    per (content type, sample index), skipping the product's own copy, so nearly every product of
    a content type sees the same examples; with the requests grouped by content type, consecutive
    prompts share the system prompt, the guide and the examples (see ``prompts.generation_messages``),
    which prompt caches bill at a fraction of the price.
    """
    golden = load_golden(brand) if (brand.path / "golden.jsonl").is_file() else []
    train = set(brand.split()["train"])
    pool = defaultdict(list)
    for record in golden:
        if record["product_id"] in train:
            pool[record["content_type"]].append(record)
    requests = []
    for content_type in content_types or brand.content_types:
        for variant in range(samples_per_pair):
            order = random.Random(f"{seed}:{content_type}:{variant}").sample(pool[content_type], len(pool[content_type]))
            for product_id in brand.split()[split]:
                examples = [r["text"] for r in order if r["product_id"] != product_id][:n_examples]
                messages = prompts.generation_messages(brand, product_id, content_type, examples, variant)
                meta = {"product_id": product_id, "content_type": content_type, "variant": variant}
                requests.append(Request(f"{product_id}/{content_type}/{variant}", messages, meta=meta))
    return requests


def generate(client: LLMClient, brand, data_dir: str | Path, split: str = "train", content_types=None,
             samples_per_pair: int = 1, n_examples: int = 2, max_repairs: int = 2, seed: int = 0) -> RunSummary:
    """Step 1: writes ``generated.jsonl``, copy for every (product, content type) of a split.

    Each answer is checked by lint and the fact check; a rejected answer goes through up to
    ``max_repairs`` repair rounds (the problems are listed back to the model), then to
    ``generate/failures.jsonl`` with its reason.

    Args:
        client: LLM client for the teacher model.
        brand: a loaded Brand.
        data_dir: the run's data folder.
        split: "train" or "val" (products of ``brand.split()``).
        content_types: content type ids; default all nine.
        samples_per_pair: samples per (product, content type).
        n_examples: golden few-shot examples per prompt.
        max_repairs: repair rounds before a rejected answer is a failure.
        seed: seed of the few-shot choice.

    Returns:
        The run summary (produced, failed, skipped, usage, cost).
    """
    data_dir = Path(data_dir)
    requests = generation_requests(brand, split, content_types, samples_per_pair, n_examples, seed)
    summary = run_requests(
        client, requests, data_dir / "generate" / "results.jsonl", data_dir / "generate" / "failures.jsonl",
        validate=_lint_validator(brand), repair=_repair, max_repairs=max_repairs, desc="generate",
    )
    results = sorted(read_jsonl_records(data_dir / "generate" / "results.jsonl"), key=lambda r: r["key"])
    samples = [_sample(brand, r["key"], r["meta"]["product_id"], r["meta"]["content_type"], r["text"], source="generate") for r in results]
    atomic_write_jsonl(data_dir / "generated.jsonl", samples)
    return summary


# --- 2. clean ----------------------------------------------------------------------------------


def is_flat(brand, text: str, content_type: str) -> bool:
    """A social note with no first-person voice reads like a spec sheet: it needs a persona and story."""
    return brand.content_type(content_type).family == "social" and "我" not in text


def _needs(brand, pass_name: str, sample: dict, text: str) -> bool:
    kinds = violation_kinds(brand, text, sample["content_type"], sample["product_id"])
    if pass_name == "markup":
        return MARKUP_KIND in kinds
    if pass_name == "persona":
        return is_flat(brand, text, sample["content_type"])
    return CTA_KIND in kinds


def _clean_validator(brand, pass_name: str, before: dict[str, str]):
    """A rewrite must fix its target and must not introduce a violation the text did not have."""

    def validate(request: Request, text: str) -> str | None:
        meta = request.meta
        old = violation_kinds(brand, before[request.key], meta["content_type"], meta["product_id"])
        new = violation_kinds(brand, text, meta["content_type"], meta["product_id"])
        introduced = new - old
        if introduced:
            return "改写引入了新问题：\n" + "\n".join(p for p in lint_problems(brand, text, meta["content_type"], meta["product_id"]) if p.split("：")[0] in introduced)
        if pass_name == "markup" and MARKUP_KIND in new:
            return "仍有残留的标签或标记"
        if pass_name == "cta" and CTA_KIND in new:
            return "结尾仍然没有行动号召"
        if pass_name == "persona" and is_flat(brand, text, meta["content_type"]):
            return "仍然没有第一人称的人设和故事"
        return None

    return validate


def clean_requests(brand, targets: list[dict], texts: dict[str, str], pass_name: str) -> list[Request]:
    """One rewrite request per target sample of a pass, grouped by content type.

    Prompts of one content type share the guide and the pass's ask as their opening, so sending
    them back to back lets the prompt cache reuse that prefix.
    """
    return [
        Request(s["id"], prompts.clean_messages(brand, s["product_id"], s["content_type"], texts[s["id"]], pass_name),
                meta={"product_id": s["product_id"], "content_type": s["content_type"]})
        for s in sorted(targets, key=lambda s: s["content_type"])
    ]


def clean(client: LLMClient, brand, in_path: str | Path, data_dir: str | Path, passes=("markup", "persona", "cta"), max_repairs: int = 1) -> dict:
    """Step 2: LLM rewrite passes, in order, each only on the samples that need it.

    ``markup`` strips stray tags and markup, ``persona`` gives flat social notes a first-person
    persona and story, ``cta`` adds the missing call to action to ads. A rewrite that introduces
    a violation or misses its target is repaired up to ``max_repairs`` times, else the sample
    keeps its text (the failure is in ``clean/<pass>.failures.jsonl``). Writes ``cleaned.jsonl``
    (lint-clean samples, each with an ``audit`` list of {pass, before, after}) and
    ``clean/rejected.jsonl`` (samples still violating, with their problems).

    Returns:
        ``{pass: RunSummary, "kept": n, "rejected": n}``.
    """
    data_dir = Path(data_dir)
    samples = read_samples(in_path, brand)
    texts = {s["id"]: s["text"] for s in samples}
    audit = defaultdict(list)
    report = {}
    for pass_name in passes:
        targets = [s for s in samples if _needs(brand, pass_name, s, texts[s["id"]])]
        requests = clean_requests(brand, targets, texts, pass_name)
        out = data_dir / "clean" / f"{pass_name}.jsonl"
        report[pass_name] = run_requests(client, requests, out, data_dir / "clean" / f"{pass_name}.failures.jsonl",
                                         validate=_clean_validator(brand, pass_name, texts), repair=_repair,
                                         max_repairs=max_repairs, desc=f"clean:{pass_name}")
        target_ids = {s["id"] for s in targets}
        for record in read_jsonl_records(out):
            if record["key"] in target_ids:  # a result of an earlier run on other input does not apply
                audit[record["key"]].append({"pass": pass_name, "before": texts[record["key"]], "after": record["text"]})
                texts[record["key"]] = record["text"]
    kept, rejected = [], []
    for s in samples:
        problems = lint_problems(brand, texts[s["id"]], s["content_type"], s["product_id"])
        cleaned = s | {"text": texts[s["id"]], "audit": audit[s["id"]]}
        (rejected if problems else kept).append(cleaned | ({"problems": problems} if problems else {}))
    atomic_write_jsonl(data_dir / "clean" / "rejected.jsonl", rejected)
    atomic_write_jsonl(data_dir / "cleaned.jsonl", kept)
    return report | {"kept": len(kept), "rejected": len(rejected)}


# --- 3. preference negatives -------------------------------------------------------------------


def _outside(spans, start, end):
    return not any(s < end and start < e for s, e in spans)


def _mentions(brand, product, text) -> list[tuple[int, int, str]]:
    """(start, end, canonical name) of the product's materials in ``text``, outside the brand's and products' names."""
    names = name_spans(brand, text)
    forms = sorted({form: m.name for m in product.materials for form in (m.name, *brand.composition.materials[m.name].aliases)}.items(),
                   key=lambda pair: -len(pair[0]))
    found = []
    for form, name in forms:
        for m in re.finditer(re.escape(form), text):
            if _outside(names, m.start(), m.end()) and _outside([(s, e) for s, e, _ in found], m.start(), m.end()):
                found.append((m.start(), m.end(), name))
    return sorted(found)


def _material_spans(brand, text) -> list[tuple[int, int]]:
    """Spans of every lexicon material's name or alias in ``text``."""
    forms = {form for entry in brand.composition.materials.values() for form in (entry.name, *entry.aliases)}
    return [(m.start(), m.end()) for form in forms for m in re.finditer(re.escape(form), text)]


def foreign_materials(brand, product) -> list[str]:
    """Lexicon materials this product does not contain (nor covers), sorted."""
    own = {m.name for m in product.materials}
    return sorted(name for name, entry in brand.composition.materials.items() if name not in own and not own & set(entry.covers))


def swap_material(brand, sample: dict, rng: random.Random) -> str | None:
    """Replaces the first mention of one of the product's materials (never inside a name) with one it does not contain."""
    product, text = brand.product(sample["product_id"]), sample["text"]
    found, foreign = _mentions(brand, product, text), foreign_materials(brand, product)
    if not found or not foreign:
        return None
    start, end, _ = found[0]
    return text[:start] + rng.choice(foreign) + text[end:]


def _nearby(value: float, low: float, high: float, rng: random.Random) -> float | None:
    """A plausible wrong value close to ``value``: one or two steps of ~20% away, within [low, high]."""
    step = max(round(value * 0.2), 1) if value >= 5 else max(round(value * 0.2, 1), 0.1)
    options = [round(v, 2) for v in (value - step, value + step, value - 2 * step, value + 2 * step) if low < v <= high and v != value]
    return rng.choice(options) if options else None


def _number_edits(brand, product, text, names) -> list[tuple[int, int, float, float, float]]:
    """(start, end, value, low, high) of the catalog's numbers written in ``text``: shares and number facts."""
    edits = []
    for material in product.materials:
        if material.share is not None:
            edits += [(m.start(1), m.end(1), material.share, 0.0, 100.0)
                      for m in re.finditer(rf"(?<![\d.])({material.share:g})\s*%", text) if _outside(names, m.start(), m.end())]
    for key, spec in brand.facts.items():
        value = product.facts.get(key)
        if spec.type != "number" or value is None:
            continue
        for number in (value if isinstance(value, tuple) else (float(str(value).rstrip("+")),)):
            units = "|".join(re.escape(u) for u in spec.units) or "|".join(re.escape(p) for p in spec.phrases)
            pattern = rf"(?<![\d.])({number:g})(?=\s*(?:{units}))" if spec.units else rf"(?i)(?:{units})\s*({number:g})(?![\d.])"
            edits += [(m.start(1), m.end(1), number, *spec.range) for m in re.finditer(pattern, text) if _outside(names, m.start(), m.end())]
    return edits


def _value_edits(brand, product, text, names) -> list[tuple[int, int, str]]:
    """(start, end, replacement) turning a mention of the product's enum or set value into another value of that fact."""
    edits = []
    for key, spec in brand.facts.items():
        own = product.facts.get(key)
        if spec.type not in ("enum", "set") or own is None:
            continue
        own_values = {own} if spec.type == "enum" else set(own)
        others = [v for v in spec.values if v not in own_values]
        for value in own_values & set(spec.values):
            for phrase in spec.values[value]:
                edits += [(m.start(), m.end(), spec.values[other][0]) for m in re.finditer(re.escape(phrase), text)
                          for other in others[:3] if _outside(names, m.start(), m.end())]
    return edits


def alter_fact(brand, sample: dict, rng: random.Random) -> str | None:
    """Changes one stated fact to another plausible value of its type, never inside a name: a share
    or a number to a nearby wrong one within the fact's range (5% -> 4%, 1200米 -> 1440米), an enum
    or set value to another value of that fact (中焙火 -> 足火). Returns the first edit lint catches."""
    product, text = brand.product(sample["product_id"]), sample["text"]
    names = name_spans(brand, text)
    candidates = [(s, e, f"{wrong:g}") for s, e, value, low, high in _number_edits(brand, product, text, names)
                  if (wrong := _nearby(value, low, high, rng)) is not None]
    candidates += _value_edits(brand, product, text, names + _material_spans(brand, text))  # 福鼎 in 福鼎大白茶 stays
    rng.shuffle(candidates)
    for start, end, replacement in candidates:
        edited = text[:start] + replacement + text[end:]
        if violation_kinds(brand, edited, sample["content_type"], sample["product_id"]) & FACT_KINDS:
            return edited
    return None


def insert_banned(brand, sample: dict, rng: random.Random) -> str | None:
    """Inserts a banned word, an absolute claim and a run of exclamation marks."""
    word = rng.choice(brand.banned_words)
    return f"{word}！！{sample['text']}效果最好，立刻见效！！"


def drop_cta(brand, sample: dict, rng: random.Random) -> str | None:
    """Drops every sentence with a call to action (only for types that require one)."""
    if not brand.content_type(sample["content_type"]).cta_required:
        return None
    sentences = re.split(r"(?<=[。！？!?\n])", sample["text"])
    normalised = [unicodedata.normalize("NFKC", s).lower() for s in sentences]
    kept = [s for s, n in zip(sentences, normalised) if not any(re.search(p, n) for p in brand.cta_patterns)]
    return "".join(kept).strip() if len(kept) < len(sentences) and "".join(kept).strip() else None


def truncate(brand, sample: dict, rng: random.Random) -> str | None:
    """Cuts the copy off at 30-50% of its length, mid-thought."""
    return sample["text"][: max(1, int(len(sample["text"]) * rng.uniform(0.3, 0.5)))]


OFFLINE_NEGATIVES = {  # kind -> (make, family, lint kinds it must trigger; empty = no requirement)
    "swap_material": (swap_material, "fake", FACT_KINDS),
    "alter_fact": (alter_fact, "fake", FACT_KINDS),
    "insert_banned": (insert_banned, "exaggerated", EXAGGERATION_KINDS),
    "drop_cta": (drop_cta, "weak", frozenset({CTA_KIND})),
    "truncate": (truncate, "weak", frozenset()),
}


def offline_negatives(brand, sample: dict, seed: int = 0) -> list[dict]:
    """Programmatic negatives of one sample (no API), each verified to fail lint where it must.

    Returns:
        Negative records (see ``make_negatives``); kinds that do not apply or that lint does not
        catch are left out.
    """
    negatives = []
    for kind, (make, family, must_trigger) in OFFLINE_NEGATIVES.items():
        text = make(brand, sample, random.Random(f"{seed}:{sample['id']}:{kind}"))
        if text is None or text == sample["text"]:
            continue
        kinds = violation_kinds(brand, text, sample["content_type"], sample["product_id"])
        if must_trigger and not kinds & must_trigger:
            continue
        negatives.append(_negative(sample, kind, family, "offline", text, kinds))
    return negatives


def _negative(sample: dict, kind: str, family: str, source: str, text: str, kinds: set[str]) -> dict:
    return {
        "id": f"{sample['id']}/{kind}", "chosen_id": sample["id"], "product_id": sample["product_id"],
        "content_type": sample["content_type"], "kind": kind, "family": family, "source": source,
        "text": text, "violations": sorted(kinds),
    }


def _llm_family(sample_id: str, seed: int) -> str:
    rng = random.Random(f"{seed}:{sample_id}:family")
    return rng.choices(list(LLM_NEGATIVE_MIX), weights=list(LLM_NEGATIVE_MIX.values()))[0]


def negative_requests(brand, samples: list[dict], seed: int = 0, weak_model: str | None = None) -> list[Request]:
    """One LLM negative per sample: 50% weak, 30% exaggerated, 20% fake (seeded per sample).

    Requests come grouped by family, so that prompts sharing their opening follow each other.
    """
    requests = []
    for s in samples:
        family = _llm_family(s["id"], seed)
        pid, ct = s["product_id"], s["content_type"]
        params = {}
        if family == "weak":
            messages = prompts.weak_messages(brand, pid, ct)
            params = {"model": weak_model} if weak_model else {}
        elif family == "exaggerated":
            messages = prompts.exaggerated_messages(brand, pid, ct, s["text"])
        else:
            foreign = random.Random(f"{seed}:{s['id']}:foreign").choice(foreign_materials(brand, brand.product(pid)))
            messages = prompts.fake_messages(brand, pid, ct, s["text"], foreign)
        meta = {"product_id": pid, "content_type": ct, "family": family, "chosen_id": s["id"], "chosen": s["text"]}
        requests.append(Request(f"{s['id']}/llm_{family}", messages, params, meta))
    return sorted(requests, key=lambda r: (list(LLM_NEGATIVE_MIX).index(r.meta["family"]), r.meta["content_type"]))


def _negative_validator(brand):
    """Exaggerated and fake negatives must fail lint or the fact check; weak ones must differ."""

    def validate(request: Request, text: str) -> str | None:
        meta = request.meta
        if text.strip() == meta["chosen"].strip():
            return "改写后与原文相同"
        kinds = violation_kinds(brand, text, meta["content_type"], meta["product_id"])
        if meta["family"] == "exaggerated" and not kinds & EXAGGERATION_KINDS:
            return "反例没有出现禁用词、绝对化用语或多个感叹号，请加强夸张程度"
        if meta["family"] == "fake" and not kinds & FACT_KINDS:
            return f"反例没有与产品信息不符的{brand.wording.fact_scope}，请植入明确的事实错误"
        return None

    return validate


def make_negatives(client: LLMClient | None, brand, in_path: str | Path, data_dir: str | Path, seed: int = 0,
                   weak_model: str | None = None, max_repairs: int = 2) -> dict:
    """Step 3: preference negatives for every sample, written to ``negatives.jsonl``.

    Through the LLM (skipped when ``client`` is None): one per sample, 50% weak (a bare prompt,
    optionally ``weak_model``), 30% exaggerated, 20% fake; exaggerated and fake ones are verified
    to fail lint or the fact check (else repaired, then dropped to the failures file). Offline:
    swap a material, alter a fact, insert banned words, drop the CTA, truncate.
    Each record: ``id``, ``chosen_id``, ``product_id``, ``content_type``, ``kind``, ``family``
    (weak / exaggerated / fake), ``source`` (llm / offline), ``text``, ``violations``.

    Returns:
        Counts per kind, plus the LLM run summary under "llm" when a client was given.
    """
    data_dir = Path(data_dir)
    samples = read_samples(in_path, brand)
    negatives = [negative for s in samples for negative in offline_negatives(brand, s, seed)]
    report = {}
    if client is not None:
        out = data_dir / "negatives" / "llm.jsonl"
        report["llm"] = run_requests(client, negative_requests(brand, samples, seed, weak_model), out,
                                     data_dir / "negatives" / "llm.failures.jsonl", validate=_negative_validator(brand),
                                     repair=_repair, max_repairs=max_repairs, desc="negatives")
        by_id = {s["id"]: s for s in samples}
        for record in read_jsonl_records(out):
            meta = record["meta"]
            if meta["chosen_id"] in by_id and by_id[meta["chosen_id"]]["text"] == meta["chosen"]:
                kinds = violation_kinds(brand, record["text"], meta["content_type"], meta["product_id"])
                negatives.append(_negative(by_id[meta["chosen_id"]], f"llm_{meta['family']}", meta["family"], "llm", record["text"], kinds))
    negatives.sort(key=lambda n: n["id"])
    atomic_write_jsonl(data_dir / "negatives.jsonl", negatives)
    counts = defaultdict(int)
    for negative in negatives:
        counts[negative["kind"]] += 1
    return report | dict(counts)


# --- 4. export ---------------------------------------------------------------------------------


def export(brand, samples_path: str | Path, data_dir: str | Path, negatives_path: str | Path | None = None) -> dict[str, Path]:
    """Step 4: training files for TRL and LLaMA-Factory, per split of the brand's products.

    TRL: ``sft_<split>.jsonl`` (``messages``), ``preference_<split>.jsonl`` (conversational
    ``prompt`` / ``chosen`` / ``rejected``), ``grpo_<split>.jsonl`` (conversational ``prompt``,
    ``product_id``, ``content_type``; one row per product and content type). LLaMA-Factory, in
    ``llamafactory/``: alpaca and sharegpt SFT files, an alpaca preference file (``ranking``)
    and ``dataset_info.json``. Every file is written atomically; a split with no rows gets no file.

    Returns:
        File name (e.g. "sft_train") -> path, for the files written.
    """
    data_dir = Path(data_dir)
    samples = read_samples(samples_path, brand)
    negatives = [n for _, n in read_records(Path(negatives_path), brand)] if negatives_path else []
    chosen = {s["id"]: s for s in samples}
    split_of = {pid: name for name, ids in brand.split().items() for pid in ids}
    rows = defaultdict(list)
    for s in samples:
        split = split_of[s["product_id"]]
        messages = prompts.chat_messages(brand, s["product_id"], s["content_type"], s["text"])
        rows[f"sft_{split}"].append({"messages": messages})
        rows[f"llamafactory/alpaca_{split}"].append(_alpaca(messages))
        rows[f"llamafactory/sharegpt_{split}"].append(_sharegpt(messages))
    for pair in sorted({(s["product_id"], s["content_type"]) for s in samples}):
        prompt = prompts.chat_messages(brand, *pair)
        rows[f"grpo_{split_of[pair[0]]}"].append({"prompt": prompt, "product_id": pair[0], "content_type": pair[1]})
    for n in negatives:
        if n["chosen_id"] not in chosen:
            continue
        s = chosen[n["chosen_id"]]
        split = split_of[s["product_id"]]
        prompt = prompts.chat_messages(brand, s["product_id"], s["content_type"])
        rows[f"preference_{split}"].append({
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": s["text"]}],
            "rejected": [{"role": "assistant", "content": n["text"]}],
        })
        rows[f"llamafactory/dpo_{split}"].append(_alpaca(prompt) | {"chosen": s["text"], "rejected": n["text"]})
    written = {}
    for name, records in sorted(rows.items()):
        path = data_dir / f"{name}.jsonl"
        atomic_write_jsonl(path, records)
        written[name] = path
    names = {name.split("/")[1] for name in written if name.startswith("llamafactory/")}
    # on-policy pairs (``brandcopy data improve``) live beside these files: a re-export keeps their entries
    names |= {path.stem for path in (data_dir / "llamafactory").glob(f"{ONPOLICY_PREFIX}*.jsonl")}
    info = dataset_info(sorted(names))
    atomic_write_text(data_dir / "llamafactory" / "dataset_info.json", json.dumps(info, ensure_ascii=False, indent=2) + "\n")
    written["dataset_info"] = data_dir / "llamafactory" / "dataset_info.json"
    return written


ONPOLICY_PREFIX = "dpo_onpolicy_"  # LLaMA-Factory on-policy pair files that ``improve`` writes


def _alpaca(messages: list[dict]) -> dict:
    system, user = messages[0]["content"], messages[1]["content"]
    row = {"instruction": user, "input": "", "system": system}
    return row | ({"output": messages[2]["content"]} if len(messages) > 2 else {})


def _sharegpt(messages: list[dict]) -> dict:
    roles = {"user": "human", "assistant": "gpt"}
    turns = [{"from": roles[m["role"]], "value": m["content"]} for m in messages[1:]]
    return {"conversations": turns, "system": messages[0]["content"]}


def dataset_info(names: list[str]) -> dict:
    """LLaMA-Factory's dataset_info.json entries for the files written (name without .jsonl)."""
    info = {}
    for name in names:
        entry = {"file_name": f"{name}.jsonl"}
        if name.startswith("alpaca"):
            entry["columns"] = {"prompt": "instruction", "query": "input", "response": "output", "system": "system"}
        elif name.startswith("sharegpt"):
            entry |= {"formatting": "sharegpt", "columns": {"messages": "conversations", "system": "system"},
                      "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}}
        else:
            entry |= {"ranking": True, "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected", "system": "system"}}
        info[f"brandcopy_{name}"] = entry
    return info
