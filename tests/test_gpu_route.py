"""The GPU route, checked on CPU: each test stands in for a GPU behaviour and says which.

Where the real thing needs CUDA (Unsloth's patching, vLLM, nvidia-smi, a 24 GB card), a fake
stands in for it: a fake ``unsloth`` package that records what was imported before it, a fake
``nvidia-smi`` script, a fake vLLM version. The code under test is the library's own.
"""

import importlib.machinery
import json
import os
import subprocess
import sys
import types
import weakref
from pathlib import Path

import jinja2
import pytest
import torch
import yaml
from conftest import REPO

from brandcopy import backend, doctor, modeling
from brandcopy.config import (
    ConfigError,
    DPOStageConfig,
    EvalStageConfig,
    GRPOStageConfig,
    MergeStageConfig,
    RewardStageConfig,
    SFTStageConfig,
    load_stage_config,
)
from brandcopy.tiny import QWEN25_CHAT_TEMPLATE

TINY = REPO / "configs" / "tiny-cpu.yaml"
PRESET_7B = REPO / "configs" / "qwen2.5-7b-24gb.yaml"
NVIDIA_SMI_535 = """Mon Nov 30 10:00:00 2026
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 535.104.05             Driver Version: 535.104.05   CUDA Version: 12.2     |
|-----------------------------------------+------------------------+----------------------+
"""


