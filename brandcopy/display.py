"""What a learner sees: expected warnings silenced (or explained once), progress bars and short readable renderings.

``quiet()`` is called at the top of every notebook (and by ``brandcopy chat``) before any heavy import. It is
idempotent and imports nothing heavy, so it can run before ``unsloth`` and ``transformers`` are imported:

- bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" is dropped. It says that an
  optional CPU kernel package is absent; bitsandbytes falls back to its own kernel, which is what every CPU run
  uses.
- The reward model's transformers LOAD REPORT (``score.weight | MISSING``) is replaced by one line saying why it
  is expected: the classification head is new and is what the reward stage trains. A report naming any other
  missing weight is kept.
- tqdm's "IProgress not found" warning is dropped, and ``datasets``' per-map bars are off.

``notebook_setup`` is the set-up cell of every notebook (after its parameters): ``quiet()``, the stage's config and,
where models load, the backend (Unsloth first on a GPU) and ``quiet_transformers()``: one progress line per Trainer
instead of transformers' table of every logged metric, and no frozen "Loading weights" bar per model loaded.

``progress_bar`` is the one progress bar of the library: tqdm in a terminal, one line updated in place in a
notebook (a live bar in Jupyter, a single line in a saved notebook instead of one line per refresh).

The ``*_text`` functions render results (a data step's ``RunSummary``, a ``LintResult``, what
``fix_special_tokens`` changed, a stage's results, a chosen/rejected pair, a generated sample) as a few lines.
"""

import difflib
import html
import io
import logging
import os
import re
import warnings

from tqdm import tqdm

PROGRESS_ENV = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}  # one bar per dataset map: noise in a lesson
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
LOAD_REPORT_LOGGER = "transformers.modeling_utils"
HEAD_EXPLANATION = ("{model}: the classification head `score.weight` is new (not in the base checkpoint), as "
                    "expected for a reward model: the reward stage trains it.")
NO_STOP = "[no <|im_end|>: the token budget ran out]"
_BOUNDARY = re.compile(r"[\s，。！？；：、,.!?;:)）】」]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ufffd]")
_BLANK_RUN = re.compile(r"\n\s*\n(\s*\n)+")


# --- expected warnings ---------------------------------------------------------------------------


class _KernelsCommunityFilter(logging.Filter):
    """Drops bitsandbytes' note that the optional ``kernels`` package is absent."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in str(record.msg)


class _HeadLoadReportFilter(logging.Filter):
    """Replaces a LOAD REPORT whose only missing weights are ``score.*`` with one explanation, once."""

    def __init__(self):
        super().__init__()
        self.explained = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message or not only_head_missing(message):
            return True
        if self.explained:
            return False
        self.explained = True
        record.msg, record.args = HEAD_EXPLANATION.format(model=strip_ansi(message).split(" LOAD REPORT")[0]), None
        return True


def only_head_missing(report: str) -> bool:
    """Whether a transformers LOAD REPORT lists missing weights and all of them belong to the ``score`` head."""
    keys = [line.split("|")[0].strip() for line in strip_ansi(report).splitlines() if "MISSING" in line and "|" in line]
    return bool(keys) and all(key.startswith("score.") for key in keys)


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _add_filter_once(logger_name: str, filter_type: type) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, filter_type) for f in logger.filters):
        logger.addFilter(filter_type())


def drop_kernels_warning() -> None:
    """Drop bitsandbytes' kernels-community warning (done on ``import brandcopy``; ``quiet`` does it too). Idempotent."""
    _add_filter_once(BNB_CPU_LOGGER, _KernelsCommunityFilter)


def quiet() -> None:
    """Silence the warnings every run prints and that are expected (see the module docstring). Idempotent."""
    drop_kernels_warning()
    _add_filter_once(LOAD_REPORT_LOGGER, _HeadLoadReportFilter)
    warnings.filterwarnings("ignore", message="IProgress not found")
    for name, value in PROGRESS_ENV.items():
        os.environ.setdefault(name, value)


# --- the notebooks' set-up ------------------------------------------------------------------------


