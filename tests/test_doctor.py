"""brandcopy doctor: the environment report and the VRAM plan."""

from pathlib import Path

import pytest

from brandcopy.doctor import doctor, format_report, lora_params, model_shape, param_counts, vram_plan

REPO = Path(__file__).resolve().parents[1]
PRESET_7B = REPO / "configs" / "qwen2.5-7b-24gb.yaml"


def test_qwen7b_shape_gives_its_published_parameter_count():
    linear, other = param_counts(model_shape("Qwen/Qwen2.5-7B-Instruct"))
    assert (linear + other) / 1e9 == pytest.approx(7.62, abs=0.02)  # Qwen2.5-7B: 7.61B


def test_lora_count_matches_peft(tiny_model_dir):
    from brandcopy.modeling import LoraSettings, load_model

    model, _ = load_model(tiny_model_dir, backend="hf", lora=LoraSettings(r=4))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_params(model_shape(str(tiny_model_dir)), 4, LoraSettings().target_modules) == trainable


def test_24gb_preset_fits_24gb_and_not_12gb():
    plan = vram_plan(PRESET_7B, 24.0)
    assert plan.warnings == []
    assert plan.weights_4bit_gib < plan.weights_16bit_gib / 2
    assert all(plan.activations_no_gc_gib[s] > 3 * plan.activations_gib[s] for s in plan.activations_gib)
    small = vram_plan(PRESET_7B, 12.0)
    assert any(w.startswith("grpo:") for w in small.warnings)


def test_a_plan_that_cannot_fit_warns(tmp_path):
    preset = tmp_path / "big.yaml"
    preset.write_text(PRESET_7B.read_text(encoding="utf-8").replace("load_in_4bit: true", "load_in_4bit: false")
                      .replace("gradient_checkpointing: true", "gradient_checkpointing: false"), encoding="utf-8")
    plan = vram_plan(preset, 24.0)
    assert {w.split(":")[0] for w in plan.warnings} >= {"sft", "dpo", "grpo"}


def test_doctor_report_prints_environment_and_plan():
    report = doctor(PRESET_7B, gpu_gb=24)
    assert set(report.env.packages) >= {"unsloth", "bitsandbytes", "vllm", "trl"}
    text = format_report(report)
    assert "VRAM plan for Qwen/Qwen2.5-7B-Instruct" in text and "estimated peak" in text


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="no local config.json"):
        model_shape("someone/unknown-model")
