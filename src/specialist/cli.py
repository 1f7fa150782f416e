"""The `specialist` command: a thin Typer layer over the Python API. Heavy imports live inside commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from specialist.console import console
from specialist.errors import SpecialistError

app = typer.Typer(
    help="Turn a general pretrained LLM into a specialist for one job, with before/after proof.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key, e.g. --set training.epochs=2 (repeatable)."),
]


JunitOption = Annotated[Path | None, typer.Option("--junit", help="Also write every gate (and golden-replay "
                                                                   "comparison) as a JUnit test case to this XML file.")]


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="YAML run config.")],
    set_: SetOption = None,
    model: Annotated[str | None, typer.Option(help="Base model (overrides model.name).")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Parent folder for the run (overrides output.dir).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (overrides training.max_steps).")] = None,
    junit: JunitOption = None,
) -> None:
    """Fine-tune the base model on CONFIG's data and compare it with the base model on held-out examples."""
    from specialist.config import load_config
    from specialist.pipeline import run as run_pipeline

    overrides = list(set_ or [])
    overrides += [f"model.name={model}"] if model else []
    overrides += [f"output.dir={output_dir}"] if output_dir else []
    overrides += [f"training.max_steps={max_steps}"] if max_steps is not None else []
    with _user_errors():
        cfg = load_config(config, overrides)
        summary = run_pipeline(cfg, config_name=config_name(config))
    if summary.evaluation is None:  # a rank other than 0 under a multi-process launch
        return
    _finish_evaluation(summary.evaluation, junit, overfitting_note=summary.metrics.get("overfitting_warning"))


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML run config.")],
    set_: SetOption = None,
    resume: Annotated[bool, typer.Option(help="Continue the newest run of CONFIG from its newest complete checkpoint.")] = False,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (overrides training.max_steps).")] = None,
) -> None:
    """Train only (no evaluation arms); runs the same under `accelerate launch` and `torchrun`."""
    from specialist.config import load_config
    from specialist.pipeline import train_only
    from specialist.ranks import is_main_process

    overrides = list(set_ or []) + ([f"training.max_steps={max_steps}"] if max_steps is not None else [])
    with _user_errors():
        cfg = load_config(config, overrides)
        summary = train_only(cfg, config_name=config_name(config), resume=resume)
    if is_main_process():
        figures = summary.metrics["train"]
        console.print(f"trained {figures['steps']} steps: loss {figures['first_loss']} -> {figures['final_loss']}, "
                      f"validation {figures['final_val_loss']}", soft_wrap=True)
        console.print(f"run folder: [bold]{summary.run_dir}[/]", soft_wrap=True)


@app.command("eval")
def eval_(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `specialist run` or `specialist train`.")],
    set_: SetOption = None,
    arm: Annotated[list[str] | None, typer.Option(help="Another arm, NAME=RUN_DIR, NAME=ADAPTER_DIR or NAME=EXPORT_DIR (repeatable).")] = None,
    junit: JunitOption = None,
) -> None:
    """Score base, few-shot, tuned (and any other arm) on the run's held-out rows; exit 1 when a gate fails."""
    from specialist.evaluate.runner import evaluate_run
    from specialist.run_folder import RunFolder

    with _user_errors():
        others = dict(_parse_arm(a) for a in arm or [])
        result = evaluate_run(run_dir, RunFolder.open(run_dir).config(list(set_ or [])), others)
    _finish_evaluation(result, junit)


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run folders; the first one's data and base model are used.")],
    set_: SetOption = None,
    junit: JunitOption = None,
) -> None:
    """Score several runs on the first run's held-out rows, side by side with its base arms."""
    from specialist.evaluate.runner import evaluate_run
    from specialist.run_folder import RunFolder

    with _user_errors():
        first, rest = run_dirs[0], run_dirs[1:]
        names = [p.resolve().name for p in rest]
        if len(set(names)) != len(names) or first.resolve().name in names:
            raise SpecialistError("compare needs run folders with distinct names")
        result = evaluate_run(first, RunFolder.open(first).config(list(set_ or [])), dict(zip(names, rest)))
    _finish_evaluation(result, junit)


