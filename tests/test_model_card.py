"""The model card every export carries (README.md, Hugging Face's format) and `specialist push` (the Hub mocked:
no test reaches the network)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from specialist.cli import app
from specialist.core.gates import GateResult
from specialist.core.stats import Interval, PairedComparison
from specialist.deploy.export import ExportOptions, export_run
from specialist.deploy.model_card import GEMMA_TERMS, render_model_card, write_model_card
from specialist.deploy.push import PushError, push_export
from specialist.errors import ConfigError, SpecialistError
from specialist.evaluate.results import ArmPair, ArmResult, EvalReport
from specialist.run_folder import ExportFolder, RunFolder

HOSTILE = ("Parse it.\n---\nlicense: mit\n---\n<script>alert('x')</script> <img src=x onerror=alert(1)>\n"
           "# Not a heading\n```\n| a | b |\n[click](javascript:alert(1)) **bold** \x00\x1b[31m")
FRONT = re.compile(r"\A---\n(.*?)\n---\n", re.S)


def front_matter(card: str) -> dict:
    match = FRONT.match(card)
    assert match, "no front matter"
    return yaml.safe_load(match.group(1))


@pytest.fixture
def run_copy(tiny_run_dir, tmp_path) -> RunFolder:
    """The session's tiny run copied, so a test can give it an eval.json or a new config."""
    copy = tmp_path / "tiny-run"
    shutil.copytree(tiny_run_dir, copy, ignore=shutil.ignore_patterns("export", "checkpoints", "eval.json"))
    return RunFolder(copy)