def _cli(*args: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "brandcopy.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=300)


def _fake_nvidia_smi(folder: Path) -> Path:
    """An ``nvidia-smi`` that reports one RTX 4090 on driver 535 (CUDA 12.2), as an old AutoDL image does."""
    script = folder / "nvidia-smi"
    script.write_text("#!/bin/sh\ncase \"$*\" in *query-gpu*) echo 'NVIDIA GeForce RTX 4090';; *) cat <<'EOF'\n"
                      + NVIDIA_SMI_535 + "EOF\n;; esac\n", encoding="utf-8")
    script.chmod(0o755)
    return folder


# --- 1. a CUDA 13 torch on an older driver -------------------------------------------------------


def test_nvidia_smi_banner_is_parsed():
    smi = backend.parse_nvidia_smi(NVIDIA_SMI_535, "NVIDIA GeForce RTX 4090\n")
    assert (smi.gpus, smi.driver, smi.cuda) == (["NVIDIA GeForce RTX 4090"], "535.104.05", "12.2")


def test_gpu_that_torch_cannot_use_names_driver_and_torch_cuda(monkeypatch):
    # Stands in for torch 2.13 (CUDA 13) on a driver-535 machine: nvidia-smi sees the card, torch does not.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    smi = backend.parse_nvidia_smi(NVIDIA_SMI_535, "NVIDIA GeForce RTX 4090\n")
    problem = backend.cuda_problem(smi)
    assert "RTX 4090" in problem and "535.104.05" in problem and "12.2" in problem
    assert "CUDA 13.0" in problem and ">= 580" in problem
    monkeypatch.setattr(backend, "nvidia_smi", lambda: smi)
    with pytest.raises(backend.GPUSetupError, match="driver 535.104.05"):
        backend.prepare_backend("auto")  # even "auto" must not fall back to the CPU silently


def test_no_gpu_at_all_is_fine_unless_the_preset_requires_one(monkeypatch):
    monkeypatch.setattr(backend, "nvidia_smi", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend.prepare_backend("auto") == "hf"
    with pytest.raises(backend.GPUSetupError, match="require_cuda"):
        backend.prepare_backend("auto", require_cuda=True)


def test_doctor_fails_when_nvidia_smi_sees_a_gpu_torch_cannot_use(tmp_path):
    fake = _fake_nvidia_smi(tmp_path)
    result = _cli("doctor", env={"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"})
    assert result.returncode == 1, result.stdout + result.stderr
    problem = [line for line in result.stdout.splitlines() if line.startswith("PROBLEM: gpu:")]
    assert problem and "RTX 4090" in problem[0] and "535.104.05" in problem[0]


@pytest.mark.cpu_only
def test_gpu_preset_stops_at_start_up_without_cuda(tmp_path):
    result = _cli("train", "sft", "--config", str(PRESET_7B), f"output_root={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "require_cuda" in result.stderr
    assert not (tmp_path / "qwen7b").exists()  # nothing was created


# --- 2. vLLM for GRPO --------------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "accepted"), [("0.32.0", True), ("0.11.1", False), ("0.14.1", False)])
def test_vllm_versions_unsloth_rejects_are_reported(monkeypatch, version, accepted):
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name: object() if name == "vllm" else None)
    monkeypatch.setattr(backend.metadata, "version", lambda name: version)
    assert (backend.vllm_problem() is None) == accepted


def test_grpo_with_vllm_missing_fails_before_weights_load(monkeypatch, tmp_path):
    from brandcopy.train import grpo

    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(grpo, "load_adapter_model", lambda *a, **k: pytest.fail("weights loaded"))
    cfg = load_stage_config(GRPOStageConfig, TINY, [f"output_root={tmp_path}", "grpo_use_vllm=true"])
    with pytest.raises(ConfigError, match=r"pip install vllm==0\.32\.0.*grpo_use_vllm=false"):
        grpo.run_grpo(cfg)


def test_doctor_reports_missing_vllm_for_a_vllm_preset(monkeypatch):
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name: None)
    problems = doctor.setup_problems(PRESET_7B)
    assert any(p.startswith("grpo:") and "vllm==0.32.0" in p for p in problems)


# --- 3. unsloth imported before trl and transformers ------------------------------------------------


FAKE_UNSLOTH = """import json, os, sys
# Stands in for unsloth: Unsloth patches trl/transformers when imported, so record what came before it.
json.dump(sorted(m for m in ("trl", "transformers", "peft") if m in sys.modules), open(os.environ["FAKE_UNSLOTH_LOG"], "w"))
raise ImportError("fake unsloth stops here")
"""


@pytest.mark.parametrize("command", [["train", "sft"], ["train", "reward"], ["train", "dpo"], ["train", "grpo"],
                                     ["merge"], ["eval"], ["chat"], ["demo"]])
def test_every_entry_point_imports_unsloth_before_trl_and_transformers(tmp_path, command):
    (tmp_path / "unsloth").mkdir()
    (tmp_path / "unsloth" / "__init__.py").write_text(FAKE_UNSLOTH, encoding="utf-8")
    log = tmp_path / "imported-before-unsloth.json"
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "FAKE_UNSLOTH_LOG": str(log)}
    preset = tmp_path / "unsloth.yaml"  # chat takes no overrides: the backend comes from the preset
    preset.write_text(TINY.read_text(encoding="utf-8").replace("backend: hf", "backend: unsloth")
                      .replace("output_root: outputs", f"output_root: {tmp_path}"), encoding="utf-8")
    result = _cli(*command, "--config", str(preset), env=env)
    assert result.returncode == 2, result.stderr
    assert "fake unsloth stops here" in result.stderr
    assert json.loads(log.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize(("module", "factory", "config_cls", "trl_name"), [
    ("sft", "sft_config", SFTStageConfig, "SFTConfig"), ("dpo", "dpo_config", DPOStageConfig, "DPOConfig"),
    ("grpo", "grpo_config", GRPOStageConfig, "GRPOConfig"), ("reward", "reward_config", RewardStageConfig, "RewardConfig"),
])
def test_stages_use_trl_classes_as_rebound_after_import(monkeypatch, tmp_path, module, factory, config_cls, trl_name):
    # Stands in for Unsloth rebinding trl.<Name> after brandcopy.train.* was imported (a notebook's order).
    import importlib

    import trl

    stage = importlib.import_module(f"brandcopy.train.{module}")
    patched = type(f"Unsloth{trl_name}", (getattr(trl, trl_name),), {})
    monkeypatch.setattr(trl, trl_name, patched)
    cfg = load_stage_config(config_cls, TINY, [f"output_root={tmp_path}"])
    assert type(getattr(stage, factory)(cfg)) is patched


# --- 4. the reward model in 4 bits, and a memory plan that counts every resident model ---------------


def _tiny_reward_dir(tmp_path: Path, model_dir: Path, load_in_4bit: bool) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "reward"
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    peft = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"],
                                            modules_to_save=["score"]))
    peft.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    (out / "config.yaml").write_text(yaml.safe_dump({"load_in_4bit": load_in_4bit}), encoding="utf-8")
    return out


@pytest.mark.parametrize("load_in_4bit", [True, False])
def test_grpo_reward_model_loads_as_it_was_trained(tmp_path, tiny_model_dir, load_in_4bit):
    import bitsandbytes as bnb

    from brandcopy.modeling import load_reward_model, score_conversations

    reward_dir = _tiny_reward_dir(tmp_path, tiny_model_dir, load_in_4bit)
    model, tokenizer = load_reward_model(str(reward_dir))
    quantized = any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert quantized == load_in_4bit
    scores = score_conversations(model, tokenizer, [[{"role": "user", "content": "你好"},
                                                     {"role": "assistant", "content": "您好"}]])
    assert len(scores) == 1 and scores[0] == scores[0]  # a finite number, not NaN