def _parse_arm(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise SpecialistError(f"--arm {text!r} is not NAME=PATH", hint="e.g. --arm v2=runs/log-to-json-2")
    return name, Path(path)


def _finish_evaluation(result, junit: Path | None = None, overfitting_note: str | None = None) -> None:
    """Print the scores and gates, write the JUnit file, exit 1 when a gate fails. A time budget that cut the
    training short is said first: the scores below are those of the shorter run."""
    from specialist.run_folder import RunFolder

    cut = RunFolder(result.run_dir).metrics_so_far().get("train", {}).get("cut_by_budget")
    if cut:
        console.print(f"[yellow]warning:[/] {cut}", soft_wrap=True)
    if result.kind == "domain_adaptation":
        print_domain(result)
    else:
        print_scores(result)
    if overfitting_note:
        console.print(f"[yellow]warning:[/] {overfitting_note}")
    for gate in result.gates:
        # describe() already opens with pass/FAIL; the colour carries it at a glance
        console.print(f"gate {gate.describe()}", soft_wrap=True, markup=False, style="green" if gate.passed else "red")
    if junit is not None:
        from specialist.junit import gate_cases, write_junit

        write_junit(junit, "specialist.gates", gate_cases(result.gates))
        console.print(f"JUnit: [bold]{junit}[/]", soft_wrap=True)
    console.print(f"run folder: [bold]{result.run_dir}[/]", soft_wrap=True)
    console.print(f"report:     [bold]{RunFolder(result.run_dir).report_html.resolve()}[/]", soft_wrap=True)
    if not result.passed:
        raise typer.Exit(1)


@app.command()
def prepare(
    config: Annotated[Path, typer.Argument(help="YAML run config.")],
    set_: SetOption = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: OUTPUT_DIR/<config name>-data).")] = None,
    lengths: Annotated[bool, typer.Option(help="Measure token lengths with the base model's tokenizer.")] = True,
) -> None:
    """Validate, clean, dedupe, split and balance CONFIG's data; write train/val/test.jsonl and a report.

    Point data.path at the output folder to train on exactly this split.
    """
    from specialist.config import load_config
    from specialist.pipeline import load_template, prepare_data

    with _user_errors():
        cfg = load_config(config, list(set_ or []))
        tokenizer, template = load_template(cfg) if lengths else (None, None)
        folder = out or cfg.output.dir / f"{config_name(config)}-data"
        prepare_data(cfg, folder, tokenizer, template, protect=[config])
    console.print(f"prepared data: [bold]{folder}[/] (report.json, manifest.json)", soft_wrap=True)


@app.command()
def baselines(
    config: Annotated[Path, typer.Argument(help="YAML run config.")],
    set_: SetOption = None,
    out: Annotated[Path | None, typer.Option(help="Prepared-data folder (default: OUTPUT_DIR/<config name>-data).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the scores as JSON here.")] = None,
    folds: Annotated[int | None, typer.Option(help="Also cross-validate the baselines over every distinct prepared "
                                              "row in this many folds (by data.split_by), e.g. 5.")] = None,
    repeats: Annotated[int | None, typer.Option(help="--folds: shuffles of the folds (default 3).")] = None,
) -> None:
    """Before any training: what the cheapest alternatives score on CONFIG's held-out rows (the nearest training
    row's answer; for labelled rows the majority label and TF-IDF + logistic regression), with the config's
    scorers and 95% intervals. A fine-tune is worth its cost only above these. With --folds, also their mean and
    spread across splits: how far one split's figure can sit from what the baseline scores in general."""
    import json

    from specialist.config import load_config
    from specialist.evaluate.cross_validation import fold_options
    from specialist.evaluate.runner import cross_validated_baselines, evaluate_baselines
    from specialist.pipeline import load_template, prepare_data

    with _user_errors():
        repeats = fold_options(folds, repeats)  # before any data is read
        cfg = load_config(config, list(set_ or []))
        tokenizer, template = load_template(cfg)
        split, _ = prepare_data(cfg, out or cfg.output.dir / f"{config_name(config)}-data", tokenizer, template,
                                protect=[config])
        report = evaluate_baselines(cfg, split)
        crossed = cross_validated_baselines(cfg, split, folds, repeats) if folds is not None else None
    print_scores(report)
    scores = report.to_json()["arms"]
    if crossed is not None:
        print_cross_validation(crossed)
        for arm, per_metric in crossed.summary().items():
            scores.setdefault(arm, {})["cross_validation"] = per_metric
    if json_out is not None:
        json_out.write_text(json.dumps(scores, indent=2), encoding="utf-8")