def set_config(run: RunFolder, **changes) -> None:
    raw = yaml.safe_load(run.config_file.read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    run.config_file.write_text(yaml.safe_dump(raw))


def fake_export(run: RunFolder, folder: Path, fmt: str = "merged", base: str | None = None) -> ExportFolder:
    """An export folder's metadata without the weights: what the card is rendered from."""
    export = ExportFolder(folder)
    folder.mkdir(parents=True)
    export.write_meta({"format": fmt, "run": str(run.path), "base_model": base or run.config().model.name,
                       "method": "lora", "template": "template.json"})
    return export


def write_eval(run: RunFolder, arm_names=("base", "tuned"), gates=None, forgetting=None) -> None:
    """eval.json in the typed report's own layout (EvalReport.to_json), as `specialist eval` writes it."""
    arms = {name: ArmResult(name, {"json_valid": Interval(0.25 + 0.5 * n, 0.1 + 0.5 * n, 0.4 + 0.5 * n, "wilson", 40),
                                   "exact_match": Interval(0.1 * n, None, None, "none", 40)},
                            length={"mean": 9.0})
            for n, name in enumerate(arm_names)}
    versus = {"json_valid": PairedComparison(Interval(0.5, 0.31, 0.66, "newcombe-paired", 40), 0.001, "b")}
    report = EvalReport(run.path, 40, 32, {"do_sample": False}, arms, {ArmPair("tuned", "base"): versus},
                        forgetting=forgetting, gates=gates or [])
    run.eval_json.write_text(json.dumps(report.to_json()))


# ---- the card -------------------------------------------------------------------------------------------------


def test_an_export_gets_a_card_with_the_hub_header_data_and_loading(run_copy, tmp_path):
    result = export_run(run_copy.path, "merged", tmp_path / "merged", ExportOptions(golden=1, max_new_tokens=4))
    card = ExportFolder(result.folder).model_card.read_text()
    header = front_matter(card)
    assert header["library_name"] == "transformers" and header["pipeline_tag"] == "text-generation"
    assert {"specialist", "merged", "lora"} <= set(header["tags"])
    assert "base_model" not in header  # a local folder is no Hub id
    assert "license" not in header and "gemma" not in card.lower()  # a Llama: no Gemma terms
    manifest = json.loads(run_copy.data_manifest.read_text())
    for split, entry in manifest["files"].items():
        assert f"| {split} | {entry['rows']} | `{entry['sha256']}` |" in card
    assert manifest["source"]["sha256"] in card and "exact dedupe 40 -> 40 rows" in card
    assert "Training: 2 optimizer steps" in card
    assert "Not evaluated yet" in card and "specialist eval" in card
    assert "1 of 1 held-out prompts answered by this export exactly" in card
    assert "AutoModelForCausalLM.from_pretrained" in card and "### Input:" in card
    assert str(tmp_path) not in card  # no local path goes public


def test_an_evaluated_run_shows_every_arm_with_intervals_gates_and_forgetting(run_copy, tmp_path):
    from specialist.evaluate.forgetting import forgetting_report

    forgetting = forgetting_report({"perplexity": 10.0, "knowledge": 0.8}, {"perplexity": 10.5, "knowledge": 0.7},
                                   20, 8, "bundled Wikipedia sentences")
    gates = [GateResult("json_valid >= 0.95", 0.75, False, 0.6, 0.9, True, 0.95, "upper bound under 0.95"),
             GateResult("forgetting.ppl_increase <= 0.1", 0.05, True, reason="at most 0.1")]
    write_eval(run_copy, ("base", "few_shot", "tuned"), gates, forgetting)
    card = render_model_card(fake_export(run_copy, tmp_path / "e"), run_copy)
    assert "Not evaluated" not in card and "40 held-out examples" in card
    assert "| metric | base | few\\_shot | tuned | tuned - base |" in card
    assert "| json\\_valid | 25.0% [10.0, 40.0] | 75.0% [60.0, 90.0] | 125.0% [110.0, 140.0] | " \
           "+50.0 pts [+31.0, +66.0] |" in card
    assert "| exact\\_match | 0.0% | 10.0% | 20.0% |" in card  # no interval where none exists
    assert ("**FAIL**: json\\_valid &gt;= 0.95 (value 0.750, interval [0.600, 0.900]; upper bound under 0.95)"
            in card)
    assert "- pass: forgetting.ppl\\_increase &lt;= 0.1" in card
    assert "| perplexity on bundled Wikipedia sentences (20 texts) | 10.00 | 10.50 | +5.0% |" in card
    assert "| knowledge probe accuracy (8 questions) | 80.0% | 70.0% | -10.0 pts |" in card


@pytest.mark.parametrize("how", ["embedded name", "embedded cache folder", "gemma config"])
def test_gemma_derivatives_carry_the_gemma_terms_and_license(run_copy, tmp_path, how, isolated_home):
    base = "gemma-3-270m"
    if how == "embedded cache folder":
        base = str(isolated_home / "models" / "gemma-3-270m")
        Path(base).mkdir(parents=True)
    set_config(run_copy, model__name=base)
    export = fake_export(run_copy, tmp_path / "e", "gguf" if how != "gemma config" else "merged",
                         base=base if how != "gemma config" else str(run_copy.path))
    if how == "gemma config":
        (export.path / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    card = render_model_card(export, run_copy)
    header = front_matter(card)
    assert header["license"] == "gemma" and GEMMA_TERMS in card
    assert "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms" in card
    assert "Prohibited Use Policy" in card
    if how == "embedded name":
        assert header["base_model"] == "google/gemma-3-270m" and header["library_name"] == "gguf"
        assert "llama-cli" in card and "ollama create" in card


def test_a_hub_base_is_named_in_the_header_and_a_local_license_is_inherited(run_copy, tmp_path):
    card = render_model_card(fake_export(run_copy, tmp_path / "a", "adapter", base="acme/tiny-llama"), run_copy)
    header = front_matter(card)
    assert header["base_model"] == "acme/tiny-llama" and header["base_model_relation"] == "adapter"
    assert header["library_name"] == "peft" and "PeftModel.from_pretrained" in card
    base = tmp_path / "local-base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    header = front_matter(render_model_card(fake_export(run_copy, tmp_path / "b", base=str(base)), run_copy))
    assert header["license"] == "apache-2.0" and "base_model" not in header
    (base / "README.md").write_text("---\nlicense: \"mit\\n---\\nx: y\"\n---\n")  # no free text into the header
    assert "license" not in front_matter(render_model_card(fake_export(run_copy, tmp_path / "c", base=str(base)),
                                                           run_copy))


def test_hostile_text_cannot_end_the_front_matter_or_inject_markup(run_copy, tmp_path):
    set_config(run_copy, data__instruction=HOSTILE)
    write_eval(run_copy, ("base", "tuned | <b>x</b>\n---"), [GateResult("json_valid >= 1 <script>", 1.0, True,
                                                                         reason="---\n<img src=x>")])
    card = render_model_card(fake_export(run_copy, tmp_path / "e"), run_copy)
    header = front_matter(card)
    # nothing of the run's text in the header: the hostile arm is left out of model-index, the plain one stays
    assert set(header) == {"library_name", "tags", "pipeline_tag", "model-index"}
    arms = {metric["args"]["arm"] for metric in header["model-index"][0]["results"][0]["metrics"]}
    assert arms == {"base"} and "<b>" not in yaml.safe_dump(header)
    closing = card.splitlines().index("---", 1)
    assert [n for n, line in enumerate(card.splitlines()) if line == "---"] == [0, closing]
    assert "\x00" not in card and "\x1b" not in card
    # raw HTML only inside the indented code block (shown verbatim, inert), never in rendered text
    rendered = [line for line in card.splitlines() if not line.startswith("    ")]
    assert not any(tag in line for line in rendered for tag in ("<script", "<img", "<b>", "[click]"))
    code = [line for line in card.splitlines() if line.startswith("    ")]
    assert {"    ---", "    license: mit", "    # Not a heading"} <= set(code)
    assert any("<script>alert('x')</script>" in line for line in code)
    row = next(line for line in card.splitlines() if line.startswith("| json"))
    assert len(re.findall(r"(?<!\\)\|", row)) == 5  # metric, two arms, tuned - base: the arm's | is escaped
    assert "tuned \\| &lt;b&gt;x&lt;/b&gt; \\-\\-\\-" in card


def test_the_instruction_is_shown_verbatim_in_an_indented_block(run_copy, tmp_path):
    set_config(run_copy, data__instruction="Line one.\n\n  indented <tag> & `code`")
    card = render_model_card(fake_export(run_copy, tmp_path / "e"), run_copy)
    assert "    Line one.\n    \n      indented <tag> & `code`" in card


@pytest.mark.parametrize("fmt, relation", [("merged", "finetune"), ("gguf", "finetune"), ("int8", "finetune"),
                                           ("adapter", "adapter")])
def test_every_export_of_a_fine_tune_is_a_finetune_on_the_hub(run_copy, tmp_path, fmt, relation):
    # a GGUF or int8 file holds the tuned weights: "quantized" would list it as a quantization of the base model
    header = front_matter(render_model_card(fake_export(run_copy, tmp_path / fmt, fmt, base="acme/tiny-llama"),
                                            run_copy))
    assert header["base_model"] == "acme/tiny-llama" and header["base_model_relation"] == relation


@pytest.mark.parametrize("fmt", ["gguf", "int8"])
def test_cards_download_with_hf_not_the_removed_huggingface_cli(run_copy, tmp_path, fmt):
    from specialist.deploy import push

    card = render_model_card(fake_export(run_copy, tmp_path / fmt, fmt), run_copy, "acme/triage")
    assert "hf download acme/triage --local-dir model" in card and "huggingface-cli" not in card
    assert "huggingface-cli" not in push._TOKEN_HINT and "hf auth login" in push._TOKEN_HINT


def test_model_index_holds_every_arm_with_its_interval_and_reads_back_with_huggingface_hub(run_copy, tmp_path):
    from huggingface_hub import ModelCard

    write_eval(run_copy, ("base", "few_shot", "tuned"))
    card = render_model_card(fake_export(run_copy, tmp_path / "e"), run_copy, "acme/triage")
    header = front_matter(card)
    assert header["model-index"][0]["name"] == "acme/triage"
    results = ModelCard(card).data.eval_results  # the Hub library's own parser of model-index
    figures = {(r.metric_args["arm"], r.metric_type): r for r in results}
    assert set(figures) == {(arm, metric) for arm in ("base", "few_shot", "tuned")
                            for metric in ("json_valid", "exact_match")}
    assert results[0].metric_args["arm"] == "tuned"  # the exported model's own figures first
    tuned = figures["tuned", "json_valid"]
    assert tuned.metric_value == pytest.approx(1.25) and tuned.metric_args["ci95"] == pytest.approx([1.1, 1.4])
    assert tuned.metric_args["interval"] == "wilson" and tuned.metric_args["n"] == 40
    assert tuned.metric_name == "json_valid (tuned)" and tuned.verified is False
    assert "ci95" not in figures["base", "exact_match"].metric_args  # no interval where none was computed
    assert {(r.task_type, r.dataset_type, r.dataset_split) for r in results} == {("text-generation", "json", "test")}
    assert "datasets" not in header  # a local file is no Hub dataset


def test_a_hub_training_dataset_is_named_in_datasets_and_in_model_index(run_copy, tmp_path):
    manifest = json.loads(run_copy.data_manifest.read_text())
    manifest["source"].update(path="acme/tickets", format="hub")  # as prepare writes it for data.path: org/name
    run_copy.data_manifest.write_text(json.dumps(manifest))
    write_eval(run_copy)
    header = front_matter(render_model_card(fake_export(run_copy, tmp_path / "e"), run_copy))
    assert header["datasets"] == ["acme/tickets"]
    dataset = header["model-index"][0]["results"][0]["dataset"]
    assert dataset["type"] == dataset["name"] == "acme/tickets" and dataset["split"] == "test"
    assert header["model-index"][0]["name"] == run_copy.path.name  # no repo id given: the run's folder name


def test_continued_pretraining_figures_go_into_model_index_too(run_copy, tmp_path):
    accuracy = Interval(0.5, 0.3, 0.7, "wilson", 20).as_dict()
    arms = {"base": {"doc_perplexity": 14.0, "general_perplexity": 20.0, "question_accuracy": accuracy},
            "tuned": {"doc_perplexity": 9.5, "general_perplexity": float("nan"), "question_accuracy": accuracy}}
    run_copy.eval_json.write_text(json.dumps({"kind": "domain_adaptation", "arms": arms}))
    metrics = front_matter(render_model_card(fake_export(run_copy, tmp_path / "e"), run_copy))["model-index"][0][
        "results"][0]["metrics"]
    found = {(m["args"]["arm"], m["type"]): m for m in metrics}
    assert found["tuned", "doc_perplexity"]["value"] == 9.5 and found["base", "question_accuracy"]["args"]["ci95"] == [
        0.3, 0.7]
    assert ("tuned", "general_perplexity") not in found  # NaN is no figure to publish


def test_an_unevaluated_run_has_no_model_index(run_copy, tmp_path):
    header = front_matter(render_model_card(fake_export(run_copy, tmp_path / "e"), run_copy))
    assert "model-index" not in header and header["library_name"] == "transformers"


def test_a_card_without_its_run_still_renders(run_copy, tmp_path):
    export = fake_export(run_copy, tmp_path / "e")
    shutil.rmtree(run_copy.path)
    card = write_model_card(export).read_text()
    assert front_matter(card)["library_name"] == "transformers"
    assert "run this export came from was not found" in card and "Not evaluated yet" in card


# ---- push ---------------------------------------------------------------------------------------------------


class FakeApi:
    """Records what push sends; never touches the network."""

    calls: list = []
    fail: Exception | None = None

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        if FakeApi.fail is not None:
            raise FakeApi.fail
        FakeApi.calls.append(("create_repo", repo_id, kwargs, self.token))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        FakeApi.calls.append(("upload_folder", kwargs))

    def upload_file(self, **kwargs):
        FakeApi.calls.append(("upload_file", kwargs))


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    FakeApi.calls, FakeApi.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return FakeApi


def test_push_uploads_the_export_with_a_card_naming_the_repo(run_copy, tmp_path, hub):
    export = fake_export(run_copy, run_copy.export_dir("merged"))
    (export.path / "model.safetensors").write_bytes(b"weights")
    export.check_file.write_text("{}")
    url = push_export(run_copy.path, "acme/log-parser", private=True, token="hf_secret")
    assert url == "https://huggingface.co/acme/log-parser"
    (_, repo, created, token), (_, folder), (_, meta) = hub.calls
    assert repo == "acme/log-parser" and created["private"] is True and token == "hf_secret"
    assert folder["folder_path"] == str(export.path) and folder["repo_id"] == "acme/log-parser"
    assert {"export_check.json", "export.json"} <= set(folder["ignore_patterns"])
    public = json.loads(meta["path_or_fileobj"])
    assert "run" not in public and public["format"] == "merged" and meta["path_in_repo"] == "export.json"
    assert 'from_pretrained("acme/log-parser")' in export.model_card.read_text()


def test_push_without_a_token_or_offline_says_what_to_do(run_copy, tmp_path, hub, monkeypatch):
    fake_export(run_copy, run_copy.export_dir("merged"))
    with pytest.raises(ConfigError, match="no Hugging Face token") as info:
        push_export(run_copy.path, "acme/x")
    assert "HF_TOKEN" in str(info.value) and hub.calls == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PushError, match="HF_HUB_OFFLINE is set, and pushing needs the network"):
        push_export(run_copy.path, "acme/x", token="t")
    assert hub.calls == []


@pytest.mark.parametrize("status, words", [(None, "could not reach the Hugging Face Hub"),
                                           (401, "refused the token"), (404, "answered HTTP 404")])
def test_an_unreachable_or_refusing_hub_is_a_clear_error(run_copy, hub, status, words):
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    fake_export(run_copy, run_copy.export_dir("merged"))
    request = httpx.Request("POST", "https://huggingface.co/api/repos/create")
    hub.fail = (httpx.ConnectError("Name or service not known", request=request) if status is None else
                HfHubHTTPError("refused", response=httpx.Response(status, request=request)))
    with pytest.raises(PushError, match=words) as info:
        push_export(run_copy.path, "acme/x", token="t")
    assert info.value.exit_code == 1


def test_push_refuses_bad_repo_ids_and_ambiguous_or_missing_exports(run_copy, tmp_path, hub):
    for repo in ("noslash", "a/b/c", "../x", "acme/", "/x", "acme/<b>", "a" * 97 + "/x", ""):
        with pytest.raises(ConfigError, match="not a Hub repository id"):
            push_export(run_copy.path, repo, token="t")
    with pytest.raises(ConfigError, match="has no export") as info:
        push_export(run_copy.path, "acme/x", token="t")
    assert "specialist export" in str(info.value)
    fake_export(run_copy, run_copy.export_dir("merged"))
    fake_export(run_copy, run_copy.export_dir("int8"), "int8")
    with pytest.raises(ConfigError, match="choose one with --format"):
        push_export(run_copy.path, "acme/x", token="t")
    with pytest.raises(ConfigError, match="is a merged export, not int8"):
        push_export(run_copy.export_dir("merged"), "acme/x", "int8", token="t")
    with pytest.raises(ConfigError, match="unknown export format"):
        push_export(run_copy.path, "acme/x", "onnx", token="t")
    with pytest.raises(ConfigError, match="neither an export folder nor a run folder"):
        push_export(tmp_path / "nowhere", "acme/x", token="t")
    assert hub.calls == []


def test_push_without_huggingface_hub_says_how_to_install_it(run_copy, monkeypatch):
    import builtins

    fake_export(run_copy, run_copy.export_dir("merged"))
    real_import = builtins.__import__

    def no_hub(name, *args, **kwargs):
        if name == "huggingface_hub":
            raise ImportError("No module named 'huggingface_hub'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hub)
    with pytest.raises(SpecialistError, match="needs the package huggingface_hub") as info:
        push_export(run_copy.path, "acme/x", token="t")
    assert "pip install huggingface_hub" in str(info.value)


def test_the_push_command_prints_the_error_without_a_traceback(run_copy, hub):
    fake_export(run_copy, run_copy.export_dir("merged"))
    result = CliRunner().invoke(app, ["push", str(run_copy.path), "--repo", "acme/x"])
    assert result.exit_code == 2 and "no Hugging Face token" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["push", str(run_copy.path), "--repo", "acme/x", "--token", "t", "--private"])
    assert result.exit_code == 0 and "https://huggingface.co/acme/x" in result.output
    assert hub.calls[0][2]["private"] is True


def test_push_refuses_a_symlink_out_of_the_export_by_name_and_sends_nothing(run_copy, tmp_path, hub):
    export = fake_export(run_copy, run_copy.export_dir("merged"))
    (export.path / "model.safetensors").write_bytes(b"weights")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the Hub")
    (export.path / "notes.txt").symlink_to(secret)
    with pytest.raises(ConfigError, match=r"notes.txt -> .*secret.txt"):
        push_export(run_copy.path, "acme/x", token="t")
    assert hub.calls == []


def test_a_readme_symlink_is_replaced_by_the_card_never_written_through(run_copy, tmp_path, hub):
    export = fake_export(run_copy, run_copy.export_dir("merged"))
    outside = tmp_path / "outside.md"
    outside.write_text("the user's own file")
    export.model_card.symlink_to(outside)
    with pytest.raises(ConfigError, match="README.md -> "):  # push: refused before the card is refreshed
        push_export(run_copy.path, "acme/x", token="t")
    assert outside.read_text() == "the user's own file" and hub.calls == []
    write_model_card(export, run_copy)  # what export does: the link is replaced, its target untouched
    assert outside.read_text() == "the user's own file"
    assert not export.model_card.is_symlink() and export.model_card.read_text().startswith("---\n")
