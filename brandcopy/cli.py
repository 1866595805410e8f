"""The ``brandcopy`` command line. Wiring only: every command calls one library function.

Each section below belongs to one area; heavy imports happen inside the commands so that
``brandcopy --help`` stays fast.
"""

import sys
from contextlib import contextmanager

import typer

app = typer.Typer(help="Brand-exclusive copywriting models: data, training, evaluation.", no_args_is_help=True)
data_app = typer.Typer(help="Generate, clean and export training data.", no_args_is_help=True)
train_app = typer.Typer(help="Training stages: sft, reward, dpo, grpo.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")


# --- bad input: one line on stderr, exit 2 ---------------------------------------------------


def _fail(message: str):
    """End the command: one line on stderr, exit code 2 (bad input)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@contextmanager
def _bad_input(*errors: type[Exception]):
    """Errors of the given kinds (each names its file, line and field) end the command with one line and exit 2."""
    try:
        yield
    except errors as err:
        _fail(str(err))


# --- brand and lint (brand.py, lint.py) ---------------------------------------------------


@app.command("lint")
def lint_command(
    file: str = typer.Argument(..., help="JSONL with text, content_type, optional id and product_id."),
    brand: str = typer.Option("yuansu", help="Brand name under data/brands/ or a brand folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per input line."),
):
    """Lint copy against the brand guide and the catalog. Exit 0 clean, 1 violations, 2 bad input."""
    from brandcopy.brand import BrandDataError, load_brand
    from brandcopy.lint import format_report, lint_file, result_json

    with _bad_input(BrandDataError, OSError):
        linted = lint_file(file, load_brand(brand))
    if not linted:
        _fail(f"{file}: no records to lint (the file is empty)")
    if as_json:
        for _, record, result in linted:
            typer.echo(result_json(record.get("id"), result))
    else:
        typer.echo(format_report(linted))
    raise typer.Exit(0 if all(result.clean for _, _, result in linted) else 1)


# --- data pipeline (llm.py, mockserver.py, datagen.py) ------------------------------------

_RUN = typer.Option("demo", help="Run name: data goes to <output-root>/<run>/data.")
_ROOT = typer.Option("outputs", help="Folder holding the runs.")
_BRAND = typer.Option("yuansu", help="Brand folder name under data/brands, or a path.")
_MODEL = typer.Option("deepseek-chat", help="Model name the endpoint expects.")
_BASE_URL = typer.Option("https://api.deepseek.com", help="OpenAI-compatible endpoint.")
_KEY_ENV = typer.Option("DEEPSEEK_API_KEY", help="NAME of the environment variable holding the key ('' for none).")
_CONCURRENCY = typer.Option(16, help="Requests in flight at once.")
_MOCK = typer.Option(False, help="Answer from the built-in scripted server (golden copy), no external API.")


def _data_dir(output_root: str, run: str):
    from pathlib import Path

    return Path(output_root) / run / "data"


def _run_llm_step(mock: bool, brand, model: str, base_url: str, api_key_env: str, concurrency: int, step):
    """Builds the client (for the scripted server with ``mock``) and runs ``step(client)``; clear errors, exit 2."""
    from brandcopy.brand import BrandDataError
    from brandcopy.llm import LLMClient, LLMConfig, LLMConfigError, LLMFatalError
    from brandcopy.mockserver import SCRIPTED, endpoint

    try:
        config = LLMConfig(model=model, base_url=SCRIPTED if mock else base_url, api_key_env=api_key_env or None,
                           concurrency=concurrency)
        with endpoint(config, brand) as config:
            return step(LLMClient(config))
    except (LLMConfigError, LLMFatalError, BrandDataError, OSError) as err:
        _fail(str(err))


@data_app.command("generate")
def data_generate(
    run: str = _RUN, output_root: str = _ROOT, brand: str = _BRAND, split: str = typer.Option("train", help="train or val."),
    content_types: str = typer.Option("", help="Comma-separated content type ids; default all nine."),
    samples_per_pair: int = typer.Option(1), max_repairs: int = typer.Option(2),
    model: str = _MODEL, base_url: str = _BASE_URL, api_key_env: str = _KEY_ENV, concurrency: int = _CONCURRENCY,
    mock: bool = _MOCK,
):
    """Generate copy for every (product, content type) of a split, checked by lint and the fact check."""
    from brandcopy.brand import BrandDataError, load_brand
    from brandcopy.datagen import generate
    from brandcopy.llm import cost_report

    if split not in ("train", "val"):
        _fail(f"--split {split!r}: expected train or val")
    with _bad_input(BrandDataError):
        loaded = load_brand(brand)
    types = [t.strip() for t in content_types.split(",")] if content_types else None
    unknown = [t for t in types or () if t not in loaded.content_types]
    if unknown:
        _fail(f"--content-types: unknown content type {unknown[0]!r}; known: {', '.join(loaded.content_types)}")
    data_dir = _data_dir(output_root, run)
    summary = _run_llm_step(mock, loaded, model, base_url, api_key_env, concurrency,
                            lambda client: generate(client, loaded, data_dir, split, types, samples_per_pair, max_repairs=max_repairs))
    typer.echo(f"{summary}\nsamples: {data_dir / 'generated.jsonl'}\nfailures: {data_dir / 'generate' / 'failures.jsonl'}")
    typer.echo(cost_report([summary], summary.produced))


@data_app.command("clean")
def data_clean(
    run: str = _RUN, output_root: str = _ROOT, brand: str = _BRAND,
    input: str = typer.Option("", help="Samples to clean; default <data>/generated.jsonl."),
    model: str = _MODEL, base_url: str = _BASE_URL, api_key_env: str = _KEY_ENV, concurrency: int = _CONCURRENCY,
    mock: bool = _MOCK,
):
    """LLM rewrite passes: strip markup, give flat notes a persona and story, add missing CTAs."""
    from brandcopy.brand import BrandDataError, load_brand
    from brandcopy.datagen import clean
    from brandcopy.llm import cost_report

    with _bad_input(BrandDataError):
        loaded = load_brand(brand)
    data_dir = _data_dir(output_root, run)
    report = _run_llm_step(mock, loaded, model, base_url, api_key_env, concurrency,
                           lambda client: clean(client, loaded, input or data_dir / "generated.jsonl", data_dir))
    typer.echo(f"{report}\ncleaned: {data_dir / 'cleaned.jsonl'}")
    typer.echo(cost_report([report[name] for name in ("markup", "persona", "cta")], report["kept"]))


@data_app.command("negatives")
def data_negatives(
    run: str = _RUN, output_root: str = _ROOT, brand: str = _BRAND,
    input: str = typer.Option("", help="Chosen samples; default <data>/cleaned.jsonl."),
    offline: bool = typer.Option(False, help="Only the programmatic negatives (no API)."),
    weak_model: str = typer.Option("", help="A weaker model for the 'weak' negatives (default: the same model)."),
    model: str = _MODEL, base_url: str = _BASE_URL, api_key_env: str = _KEY_ENV, concurrency: int = _CONCURRENCY,
    mock: bool = _MOCK,
):
    """Preference negatives: weak / exaggerated / fake through the LLM, plus offline ones."""
    from brandcopy.brand import BrandDataError, load_brand
    from brandcopy.datagen import make_negatives
    from brandcopy.llm import cost_report

    with _bad_input(BrandDataError):
        loaded = load_brand(brand)
    data_dir = _data_dir(output_root, run)
    source = input or data_dir / "cleaned.jsonl"
    if offline:
        with _bad_input(BrandDataError, OSError):
            report = make_negatives(None, loaded, source, data_dir)
    else:
        report = _run_llm_step(mock, loaded, model, base_url, api_key_env, concurrency,
                               lambda client: make_negatives(client, loaded, source, data_dir, weak_model=weak_model or None))
    typer.echo(f"{report}\nnegatives: {data_dir / 'negatives.jsonl'}")
    if "llm" in report:
        typer.echo(cost_report([report["llm"]], report["llm"].produced))


@data_app.command("export")
def data_export(
    run: str = _RUN, output_root: str = _ROOT, brand: str = _BRAND,
    input: str = typer.Option("", help="Chosen samples; default <data>/cleaned.jsonl."),
    negatives: str = typer.Option("", help="Negatives; default <data>/negatives.jsonl when it exists."),
):
    """Write TRL (sft, preference, grpo) and LLaMA-Factory files per split."""
    from brandcopy.brand import BrandDataError, load_brand
    from brandcopy.datagen import export

    data_dir = _data_dir(output_root, run)
    default_negatives = data_dir / "negatives.jsonl"
    with _bad_input(BrandDataError, OSError):
        written = export(load_brand(brand), input or data_dir / "cleaned.jsonl", data_dir,
                         negatives or (default_negatives if default_negatives.exists() else None))
    for name, path in written.items():
        typer.echo(f"{name}: {path}")


@data_app.command("improve")
def data_improve(
    config: str = typer.Option("configs/tiny-cpu.yaml", "--config", "-c", help="Preset: run, brand, base model, backend."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides of preset keys, e.g. run=try2."),
    stage: str = typer.Option("sft", help="Finished stage that samples (its adapter or merged model)."),
    k: int = typer.Option(2, help="Samples per prompt."),
    split: str = typer.Option("train", help="Products whose prompts are sampled (train or val)."),
    content_types: str = typer.Option("", help="Comma-separated content type ids; default all nine."),
    max_prompts: int | None = typer.Option(None, help="Prompts sampled, spread over products and types (0: all); "
                                    "default: the preset's dpo_onpolicy_prompts."),
    max_new_tokens: int = typer.Option(768, help="Generation budget per sample."),
    temperature: float = typer.Option(1.0, help="Sampling temperature of the policy."),
    max_similarity: float = typer.Option(0.8, help="Drop pairs whose chosen and rejected have a higher character ROUGE-L."),
    max_repairs: int = typer.Option(2, help="Repair rounds of the judge's answer."),
    model: str = _MODEL, base_url: str = _BASE_URL, api_key_env: str = _KEY_ENV, concurrency: int = _CONCURRENCY,
    mock: bool = typer.Option(False, help="Judge with the built-in scripted server's improve judge, no external API."),
):
    """On-policy pairs: sample a stage, judge + improve each sample, write preference_onpolicy_<split>.jsonl."""
    from dataclasses import replace

    from brandcopy.brand import BrandDataError, load_brand
    from brandcopy.config import ConfigError, DPOStageConfig, EvalStageConfig, load_stage_config
    from brandcopy.improve import SAMPLE_PARAMS, run_improve
    from brandcopy.llm import LLMConfig, LLMConfigError, LLMFatalError
    from brandcopy.mockserver import SCRIPTED, endpoint
    from brandcopy.run import StageInputError

    try:
        cfg = load_stage_config(EvalStageConfig, config, overrides or [])
        if max_prompts is None:
            max_prompts = load_stage_config(DPOStageConfig, config, overrides or []).dpo_onpolicy_prompts
        params = replace(SAMPLE_PARAMS, max_new_tokens=max_new_tokens, temperature=temperature, seed=cfg.seed)
        judge = LLMConfig(model=model, base_url=SCRIPTED if mock else base_url, api_key_env=api_key_env or None,
                          concurrency=concurrency, cache_dir=f"{cfg.output_root}/llm-cache")
        with endpoint(judge, load_brand(cfg.brand)) as llm:
            report = run_improve(cfg, llm, stage, k, split, content_types.split(",") if content_types else None,
                                 max_prompts, params, max_similarity, max_repairs)
    except (ConfigError, StageInputError, BrandDataError, LLMConfigError, LLMFatalError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)  # ValueError: a torn or malformed line in improve/*.jsonl (file:line)
        raise typer.Exit(2) from None
    typer.echo(f"{report}\n" + "\n".join(f"{name}: {path}" for name, path in report.files.items()))


@data_app.command("serve-mock")
def data_serve_mock(
    port: int = typer.Option(8000, help="Port on 127.0.0.1 (0 picks a free one)."),
    brand: str = typer.Option("yuansu", help="Answer datagen, improve and judge prompts for this brand ('' to echo)."),
    latency: float = typer.Option(0.0, help="Seconds every answer waits."),
    fault_rate: float = typer.Option(0.0, help="Probability of an injected fault per request."),
    seed: int = typer.Option(0, help="Seed of the fault RNG."),
):
    """Run the scripted OpenAI-compatible server (model name: any) until Ctrl-C."""
    from brandcopy.brand import BrandDataError, load_brand
    from brandcopy.mockserver import Faults, ScriptedServer, scripted_responder, serve

    with _bad_input(BrandDataError):
        responder = scripted_responder(load_brand(brand)) if brand else None
    serve(ScriptedServer(responder=responder, faults=Faults(rate=fault_rate), latency=latency, seed=seed, port=port))


# --- training, merge, doctor (train/*, doctor.py) -----------------------------------------


def _stage_config_or_exit(config_cls, config: str | None, overrides: list[str] | None):
    """The stage config, with the GPU checked and the backend imported (unsloth first); one line and exit 2 on error."""
    from brandcopy.backend import GPUSetupError, prepare_backend
    from brandcopy.config import ConfigError, load_stage_config

    try:
        cfg = load_stage_config(config_cls, config, overrides or [])
        prepare_backend(cfg.backend, require_cuda=cfg.require_cuda)
    except (ConfigError, GPUSetupError, ImportError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    return cfg

_CONFIG = typer.Option(..., "--config", "-c", help="Flat YAML preset, e.g. configs/tiny-cpu.yaml.")
_OVERRIDES = typer.Argument(None, help="key=value overrides of preset keys; a stage's prefix may be left out (learning_rate=1e-4).")


def _run_stage(run_stage, cfg) -> None:
    """Run a stage on its checked config (``_stage_config_or_exit``) and print its folder.

    Every input error exits 2 with one line before any model loads: data files (file:line:
    field), starting stage, model folder. Each command imports its stage module (and with it
    trl) only after ``_stage_config_or_exit`` prepared the backend, so that on the unsloth backend
    Unsloth's patched trainers are the ones the stage gets; the preset is checked before either.
    """
    from brandcopy.config import ConfigError
    from brandcopy.modeling import TrainingExampleError
    from brandcopy.files import DataFileError
    from brandcopy.run import StageInputError

    with _bad_input(ConfigError, StageInputError, DataFileError, TrainingExampleError, FileNotFoundError, ImportError):
        out = run_stage(cfg)
    typer.echo(f"{cfg.stage} finished: {out}")


@train_app.command("sft")
def train_sft(config: str = _CONFIG, overrides: list[str] = _OVERRIDES):
    """Supervised fine-tuning (LoRA/QLoRA, assistant-only loss, packed) -> <run>/sft."""
    from brandcopy.config import SFTStageConfig

    cfg = _stage_config_or_exit(SFTStageConfig, config, overrides)
    from brandcopy.train.sft import run_sft

    _run_stage(run_sft, cfg)


@train_app.command("reward")
def train_reward(config: str = _CONFIG, overrides: list[str] = _OVERRIDES):
    """Reward model on chosen/rejected pairs -> <run>/reward."""
    from brandcopy.config import RewardStageConfig

    cfg = _stage_config_or_exit(RewardStageConfig, config, overrides)
    from brandcopy.train.reward import run_reward

    _run_stage(run_reward, cfg)


@train_app.command("dpo")
def train_dpo(config: str = _CONFIG, overrides: list[str] = _OVERRIDES):
    """DPO from the SFT adapter -> <run>/dpo."""
    from brandcopy.config import DPOStageConfig

    cfg = _stage_config_or_exit(DPOStageConfig, config, overrides)
    from brandcopy.train.dpo import run_dpo

    _run_stage(run_dpo, cfg)


@train_app.command("grpo")
def train_grpo(config: str = _CONFIG, overrides: list[str] = _OVERRIDES):
    """GRPO from the SFT adapter with the brand rewards -> <run>/grpo."""
    from brandcopy.config import GRPOStageConfig

    cfg = _stage_config_or_exit(GRPOStageConfig, config, overrides)
    from brandcopy.demo import judged
    from brandcopy.train.grpo import judge_endpoint, run_grpo

    _run_stage(lambda cfg: judged(run_grpo, cfg, judge_endpoint), cfg)  # a `scripted` judge serves for the whole stage


@app.command("merge")
def merge(config: str = _CONFIG, overrides: list[str] = _OVERRIDES):
    """Merge an adapter onto the 16-bit base -> <run>/merged (safetensors; GGUF with Unsloth)."""
    from brandcopy.config import MergeStageConfig

    cfg = _stage_config_or_exit(MergeStageConfig, config, overrides)
    from brandcopy.train.merge import run_merge

    _run_stage(run_merge, cfg)


@app.command("doctor")
def doctor_command(
    preset: str = typer.Option(None, help="Preset to plan VRAM for, e.g. configs/qwen2.5-7b-24gb.yaml."),
    gpu_gb: float = typer.Option(None, help="Card memory in GiB (default: the detected GPU, else 24)."),
):
    """Environment report and, with --preset, a VRAM plan. Exit 1 when a stage will not fit or cannot run here."""
    from brandcopy.config import ConfigError
    from brandcopy.doctor import doctor, format_report

    try:
        report = doctor(preset, gpu_gb)
    except (ConfigError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    typer.echo(format_report(report))
    raise typer.Exit(1 if report.problems or (report.plan is not None and report.plan.warnings) else 0)


@app.command("gpu-check")
def gpu_check_command(
    preset: str = typer.Option("configs/qwen2.5-7b-24gb.yaml", help="GPU preset whose settings are checked."),
    shape: str = typer.Option("0.5b", help="Random model's architecture when the preset's model is not on disk: 0.5b or 7b."),
    output_root: str = typer.Option("outputs", help="The check writes <output-root>/gpu-check/."),
    random_model: bool = typer.Option(False, help="Use the random model even when the preset's model is cached."),
):
    """Every stage once on the GPU with small step counts: status, seconds, peak memory, tokens/s -> report.json."""
    from brandcopy.backend import GPUSetupError
    from brandcopy.gpucheck import SHAPES, run_gpu_check

    if shape not in SHAPES:
        typer.echo(f"error: --shape {shape!r} is not one of {', '.join(SHAPES)}", err=True)
        raise typer.Exit(2)
    try:
        run_gpu_check(preset, shape, output_root, use_preset_model=not random_model)
    except (GPUSetupError, ImportError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


# --- evaluation and chat (evaluate.py, chat.py) -------------------------------------------


@app.command("eval")
def eval_command(
    config: str = typer.Option(None, help="Flat YAML preset, e.g. configs/tiny-cpu.yaml."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. eval_max_samples=20 judge=false."),
):
    """Evaluate base / sft / dpo / grpo / merged on the val split: metrics, judge, report.md."""
    from brandcopy.config import ConfigError, EvalStageConfig

    cfg = _stage_config_or_exit(EvalStageConfig, config, overrides)
    from brandcopy.brand import BrandDataError
    from brandcopy.demo import judged
    from brandcopy.evaluate import judge_endpoint, run_eval
    from brandcopy.run import StageInputError

    with _bad_input(ConfigError, StageInputError, BrandDataError, ValueError, FileNotFoundError):
        out = judged(run_eval, cfg, judge_endpoint)
    report = (out / "report.md").read_text(encoding="utf-8")
    typer.echo(("PARTIAL report: " if "**PARTIAL**" in report else "report: ") + str(out / "report.md"))


@app.command("chat")
def chat_command(
    config: str = typer.Option(None, help="Flat YAML preset (base model, backend, run); default: qwen2.5-7b-24gb "
                                          "with CUDA, else tiny-cpu (the notebooks' \"auto\")."),
    run: str = typer.Option(None, help="Run name whose adapters to load (default: the preset's run)."),
    adapter: list[str] = typer.Option(None, help="Adapter: a stage of the run (sft, dpo, grpo) or a folder; repeatable. "
                                                 "Default: every finished adapter stage of the run, the latest active."),
    base: str = typer.Option(None, help="Base model instead of the preset's model (e.g. <run>/merged)."),
    base_url: str = typer.Option("", help="Chat with a served model (vllm serve / transformers serve) instead, "
                                          "e.g. http://127.0.0.1:8000/v1."),
    api_model: str = typer.Option("", help="Model name at --base-url (transformers serve: the folder it loaded)."),
    api_key_env: str = typer.Option("BRANDCOPY_SERVE_KEY", help="NAME of the variable holding the server's key ('' for none)."),
):
    """Streaming chat with the brand's system prompt; /product, /type and /write use the training prompt.

    Without --config the preset is picked as the notebooks' "auto" does; --base-url chats with a served model.
    """
    from brandcopy.display import quiet

    quiet()  # before torch/bitsandbytes load: their expected warnings would land in the chat
    from brandcopy.backend import GPUSetupError
    from brandcopy.config import ConfigError, EvalStageConfig, load_stage_config
    from brandcopy.demo import preset_path

    overrides = [f"run={run}"] if run else []
    try:
        preset = config or preset_path("auto")
    except (GPUSetupError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    if base_url:  # the served model: nothing loads here, so no GPU check either
        from brandcopy.brand import load_brand
        from brandcopy.chat import ServedModel, chat_loop
        from brandcopy.llm import LLMConfigError

        try:
            if not api_model:
                raise ValueError("--base-url needs --api-model: the name the server serves (transformers serve: the folder it loaded)")
            cfg = load_stage_config(EvalStageConfig, preset, overrides)
            served = ServedModel(base_url, api_model, api_key_env or None)
        except (ConfigError, LLMConfigError, ValueError) as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        chat_loop(served, None, load_brand(cfg.brand))
        return
    cfg = _stage_config_or_exit(EvalStageConfig, preset, overrides)
    from brandcopy.brand import load_brand
    from brandcopy.chat import chat_loop, load_chat_model, run_adapters
    from brandcopy.run import StageInputError

    try:
        adapters = run_adapters(cfg.run_dir, adapter or [])
        model, tokenizer = load_chat_model(base or cfg.model, adapters, **cfg.load_options)
    except (ConfigError, StageInputError, OSError, ValueError, ImportError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    if sys.stdin.isatty():
        import readline  # noqa: F401  (input() gains line editing, history and correct wide-character erasing)
    chat_loop(model, tokenizer, load_brand(cfg.brand))


# --- brand-gated writing (write.py) --------------------------------------------------------


def _write_source(cfg, model: str) -> str:
    """A stage of the run (merged, sft, dpo, grpo) or a folder; a stage must be finished."""
    from pathlib import Path

    from brandcopy.run import require_stage

    if model in ("merged", "sft", "dpo", "grpo") and not Path(model).is_dir():
        return str(require_stage(cfg.run_dir, model, "write"))
    if not Path(model).is_dir():
        raise FileNotFoundError(f"--model {model}: not a stage of {cfg.run_dir} (merged, sft, dpo, grpo) nor a folder")
    return model


def _write_reward_model(cfg, reward_model: str):
    """The reward model ranking clean candidates: the run's finished reward stage unless told otherwise."""
    from brandcopy.run import is_complete

    if reward_model == "none":
        return None
    if reward_model:
        return reward_model
    return cfg.run_dir / "reward" if is_complete(cfg.run_dir / "reward") else None