def print_cross_validation(figures) -> None:
    """The baselines' figures across folds: mean (sd) per metric and arm."""
    from specialist.evaluate.cross_validation import summary_rows

    table = Table(title=f"cross-validated: {figures.folds} folds x {figures.repeats} shuffles over {figures.rows} "
                        "distinct rows; mean (sd) across folds")
    table.add_column("metric", no_wrap=True)
    for arm in figures.summary():
        table.add_column(arm, justify="right")
    for row in summary_rows(figures):
        table.add_row(*row)
    console.print(table)


@app.command()
def validate(
    config: Annotated[Path, typer.Argument(help="YAML run config.")],
    set_: SetOption = None,
) -> None:
    """Check a config and its data without a model or any output; exit 2 with the problems listed."""
    import tempfile

    from specialist.config import load_config
    from specialist.data import prepare as prepare_rows
    from specialist.data.report import print_prepare_report
    from specialist.evaluate.runner import check_evaluation_inputs
    from specialist.train import check_method_runs_here

    with _user_errors(), tempfile.TemporaryDirectory() as scratch:
        cfg = load_config(config, list(set_ or []))
        check_method_runs_here(cfg.method)
        check_evaluation_inputs(cfg)
        prepared = prepare_rows(cfg.data, cfg.method.kind, Path(scratch) / "prepared", cfg.training.seed)
        print_prepare_report(prepared.report)
    splits = prepared.report.get("splits", {})
    console.print(f"[green]ok[/] {config}: {sum(splits.values())} examples in {cfg.data.path}, model {cfg.model.name}",
                  soft_wrap=True)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `specialist run` or `specialist train`.")],
    format_: Annotated[str, typer.Option("--format", help="merged (transformers/vLLM folder), adapter (PEFT), gguf (llama.cpp, Ollama) or int8.")] = "merged",
    quantize: Annotated[str | None, typer.Option(help="gguf: f32, f16 (default), q8_0, q5_0, q4_0, q6_k, q5_k_m, q4_k_m; int8: weight_only.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: RUN_DIR/export/FORMAT); an earlier export there is replaced whole, once the new one is fully written.")] = None,
    golden: Annotated[int, typer.Option(min=0, help="Test prompts replayed through the export and compared.")] = 8,
    lora: Annotated[str, typer.Option(help="gguf of a LoRA run: separate (base GGUF + LoRA GGUF: llama.cpp --lora, Ollama ADAPTER), merged (one file) or auto (separate at 4 and 5 bits, where merging rounds the update away).")] = "auto",
    compensation_rank: Annotated[int | None, typer.Option(min=0, max=1024, help="gguf --lora separate with a base quantized here: rank of the base's quantization error correction added to the adapter (default 32; 0: none).")] = None,
    junit: JunitOption = None,
) -> None:
    """Export a run's model; replay golden prompts through the export and fail (exit 1) on any difference."""
    from specialist.deploy.export import ExportOptions, describe_check, export_run

    with _user_errors():
        result = export_run(run_dir, format_, out, ExportOptions(golden=golden, quantize=quantize, junit=junit,
                                                                 lora=lora, compensation_rank=compensation_rank))
    console.print(f"exported {format_}: [bold]{result.folder}[/] ({describe_check(result.check)})", soft_wrap=True)