def notebook_setup(stage, preset: str, run: str, output_root: str, overrides: list[str], loads_models: bool = True):
    """The set-up cell of every notebook, run right after its parameters: expected warnings quietened (``quiet``),
    the repository root as working folder (presets use paths relative to it), the stage's config from the preset,
    and, where the notebook loads models, the backend prepared before anything imports transformers or TRL (on a
    GPU Unsloth patches them when it is imported, so it must come first).

    Args:
        stage: The notebook's stage config class (``SFTStageConfig``, ..., ``EvalStageConfig``).
        preset: The notebook's ``PRESET`` (``auto``, a preset name or a YAML path).
        run: The notebook's ``RUN``; empty: the preset's.
        output_root: The notebook's ``OUTPUT_ROOT``; empty: the host's default, else the preset's.
        overrides: The notebook's ``OVERRIDES`` (``key=value``), plus any the notebook adds.
        loads_models: False for the data notebooks, which need no backend.

    Returns:
        ``(cfg, overrides)``: the stage's config and the full override list, for the other stages' configs.
    """
    from brandcopy.backend import prepare_backend
    from brandcopy.demo import explain_preset, run_overrides, stage_config, use_repo_root

    quiet()
    use_repo_root()
    overrides = run_overrides(run, output_root, overrides)
    cfg = stage_config(stage, preset, overrides)
    print(f"preset:        {explain_preset(preset)}")
    print(f"run directory: {cfg.run_dir.resolve()}")
    if loads_models:
        print(f"backend:       {prepare_backend(cfg.backend, require_cuda=cfg.require_cuda)}")
        quiet_transformers()  # after prepare_backend: it imports transformers
    return cfg, overrides


def quiet_transformers() -> None:
    """What transformers draws in a notebook, made readable in a saved one. Idempotent.

    - Every Trainer draws one progress line (``progress_bar``) with the last loss, instead of transformers' notebook
      table: that one adds a row per logged step and a column per evaluation metric (fourteen for DPO), which a saved
      notebook shows cut off at the right. The stages print their results after training (``stage_results_text``,
      ``training_table_text``).
    - The per-load bars ("Loading weights", "Writing model shards") are off: a saved notebook keeps each widget frozen
      at 0%, one per model loaded. The hub's download bars stay (a 7B model's first download takes minutes).
    """
    import huggingface_hub.utils
    import transformers.trainer
    import transformers.utils.logging
    from transformers import TrainerCallback

    hub_bars = not huggingface_hub.utils.are_progress_bars_disabled()
    transformers.utils.logging.disable_progress_bar()  # turns the hub's off too
    if hub_bars:
        huggingface_hub.utils.enable_progress_bars()

    class TrainingBar(TrainerCallback):  # defined here: this module imports nothing heavy when it is imported
        """The training steps as one ``progress_bar`` line, with the last logged loss."""

        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = progress_bar(state.max_steps, "train", initial=state.global_step, unit="step")

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and "loss" in (logs or {}):
                self.bar.set_postfix_str(f"loss {logs['loss']:.3f}")

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    if transformers.trainer.DEFAULT_PROGRESS_CALLBACK.__name__ != "TrainingBar":
        transformers.trainer.DEFAULT_PROGRESS_CALLBACK = TrainingBar


# --- progress --------------------------------------------------------------------------------------


