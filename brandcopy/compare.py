"""Several models side by side on one prompt set (``brandcopy compare``).

Models are named by spec: ``base`` (the preset's base model), a stage of the run (``sft``,
``dpo``, ``dpo-onpolicy``, ``grpo``, ``merged``), a stage of another run (``otherrun/sft``), or a
folder: a LoRA adapter (``adapter_config.json``) or a full model (``config.json``). ``label=spec``
names a column. Every adapter is attached to the one base model, loaded once, and switched with
PEFT's ``set_adapter`` (adapters of different brands trained on the same base compare this way);
full models are loaded one at a time. All models generate with the same fixed parameters and seed.

Writes ``compare.md`` (a header with the time, the models, the generation parameters and the seed;
then per prompt the outputs side by side, lint findings marked) and ``compare.jsonl`` (one row per
prompt and model with the lint findings).
"""

import contextlib
import gc
import time
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel

from brandcopy.brand import load_golden
from brandcopy.files import DataFileError, atomic_write_jsonl, atomic_write_text, jsonl_rows
from brandcopy.generation import GenerationParams, generate_batch
from brandcopy.ifeval import load_prompts as load_ifeval_prompts
from brandcopy.lint import lint_text
from brandcopy.modeling import fix_special_tokens, load_model
from brandcopy.prompts import chat_messages
from brandcopy.run import is_complete


class CompareInputError(ValueError):
    """A model spec or a prompt file that cannot be used; the message names it (file, line, field)."""


@dataclass
class ModelSpec:
    """One compared model: its column ``label``, and an ``adapter`` folder or a full ``model`` (None: the base)."""

    label: str
    adapter: Path | None = None
    model: Path | None = None


@dataclass
class ComparePrompt:
    """One prompt: ``id``, chat ``messages`` ending with the user turn, and what lint needs (or None)."""

    id: str
    messages: list[dict]
    content_type: str | None = None
    product_id: str | None = None
    title: str = ""


# --- inputs --------------------------------------------------------------------------------------