@app.command()
def push(
    source: Annotated[Path, typer.Argument(help="An export folder, or a run folder (its export named by --format).")],
    repo: Annotated[str, typer.Option(help="The Hub repository ORG/NAME (created when missing).")],
    format_: Annotated[str | None, typer.Option("--format", help="Which export of a run folder: merged, adapter, gguf or int8 (default: its only one).")] = None,
    private: Annotated[bool, typer.Option(help="Create the repository private.")] = False,
    token: Annotated[str | None, typer.Option(help="Hugging Face token with write access (default: HF_TOKEN, or the one `hf auth login` stored).")] = None,
) -> None:
    """Upload an export folder and its model card to the Hugging Face Hub; needs a network and a token."""
    from specialist.deploy.push import push_export

    with _user_errors():
        url = push_export(source, repo, format_, private=private, token=token)
    console.print(f"pushed to [bold]{url}[/]", soft_wrap=True)


@app.command()
def serve(
    arm: Annotated[list[str], typer.Option(help="NAME=SOURCE: a run folder, an export folder or a base model (repeatable).")],
    split: Annotated[str | None, typer.Option(help="Traffic split for requests to model 'specialist', e.g. tuned=0.9,base=0.1.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 keeps it on this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    db: Annotated[Path, typer.Option(help="SQLite request log (its salt for user hashes is kept beside it).")] = Path("serve.sqlite"),
    api_key: Annotated[str | None, typer.Option(envvar="SPECIALIST_API_KEY", help="Require Authorization: Bearer KEY (all but /health).")] = None,
    log_prompts: Annotated[bool, typer.Option(help="Store prompts and outputs in the log (off: metadata only).")] = False,
    max_batch: Annotated[int, typer.Option(min=1, help="Requests generated together at most.")] = 8,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="How long a request waits for others to batch with.")] = 10.0,
    queue_size: Annotated[int, typer.Option(min=1, help="Waiting requests per arm before answering 503.")] = 64,
    max_tokens: Annotated[int, typer.Option(min=1, help="Largest max_tokens a request may ask for (and the cap when it names none).")] = 512,
    max_prompt_tokens: Annotated[int, typer.Option(min=1, help="Longest prompt in tokens; longer ones answer 400.")] = 2048,
    drain_seconds: Annotated[float, typer.Option(min=0, help="On SIGTERM, how long requests in flight may finish.")] = 5.0,
    constrain: Annotated[bool, typer.Option(help="Arms from runs decode inside the run's output language (JSON "
                                                 "schema, labels or regex: evaluation.constraint).")] = False,
    shadow: Annotated[list[str] | None, typer.Option(help="NAME=SOURCE answering in the background only: logged "
                                                          "beside the live answer, never returned (repeatable).")] = None,
    shadow_share: Annotated[float, typer.Option(min=0, max=1, help="Share of requests the shadows answer.")] = 1.0,
    shadow_queue: Annotated[int, typer.Option(min=1, help="Requests waiting for the shadows before new ones are dropped.")] = 32,
    admin_key: Annotated[str | None, typer.Option(envvar="SPECIALIST_ADMIN_KEY", help="Turns on POST /admin/arms/NAME "
                                                  "(arm swaps) for Authorization: Bearer KEY; a key of its own.")] = None,
    admin_root: Annotated[list[Path] | None, typer.Option(help="Folder an admin swap may load runs from (repeatable; "
                                                              "default: the folders holding the served runs).")] = None,
    scrub_logs: Annotated[bool, typer.Option(help="Scrub secrets and personal data from logged prompts and answers "
                                                  "(the rules of data.clean.scrub).")] = False,
    log_max_rows: Annotated[int | None, typer.Option(min=1, help="Keep the newest N requests in the log.")] = None,
    log_max_age: Annotated[float | None, typer.Option(min=1, help="Delete logged requests older than this many hours.")] = None,
    lone_runtime: Annotated[str, typer.Option(help="What answers a GGUF export arm's requests that arrive alone: "
                                                   "llama.cpp (auto: where llama-cpp-python is installed) or "
                                                   "torch; batches always run in torch.")] = "auto",
) -> None:
    """Serve the arms behind an OpenAI-compatible API with A/B routing, batching and a request log."""
    from specialist.deploy.serve import run_server

    with _user_errors():
        app, settings, names = _serve_app(arm, shadow or [], split, constrain, dict(
            db=db, api_key=api_key, log_prompts=log_prompts, max_batch=max_batch, max_wait_ms=max_wait_ms,
            queue_size=queue_size, max_tokens_limit=max_tokens, max_prompt_tokens=max_prompt_tokens,
            drain_seconds=drain_seconds, admin_key=admin_key, admin_roots=tuple(admin_root or ()),
            scrub_logs=scrub_logs, log_max_rows=log_max_rows,
            log_max_age_s=None if log_max_age is None else log_max_age * 3600, lone_runtime=lone_runtime),
            shadow_share, shadow_queue)
    console.print(f"serving {names} on http://{host}:{port}/v1 (split {settings.split}); log {db}"
                  + (f"; shadows {[s.partition('=')[0] for s in shadow]}" if shadow else ""), soft_wrap=True)
    run_server(app, host, port, settings)


