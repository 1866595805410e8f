"""``make gpu-check``: every stage once on the GPU with small step counts, and what each one cost.

The check runs data (scripted server), SFT, reward model, DPO, GRPO, merge, evaluation (scripted
judge) and one chat turn through the same library calls a user runs, with a GPU preset's own
settings (batch, sequence length, LoRA, 4-bit, vLLM share) and only the step counts cut. It
writes ``<output_root>/gpu-check/report.json``: per stage ok / failed with the error, wall
seconds, peak GPU memory (``torch.cuda.max_memory_allocated`` and the most ``nvidia-smi``
showed), tokens per second, and the doctor's estimate beside the measured peak.

It needs no network: when the preset's model is not on disk or in the Hugging Face cache, it
builds a model with the real architecture's shape (Qwen2.5-0.5B-Instruct's by default, 7B's on
request) and random weights. Memory and speed depend on the shapes, not on the weights; the
copy such a model writes is noise, so lint scores and stop rates of that run mean nothing.
"""

import json
import shutil
import subprocess
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from brandcopy.config import EvalStageConfig, GRPOStageConfig
from brandcopy.doctor import KNOWN_SHAPES, ModelShape, vram_plan
from brandcopy.files import atomic_dir, atomic_write_text, read_jsonl, read_jsonl_log

GPU_PRESET = "configs/qwen2.5-7b-24gb.yaml"
SHAPES = {"0.5b": "qwen2.5-0.5b-instruct", "7b": "qwen2.5-7b-instruct"}
# Step counts small enough for minutes, large enough to reach each stage's steady-state memory.
SMALL_RUN = {
    "sft_max_steps": 8, "reward_max_steps": 6, "dpo_max_steps": 6, "grpo_max_steps": 4,
    "save_steps": 1000, "logging_steps": 1, "merge_from": "grpo", "merge_gguf": "",
    "eval_models": [], "eval_max_samples": 8, "eval_max_new_tokens": 256, "eval_sampled": False,
    "eval_judge": True, "eval_judge_base_url": "scripted", "eval_judge_model": "heuristic-judge", "eval_ifeval_max_samples": 8, "grpo_reward_weights": {
        "lint": 1.0, "fact": 1.0, "format": 1.0, "cta": 0.5, "reward_model": 0.5, "judge": 0.0},
}
STAGES = ("data", "sft", "reward", "dpo", "grpo", "merged", "eval", "chat")
NEEDS = {"sft": "data", "reward": "data", "dpo": "sft", "grpo": "sft", "merged": "grpo", "eval": "sft", "chat": "merged"}


@dataclass
class StageReport:
    """One stage of the check."""

    stage: str
    status: str = "skipped"  # ok | failed | skipped
    error: str | None = None
    seconds: float | None = None
    peak_allocated_gib: float | None = None  # torch.cuda.max_memory_allocated
    peak_nvidia_smi_gib: float | None = None  # the most memory.used nvidia-smi showed (all processes)
    estimated_peak_gib: float | None = None  # brandcopy doctor's estimate for this stage
    tokens_per_second: float | None = None
    extra: dict = field(default_factory=dict)


def shaped_model(out_dir: Path, shape: ModelShape, texts: list[str]) -> Path:
    """Write a Qwen2 model of ``shape`` with random weights and a Qwen2.5-style tokenizer (special tokens, template).

    Built directly on the GPU in bf16, then saved as safetensors; a 7B shape takes ~15 GB of disk.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from brandcopy.modeling import END_OF_TURN, ENDOFTEXT
    from brandcopy.tiny import train_qwen2_tokenizer

    if (out_dir / "config.json").is_file():
        return out_dir
    tokenizer = train_qwen2_tokenizer(texts)
    endoftext, im_end = tokenizer.convert_tokens_to_ids([ENDOFTEXT, END_OF_TURN])
    config = Qwen2Config(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        tie_word_embeddings=shape.tied_embeddings, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, bos_token_id=endoftext, eos_token_id=im_end, dtype="bfloat16")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config = GenerationConfig(bos_token_id=endoftext, eos_token_id=[im_end, endoftext],
                                               pad_token_id=endoftext)
    with atomic_dir(out_dir) as partial:
        tokenizer.save_pretrained(partial)
        model.save_pretrained(partial)
    return out_dir


def model_on_disk(name_or_path: str) -> bool:
    """A local model folder, or a hub id whose config is in the Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    if (Path(name_or_path) / "config.json").is_file():
        return True
    return "/" in name_or_path and isinstance(try_to_load_from_cache(name_or_path, "config.json"), str)