def in_notebook() -> bool:
    """Whether the code runs in a Jupyter kernel (not a terminal IPython)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in shell.config


class NotebookBar(tqdm):
    """tqdm drawn through one IPython display handle: an HTML bar while it runs, one text line once saved."""

    def __init__(self, *args, **kwargs):
        self._handle = None  # made at the first draw: a bar that never shows (``delay``) leaves no empty output
        super().__init__(*args, file=io.StringIO(), **kwargs)  # the display handle draws, not a stream

    def display(self, msg=None, pos=None):
        from IPython.display import display

        line = msg or self.format_meter(**self.format_dict)
        bar = f'<progress value="{self.n}" max="{self.total or 1}"></progress> '
        data = {"text/plain": line, "text/html": bar + html.escape(line)}
        if self._handle is None:
            self._handle = display(data, raw=True, display_id=True)
        else:
            self._handle.update(data, raw=True)
        return True


def progress_bar(total: int, desc: str, initial: int = 0, unit: str = "it", delay: float = 0.0) -> tqdm:
    """The library's progress bar: tqdm in a terminal, a ``NotebookBar`` in a notebook.

    Args:
        total: Number of steps.
        desc: Label in front of the bar.
        initial: Steps already done (a resumed run).
        unit: Unit after the counts.
        delay: Seconds before the bar first shows (a run that fails at once shows only its error).
    """
    bar = NotebookBar if in_notebook() else tqdm
    return bar(total=total, initial=initial, desc=desc, unit=unit, mininterval=0.5, delay=delay)


# --- renderings ------------------------------------------------------------------------------------


def shorten(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters at a space or punctuation (never mid-word), with "…"."""
    if len(text) <= limit:
        return text
    cut = max((m.end() for m in _BOUNDARY.finditer(text, 0, limit)), default=limit)
    return text[: cut if cut > limit // 2 else limit].rstrip() + "…"


def sample_text(text: str, stopped: bool | None = None, limit: int = 300, max_lines: int = 8) -> str:
    """A generated copy made readable: control characters and broken bytes shown as ``·``, runs of blank lines
    collapsed to one marker, cut at ``limit`` characters and ``max_lines`` lines (a model that has not learnt to
    stop can emit hundreds of short lines in a few hundred characters), and a mark when the model never emitted
    ``<|im_end|>``. ``max_lines=1`` puts the copy on one line, its line breaks shown as ``⏎``."""
    text = _CONTROL.sub("·", text.replace("\r", "")).strip()
    text = _BLANK_RUN.sub(lambda m: f"\n⏎×{m.group(0).count(chr(10)) - 1}\n", text)
    text = shorten(text, limit) if text else "(empty)"
    lines = text.split("\n")
    if max_lines <= 1:
        text = " ⏎ ".join(line.strip() for line in lines if line.strip())
    elif len(lines) > max_lines:
        text = "\n".join(lines[: max_lines - 1] + [f"… (+{len(lines) - max_lines + 1} more lines)"])
    if stopped is False:
        return f"{text} {NO_STOP}" if max_lines <= 1 else f"{text}\n{NO_STOP}"
    return text


def run_summary_text(summary, label: str = "") -> str:
    """One line for a data step's ``llm.RunSummary``: what was produced, failed and skipped, time and tokens.

    ``cost`` is the estimate at the client's configured price per million tokens (USD for DeepSeek's list price);
    the built-in scripted server is free, whatever the estimate says.
    """
    usage = summary.usage
    tokens = f"{usage.get('prompt_tokens', 0):,} prompt + {usage.get('completion_tokens', 0):,} completion tokens"
    return (f"{label + ': ' if label else ''}{summary.produced} produced, {summary.failed} failed, "
            f"{summary.skipped} already done; {summary.seconds:.1f} s; {usage.get('calls', 0)} calls "
            f"({usage.get('cached', 0)} cached), {tokens}, est. ${summary.cost:.2f} at list price")


def report_text(report: dict) -> str:
    """A data step's report (``clean``/``make_negatives``: RunSummary values and counts) as one line each."""
    lines = []
    for name, value in report.items():
        lines.append(run_summary_text(value, name) if hasattr(value, "produced") else f"{name}: {value}")
    return "\n".join(lines)


def lint_result_text(result, text: str, width: int = 12) -> str:
    """A ``LintResult``: "clean" or each violation with its kind, message and the offending span in context."""
    if result.clean:
        return f"clean (score {result.score:.2f})"
    lines = [f"score {result.score:.2f}, {len(result.violations)} violation(s):"]
    for v in result.violations:
        start, end = v.span
        context = f"…{text[max(0, start - width):start]}⟦{text[start:end]}⟧{text[end:end + width]}…".replace("\n", " ")
        lines.append(f"  - {v.kind}: {v.message}  {context}")
    return "\n".join(lines)


def changes_text(changes: dict) -> str:
    """What ``fix_special_tokens`` changed, one ``field: before -> after`` line each (templates summarised)."""
    if not changes:
        return "nothing to change (already fixed)"
    lines = []
    for name, (before, after) in changes.items():
        if name == "chat_template":
            before, after = "the base template", "the same template with {% generation %} markers for assistant-only loss"
        lines.append(f"  {name}: {before!r} -> {after!r}" if name != "chat_template" else f"  {name}: {before} -> {after}")
    return "\n".join(lines)


STAGE_RESULT_NOTES = {
    "train_loss": "mean training loss over all steps",
    "eval_loss": "loss on the held-out val split (val products)",
    "global_step": "optimizer steps taken",
    "changed_tensors": "parameter tensors that changed during training (0 would mean nothing was trained)",
    "heldout_pairwise_accuracy_before": "held-out pairs ranked correctly before training (0.5 = chance)",
    "heldout_pairwise_accuracy": "held-out pairs ranked correctly after training",
    "eval_reward_accuracy": "held-out pairs where the policy prefers chosen over rejected more than the reference does",
    "rewards": "the reward functions GRPO was paid with (weights: grpo_reward_weights)",
    "merged_from": "adapter folded into the base",
    "resumed_from": "checkpoint the stage resumed from",
    "started_from": "adapter the stage started from",
}


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_value(v)}" for k, v in value.items())
    return str(value)