def test_memory_plan_counts_every_model_resident_in_grpo(tmp_path):
    plan = doctor.vram_plan(PRESET_7B, 24.0)
    grpo = plan.residents_gib["grpo"]
    assert grpo["reward model weights"] < 5.0  # 4-bit: a bf16 7B classifier would be ~13 GiB
    assert "vLLM share (policy weights + KV cache)" in grpo and "policy weights" not in grpo
    assert plan.stage_peak_gib["grpo"] == pytest.approx(sum(grpo.values()), abs=0.05)
    assert plan.warnings == []  # the 24 GB preset fits with its own settings
    text = PRESET_7B.read_text(encoding="utf-8")
    without_rm = tmp_path / "no-rm.yaml"
    without_rm.write_text(text.replace("reward_model: 0.5", "reward_model: 0.0"), encoding="utf-8")
    assert "reward model weights" not in doctor.vram_plan(without_rm, 24.0).residents_gib["grpo"]
    hf = tmp_path / "hf.yaml"  # TRL's own colocated vLLM loads a second copy of the weights
    hf.write_text(text.replace("backend: unsloth", "backend: hf").replace("grpo_beta: 0.0", "grpo_beta: 0.04"),
                  encoding="utf-8")
    hf_grpo = doctor.vram_plan(hf, 24.0).residents_gib["grpo"]
    assert "policy weights" in hf_grpo and "reference (shared base, adapter off)" in hf_grpo
    assert doctor.vram_plan(hf, 24.0).stage_peak_gib["grpo"] > plan.stage_peak_gib["grpo"]


# --- 5. saved chat templates are plain ---------------------------------------------------------------


def test_saved_tokenizer_has_the_plain_template_and_memory_keeps_markers(tmp_path, tiny_model_dir):
    model, tokenizer = modeling.load_model(tiny_model_dir, backend="hf")
    modeling.fix_special_tokens(model, tokenizer)
    assert modeling.has_generation_markers(tokenizer.chat_template)
    modeling.save_tokenizer(tokenizer, tmp_path)
    assert modeling.has_generation_markers(tokenizer.chat_template)  # training continues with markers
    saved = modeling.AutoTokenizer.from_pretrained(tmp_path).chat_template
    assert saved == QWEN25_CHAT_TEMPLATE


def test_merged_model_template_renders_without_the_generation_extension(sft_run, tmp_path):
    overrides, sft_dir = sft_run
    assert not modeling.has_generation_markers(modeling.AutoTokenizer.from_pretrained(sft_dir).chat_template)
    cfg = load_stage_config(MergeStageConfig, TINY, overrides + ["merge_from=sft", "run=t"])
    merged = sft_dir.parent / "merged"
    if not (merged / "manifest.json").is_file():
        from brandcopy.train.merge import run_merge

        run_merge(cfg)
    saved = json.loads((merged / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    if saved is None:
        saved = (merged / "chat_template.jinja").read_text(encoding="utf-8")
    assert saved == QWEN25_CHAT_TEMPLATE  # the base model's template, exactly
    template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(saved)  # no generation extension
    text = template.render(messages=[{"role": "user", "content": "写一句话"}], add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    generation = json.loads((merged / "generation_config.json").read_text(encoding="utf-8"))
    im_end, endoftext = modeling.AutoTokenizer.from_pretrained(merged).convert_tokens_to_ids(["<|im_end|>",
                                                                                             "<|endoftext|>"])
    assert generation["eos_token_id"] == [im_end, endoftext]  # item 7: the model's own list survives the merge


# --- 6. vLLM serves adapters up to the adapter's rank ------------------------------------------------


def test_fast_inference_gets_the_adapters_lora_rank(monkeypatch, tmp_path, tiny_model_dir):
    calls = {}

    class FastLanguageModel:  # stands in for unsloth.FastLanguageModel: records the load arguments
        @staticmethod
        def from_pretrained(**kwargs):
            calls.update(kwargs)
            raise RuntimeError("recorded")

    fake = types.ModuleType("unsloth")
    fake.__spec__ = importlib.machinery.ModuleSpec("unsloth", None)
    fake.FastLanguageModel = FastLanguageModel
    monkeypatch.setitem(sys.modules, "unsloth", fake)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 128, "base_model_name_or_path": str(tiny_model_dir)}))
    with pytest.raises(RuntimeError, match="recorded"):
        modeling.load_adapter_model(adapter, backend="unsloth", vllm_gpu_memory_utilization=0.4)
    assert calls["fast_inference"] is True and calls["max_lora_rank"] == 128 and calls["gpu_memory_utilization"] == 0.4


