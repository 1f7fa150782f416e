"""Export (merged, adapter, int8, GGUF through llama.cpp), loading exports safely, the A/B report and drift, on a
tiny model trained for two steps (the session's `tiny_run_dir`)."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from specialist.artifacts import load_exported
from specialist.deploy.ab import ab_report, pass_rate_interval, two_proportion_test
from specialist.deploy.export import ExportMismatch, ExportOptions, compare_outputs, export_run
from specialist.errors import ConfigError
from specialist.generation import Engine
from specialist.run_folder import ExportFolder, RunFolder


@pytest.fixture
def run_dir(tiny_run_dir):
    return tiny_run_dir


# ---- export -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["merged", "adapter"])
def test_export_loads_back_and_answers_the_golden_prompts_like_the_run(run_dir, tmp_path, fmt):
    result = export_run(run_dir, fmt, tmp_path / fmt, ExportOptions(golden=4, max_new_tokens=8))
    check = json.loads((result.folder / "export_check.json").read_text())
    assert check["prompts"] == 4 and check["mismatches"] == [] and len(check["answers"]) == 4
    assert (result.folder / "template.json").is_file() and (result.folder / "tokenizer_config.json").is_file()
    if fmt == "merged":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(result.folder)  # plain transformers, no PEFT
        assert not any("lora" in name for name, _ in model.named_parameters())
        assert model.generation_config.eos_token_id
    else:
        assert (result.folder / "adapter_config.json").is_file()
        assert (result.folder / "adapter_model.safetensors").is_file()
    loaded = load_exported(result.folder)
    assert loaded.template.kind in ("builtin", "chat") and loaded.tokenizer.eos_token


def test_a_different_model_is_reported_as_a_mismatch(run_dir, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = load_exported(export_run(run_dir, "merged", tmp_path / "m",
                                        ExportOptions(golden=2, max_new_tokens=6)).folder)
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for param in other.parameters():
        param.data.normal_(std=0.5)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [ex.prompt for ex in RunFolder(run_dir).split().test[:4]]
    check = compare_outputs(Engine(exported.model, exported.tokenizer, exported.template),
                            Engine(other, tokenizer, exported.template), prompts, 6)
    assert check["mismatches"] and {"run", "export", "run_stopped", "export_stopped"} <= set(check["mismatches"][0])


def test_an_export_that_answers_differently_fails_the_cli_with_exit_1_naming_the_check(run_dir, tmp_path,
                                                                                       monkeypatch):
    from typer.testing import CliRunner

    import specialist.deploy.export as export_module
    from specialist.cli import app

    merged_copy = export_module.merged_copy

    def scrambled(tuned):  # a writer that saves some other model: the replay must notice
        model = merged_copy(tuned)
        for param in model.parameters():
            param.data.normal_(std=0.5)
        return model

    monkeypatch.setattr(export_module, "merged_copy", scrambled)
    out = tmp_path / "m"
    with pytest.raises(ExportMismatch, match=r"of 2 golden prompts answer differently after export"):
        export_run(run_dir, "merged", out, ExportOptions(golden=2, max_new_tokens=6))
    result = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(out), "--golden", "2"], terminal_width=200)
    assert result.exit_code == 1, result.output
    assert "golden prompts answer differently after export" in result.output and "Traceback" not in result.output
    assert json.loads((out / "export_check.json").read_text())["mismatches"]


def test_export_refuses_a_folder_without_a_model_and_an_unknown_format(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": {"path": "d.jsonl"}}))
    with pytest.raises(ConfigError, match="holds no trained model"):
        export_run(tmp_path, "gguf")
    with pytest.raises(ConfigError, match="unknown export format"):
        export_run(tmp_path, "onnx")


def test_an_export_killed_mid_write_leaves_the_earlier_export_whole(run_dir, tmp_path, monkeypatch):
    import specialist.deploy.export as export_module

    out = tmp_path / "m"
    first = export_run(run_dir, "merged", out, ExportOptions(golden=1, max_new_tokens=4))
    before = {p.name: p.read_bytes() for p in first.folder.iterdir() if p.is_file()}

    def killed(*args, **kwargs):  # the process dies after the weights are written, before the export is whole
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "write_model_card", killed)
    with pytest.raises(KeyboardInterrupt):
        export_run(run_dir, "merged", out, ExportOptions(golden=1, max_new_tokens=4))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert load_exported(out).tokenizer.eos_token  # the earlier export still loads

    monkeypatch.undo()  # the next export clears the killed one's leftovers and replaces the earlier export whole
    again = export_run(run_dir, "adapter", out, ExportOptions(golden=1, max_new_tokens=4))
    assert again.folder == out and ExportFolder(out).meta()["format"] == "adapter"
    assert not (out / "model.safetensors").exists() and (out / "adapter_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging or replaced folder left beside it


def test_export_refuses_to_replace_a_folder_that_is_not_an_export(run_dir, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="is not an export"):
        export_run(run_dir, "merged", mine, ExportOptions(golden=1, max_new_tokens=4))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not an export"):
        export_run(run_dir, "merged", tmp_path / "file", ExportOptions(golden=1, max_new_tokens=4))
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_run(run_dir, "merged", empty, ExportOptions(golden=1, max_new_tokens=4)).folder == empty


def test_export_writes_every_golden_replay_as_a_junit_case(run_dir, tmp_path):
    import xml.etree.ElementTree as ET

    export_run(run_dir, "merged", tmp_path / "m",
               ExportOptions(golden=3, max_new_tokens=6, junit=tmp_path / "export.xml"))
    suite = ET.parse(tmp_path / "export.xml").getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == 3 and suite.get("failures") == "0"
    assert {c.get("classname") for c in cases} == {"export.merged"}


def test_int8_export_is_safetensors_int8_and_scores_as_an_eval_arm(run_dir, tmp_path):
    from safetensors import safe_open

    from specialist.evaluate.runner import evaluate_run

    result = export_run(run_dir, "int8", tmp_path / "q8", ExportOptions(golden=4, max_new_tokens=8))
    meta = json.loads((result.folder / "export.json").read_text())
    assert meta["int8_mode"] == "weight_only" and result.check["logits"]["max_relative_l2"] < 0.1
    assert not list(result.folder.glob("*.pt")) and not list(result.folder.glob("*.bin"))
    with safe_open(str(result.folder / meta["int8_file"]), framework="pt") as weights:
        dtypes = {str(weights.get_slice(k).get_dtype()) for k in weights.keys()}
    assert "I8" in dtypes
    model = load_exported(result.folder).model
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again after loading
    config = RunFolder(run_dir).config(["evaluation.forgetting=false", "evaluation.max_examples=4",
                                        "evaluation.max_new_tokens=6", "evaluation.bootstrap_samples=100"])
    evaluation = evaluate_run(run_dir, config, {"int8": result.folder})
    assert {"int8", "tuned"} <= set(evaluation.arms)
    assert evaluation.arms["int8"].weights_bytes == meta["int8_bytes"]
    assert evaluation.arms["tuned"].generation_seconds > 0
    assert "| int8 |" in (run_dir / "report.md").read_text()


def test_an_export_whose_metadata_names_a_file_outside_it_or_a_pickle_is_refused(run_dir, tmp_path):
    """A planted pickle never runs: no loader of ours unpickles, and file names must stay inside the folder."""
    folder = export_run(run_dir, "int8", tmp_path / "q8", ExportOptions(golden=1, max_new_tokens=4)).folder
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (folder / "int8_state.pt").write_bytes(pickle.dumps(Payload()))
    meta = json.loads((folder / "export.json").read_text())
    for name in ("int8_state.pt", "../../outside.safetensors", "/etc/passwd", "", 7, "sub/x.safetensors"):
        (folder / "export.json").write_text(json.dumps({**meta, "int8_file": name}))
        with pytest.raises(ConfigError):
            load_exported(folder)
    assert not marker.exists()
    (folder / "export.json").write_text(json.dumps({**meta, "format": "dynamic"}))
    with pytest.raises(ConfigError, match="unknown export format"):
        load_exported(folder)
    (folder / "export.json").write_text("[" * 5000)
    with pytest.raises(ConfigError, match="not valid JSON"):
        ExportFolder(folder).meta()


@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_0", "q4_k_m"])
def test_gguf_export_replays_in_llama_cpp_with_its_own_tokenizer(run_dir, tmp_path, qtype):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is in the test extra")
    result = export_run(run_dir, "gguf", tmp_path / qtype, ExportOptions(golden=4, max_new_tokens=8, quantize=qtype))
    check = result.check
    assert check["runtime"] == "llama.cpp" and check["prompt_token_mismatches"] == []
    assert check["prompts"] == 4 and len(check["answers"]) == 4
    if qtype == "f16":
        assert check["mismatches"] == [] and check["logits"]["top1_agreement"] == 1.0
    modelfile = (result.folder / "Modelfile").read_text()
    assert "TEMPLATE" in modelfile and "PARAMETER stop" in modelfile
    meta = json.loads((result.folder / "export.json").read_text())
    if qtype in ("q4_0", "q4_k_m"):  # a LoRA run at 4 bits: the base file and the adapter beside it
        assert meta["gguf_layout"] == "separate" and meta["gguf_file"] == f"base-{qtype}.gguf"
        assert modelfile.startswith(f"FROM ./base-{qtype}.gguf\nADAPTER ./adapter.gguf\n")
        # the tiny base is quantized here, so its error is corrected inside the adapter
        assert meta["gguf_compensation"]["rank"] == 32 and meta["gguf_compensation"]["layers"] > 0
    else:
        assert meta["gguf_layout"] == "merged" and modelfile.startswith(f"FROM ./model-{qtype}.gguf\n")


def test_a_separate_lora_gguf_answers_like_the_run_in_llama_cpp_and_through_transformers(run_dir, tmp_path):
    """Base + adapter files: llama.cpp applies the adapter; without llama.cpp the loader adds it to the weights."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is in the test extra")
    result = export_run(run_dir, "gguf", tmp_path / "sep",
                        ExportOptions(golden=4, max_new_tokens=8, quantize="f16", lora="separate"))
    assert result.check["runtime"] == "llama.cpp" and result.check["mismatches"] == []
    assert sorted(p.name for p in result.folder.glob("*.gguf")) == ["adapter.gguf", "base-f16.gguf"]
    loaded = load_exported(result.folder)  # transformers' GGUF reader + the adapter merged in
    merged = load_exported(export_run(run_dir, "merged", tmp_path / "m",
                                      ExportOptions(golden=1, max_new_tokens=4)).folder)
    for name, weight in merged.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], weight, rtol=2e-3, atol=2e-3, msg=name)