@app.command("write")
def write_command(
    config: str = typer.Option(None, help="Flat YAML preset (run, brand, backend); e.g. configs/tiny-cpu.yaml."),
    run: str = typer.Option(None, help="Run name (default: the preset's run)."),
    product: str = typer.Option(None, help="Product id, e.g. YS-001 (with --type)."),
    content_type: str = typer.Option(None, "--type", help="Content type id, e.g. paid_ad_fab (with --product)."),
    requests: str = typer.Option(None, help="JSONL or CSV file of requests: product_id, content_type, optional id."),
    model: str = typer.Option("merged", help="merged, sft, dpo or grpo of the run, or a model/adapter folder."),
    n: int = typer.Option(4, "-n", help="Candidates per request."),
    reward_model: str = typer.Option("", help="Reward model folder ranking clean candidates; default the run's "
                                              "finished reward stage; 'none' ranks by lint score."),
    base_url: str = typer.Option("", help="A served model (vllm serve / transformers serve) instead of --model, "
                                          "e.g. http://127.0.0.1:8000/v1."),
    api_model: str = typer.Option("", help="Model name at --base-url (transformers serve: the folder it loaded)."),
    api_key_env: str = typer.Option("BRANDCOPY_SERVE_KEY", help="NAME of the variable holding the server's key ('' for none)."),
    max_new_tokens: int = typer.Option(768, help="Token budget per candidate; one that reaches it fails."),
    out: str = typer.Option("", help="Output folder; default <run>/write."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides of preset keys, e.g. output_root=/tmp/runs."),
):
    """Write copy: n candidates per request, lint + fact check each, keep the best clean one.

    Exit status 0 when every request got a passing copy, 1 when some did not, 2 on bad input.
    """
    from dataclasses import replace

    from brandcopy.brand import BrandDataError, load_brand
    from brandcopy.config import ConfigError, EvalStageConfig, load_stage_config
    from brandcopy.llm import LLMClient, LLMConfig, LLMConfigError, LLMFatalError
    from brandcopy.run import StageInputError
    from brandcopy.write import WRITE_PARAMS, read_requests, single_request, write_copy

    try:
        cfg = load_stage_config(EvalStageConfig, config, (overrides or []) + ([f"run={run}"] if run else []))
        brand = load_brand(cfg.brand)
        if (requests is None) == (product is None or content_type is None):
            raise ValueError("give either --product and --type, or --requests FILE")
        todo = read_requests(requests, brand) if requests else [single_request(brand, product, content_type)]
        if n < 1 or max_new_tokens < 1:
            raise ValueError("-n and --max-new-tokens must be >= 1")
        if base_url and not api_model:
            raise ValueError("--base-url needs --api-model: the name the server serves (transformers serve: the folder it loaded)")
        source = None if base_url else _write_source(cfg, model)
        client = LLMClient(LLMConfig(model=api_model, base_url=base_url, api_key_env=api_key_env or None,
                                     cache_dir=None, concurrency=8, max_retries=2)) if base_url else None
        results = write_copy(brand, todo, out or cfg.run_dir / "write", n=n, model_dir=source, client=client,
                             reward_model=_write_reward_model(cfg, reward_model),
                             params=replace(WRITE_PARAMS, max_new_tokens=max_new_tokens, seed=cfg.seed),
                             load_options=cfg.load_options)
    except (ConfigError, StageInputError, BrandDataError, LLMConfigError, LLMFatalError, FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    except KeyError as err:
        typer.echo(f"error: {err.args[0]}", err=True)
        raise typer.Exit(2) from None
    folder = out or cfg.run_dir / "write"
    for result in results:
        typer.echo(f"{result.request.id}: {result.status}" + ("" if result.text else " — " + "; ".join(result.reasons[:3])))
    typer.echo(f"results: {folder}/results.jsonl\nreadable: {folder}/results.md")
    raise typer.Exit(0 if all(r.status == "passed" for r in results) else 1)


@app.command("compare")
def compare_command(
    config: str = typer.Option("configs/tiny-cpu.yaml", "--config", "-c", help="Preset: run, brand, base model, backend."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides of preset keys, e.g. run=try2."),
    model: list[str] = typer.Option(..., "--model", "-m", help="base, a stage of the run (sft, dpo, grpo, merged), "
                                    "otherrun/stage, or an adapter or model folder; label=spec names it. Repeatable."),
    prompts: str = typer.Option("val", help="val or train (the brand's golden prompts), ifeval, or a JSONL file."),
    max_prompts: int = typer.Option(5, help="First N prompts (0: all)."),
    max_new_tokens: int = typer.Option(512, help="Generation budget."),
    sample: bool = typer.Option(False, help="Sample with --temperature / --top-p instead of greedy decoding."),
    temperature: float = typer.Option(0.7), top_p: float = typer.Option(0.9),
    seed: int = typer.Option(None, help="Sampling seed (default: the preset's seed)."),
    out: str = typer.Option("", help="Output folder (default <run>/compare)."),
):
    """Several models side by side with fixed generation parameters -> compare.md and compare.jsonl."""
    from pathlib import Path

    from brandcopy.brand import BrandDataError, load_brand
    from brandcopy.compare import CompareInputError, load_prompt_set, resolve_model, run_compare
    from brandcopy.config import ConfigError, EvalStageConfig, load_stage_config
    from brandcopy.generation import GenerationParams

    try:
        cfg = load_stage_config(EvalStageConfig, config, overrides or [])
        brand = load_brand(cfg.brand)
        specs = [resolve_model(spec, cfg.run_dir) for spec in model]
        prompt_set = load_prompt_set(prompts, brand, max_prompts)
    except (ConfigError, BrandDataError, CompareInputError, OSError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    params = GenerationParams("sampled" if sample else "greedy", max_new_tokens, sample, temperature, top_p,
                              cfg.seed if seed is None else seed)
    path = run_compare(brand, specs, cfg.model, prompt_set, params, Path(out) if out else cfg.run_dir / "compare",
                       prompts, cfg.eval_batch_size, **cfg.load_options)
    typer.echo(f"compare: {path}\nrows: {path.with_suffix('.jsonl')}")


# --- demo (demo.py) -----------------------------------------------------------------------


@app.command()
def demo(
    config: str = typer.Option("configs/tiny-cpu.yaml", "--config", "-c", help="Preset; the CPU default runs in minutes."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides for any stage, e.g. run=demo grpo_max_steps=4."),
    base_url: str = typer.Option("", envvar="BRANDCOPY_BASE_URL",
                                 help="OpenAI-compatible endpoint for the data and the judge; empty: the built-in scripted server."),
    api_model: str = typer.Option("deepseek-chat", envvar="BRANDCOPY_MODEL", help="Model name at --base-url."),
    api_key_env: str = typer.Option("DEEPSEEK_API_KEY", envvar="BRANDCOPY_API_KEY_ENV",
                                    help="NAME of the environment variable holding the endpoint's key."),
):
    """The whole pipeline on the CPU default: tiny model, data, SFT, reward model, DPO, GRPO, merge, judged evaluation."""
    from brandcopy.backend import GPUSetupError, prepare_backend
    from brandcopy.config import ConfigError, SFTStageConfig
    from brandcopy.demo import stage_config

    try:  # the GPU checked and unsloth imported (on its backend) before anything imports trl
        cfg = stage_config(SFTStageConfig, config, overrides or [])
        prepare_backend(cfg.backend, require_cuda=cfg.require_cuda)
    except (ConfigError, GPUSetupError, ImportError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    from brandcopy.demo import run_demo
    from brandcopy.run import StageInputError

    try:
        result = run_demo(config, overrides or [], base_url=base_url, api_model=api_model, api_key_env=api_key_env)
    except (ConfigError, StageInputError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    for sample in result.samples:
        typer.echo(f"\n=== {sample['id']} ({sample['content_type']})\n--- golden: {sample['golden'][:120]}")
        for name, text in sample["models"].items():
            typer.echo(f"--- {name}: {text[:120] or '(empty: only whitespace before the token budget ran out)'}")
    typer.echo("\n" + "\n".join(f"{stage}: {summary}" for stage, summary in result.summaries.items()))
    typer.echo("\n" + result.changes)
    typer.echo("seconds: " + ", ".join(f"{step} {seconds}" for step, seconds in result.seconds.items()))
    typer.echo(f"run directory: {result.run_dir}\nreport: {result.report}")


if __name__ == "__main__":
    app()