class NvidiaSmiSampler:
    """Polls ``nvidia-smi`` for the GPU's used memory in a thread; ``peak_gib`` is the largest reading."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak_mib, self._stop = interval, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                self.peak_mib = max([self.peak_mib, *(float(v) for v in out.split() if v.strip())])
            except (OSError, subprocess.SubprocessError, ValueError):
                return
            self._stop.wait(self.interval)

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)

    @property
    def peak_gib(self) -> float | None:
        return round(self.peak_mib / 1024, 2) if self.peak_mib else None


def check_preset(preset: str | Path, out_dir: Path, model: str, overrides: dict) -> Path:
    """Write the preset the check runs: the GPU preset's settings, the check's model, run and step counts."""
    settings = yaml.safe_load(Path(preset).read_text(encoding="utf-8"))
    settings.update(SMALL_RUN)
    settings.update({"run": out_dir.name, "output_root": str(out_dir.parent), "model": model, "data_dir": ""})
    settings.update(overrides)
    path = out_dir / "preset.yaml"
    atomic_write_text(path, yaml.safe_dump(settings, allow_unicode=True, sort_keys=False))
    return path


def _tokens_per_second(stage_dir: Path, seconds: float) -> float | None:
    """Training tokens (TRL's ``num_tokens``, logged by SFT, DPO and GRPO) per wall second of the stage."""
    counts = [row["num_tokens"] for row in read_jsonl_log(stage_dir / "metrics.jsonl")
              if isinstance(row.get("num_tokens"), (int, float))]
    return round(max(counts) / seconds, 1) if counts else None


def _eval_figures(eval_dir: Path) -> dict:
    """Greedy stop rate per model and generated tokens per second over the whole eval stage."""
    rows = read_jsonl(eval_dir / "generations.jsonl")
    stop_rate = {}
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model and r["setting"] == "greedy"]
        stop_rate[model] = round(sum(r["stopped"] for r in mine) / len(mine), 3)
    return {"stop_rate": stop_rate, "generated_tokens": sum(r["new_tokens"] for r in rows)}


def _stage_steps(preset: Path, backend: str) -> dict:
    """The callable of each stage (library entry points only), given the check's preset."""
    from brandcopy.brand import load_brand
    from brandcopy.chat import CHAT_PARAMS, load_chat_model, stream_reply
    from brandcopy.config import DPOStageConfig, MergeStageConfig, RewardStageConfig, SFTStageConfig
    from brandcopy import evaluate
    from brandcopy.demo import build_data, judged, llm_endpoint, stage_config
    from brandcopy.evaluate import run_eval
    from brandcopy.train.dpo import run_dpo
    from brandcopy.train.grpo import run_grpo
    from brandcopy.train.merge import run_merge
    from brandcopy.train.reward import run_reward
    from brandcopy.train.sft import run_sft

    sft = stage_config(SFTStageConfig, preset)
    brand = load_brand(sft.brand)

    def data():
        with llm_endpoint(brand, "", cache_dir=Path(sft.output_root) / "llm-cache") as endpoint:
            return build_data(endpoint, brand, sft.data_path)

    def chat():
        model, tokenizer = load_chat_model(sft.run_dir / "merged", {}, backend=backend, load_in_4bit=False,
                                           max_seq_length=sft.max_seq_length)
        record = read_jsonl(sft.data_path / "sft_val.jsonl")[0]
        messages = record["messages"][:-1]
        reply = "".join(stream_reply(model, tokenizer, messages, "base", CHAT_PARAMS))
        return {"reply_characters": len(reply)}

    return {
        "data": data,
        "sft": lambda: run_sft(sft),
        "reward": lambda: run_reward(stage_config(RewardStageConfig, preset)),
        "dpo": lambda: run_dpo(stage_config(DPOStageConfig, preset)),
        "grpo": lambda: run_grpo(stage_config(GRPOStageConfig, preset)),
        "merged": lambda: run_merge(stage_config(MergeStageConfig, preset)),
        "eval": lambda: judged(run_eval, stage_config(EvalStageConfig, preset), evaluate.judge_endpoint),
        "chat": chat,
    }


def run_stage(name: str, step, stage_dir: Path) -> StageReport:
    """Run one stage, measuring wall time and peak memory; an exception fails the stage, not the check."""
    import torch

    from brandcopy.evaluate import release_memory

    report = StageReport(name)
    release_memory()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with NvidiaSmiSampler() as smi:
        try:
            result = step()
            report.status = "ok"
            report.extra = result if isinstance(result, dict) and name == "chat" else {}
        except Exception as error:  # the report records any failure; the next stages still run
            report.status, report.error = "failed", f"{type(error).__name__}: {error}"
            report.extra = {"traceback": traceback.format_exc(limit=8)}
    report.seconds = round(time.perf_counter() - started, 1)
    report.peak_allocated_gib = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
    report.peak_nvidia_smi_gib = smi.peak_gib
    if report.status == "ok":
        report.tokens_per_second = _tokens_per_second(stage_dir, report.seconds)
        if name == "eval":
            report.extra = _eval_figures(stage_dir)
            report.tokens_per_second = round(report.extra["generated_tokens"] / report.seconds, 1)
    release_memory()
    return report


