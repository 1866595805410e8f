"""Colab and AutoDL: one source of GPU pins, the notebooks' bootstrap, `PRESET = "auto"`, the 16 GB preset,
and a simulated Colab session (a notebook opened on its own clones the repository and runs its first stage)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
import torch

from brandcopy import bootstrap
from brandcopy.demo import explain_preset, preset_path, run_overrides
from brandcopy.doctor import vram_plan

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
GIB = 1024**3

# --- one source of GPU pins ------------------------------------------------------------------------------


def pins(text: str) -> dict[str, str]:
    """``name==version`` pins in a requirements file, an environment.yml or prose, by canonical name."""
    found = re.findall(r"(?<![\w.-])([A-Za-z][A-Za-z0-9_.-]*)==([0-9][^\s,;#`'\")\\]*)", text)
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in found}


def pin_disagreements(gpu: dict[str, str], others: dict[str, str], allowed: dict[str, str] | None = None) -> list[str]:
    """Each package pinned in ``others`` differently from the GPU set (``allowed``: name -> other version)."""
    allowed = allowed or {}
    return [f"{name}=={version} (GPU set: {gpu[name]})" for name, version in others.items()
            if name in gpu and version != gpu[name] and allowed.get(name) != version]


GPU = pins((REPO / "requirements-gpu.txt").read_text(encoding="utf-8"))
CPU = pins((REPO / "requirements-cpu.txt").read_text(encoding="utf-8"))
TRL_CPU = {"trl": "1.16.0"}  # the CPU set's documented exception: trl 1.15's GRPO needs Triton


def test_pin_check_catches_a_disagreement():
    assert pin_disagreements({"torch": "2.13.0"}, pins("pip install torch==2.12.0 vllm==0.32.0")) == [
        "torch==2.12.0 (GPU set: 2.13.0)"]
    assert pin_disagreements({"torch": "2.13.0"}, pins("torch==2.13.0")) == []


def test_gpu_set_pins_the_stack_the_project_runs():
    assert {"torch", "vllm", "transformers", "trl", "unsloth", "unsloth-zoo", "peft", "bitsandbytes"} <= set(GPU)
    assert (GPU["torch"], GPU["vllm"], GPU["trl"], GPU["unsloth"]) == ("2.13.0", "0.32.0", "1.15.0", "2026.10.9")
    assert all(line.split("#")[0].strip() == "" or "==" in line
               for line in (REPO / "requirements-gpu.txt").read_text(encoding="utf-8").splitlines()), "exact pins only"


def test_environment_yml_installs_the_gpu_set_and_repins_nothing():
    text = (REPO / "environment.yml").read_text(encoding="utf-8")
    assert "- -r requirements-gpu.txt" in text
    assert not set(pins(text)) & set(GPU), "environment.yml pins a package of requirements-gpu.txt itself"
    assert pin_disagreements(CPU, pins(text)) == []  # its tools (nbclient, pytest, ...) as in the CPU set


def test_cpu_set_makefile_readme_and_bootstrap_agree_with_the_gpu_set():
    assert pin_disagreements(GPU, CPU, TRL_CPU) == []
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"TORCH_VERSION := (\S+)", makefile)[1] == GPU["torch"]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert pin_disagreements(GPU, pins(readme), TRL_CPU) == []
    assert "pip install -r requirements-gpu.txt" in readme  # the Colab / existing-torch line
    commands, _ = bootstrap.install_plan(REPO, None)
    assert commands[0][-2:] == ["-r", str(REPO / "requirements-gpu.txt")]
    assert bootstrap.pinned(REPO / "requirements-gpu.txt", "torch") == GPU["torch"]


# --- the bootstrap's decisions ---------------------------------------------------------------------------


def test_install_keeps_a_torch_of_the_pinned_version_and_asks_for_one_restart_otherwise(tmp_path):
    keep = bootstrap.install_plan(REPO, GPU["torch"])
    replace = bootstrap.install_plan(REPO, "2.9.0")
    fresh = bootstrap.install_plan(REPO, None)
    assert (keep[1], replace[1], fresh[1]) == (False, True, False)
    assert keep[0][1] == [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", str(REPO)]


def test_install_runs_once_per_requirements_version(tmp_path, capsys):
    shutil.copy(REPO / "requirements-gpu.txt", tmp_path / "requirements-gpu.txt")
    (tmp_path / bootstrap.STAMP).write_text(bootstrap.requirements_hash(tmp_path), encoding="utf-8")
    bootstrap.install(tmp_path)  # stamp matches: no pip at all
    assert "is installed" in capsys.readouterr().out
    (tmp_path / "requirements-gpu.txt").write_text("torch==9.9.9\n", encoding="utf-8")
    assert bootstrap.requirements_hash(tmp_path) != (tmp_path / bootstrap.STAMP).read_text(encoding="utf-8")


def test_host_and_where_runs_go(tmp_path):
    drive, disk = tmp_path / "MyDrive", tmp_path / "autodl-tmp"
    assert bootstrap.host({"COLAB_RELEASE_TAG": "x"}, disk) == "colab"
    assert bootstrap.host({}, disk) == "local"
    disk.mkdir()
    assert bootstrap.host({}, disk) == "autodl"
    assert bootstrap.default_output_root("colab", drive) == ""  # Drive not mounted: the preset's outputs/
    drive.mkdir()
    assert bootstrap.default_output_root("colab", drive) == str(drive / "brandcopy" / "outputs")
    assert bootstrap.default_output_root("autodl", drive, disk) == str(disk / "outputs")
    assert bootstrap.default_output_root("local", drive, disk) == ""
    assert run_overrides("r", "", ["x=1"]) == ["run=r", "x=1"]  # here (no Colab, no AutoDL): the preset's root


def test_autodl_hub_cache_on_the_data_disk_and_the_mirror_unless_set():
    environ = {"HF_ENDPOINT": "https://example.org"}
    assert bootstrap.set_hub_cache("autodl", environ) == [
        f"HF_HOME={bootstrap.AUTODL_DISK / 'hf-cache'}", "HF_ENDPOINT=https://example.org"]
    assert bootstrap.set_hub_cache("colab", environ := {}) == [] and environ == {}


def test_old_driver_advice():
    assert bootstrap.driver_advice(None, "colab") == bootstrap.driver_advice(580, "autodl") == ""
    assert "580" in bootstrap.driver_advice(550, "colab")
    assert "AutoDL" in bootstrap.driver_advice(535, "autodl")


# --- notebooks and README carry the cells and badges rendered from brandcopy/bootstrap.py ----------------


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_starts_with_badge_and_bootstrap(path):
    cells = nbformat.read(path, as_version=4).cells
    assert (cells[0].cell_type, cells[0].source) == ("markdown", bootstrap.badge_cell(path.stem))
    assert (cells[1].cell_type, cells[1].source) == ("code", bootstrap.bootstrap_cell())
    assert bootstrap.colab_url(path.stem).endswith(f"/blob/{bootstrap.BRANCH}/notebooks/{path.name}")
    assert bootstrap.colab_url(path.stem) in (REPO / "README.md").read_text(encoding="utf-8")


def test_notebook_cells_follow_a_changed_repository_url(tmp_path):
    for path in NOTEBOOKS[:2]:
        shutil.copy(path, tmp_path / path.name)
    assert bootstrap.write_notebook_cells(tmp_path) == []  # already current
    changed = bootstrap.write_notebook_cells(tmp_path, "https://github.com/someone/fork")
    assert len(changed) == 2
    cells = nbformat.read(changed[0], as_version=4).cells
    assert "github/someone/fork/blob" in cells[0].source and '"https://github.com/someone/fork"' in cells[1].source
    assert len(cells) == len(nbformat.read(NOTEBOOKS[0], as_version=4).cells)  # replaced, not added


# --- PRESET = "auto" and the 16 GB preset ------------------------------------------------------------------


@pytest.mark.parametrize(("total_gib", "preset"), [(40.0, "qwen2.5-7b-24gb"), (23.99, "qwen2.5-7b-24gb"),
                                                   (22.49, "qwen2.5-7b-24gb"), (14.74, "qwen2.5-7b-16gb"),
                                                   (15.77, "qwen2.5-7b-16gb"), (7.8, "qwen2.5-0.5b"), (None, "tiny-cpu")])
def test_auto_picks_the_preset_by_card_memory(monkeypatch, total_gib, preset):
    """Detection stubbed: torch reports a card of ``total_gib`` (A100 40 GB, RTX 4090, A10, Colab's T4, V100 16 GB,
    an 8 GB card) or no CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: total_gib is not None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=total_gib * GIB))
    assert preset_path("auto").name == f"{preset}.yaml"
    explained = explain_preset("auto")
    assert explained.startswith(str(preset_path(preset))) and "(auto: " in explained
    assert ("no CUDA" in explained) == (total_gib is None)
    assert total_gib is None or f"{total_gib:.1f} GiB" in explained