def resolve_model(spec: str, run_dir: Path) -> ModelSpec:
    """A ``ModelSpec`` from ``base``, a stage of the run, ``run/stage``, or a folder (``label=`` prefix optional).

    Raises:
        CompareInputError: Not a finished stage nor an adapter or model folder.
    """
    label, _, target = spec.rpartition("=") if "=" in spec else (spec, "", spec)
    if target == "base":
        return ModelSpec(label)
    for path in (run_dir / target, run_dir.parent / target, Path(target)):
        if (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
            if path.parent.parent == run_dir.parent and not is_complete(path):
                raise CompareInputError(f"model {spec!r}: {path} is unfinished (no manifest.json)")
            adapter = (path / "adapter_config.json").is_file()
            return ModelSpec(label, adapter=path if adapter else None, model=None if adapter else path)
    raise CompareInputError(
        f"model {spec!r}: not 'base', a finished stage of {run_dir} (sft, dpo, grpo, merged, ...), "
        "'otherrun/stage', nor an adapter or model folder"
    )


def brand_prompts(brand, split: str = "val") -> list[ComparePrompt]:
    """The brand prompts of a split's golden records (system prompt + instruction), in id order."""
    products = set(brand.split()[split])
    records = sorted((r for r in load_golden(brand) if r["product_id"] in products), key=lambda r: r["id"])
    return [ComparePrompt(r["id"], chat_messages(brand, r["product_id"], r["content_type"]), r["content_type"],
                          r["product_id"], f"{r['content_type']} · {brand.product(r['product_id']).name}")
            for r in records]


def file_prompts(path: Path, brand) -> list[ComparePrompt]:
    """Prompts from JSONL: ``id`` and either ``product_id`` + ``content_type`` (a brand prompt) or ``prompt``
    (a plain user turn; ``content_type`` and ``product_id`` optional, for lint).

    Raises:
        CompareInputError: A line that is not JSON or lacks what it needs (file, line, field).
    """
    try:
        rows = jsonl_rows(path)
    except DataFileError as err:
        raise CompareInputError(str(err)) from None
    prompts = []
    for number, row in rows:
        where = f"{path}:{number}"
        if not row.get("id"):
            raise CompareInputError(f"{where}: field 'id' is missing")
        ct, pid = row.get("content_type"), row.get("product_id")
        if ct is not None and ct not in brand.content_types:
            raise CompareInputError(f"{where}: field 'content_type': unknown content type {ct!r}")
        if pid is not None and pid not in brand.products:
            raise CompareInputError(f"{where}: field 'product_id': unknown product {pid!r}")
        if "prompt" in row:
            prompts.append(ComparePrompt(str(row["id"]), [{"role": "user", "content": row["prompt"]}], ct, pid, row["prompt"][:40]))
        elif ct and pid:
            prompts.append(ComparePrompt(str(row["id"]), chat_messages(brand, pid, ct), ct, pid, f"{ct} · {brand.product(pid).name}"))
        else:
            raise CompareInputError(f"{where}: field 'prompt' is missing (or give product_id and content_type)")
    return prompts


def load_prompt_set(name: str, brand, max_prompts: int = 0) -> list[ComparePrompt]:
    """``val`` / ``train`` (the brand's golden prompts), ``ifeval`` (the general prompts), or a JSONL path.

    Raises:
        CompareInputError: An unknown name, a missing or malformed file, or an empty set.
    """
    if name in ("val", "train"):
        prompts = brand_prompts(brand, name)
    elif name == "ifeval":
        prompts = [ComparePrompt(p.id, [{"role": "user", "content": p.prompt}], title=p.prompt[:40]) for p in load_ifeval_prompts()]
    elif Path(name).is_file():
        prompts = file_prompts(Path(name), brand)
    else:
        raise CompareInputError(f"prompts {name!r}: not val, train, ifeval or a JSONL file")
    if not prompts:
        raise CompareInputError(f"prompts {name!r}: no prompts")
    return prompts[:max_prompts] if max_prompts > 0 else prompts


# --- generation ----------------------------------------------------------------------------------


def _load_base(base_model: str | Path, adapters: list[ModelSpec], options: dict):
    """The base once, with every adapter attached under its label."""
    model, tokenizer = load_model(base_model, **options)
    fix_special_tokens(model, tokenizer)
    for number, spec in enumerate(adapters):
        if number == 0:
            model = PeftModel.from_pretrained(model, str(spec.adapter), adapter_name=spec.label)
        else:
            model.load_adapter(str(spec.adapter), adapter_name=spec.label)
    return model, tokenizer


def _active(model, spec: ModelSpec):
    """Context in which ``model`` behaves as ``spec``: its adapter set, or every adapter disabled for the base."""
    if not isinstance(model, PeftModel):
        return contextlib.nullcontext()
    if spec.adapter is None:
        return model.disable_adapter()
    model.set_adapter(spec.label)
    return contextlib.nullcontext()


def generate_all(specs: list[ModelSpec], base_model: str | Path, prompts: list[ComparePrompt], params: GenerationParams,
                 batch_size: int = 8, **options) -> dict[str, list]:
    """Every model's ``Generation`` per prompt, same parameters and seed. ``options`` go to ``load_model``."""
    messages = [p.messages for p in prompts]
    outputs = {}
    on_base = [s for s in specs if s.model is None]
    if on_base:
        model, tokenizer = _load_base(base_model, [s for s in on_base if s.adapter], options)
        for spec in on_base:
            with _active(model, spec):
                outputs[spec.label] = generate_batch(model, tokenizer, messages, params, batch_size)
        del model
        gc.collect()
    for spec in (s for s in specs if s.model is not None):
        model, tokenizer = load_model(spec.model, **options)
        fix_special_tokens(model, tokenizer)
        outputs[spec.label] = generate_batch(model, tokenizer, messages, params, batch_size)
        del model
        gc.collect()
    return {spec.label: outputs[spec.label] for spec in specs}


# --- output --------------------------------------------------------------------------------------


def findings(brand, prompt: ComparePrompt, text: str) -> list:
    """Lint violations of one output (none when the prompt has no content type)."""
    if prompt.content_type is None:
        return []
    return lint_text(brand, text, prompt.content_type, prompt.product_id).violations


def mark(text: str, violations: list) -> str:
    """The text with each violation's span in ``<mark>`` (whole-text findings such as length are listed, not marked)."""
    spans = sorted({tuple(v.span) for v in violations if 0 <= v.span[0] < v.span[1] and v.span[1] - v.span[0] < len(text)})
    out, last = [], 0
    for start, end in spans:
        if start < last:
            continue  # overlapping spans: the first one is marked
        out += [text[last:start], f"<mark>{text[start:end]}</mark>"]
        last = end
    return "".join(out + [text[last:]])


def _cell(text: str) -> str:
    return (text or "*(empty)*").replace("|", "\\|").replace("\n", "<br>")


def render(brand_name: str, specs: list[ModelSpec], base_model, prompts: list[ComparePrompt], outputs: dict,
           lint: dict, params: GenerationParams, prompt_set: str, started: str) -> str:
    """``compare.md``."""
    where = {s.label: s.adapter or s.model or f"{base_model} (adapters off)" for s in specs}
    parts = [
        f"# Compare: {', '.join(where)}",
        "\n".join([
            f"- time: {started}; brand: {brand_name}; prompts: {prompt_set} ({len(prompts)})",
            f"- base model: `{base_model}`",
            *[f"- model `{label}`: `{path}`" for label, path in where.items()],
            f"- generation: {params.describe()}; seed: {params.seed}",
            "- lint findings are marked <mark>like this</mark>; findings about the whole copy are listed",
        ]),
    ]
    for i, prompt in enumerate(prompts):
        rows = ["| model | output | lint |", "|---|---|---|"]
        for label in outputs:
            copy, found = outputs[label][i], lint[label][i]
            note = "" if copy.stopped else f" (did not stop in {copy.new_tokens} tokens)"
            kinds = ", ".join(sorted({v.kind for v in found})) or ("clean" if prompt.content_type else "–")
            rows.append(f"| {label}{note} | {_cell(mark(copy.text, found))} | {kinds} |")
        parts.append(f"## {prompt.id} · {prompt.title}\n\n" + "\n".join(rows))
    return "\n\n".join(parts) + "\n"


def run_compare(brand, specs: list[ModelSpec], base_model: str | Path, prompts: list[ComparePrompt],
                params: GenerationParams, out_dir: str | Path, prompt_set: str = "val", batch_size: int = 8,
                **options) -> Path:
    """Generate with every model and write ``compare.md`` and ``compare.jsonl`` (atomically) into ``out_dir``.

    Args:
        brand: The loaded brand (system prompt, lint).
        specs: The models (``resolve_model``).
        base_model: Base model folder or hub id for ``base`` and every adapter.
        prompts: The prompt set (``load_prompt_set``).
        params: Fixed generation parameters (with the seed).
        out_dir: Output folder.
        prompt_set: Name of the set, for the header.
        batch_size: Prompts per ``generate`` call.
        **options: ``backend``, ``load_in_4bit``, ``max_seq_length`` for ``load_model``.

    Returns:
        The path of ``compare.md``.
    """
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise CompareInputError(f"models: duplicate label in {labels}; name them with label=spec")
    outputs = generate_all(specs, base_model, prompts, params, batch_size, **options)
    lint = {label: [findings(brand, p, g.text) for p, g in zip(prompts, copies)] for label, copies in outputs.items()}
    rows = [{"id": p.id, "model": label, "content_type": p.content_type, "product_id": p.product_id,
             "text": outputs[label][i].text, "new_tokens": outputs[label][i].new_tokens,
             "stopped": outputs[label][i].stopped, "lint": [v.to_dict() for v in lint[label][i]]}
            for i, p in enumerate(prompts) for label in labels]
    out_dir = Path(out_dir)
    atomic_write_jsonl(out_dir / "compare.jsonl", rows)
    return atomic_write_text(out_dir / "compare.md", render(brand.name, specs, base_model, prompts, outputs, lint,
                                                            params, prompt_set, started))