def test_lora_layouts_are_checked_before_anything_is_written(run_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown LoRA layout 'both'"):
        export_run(run_dir, "gguf", tmp_path / "x", ExportOptions(quantize="q4_0", lora="both"))
    for rank in (-1, 10**9):
        with pytest.raises(ConfigError, match="compensation rank"):
            export_run(run_dir, "gguf", tmp_path / "x", ExportOptions(quantize="q4_0", compensation_rank=rank))
    assert not (tmp_path / "x").exists()


# ---- A/B report -------------------------------------------------------------------------------------------


def test_wilson_interval_and_two_proportion_test_match_known_values():
    low, high = pass_rate_interval(8, 10)
    assert abs(low - 0.4902) < 1e-3 and abs(high - 0.9433) < 1e-3
    assert pass_rate_interval(0, 5)[0] == 0.0 and pass_rate_interval(5, 5)[1] == 1.0  # exact at 0/n and n/n
    test = two_proportion_test(90, 100, 75, 100)
    assert abs(test["z"] - 2.7914) < 1e-3 and abs(test["p_value"] - 0.00525) < 1e-4  # pooled: 0.15 / 0.053736


def test_ab_pass_rate_interval_is_the_interval_evaluation_reports_for_the_same_rows():
    # one Wilson implementation: a live pass rate and an evaluated one over the same 0/1 rows must not disagree
    from specialist.core.stats import score_interval

    for total in (1, 7, 60, 333):
        for passed in sorted({0, 1, total // 2, total - 1, total}):
            evaluated = score_interval([1.0] * passed + [0.0] * (total - passed))
            assert pass_rate_interval(passed, total) == (evaluated.low, evaluated.high)


def ab_log(path: Path) -> Path:
    """A request log of two arms: tuned passes the format check 10 times in 12, base 4 in 8; one feedback row."""
    from specialist.deploy.records import LoggedRequest, RequestLog

    log = RequestLog(path)
    for i in range(20):
        arm = "tuned" if i < 12 else "base"
        log.add(LoggedRequest(request_id=f"r{i}", arm=arm, endpoint="chat", user=None,
                              latency_s=0.1 * (i % 4 + 1), tokens_in=10, tokens_out=5,
                              format_ok=(i % 6 != 0) if arm == "tuned" else (i % 2 == 0), finish_reason="stop"))
    assert log.add_feedback("r1", 1.0, "good") and not log.add_feedback("missing", 0.0, None)
    log.close()
    return path


def test_ab_report_counts_arms_latency_pass_rates_and_feedback(tmp_path):
    report = ab_report(ab_log(tmp_path / "log.sqlite"))
    tuned, base = report["arms"]["tuned"], report["arms"]["base"]
    assert (tuned["requests"], base["requests"]) == (12, 8)
    assert tuned["format_pass_rate"] == 10 / 12 and base["format_pass_rate"] == 4 / 8
    assert tuned["feedback_count"] == 1 and tuned["feedback_mean"] == 1.0
    assert tuned["latency_p50_s"] <= tuned["latency_p95_s"]
    assert report["format_pass_tests"][0]["arms"] == ["tuned", "base"]


def test_the_ab_report_command_prints_each_arms_pass_rate_with_its_wilson_interval(tmp_path):
    from typer.testing import CliRunner

    from specialist.cli import app

    result = CliRunner().invoke(app, ["ab-report", str(ab_log(tmp_path / "log.sqlite"))], terminal_width=200)
    assert result.exit_code == 0, result.output
    for passed, total in ((10, 12), (4, 8)):  # "[low, high]" in percent, one decimal, as the table always printed
        low, high = pass_rate_interval(passed, total)
        assert f"{100 * passed / total:.1f}%" in result.output and f"[{100 * low:.1f}, {100 * high:.1f}]" in result.output


# ---- drift ------------------------------------------------------------------------------------------------


def test_psi_and_js_distance_are_zero_for_the_same_data_and_grow_with_shift():
    from collections import Counter

    import numpy as np

    from specialist.deploy.drift import js_distance, population_stability_index

    rng = np.random.default_rng(0)
    reference = rng.normal(100, 10, 2000)
    assert population_stability_index(reference, rng.normal(100, 10, 2000)) < 0.05
    assert population_stability_index(reference, rng.normal(140, 10, 2000)) > 1.0
    words = Counter({"block": 5, "datanode": 3})
    assert js_distance(words, words) == 0.0 and js_distance(words, Counter({"refund": 4})) == 1.0


def test_js_distance_is_the_textbook_square_root_of_the_base_2_divergence():
    import math
    import random
    from collections import Counter

    from specialist.deploy.drift import js_distance

    def by_hand(a: Counter, b: Counter) -> float:
        total_a, total_b = sum(a.values()), sum(b.values())
        divergence = 0.0
        for word in set(a) | set(b):
            p, q = a[word] / total_a, b[word] / total_b
            m = (p + q) / 2
            divergence += (p * math.log2(p / m) if p else 0.0) + (q * math.log2(q / m) if q else 0.0)
        return math.sqrt(divergence / 2)

    rng = random.Random(27)
    vocabulary = [f"w{i}" for i in range(30)]
    for _ in range(50):
        a = Counter(rng.choices(vocabulary[:20], k=rng.randint(1, 60)))
        b = Counter(rng.choices(vocabulary[10:], k=rng.randint(1, 60)))
        assert js_distance(a, b) == pytest.approx(by_hand(a, b), abs=1e-9)


def fill_log(path, rows):
    from specialist.deploy.records import LoggedRequest, RequestLog

    log = RequestLog(path)
    for i, (prompt, tokens_in, ok) in enumerate(rows):
        log.add(LoggedRequest(request_id=f"r{i}", arm="tuned", endpoint="chat", user=None, latency_s=0.1,
                              tokens_in=tokens_in, tokens_out=5, format_ok=ok, finish_reason="stop", prompt=prompt))
    log.close()


def test_drift_cli_passes_on_training_like_traffic_and_fails_with_exit_1_on_shift(run_dir, tmp_path):
    from typer.testing import CliRunner

    from specialist.cli import app
    from specialist.models import load_tokenizer

    run = RunFolder(run_dir)
    tokenizer = load_tokenizer(run.config().model.name)
    template = run.template()
    train = [ex.prompt for ex in run.split().train]
    same = [(p, len(template.encode_prompt(p, tokenizer)), True) for p in train]
    fill_log(tmp_path / "same.sqlite", same)
    result = CliRunner().invoke(app, ["drift", str(run_dir), str(tmp_path / "same.sqlite")], terminal_width=200)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "drift.json").read_text())
    assert not summary["drift"] and summary["signals"]["novel_input_share"]["value"] == 0.0
    assert (tmp_path / "drift.png").stat().st_size > 1000

    other = "refund my card payment was declined twice at the checkout page yesterday evening"
    shifted = [(f"{other} {i}", 300 + i, i < 20) for i in range(40)]  # longer, unfamiliar, failing later
    fill_log(tmp_path / "shifted.sqlite", shifted)
    result = CliRunner().invoke(app, ["drift", str(run_dir), str(tmp_path / "shifted.sqlite")], terminal_width=200)
    assert result.exit_code == 1, result.output
    signals = json.loads((tmp_path / "drift.json").read_text())["signals"]
    assert all(signals[name]["drift"] for name in ("input_length_psi", "vocabulary_js_distance",
                                                   "novel_input_share", "format_pass_rate_trend"))




def test_a_second_export_to_one_destination_is_refused_while_the_first_runs(run_dir, tmp_path, monkeypatch):
    import threading

    import specialist.deploy.export as export_module

    out, writing, finish = tmp_path / "m", threading.Event(), threading.Event()
    card = export_module.write_model_card

    def slow_card(*args, **kwargs):  # the first export pauses after its replay check, before it publishes
        writing.set()
        finish.wait(60)
        return card(*args, **kwargs)

    monkeypatch.setattr(export_module, "write_model_card", slow_card)
    results = []
    options = ExportOptions(golden=1, max_new_tokens=4)
    first = threading.Thread(target=lambda: results.append(export_run(run_dir, "merged", out, options)))
    first.start()
    try:
        assert writing.wait(120)
        monkeypatch.setattr(export_module, "write_model_card", card)
        with pytest.raises(ConfigError, match="another export is writing"):
            export_run(run_dir, "adapter", out, ExportOptions(golden=1, max_new_tokens=4))
    finally:
        finish.set()
        first.join(120)
    assert results and results[0].folder == out and ExportFolder(out).meta()["format"] == "merged"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no lock, staging or replaced folder left
    again = export_run(run_dir, "adapter", out, ExportOptions(golden=1, max_new_tokens=4))  # the lock was released
    assert ExportFolder(again.folder).meta()["format"] == "adapter"


def test_each_export_stages_in_a_folder_of_its_own(tmp_path):
    from specialist.deploy.export import staging_folder

    out = tmp_path / "m"
    first = staging_folder(out)
    assert first.is_dir() and str(os.getpid()) in first.name and first.parent == tmp_path
    (tmp_path / ".m.partial").mkdir()  # what an export killed before this change left
    second = staging_folder(out)  # the lock holder clears what killed exports left
    assert second != first and not first.exists() and not (tmp_path / ".m.partial").exists()