def _serve_app(arm: list[str], shadow: list[str], split: str | None, constrain: bool, options: dict,
               shadow_share: float, shadow_queue: int):
    """Load live and shadow arms into one model pool (a shadow run on the live base adds only its adapter), and
    the app with a loader for admin swaps; `options` are ServeSettings fields passed as given."""
    from specialist.artifacts import ModelPool
    from specialist.deploy.arms import load_arms, load_replacement, parse_arms, parse_split
    from specialist.deploy.serve import ServeSettings, create_app
    from specialist.deploy.shadow import ShadowSettings

    specs, shadow_specs = parse_arms(arm), parse_arms(shadow) if shadow else []
    weights = parse_split(split, [name for name, _ in specs])
    pool = ModelPool(lone_runtime=options.pop("lone_runtime", "auto"))
    loaded = load_arms(specs + shadow_specs, pool, constrain=constrain)
    live = {name: loaded[name] for name, _ in specs}
    shadows = {name: loaded[name] for name, _ in shadow_specs}
    roots = options.pop("admin_roots") or tuple({Path(source).resolve().parent for _, source in specs
                                                 if Path(source).is_dir()})
    settings = ServeSettings(split=weights, shadow=ShadowSettings(share=shadow_share, queue_size=shadow_queue),
                             admin_roots=roots, **options)
    app = create_app(live, settings, shadows,
                     lambda name, source: load_replacement(name, source, pool, constrain))
    return app, settings, list(live)