# --- 7. the model's own stop-id list ----------------------------------------------------------------


def test_fix_special_tokens_keeps_the_models_eos_list(tiny_model_dir):
    model, tokenizer = modeling.load_model(tiny_model_dir, backend="hf")
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert model.generation_config.eos_token_id == [im_end, endoftext]  # as Qwen2.5-Instruct ships it
    modeling.fix_special_tokens(model, tokenizer)
    assert model.generation_config.eos_token_id == [im_end, endoftext]
    assert model.config.eos_token_id == im_end
    model.generation_config.eos_token_id = endoftext  # a base model that stops only on <|endoftext|>
    modeling.fix_special_tokens(model, tokenizer)
    assert model.generation_config.eos_token_id == [im_end, endoftext]
    assert modeling.fix_special_tokens(model, tokenizer) == {}  # idempotent


# --- 8. evaluation frees each model before the next one loads ----------------------------------------


def test_evaluation_frees_the_previous_model_before_loading_the_next(monkeypatch, tmp_path, tiny_model_dir):
    from brandcopy import evaluate
    from brandcopy.brand import load_brand, load_golden
    from brandcopy.generation import GenerationParams

    real_load = evaluate.load_eval_model
    alive = []

    def load(cfg, name):
        # Stands in for a 24 GB card: loading while the previous model is still referenced would not fit.
        assert all(ref() is None for ref in alive), "the previous model is still alive while the next one loads"
        model, tokenizer = real_load(cfg, name)
        alive.append(weakref.ref(model))
        return model, tokenizer

    monkeypatch.setattr(evaluate, "load_eval_model", load)
    cfg = load_stage_config(EvalStageConfig, TINY, [f"output_root={tmp_path}", f"model={tiny_model_dir}"])
    brand = load_brand(cfg.brand)
    results = evaluate.EvalResults(["base", "base", "base"], [GenerationParams("greedy", 4)], load_golden(brand)[:1])
    evaluate.generate_all(cfg, brand, results)
    assert len(alive) == 3


# --- 9. GGUF needs a built llama.cpp -----------------------------------------------------------------


def test_gguf_without_llama_cpp_is_reported_before_loading(monkeypatch, tmp_path):
    from brandcopy.train import merge

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UNSLOTH_LLAMA_CPP_PATH", str(tmp_path / "llama.cpp-home"))
    assert "no built llama.cpp" in backend.llama_cpp_problem()
    preset = tmp_path / "gguf.yaml"
    preset.write_text(PRESET_7B.read_text(encoding="utf-8").replace('merge_gguf: ""', "merge_gguf: q4_k_m"),
                      encoding="utf-8")
    assert any(p.startswith("merge:") for p in doctor.setup_problems(preset))
    monkeypatch.setattr(merge, "load_adapter_model", lambda *a, **k: pytest.fail("weights loaded"))
    cfg = load_stage_config(MergeStageConfig, TINY, [f"output_root={tmp_path}", "backend=unsloth", "merge_gguf=q4_k_m"])
    with pytest.raises(ConfigError, match="llama.cpp"):
        merge.run_merge(cfg)
    built = tmp_path / "llama.cpp-home"
    built.mkdir()
    (built / "convert_hf_to_gguf.py").write_text("")
    (built / "llama-quantize").write_text("")
    assert backend.llama_cpp_problem() is None


# --- the one-command check -----------------------------------------------------------------------------


@pytest.mark.cpu_only
def test_gpu_check_without_cuda_prints_one_line_and_does_nothing(tmp_path):
    result = _cli("gpu-check", "--output-root", str(tmp_path))
    assert result.returncode == 0
    assert result.stdout.strip() == "gpu-check needs a CUDA GPU and torch does not see one here; nothing was run."
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("preset", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_gpu_check_preset_loads_for_every_stage(tmp_path, preset):
    from brandcopy.gpucheck import check_preset

    path = check_preset(preset, tmp_path / "gpu-check", "outputs/shaped-0.5b", {"grpo_use_vllm": False})
    for cls in (SFTStageConfig, RewardStageConfig, DPOStageConfig, GRPOStageConfig, MergeStageConfig, EvalStageConfig):
        cfg = load_stage_config(cls, path)
        assert cfg.run == "gpu-check" and cfg.model == "outputs/shaped-0.5b"
    assert load_stage_config(SFTStageConfig, path).sft_max_steps > 0
