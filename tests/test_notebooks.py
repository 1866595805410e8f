"""The numbered notebooks: static checks, a drift test against the library, and headless execution.

The drift test parses every code cell and fails (never skips) when a notebook imports or calls a
``brandcopy`` name that does not exist, or calls it with arguments its signature does not accept.
The execution test runs all notebooks in order with nbclient on the tiny-cpu preset, sharing one
run directory in a tmp folder, with the scripted API server standing in for the endpoint.
Parameters are injected papermill-style: a cell after the one tagged ``parameters``.
"""

import ast
import importlib
import inspect
import json
import re
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
EXPECTED = ["00_setup", "01_data_generation", "02_data_cleaning", "03_preference_data", "04_sft",
            "05_reward_model", "06_grpo", "07_merge_export", "08_judged_evaluation"]
LOADS_MODELS = {"00_setup", "04_sft", "05_reward_model", "06_grpo", "07_merge_export", "08_judged_evaluation"}


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def read(path: Path):
    return nbformat.read(path, as_version=4)


def code_cells(book) -> list:
    return [cell for cell in book.cells if cell.cell_type == "code"]


def parameters_index(book) -> int:
    (index,) = [i for i, cell in enumerate(book.cells) if "parameters" in cell.metadata.get("tags", [])]
    return index


# --- static checks ---------------------------------------------------------------------------------


def test_notebooks_are_the_numbered_set():
    assert [p.stem for p in notebook_paths()] == EXPECTED


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_outputs_are_stripped(path):
    for cell in code_cells(read(path)):
        assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: commit notebooks without outputs"


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_one_parameters_cell_choosing_the_preset(path):
    book = read(path)
    cell = book.cells[parameters_index(book)]
    assert cell.cell_type == "code"
    names = assigned_names(cell.source)
    assert {"PRESET", "RUN", "OUTPUT_ROOT", "OVERRIDES"} <= names
    assert 'PRESET = "auto"' in cell.source


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_cells_only_wire_library_calls(path):
    """STYLE.md: no function, class, lambda or regex defined in a notebook cell."""
    for cell in code_cells(read(path)):
        tree = ast.parse(cell.source)
        defined = [type(n).__name__ for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Lambda))]
        assert not defined, f"{path.name}: {defined} in a cell; put it in the library\n{cell.source}"
        modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "re" not in modules, f"{path.name}: regexes belong in the library"


def imported_modules(source: str) -> set[str]:
    tree = ast.parse(source)
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return modules | {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_one_setup_cell_and_unsloth_imported_first_where_models_load(path):
    """The cell after the parameters calls ``display.notebook_setup`` (quiet, config, and where models load the backend:
    Unsloth imported before anything imports transformers); nothing before it imports a library, nothing after it
    repeats the set-up."""
    book = read(path)
    cells = code_cells(book)
    index = next(i for i, cell in enumerate(cells) if "parameters" in cell.metadata.get("tags", []))
    assert index == 1, "the parameters come right after the bootstrap cell"
    assert not imported_modules(cells[index].source)
    setup = cells[index + 1].source
    assert "notebook_setup(" in setup
    assert ("loads_models=False" not in setup) == (path.stem in LOADS_MODELS)
    assert not imported_modules(setup) & {"trl", "transformers", "peft", "unsloth", "torch"}
    for cell in cells[index + 2:]:
        assert not any(call in cell.source for call in ("prepare_backend(", "import unsloth", "notebook_setup(", "quiet()"))
        assert "use_repo_root" not in cell.source and "run_overrides" not in cell.source


# --- drift: every brandcopy name a notebook uses exists and accepts the call ------------------------


def assigned_names(source: str) -> set[str]:
    return {t.id for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)}