def stage_results_text(results: dict) -> str:
    """A stage's headline results (``demo.stage_summary``), one labelled and explained line each."""
    lines = [f"  {key:34s} {_value(value):>10s}  {STAGE_RESULT_NOTES.get(key, '')}".rstrip()
             for key, value in results.items() if value is not None]
    if isinstance(results.get("train_loss"), float) and isinstance(results.get("eval_loss"), float):
        gap = results["eval_loss"] - results["train_loss"]
        lines.append(f"  eval - train loss = {gap:+.2f}: a large positive gap means the model fits the training "
                     "copy better than unseen products (memorising; expected for a tiny model on 126 samples)")
    return "\n".join(lines)


DPO_COLUMNS = {"loss": "loss", "rewards/margins": "margin", "rewards/accuracies": "accuracy",
               "eval_rewards/accuracies": "held-out accuracy"}  # notebook 06 explains each


def training_table_text(stage_dir, columns: dict[str, str], rows: int = 8) -> str:
    """A few columns of a stage's ``metrics.jsonl`` as a short table: at most ``rows`` logged steps, evenly spaced,
    the last one included. A metric logged at another step than the row's (an evaluation every ``save_steps``)
    shows its latest value so far; "–" before its first value.

    Args:
        stage_dir: The stage folder.
        columns: ``{metrics.jsonl key: column label}``, in column order.
        rows: Most steps shown.
    """
    from pathlib import Path

    from brandcopy.run import read_metrics

    latest, table = {}, []
    for record in read_metrics(Path(stage_dir) / "metrics.jsonl"):
        latest.update({key: record[key] for key in columns if key in record})
        if any(key in record for key in columns):
            row = [record["step"], *[latest.get(key) for key in columns]]
            if table and table[-1][0] == row[0]:
                table.pop()  # an evaluation logged at a step joins that step's row
            table.append(row)
    shown = min(rows, len(table))
    picked = sorted({round(i * (len(table) - 1) / max(shown - 1, 1)) for i in range(shown)})
    width = [max(6, len(label)) for label in columns.values()]
    lines = ["step  " + "  ".join(f"{label:>{w}s}" for label, w in zip(columns.values(), width))]
    for step, *values in (table[i] for i in picked):
        lines.append(f"{step:4d}  " + "  ".join(f"{'–' if v is None else f'{v:.3f}':>{w}s}" for v, w in zip(values, width)))
    return "\n".join(lines)


def pair_diff_text(chosen: str, rejected: str, context: int = 15) -> str:
    """Where a rejected answer differs from its chosen one: each change as ``[-chosen-][+rejected+]`` with a
    little context, instead of two long texts that look alike."""
    matcher = difflib.SequenceMatcher(None, chosen, rejected, autojunk=False)
    hunks = [op for op in matcher.get_opcodes() if op[0] != "equal"]
    if not hunks:
        return "identical texts"
    lines = []
    for tag, a0, a1, b0, b1 in hunks[:6]:
        removed = f"[-{chosen[a0:a1]}-]" if a1 > a0 else ""
        added = f"[+{rejected[b0:b1]}+]" if b1 > b0 else ""
        before, after = chosen[max(0, a0 - context):a0], chosen[a1:a1 + context]
        lines.append(f"  …{before}{shorten(removed, 80)}{shorten(added, 80)}{after}…".replace("\n", " "))
    if len(hunks) > 6:
        lines.append(f"  (+{len(hunks) - 6} more changes)")
    same = matcher.ratio()
    return f"{len(hunks)} change(s), {same:.0%} of the text shared:\n" + "\n".join(lines)


# --- the evaluation at a glance --------------------------------------------------------------------

OVERVIEW_METRICS = {"stop_rate": "stopped", "distinct_2": "distinct-2", "lint_score": "lint", "fact_pass_rate": "facts ok"}


def _percent(value: float | None) -> str:
    """A share as a percentage; None (null in results.json: nothing was measured) as –."""
    return "–" if value is None else f"{value:.0%}"