def run_gpu_check(preset: str | Path = GPU_PRESET, shape: str = "0.5b", output_root: str | Path = "outputs",
                  use_preset_model: bool = True) -> Path | None:
    """Run every stage once on the GPU and write ``<output_root>/gpu-check/report.json``.

    Args:
        preset: The GPU preset whose settings are checked.
        shape: ``0.5b`` or ``7b``: the architecture of the random model built when the preset's
            model is not on disk (or when ``use_preset_model`` is False).
        output_root: Folder for the ``gpu-check`` run.
        use_preset_model: Use the preset's model when it is cached or a local folder.

    Returns:
        The report's path, or None (after one line) on a machine without CUDA.
    """
    import torch

    if not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU and torch does not see one here; nothing was run.")
        return None
    from importlib.util import find_spec

    from brandcopy.backend import prepare_backend
    from brandcopy.demo import repo_texts

    settings = yaml.safe_load(Path(preset).read_text(encoding="utf-8"))
    out_dir = Path(output_root) / "gpu-check"
    notes = []
    overrides = {}
    if settings.get("backend") == "unsloth" and find_spec("unsloth") is None:
        overrides["backend"] = "hf"
        notes.append("unsloth is not installed: the hf backend (transformers + bitsandbytes + PEFT) ran instead")
    if settings.get("grpo_use_vllm") and find_spec("vllm") is None:
        overrides["grpo_use_vllm"] = False
        notes.append("vLLM is not installed: GRPO generated with transformers instead of vLLM")
    backend = prepare_backend(overrides.get("backend", settings["backend"]), require_cuda=True)
    if use_preset_model and model_on_disk(settings["model"]):
        model, model_note = settings["model"], f"the preset's model {settings['model']}"
    else:
        shaped = KNOWN_SHAPES[SHAPES[shape]]
        model = str(shaped_model(Path(output_root) / f"shaped-{shape}", shaped, repo_texts()))
        model_note = f"random weights in {SHAPES[shape]}'s shape (the preset's model is not on disk)"
    notes.append(f"model: {model_note}")
    check = check_preset(preset, out_dir, model, overrides)
    plan = vram_plan(check, torch.cuda.get_device_properties(0).total_memory / 1024**3)
    steps = _stage_steps(check, backend)
    reports: dict[str, StageReport] = {}
    for name in STAGES:
        need = NEEDS.get(name)
        if need and reports[need].status != "ok":
            reports[name] = StageReport(name, error=f"skipped: {need} did not finish")
        else:
            print(f"\n=== gpu-check: {name} ===", flush=True)
            reports[name] = run_stage(name, steps[name], out_dir / name)
        reports[name].estimated_peak_gib = plan.stage_peak_gib.get(name)
    return write_report(out_dir, reports, notes, plan)


def write_report(out_dir: Path, reports: dict, notes: list[str], plan) -> Path:
    """``report.json`` and the console summary: one line per stage, then the whole figure."""
    import torch

    ok = sum(r.status == "ok" for r in reports.values())
    total = sum(r.seconds or 0 for r in reports.values())
    summary = (f"gpu-check: {ok}/{len(reports)} stages ok in {total:.0f} s on {torch.cuda.get_device_name(0)}, "
               f"peak {max((r.peak_allocated_gib or 0) for r in reports.values()):.2f} GiB allocated")
    payload = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
               "model": plan.model, "notes": notes, "stages": {n: asdict(r) for n, r in reports.items()},
               "summary": summary}
    path = out_dir / "report.json"
    atomic_write_text(path, json.dumps(payload, ensure_ascii=False, indent=2))
    print("\nstage    status   seconds  peak alloc  nvidia-smi  doctor est.  tokens/s")
    for r in reports.values():
        print(f"{r.stage:8s} {r.status:8s} {_cell(r.seconds):>7s}  {_cell(r.peak_allocated_gib):>10s}  "
              f"{_cell(r.peak_nvidia_smi_gib):>10s}  {_cell(r.estimated_peak_gib):>11s}  {_cell(r.tokens_per_second):>8s}"
              + (f"  {r.error}" if r.error else ""))
    for note in notes:
        print(f"note: {note}")
    if "eval" in reports and reports["eval"].status == "ok":
        print(f"eval stop rate (greedy): {reports['eval'].extra['stop_rate']}")
    print(f"report: {path}\n{summary}")
    return path


def _cell(value) -> str:
    return "-" if value is None else str(value)