def brandcopy_imports(tree: ast.AST) -> list[tuple[str, str, str]]:
    """(module, name, local alias) for every ``from brandcopy... import name`` and ``import brandcopy...``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "brandcopy":
            found += [(node.module, alias.name, alias.asname or alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "", alias.asname or alias.name) for alias in node.names
                      if alias.name.split(".")[0] == "brandcopy"]
    return found


def drift_problems(source: str) -> list[str]:
    """Problems with the ``brandcopy`` names a piece of notebook code uses: missing modules, missing
    names, and calls whose positional/keyword arguments the target's signature rejects."""
    tree = ast.parse(source)
    problems, targets = [], {}
    for module_name, name, alias in brandcopy_imports(tree):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            problems.append(f"import {module_name}: {err}")
            continue
        if name and not hasattr(module, name):
            problems.append(f"{module_name}.{name} does not exist")
        elif name:
            targets[alias] = getattr(module, name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in targets:
            problems += _signature_problem(node, node.func.id, targets[node.func.id])
    return problems


def _signature_problem(call: ast.Call, name: str, target) -> list[str]:
    if not callable(target) or any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return []
    try:
        inspect.signature(target).bind(*[None] * len(call.args), **{k.arg: None for k in call.keywords})
    except TypeError as err:
        return [f"{name}({ast.unparse(call)[len(name) + 1:-1]}): {err}"]
    return []


def notebook_source(path: Path) -> str:
    return "\n".join(cell.source for cell in code_cells(read(path)))


def test_drift_check_catches_missing_and_misused_names():
    assert drift_problems("from brandcopy.demo import run_demo\nrun_demo('tiny-cpu', [])") == []
    assert drift_problems("from brandcopy.demo import no_such_helper") == ["brandcopy.demo.no_such_helper does not exist"]
    assert drift_problems("from brandcopy.no_such_module import x")[0].startswith("import brandcopy.no_such_module")
    assert "unexpected keyword argument" in drift_problems("from brandcopy.demo import stage_summary\nstage_summary(x, n=1)")[0]


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_notebook_uses_only_existing_library_names(path):
    assert drift_problems(notebook_source(path)) == []


# --- headless execution ------------------------------------------------------------------------------


def run_parameters(output_root: Path) -> dict:
    """The smallest tiny-cpu run: every stage a few steps, the scripted server as the API."""
    overrides = [f"model={output_root / 'tiny-model'}", "save_steps=1000",
                 "sft_max_steps=6", "sft_eval=false", "reward_max_steps=3", "dpo_max_steps=2",
                 "grpo_max_steps=2", "grpo_max_completion_length=16",
                 "eval_max_samples=3", "eval_batch_size=3", "eval_max_new_tokens=16", "eval_sampled=false",
                 "eval_side_by_side=2"]
    return {"PRESET": "tiny-cpu", "RUN": "nb", "OUTPUT_ROOT": str(output_root), "OVERRIDES": overrides,
            "API_BASE_URL": "", "CONTENT_TYPES": ["paid_ad_cta", "social_media_review"], "IMPROVE_MAX_PROMPTS": 6}


def inject_parameters(book, values: dict) -> None:
    """Add a cell after the ``parameters`` cell setting the names that cell defines (papermill style)."""
    index = parameters_index(book)
    names = assigned_names(book.cells[index].source)
    source = "\n".join(f"{name} = {values[name]!r}" for name in sorted(names) if name in values)
    cell = nbformat.v4.new_code_cell("# injected parameters\n" + source)
    cell.metadata["tags"] = ["injected-parameters"]
    book.cells.insert(index + 1, cell)


def cell_text(book) -> str:
    """All stdout/display text a notebook produced."""
    parts = []
    for cell in code_cells(book):
        for output in cell.outputs:
            parts.append(output.get("text", "") + output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


# --- what a saved notebook shows a reader ---------------------------------------------------------

MAX_PROGRESS_LINES = 3  # per cell, in printed text: a bar is one widget or display line, not one line per refresh
MAX_CELL_LINES = 60  # a cell's output a reader can take in without scrolling past it
PROGRESS_LINE = re.compile(r"\d+%\||\d+/\d+ \[\d+:\d+")


def output_text(output) -> str:
    """The text a saved output shows: stream text, plain-text display data, or an error's traceback."""
    if output.get("output_type") == "error":
        return "\n".join(output.get("traceback", []))
    return output.get("text", "") + output.get("data", {}).get("text/plain", "")


def output_problems(book) -> list[str]:
    """What a reader of the executed notebook should not meet: tracebacks, the kernels-community warning,
    progress bars printed as text (saved one line per refresh), and cell outputs too long to read. A bar drawn
    as a widget or an updated display line is one output and counts as one line."""
    problems = []
    for number, cell in enumerate(code_cells(book), start=1):
        texts = [output_text(output) for output in cell.outputs]
        text = "\n".join(texts)
        lines = [line for part in texts for line in part.replace("\r", "\n").splitlines()]
        if any(o.get("output_type") == "error" for o in cell.outputs) or "Traceback (most recent call last)" in text:
            problems.append(f"cell {number}: a Python traceback")
        if "kernels-community" in text:
            problems.append(f"cell {number}: the kernels-community warning")
        streamed = [line for o in cell.outputs if o.get("output_type") == "stream"
                    for line in o.get("text", "").replace("\r", "\n").splitlines()]
        progress = sum(bool(PROGRESS_LINE.search(line)) for line in streamed)  # a bar saved once per refresh
        if progress > MAX_PROGRESS_LINES:
            problems.append(f"cell {number}: {progress} progress lines")
        if len(lines) > MAX_CELL_LINES:
            problems.append(f"cell {number}: {len(lines)} output lines (limit {MAX_CELL_LINES})")
    return problems


def test_output_check_flags_what_a_reader_should_not_meet():
    stream = nbformat.v4.new_output
    book = nbformat.v4.new_notebook()
    book.cells = [nbformat.v4.new_code_cell("x") for _ in range(6)]
    book.cells[0].outputs = [stream("stream", name="stdout", text="clean samples: 189\n")]
    book.cells[1].outputs = [stream("error", ename="ValueError", evalue="x", traceback=["Traceback (most recent call last)"])]
    book.cells[2].outputs = [stream("stream", name="stderr", text="Failed to load CPU gemm_4bit_forward from kernels-community\n")]
    book.cells[3].outputs = [stream("stream", name="stderr", text="".join(f"\rgenerate: {p}%|#| {p}/100 [00:01<00:01]" for p in range(0, 100, 10)))]
    book.cells[4].outputs = [stream("stream", name="stdout", text="\n" * 100)]
    bars = [f"Loading weights: 100%|#| 27/27 [00:00<00:00] (model {i})" for i in range(8)]  # one display line per bar
    book.cells[5].outputs = [stream("display_data", data={"text/plain": bar}) for bar in bars]
    assert output_problems(book) == ["cell 2: a Python traceback", "cell 3: the kernels-community warning",
                                     "cell 4: 10 progress lines", "cell 5: 100 output lines (limit 60)"]


@pytest.mark.cpu_only
@pytest.mark.slow
def test_notebooks_execute_in_order_on_tiny_cpu(tmp_path, monkeypatch, pretrained_tiny_model_dir):
    import shutil

    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    values = run_parameters(tmp_path)
    shutil.copytree(pretrained_tiny_model_dir, tmp_path / "tiny-model")  # 00_setup finds it built: pre-trained once per session
    texts, problems = {}, {}
    for path in notebook_paths():
        book = read(path)
        inject_parameters(book, values)
        client = NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
        try:
            client.execute()
        except CellExecutionError as err:
            pytest.fail(f"{path.name} failed:\n{err}")
        texts[path.stem] = cell_text(book)
        problems[path.stem] = output_problems(book)
    assert {name: found for name, found in problems.items() if found} == {}, "saved outputs a reader should not meet"
    run = tmp_path / "nb"
    for stage in ("sft", "reward", "dpo", "grpo", "merged", "eval"):
        assert (run / stage / "manifest.json").is_file(), f"{stage} did not finish"
    for stage in ("sft", "reward", "dpo", "grpo"):
        assert (run / stage / "curve.png").stat().st_size > 0
    assert not (REPO / "notebooks" / "outputs").exists(), "a notebook wrote outside the run directory"
    # 00: the EOS/pad fix, and the final <|im_end|> carries loss in the checked example.
    assert "pad '<|endoftext|>'" in texts["00_setup"] and "<|im_end|>\n]]" in texts["00_setup"]
    # 01-03: data came from the scripted server, lint-clean, and was exported.
    assert "0 with violations" in texts["01_data_generation"] and "0 with violations" in texts["02_data_cleaning"]
    assert (run / "data" / "preference_train.jsonl").is_file() and (run / "data" / "llamafactory" / "dataset_info.json").is_file()
    # 07: the merged model writes what the adapter wrote (float32 merge on CPU).
    assert "identical greedy output on 3 of 3 prompts" in texts["07_merge_export"]
    # 08: a complete report, judged by the scripted judge.
    results = json.loads((run / "eval" / "results.json").read_text(encoding="utf-8"))
    assert results["partial"] == [] and set(results["models"]) == {"base", "sft", "dpo", "dpo-onpolicy", "grpo", "merged"}
    report = (run / "eval" / "report.md").read_text(encoding="utf-8")
    assert "Position bias" in report
    # 06: on-policy pairs from the SFT model's samples, DPO on them; 08 compares both DPOs and runs the regression check.
    assert (run / "data" / "preference_onpolicy_train.jsonl").stat().st_size > 0 and (run / "dpo-onpolicy" / "manifest.json").is_file()
    assert "## DPO: synthetic vs on-policy pairs" in report and "## General instruction following" in report