@app.command("ab-report")
def ab_report_command(
    db: Annotated[Path, typer.Argument(help="The SQLite request log a `specialist serve` wrote.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the figures as JSON.")] = None,
) -> None:
    """Per-arm requests, latency p50/p95, format pass rate (95% CI), feedback; a test between arms' pass rates."""
    import json

    from specialist.core.stats import Interval
    from specialist.deploy.ab import ab_report

    with _user_errors():
        report = ab_report(db)
    table = Table(title=f"A/B report: {report['requests']} requests in {db}")
    for column in ("arm", "requests", "p50 s", "p95 s", "format pass", "95% CI", "feedback"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    for name, a in report["arms"].items():
        rate = "n/a" if a["format_pass_rate"] is None else f"{100 * a['format_pass_rate']:.1f}%"
        bounds = a["format_pass_ci95"]
        ci = "" if bounds is None else Interval(a["format_pass_rate"], *bounds).format_bounds(".1f", 100)
        table.add_row(name, str(a["requests"]), f"{a['latency_p50_s']:.3f}", f"{a['latency_p95_s']:.3f}", rate, ci,
                      f"{100 * a['feedback_rate']:.1f}%")
    console.print(table)
    for test in report["format_pass_tests"]:
        console.print(f"format pass rate {test['arms'][0]} - {test['arms'][1]}: {100 * test['difference']:+.1f} pts, "
                      f"z = {test['z']:.2f}, p = {test['p_value']:.4f}", soft_wrap=True)
    if report["shadows"]:
        console.print(_shadow_table(report["shadows"]))
    if json_out:
        json_out.write_text(json.dumps(report, indent=2), encoding="utf-8")


def _shadow_table(shadows: dict) -> Table:
    def percent(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    table = Table(title="shadow arms against the live answers to the same requests")
    for column in ("shadow", "requests", "agreement", "format live / shadow", "p50 s live / shadow",
                   "rated: live right / shadow agreed", "live wrong / shadow differed"):
        table.add_column(column, justify="left" if column == "shadow" else "right")
    for name, s in shadows.items():
        fb = s["on_feedback"]
        table.add_row(name, str(s["requests"]), percent(s["agreement"]),
                      f"{percent(s['live_format_pass_rate'])} / {percent(s['shadow_format_pass_rate'])}",
                      f"{s['live_latency_p50_s']:.3f} / {s['shadow_latency_p50_s']:.3f}",
                      f"{fb['live_right']} / {fb['both_right']}", f"{fb['live_wrong']} / {fb['shadow_maybe_right']}")
    return table


@app.command()
def harvest(
    db: Annotated[Path, typer.Argument(help="The SQLite request log a `specialist serve --log-prompts` wrote.")],
    run: Annotated[Path, typer.Option(help="The run whose data the queue is measured against (and shaped like).")],
    out: Annotated[Path, typer.Option(help="The labelling queue (JSONL) to write.")] = Path("queue.jsonl"),
    max_rows: Annotated[int, typer.Option("--max", min=1, help="Rows in the queue at most.")] = 200,
    mix: Annotated[str | None, typer.Option(help="Share of the budget per reason, e.g. negative_feedback=0.5,"
                                                 "format_failure=0.3,far_from_training=0.2 (default: all five).")] = None,
    arm: Annotated[str | None, typer.Option(help="Only this live arm's requests (default: all).")] = None,
    far: Annotated[float, typer.Option(min=0, max=1, help="Nearest training row similarity below this is far.")] = 0.2,
    low_confidence: Annotated[float, typer.Option(min=0, max=1, help="Classifier probability below this is low.")] = 0.6,
) -> None:
    """The logged requests worth labelling, each with why, as the run's rows with the model's answer as a draft."""
    from specialist.deploy.harvest import HarvestOptions, harvest as harvest_log, write_queue

    with _user_errors():
        options = HarvestOptions(max_rows=max_rows, arm=arm, far_similarity=far, low_confidence=low_confidence,
                                 **({"mix": _parse_mix(mix)} if mix else {}))
        rows, report = harvest_log(db, run, options)
        write_queue(rows, out)
    console.print(f"{report['chosen']} of {report['requests']} requests to label -> {out} "
                  f"(by reason {report['by_reason']}; {report['in_run_data']} already in the run's data, "
                  f"{report['duplicates_collapsed']} near duplicates collapsed)", soft_wrap=True)


def _parse_mix(text: str) -> dict[str, float]:
    from specialist.errors import ConfigError

    mix = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            mix[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--mix part {part!r} is not REASON=WEIGHT") from None
    return mix


@app.command()
def promote(
    candidate: Annotated[Path, typer.Argument(help="The retrained run to promote.")],
    over: Annotated[Path, typer.Option(help="The run serving now.")],
    db: Annotated[Path | None, typer.Option(help="Request log whose traffic is replayed through both.")] = None,
    replay: Annotated[int, typer.Option(min=0, help="Logged requests replayed at most.")] = 50,
    test_max: Annotated[int | None, typer.Option(min=1, help="Test rows scored at most (default: all).")] = None,
    tolerance: Annotated[float, typer.Option(min=0, help="How far the candidate may trail on a score.")] = 0.0,
    min_agreement: Annotated[float, typer.Option(min=0, max=1, help="Replay agreement with the current run required.")] = 0.0,
    server: Annotated[str | None, typer.Option(help="A running `specialist serve` to swap the arm on, e.g. http://127.0.0.1:8000.")] = None,
    arm: Annotated[str, typer.Option(help="The live arm the candidate replaces on --server.")] = "tuned",
    admin_key: Annotated[str | None, typer.Option(envvar="SPECIALIST_ADMIN_KEY", help="The server's --admin-key.")] = None,
    record: Annotated[Path | None, typer.Option(help="Where to write the promotion record (default: CANDIDATE/promotion.json).")] = None,
) -> None:
    """Gate CANDIDATE against the run serving (fixed test set, replayed traffic), record it, swap it in; exit 1 on a failed gate."""
    import json

    from specialist.deploy.promote import PromoteOptions, promote_gates, swap_on_server
    from specialist.run_folder import RunFolder

    with _user_errors():
        if server and not admin_key:
            swap_on_server(server, arm, candidate, admin_key)  # refuses before minutes of gating
        result = promote_gates(candidate, over, PromoteOptions(db=db, replay=replay, test_max=test_max,
                                                               tolerance=tolerance, min_agreement=min_agreement))
        result["swap"] = swap_on_server(server, arm, candidate, admin_key) if server and result["passed"] else None
        path = record or RunFolder.open(candidate).promotion_record
        path.write_text(json.dumps(result, indent=2), encoding="utf-8")
    for gate in result["gates"]:
        mark = "[green]pass[/]" if gate["passed"] else "[red]FAIL[/]"
        console.print(f"{mark}  {gate['name']}: {gate['detail']}", soft_wrap=True)
    swapped = f"; arm {arm!r} on {server} now serves it" if result["swap"] else ""
    console.print(f"record: {path}{swapped}", soft_wrap=True)
    if not result["passed"]:
        raise typer.Exit(1)


@app.command()
def drift(
    run_dir: Annotated[Path, typer.Argument(help="The run whose training data is the reference.")],
    db: Annotated[Path, typer.Argument(help="The SQLite request log a `specialist serve` wrote.")],
    arm: Annotated[str | None, typer.Option(help="Only this arm's traffic (default: all).")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for drift.json and drift.png (default: beside DB).")] = None,
    psi: Annotated[float, typer.Option(help="Input-length PSI above this is drift.")] = 0.2,
    novel_share: Annotated[float, typer.Option(help="Share of unfamiliar inputs above this is drift.")] = 0.25,
    pass_rate_drop: Annotated[float, typer.Option(help="Format pass-rate fall (first to last window) above this is drift.")] = 0.1,
) -> None:
    """Compare recent traffic with the training data and output health over time; exit 1 on drift."""
    from specialist.deploy.drift import DriftThresholds, detect_drift, write_drift_outputs
    from specialist.models import load_tokenizer
    from specialist.run_folder import RunFolder

    with _user_errors():
        run = RunFolder.open(run_dir)
        tokenizer = load_tokenizer(run.config().model.name)
        thresholds = DriftThresholds(psi=psi, novel_share=novel_share, pass_rate_drop=pass_rate_drop)
        result = detect_drift(run_dir, db, tokenizer, run.template(), thresholds, arm)
        summary, png = write_drift_outputs(result, out or db.parent)
    for name, signal in result["signals"].items():
        mark = "[red]DRIFT[/]" if signal["drift"] else "[green]ok[/]"
        value = "n/a" if signal["value"] is None else f"{signal['value']:.3f}"
        console.print(f"{mark:>14}  {name}: {value}" + (f" (threshold {signal['threshold']})" if "threshold" in signal
                                                        else f" ({signal.get('note', '')})"), soft_wrap=True)
    console.print(f"{result['requests']} requests; summary {summary}, plot {png}", soft_wrap=True)
    if result["drift"]:
        raise typer.Exit(1)


@app.command()
def models() -> None:
    """List converted models in the cache ($SPECIALIST_HOME/models)."""
    from specialist.models import list_cached_models, models_dir

    cached = list_cached_models()
    if not cached:
        console.print(f"no cached models in {models_dir()}; `specialist run` converts the default on first use")
        return
    table = Table(title=f"cached models in {models_dir()}")
    for column in ("name", "parameters", "context", "dtype", "disk"):
        table.add_column(column, justify="right" if column in {"parameters", "context", "disk"} else "left")
    for m in cached:
        table.add_row(m.name, f"{m.parameters / 1e6:.1f}M", str(m.context_length or "?"), m.dtype,
                      f"{m.disk_bytes / 2**20:.0f} MiB")
    console.print(table)


def print_domain(report) -> None:
    from specialist.evaluate.domain import domain_columns, domain_table

    table = Table(title="domain adaptation: before and after")
    for column in domain_columns(report):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for row in domain_table(report):
        table.add_row(*row)
    console.print(table)


def print_scores(report) -> None:
    """Every arm's headline scores with their 95% intervals, tuned minus base, and the forgetting figures."""
    arms = list(report.arms)
    if not arms:
        return
    table = Table(title=f"held-out results ({report.n_eval} examples; 95% intervals)")
    metrics = list(report.arms[arms[0]].headline())
    table.add_column("metric", no_wrap=True, min_width=max(len(m) for m in [*metrics, "length (words)"]))
    for arm in arms:
        table.add_column(arm, justify="right")
    compared = "base" in arms and "tuned" in arms
    if compared:
        table.add_column("tuned - base", justify="right")
    for metric in metrics:
        table.add_row(*_score_row(report, arms, metric, compared))
    print_versus_best(report)
    console.print(table)
    if report.forgetting is not None:
        forgetting = Table(title="forgetting: base weights against tuned")
        for column in ("figure", "before", "after", "change"):
            forgetting.add_column(column, justify="left" if column == "figure" else "right")
        for row in report.forgetting.table():
            forgetting.add_row(*row)
        console.print(forgetting)


def print_versus_best(report) -> None:
    """The line that matters: each tuned arm against the best of the cheap alternatives, per metric (paired, same
    rows); tuned+constrained, where scored, beside tuned."""
    from specialist.evaluate.baseline_arms import versus_best_lines

    lines = versus_best_lines(report)
    if lines:
        console.print("[bold]tuned against the best baseline[/] (the cheapest alternative scoring highest, same rows):")
        for line in lines:
            console.print(f"  {line}", soft_wrap=True, markup=False)


def _score_row(report, arms: list[str], metric: str, compared: bool) -> list[str]:
    cells = [metric if metric != "length" else "length (words)"]
    for arm in arms:
        value, interval = report.arms[arm].headline()[metric], report.arms[arm].scores.get(metric)
        if metric == "length":
            cells.append(f"{value:.1f}")
        elif interval is not None:
            cells.append(interval.format(".1f", 100, "%"))
        else:
            cells.append(f"{100 * value:.1f}%")
    if compared:
        difference = report.arms["tuned"].headline()[metric] - report.arms["base"].headline()[metric]
        cells.append("" if metric == "length" else f"{100 * difference:+.1f} pts")
    return cells


def config_name(path: Path) -> str:
    """The run's name stem: the config's folder for `config.yaml` (resolved, so `config.yaml` given from inside
    its own folder still names it), the folder and the variant for `config-VARIANT.yaml` (a recipe's
    `config-grpo.yaml` runs as `safety-refusals-grpo-...`), else the file's stem."""
    path = Path(path).resolve()
    if path.parent.name and path.stem == "config":
        return path.parent.name
    if path.parent.name and path.stem.startswith("config-") and len(path.stem) > len("config-"):
        return f"{path.parent.name}-{path.stem[len('config-'):]}"
    return path.stem


class _user_errors:
    """Print a SpecialistError without a traceback and exit with its code."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if isinstance(exc, OSError):  # a full disk or a read-only folder: the path and free space, no traceback
            from specialist.errors import storage_error

            exc = storage_error(exc) or exc
        if isinstance(exc, SpecialistError):
            console.print(f"[red]error:[/] {exc}", soft_wrap=True)
            raise typer.Exit(exc.exit_code)
        return False


if __name__ == "__main__":
    app()