def eval_overview_markdown(eval_dir, link_from=None) -> str:
    """The evaluation at a glance (from ``results.json``): per model the judge's overall mean score, the greedy stop
    rate and a few offline metrics, the position-bias figures, and a link to the full ``report.md``.

    Args:
        eval_dir: The eval stage folder.
        link_from: Folder the link is made relative to (a notebook's folder); None: the absolute path.
    """
    import json
    from pathlib import Path

    eval_dir = Path(eval_dir)
    results = json.loads((eval_dir / "results.json").read_text(encoding="utf-8"))
    judged = results["judge_means"].get("overall", {})
    greedy = results["metrics"].get("greedy", {})
    header = ["model", "judge (1-5)", "eval loss", *OVERVIEW_METRICS.values()]
    rows = [[name, judged.get(name), results["losses"].get(name, {}).get("eval_loss"),
             *[greedy.get(name, {}).get("overall", {}).get(key) for key in OVERVIEW_METRICS]] for name in results["models"]]
    rows.append(["golden", judged.get("golden"), None, *[None] * len(OVERVIEW_METRICS)])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("–" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v) for v in row) + " |"
              for row in rows]
    bias = [f"- **{name}**: the first position won {_percent(b['first_won_original'])} of best-of-3 rounds in the original "
            f"order, {_percent(b['first_won_swapped'])} after swapping (about 33% without bias); the orders agreed on "
            f"{_percent(b['agreement'])}, {b['ties']} ties, {b['failed']} failed, of {b['n']}"
            for name, b in results["position_bias"].items()]
    report = eval_dir / "report.md"
    link = os.path.relpath(report, link_from) if link_from else str(report)
    partial = "\n\n**PARTIAL**: " + "; ".join(results["partial"]) if results["partial"] else ""
    return "\n".join([f"{results['n_prompts']} val prompts, judge: {results['judge'] or 'not run'}.{partial}", "",
                      *lines, "", "Position bias of the judge:", *bias, "",
                      f"Everything else (per content type, sampled decoding, charts, failures): [report.md]({link})"])


def write_results_text(brand, results, limit: int = 300, max_lines: int = 8, max_reasons: int = 5) -> str:
    """``write_copy``'s results for a notebook: per request the chosen copy (``sample_text``: at most ``limit``
    characters and ``max_lines`` lines) or the first ``max_reasons`` reasons nothing passed. ``results.md`` keeps
    the whole copy and every reason."""
    lines = []
    for r in results:
        product = brand.product(r.request.product_id)
        lines.append(f"=== {r.request.id}: {product.name} · {brand.content_type(r.request.content_type).name_zh}")
        if r.status == "passed":
            clean = sum(c.clean for c in r.candidates)
            lines.append(f"passed ({clean}/{len(r.candidates)} candidates clean, ranked by {r.ranked_by})")
            lines.append(sample_text(r.text, None, limit, max_lines))
        else:
            lines.append(f"failed: none of {len(r.candidates)} candidates passed the brand and fact checks")
            lines += [f"- {reason}" for reason in r.reasons[:max_reasons]]
            if len(r.reasons) > max_reasons:
                lines.append(f"- … {len(r.reasons) - max_reasons} more in results.md")
    return "\n".join(lines)


def eval_samples_text(eval_dir, n: int = 2, limit: int = 200) -> str:
    """The first ``n`` val prompts of an evaluation: golden copy and each model's greedy copy, one line each
    (``sample_text`` with ``max_lines=1``: line breaks shown as ``⏎``, a mark where the model never emitted
    ``<|im_end|>``), so six models side by side stay a screenful whatever they generated."""
    from pathlib import Path

    from brandcopy.demo import eval_samples
    from brandcopy.files import read_jsonl

    rows = read_jsonl(Path(eval_dir) / "generations.jsonl")
    stopped = {(r["id"], r["model"]): r["stopped"] for r in rows if r["setting"] == "greedy"}
    parts = []
    for sample in eval_samples(eval_dir, n):
        parts.append(f"=== {sample['id']} ({sample['content_type']})")
        parts.append(f"--- golden: {sample_text(sample['golden'], None, limit, max_lines=1)}")
        parts += [f"--- {name}: {sample_text(text, stopped[sample['id'], name], limit, max_lines=1)}"
                  for name, text in sample["models"].items()]
    return "\n".join(parts)