def test_16gb_preset_fits_colabs_t4_in_every_stage():
    preset = REPO / "configs" / "qwen2.5-7b-16gb.yaml"
    plan = vram_plan(preset, 15.0)
    assert plan.warnings == [], plan.warnings
    assert max(plan.stage_peak_gib.values()) <= 15.0 * 0.9  # a tenth of the card left for what the plan omits
    assert vram_plan(REPO / "configs" / "qwen2.5-7b-24gb.yaml", 15.0).stage_peak_gib["sft"] > plan.stage_peak_gib["sft"]


# --- a simulated Colab session ---------------------------------------------------------------------------


def working_tree_origin(dest: Path) -> Path:
    """A git repository holding this checkout's working tree (committed or not): what the bootstrap clones."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org", "-c", "init.defaultBranch=main"]
    subprocess.run(git + ["init", "-q"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "origin"], cwd=dest, check=True)
    return dest


def execute_alone(notebook: Path, folder: Path, parameters: dict) -> str:
    """Copy ``notebook`` into ``folder`` and run it there headless; return what it printed."""
    from nbclient import NotebookClient

    from test_notebooks import cell_text, inject_parameters

    book = nbformat.read(shutil.copy(notebook, folder / notebook.name), as_version=4)
    inject_parameters(book, parameters)
    book.cells.append(nbformat.v4.new_code_cell("import brandcopy, os\nprint('imported from', brandcopy.__file__)\n"
                                                "print('cwd', os.getcwd())"))
    NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    return cell_text(book)


@pytest.mark.cpu_only
@pytest.mark.slow
def test_colab_notebook_opened_alone_clones_and_runs_its_first_stage(tmp_path, monkeypatch):
    origin = working_tree_origin(tmp_path / "origin")
    content, drive = tmp_path / "content", tmp_path / "drive"  # Colab's /content, a persistent output root
    content.mkdir()
    monkeypatch.setenv("COLAB_RELEASE_TAG", "simulated")
    monkeypatch.setenv("BRANDCOPY_REPO_URL", str(origin))
    monkeypatch.setenv("BRANDCOPY_SKIP_INSTALL", "1")
    monkeypatch.delenv("PYTHONPATH", raising=False)  # brandcopy must come from the clone
    for name, value in {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}.items():
        monkeypatch.setenv(name, value)
    parameters = {"RUN": "colab", "OUTPUT_ROOT": str(drive), "API_BASE_URL": "", "CONTENT_TYPES": ["paid_ad_cta"]}

    text = execute_alone(REPO / "notebooks" / "01_data_generation.ipynb", content, parameters)

    clone = content / "brandcopy"
    assert (clone / ".git").is_dir() and (clone / "configs" / "tiny-cpu.yaml").is_file()
    assert "bootstrap: running on colab" in text and "BRANDCOPY_SKIP_INSTALL=1, no install" in text
    assert f"imported from {clone / 'brandcopy' / '__init__.py'}" in text and f"cwd {clone}" in text
    assert f"{clone / 'configs' / 'tiny-cpu.yaml'} (auto: no CUDA" in text  # PRESET = "auto" found the clone's presets
    generated = drive / "colab" / "data" / "generated.jsonl"
    assert generated.is_file() and generated.read_text(encoding="utf-8").count("\n") > 0
    assert "0 with violations" in text
    assert sorted(p.name for p in content.iterdir()) == ["01_data_generation.ipynb", "brandcopy"]
