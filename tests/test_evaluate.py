"""`specialist eval` and `compare` end to end on a tiny-model run: arms, intervals, gates, exit codes, report."""

import json
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from specialist.cli import app
from specialist.config import validate_config
from specialist.pipeline import train_only

runner = CliRunner()


@pytest.fixture
def trained_run(tiny_config):
    tiny_config["evaluation"].update({"few_shot_k": 2, "train_sample": 4, "bootstrap_samples": 200,
                                      "scorers": ["json_valid", "exact_match", "field_accuracy", "rouge_l", "length"]})
    return train_only(validate_config(tiny_config), "tiny").run_dir


def test_eval_scores_all_three_arms_with_intervals_and_paired_tests(trained_run):
    result = runner.invoke(app, ["eval", str(trained_run)], terminal_width=200)
    assert result.exit_code == 0, result.output
    report = json.loads((trained_run / "eval.json").read_text())
    # the tiny run's rows carry no labels: the label baselines (majority, linear) do not apply
    assert set(report["arms"]) == {"base", "few_shot", "nearest", "retrieval", "tuned"}
    for arm in report["arms"].values():
        for metric, interval in arm["scores"].items():
            assert interval["low"] <= interval["mean"] <= interval["high"], metric
    assert set(report["comparisons"]) == {"tuned_vs_base", "tuned_vs_few_shot", "tuned_vs_nearest",
                                          "tuned_vs_retrieval"}
    best = report["best_baseline"]["exact_match"]
    assert best["baseline"] == max(report["arms"][arm]["scores"]["exact_match"]["mean"]
                                   for arm in ("base", "few_shot", "nearest", "retrieval"))
    assert best["comparison"] == report["comparisons"][f"tuned_vs_{best['arm']}"]["exact_match"]
    assert "tuned against the best baseline" in result.output
    assert 0 < report["comparisons"]["tuned_vs_base"]["exact_match"]["p_value"] <= 1
    assert report["overfitting"]["train_rows"] == 4 and "memorisation_rate" in report["overfitting"]
    forgetting = report["forgetting"]
    assert forgetting["before"]["perplexity"] > 1 and forgetting["after"]["perplexity"] > 1
    assert forgetting["ppl_increase"] == pytest.approx(
        forgetting["after"]["perplexity"] / forgetting["before"]["perplexity"] - 1)
    assert forgetting["before"]["perplexity"] != forgetting["after"]["perplexity"]  # the adapter was switched off
    predictions = [json.loads(line) for line in (trained_run / "predictions.jsonl").read_text().splitlines()]
    assert {"base", "few_shot", "tuned"} <= set(predictions[0])
    markdown = (trained_run / "report.md").read_text()
    assert "| json_valid |" in markdown and "tuned vs base" in markdown
    assert "## Tuned against the best baseline" in markdown and "- exact_match: tuned" in markdown
    html = (trained_run / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3  # scores, loss, lengths


def test_failed_gate_exits_1_and_names_the_gate(trained_run):
    result = runner.invoke(app, ["eval", str(trained_run), "--set", "evaluation.gates=['json_valid >= 1.01']"],
                           terminal_width=200)
    assert result.exit_code == 1
    assert "FAIL" in result.output and "json_valid >= 1.01" in result.output
    assert json.loads((trained_run / "eval.json").read_text())["gates"][0]["passed"] is False


def test_gate_on_an_uncomputed_figure_exits_2(trained_run):
    result = runner.invoke(app, ["eval", str(trained_run), "--set", "evaluation.gates=['forgetting.x <= 1']",
                                 "--set", "evaluation.forgetting=false"],
                           terminal_width=200)
    assert result.exit_code == 2 and "did not compute" in result.output


def _eval_with_gates(run, gates: list[str]):
    result = runner.invoke(app, ["eval", str(run), "--set", f"evaluation.gates={gates!r}"], terminal_width=200)
    return result, json.loads((run / "eval.json").read_text())["gates"]


# (a gate on each kind of figure, its operator): the tuned arm by default, a named arm, a difference of arms, and
# a figure lower is better for
GATE_FORMS = [("json_valid {} {:.6f}", ">="), ("nearest.length {} {:.6f}", ">="),
              ("tuned - nearest {} {:.6f} on exact_match", ">="), ("forgetting.ppl_increase {} {:.6f}", "<=")]


def test_gates_pass_at_the_measured_figure_and_fail_just_past_it(trained_run):
    """Gates read the figures they name: on the same run each passes at its measured value and fails just past it,
    and the eval exits 1 naming the ones that failed."""
    loose = [form.format(op, -100 if op == ">=" else 100) for form, op in GATE_FORMS]
    result, gates = _eval_with_gates(trained_run, loose)
    assert result.exit_code == 0 and [g["passed"] for g in gates] == [True] * 4, result.output
    report = json.loads((trained_run / "eval.json").read_text())
    score = {arm: {m: i["mean"] for m, i in a["scores"].items()} for arm, a in report["arms"].items()}
    measured = [g["value"] for g in gates]
    assert measured == pytest.approx([
        score["tuned"]["json_valid"], score["nearest"]["length"],
        score["tuned"]["exact_match"] - score["nearest"]["exact_match"], report["forgetting"]["ppl_increase"]])
    assert measured[2] != 0  # so a difference read the wrong way round cannot pass as this one
    passing, failing = [], []
    for (form, op), value in zip(GATE_FORMS, measured, strict=True):
        toward_failing = 1 if op == ">=" else -1
        passing.append(form.format(op, value - toward_failing * 1e-6))
        failing.append(form.format(op, value + toward_failing * max(1e-3, abs(value) / 100)))
    result, gates = _eval_with_gates(trained_run, passing + failing)
    assert result.exit_code == 1, result.output
    assert {g["gate"]: g["passed"] for g in gates} == {**dict.fromkeys(passing, True), **dict.fromkeys(failing, False)}
    assert [g["value"] for g in gates] == pytest.approx(measured * 2)
    assert all(f"FAIL  {gate}" in result.output for gate in failing), result.output


def test_compare_adds_another_run_as_an_arm(trained_run, tmp_path):
    other = tmp_path / "second-run"
    shutil.copytree(trained_run, other)
    result = runner.invoke(app, ["compare", str(trained_run), str(other)], terminal_width=200)
    assert result.exit_code == 0, result.output
    report = json.loads((trained_run / "eval.json").read_text())
    assert "second-run" in report["arms"]
    # the same adapter under two names gives the same outputs
    assert report["arms"]["second-run"]["scores"] == report["arms"]["tuned"]["scores"]


def test_eval_of_a_folder_that_is_not_a_run_is_a_usage_error(tmp_path):
    result = runner.invoke(app, ["eval", str(tmp_path)])
    assert result.exit_code == 2 and "not a run folder" in result.output


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it as root)")
def test_report_renders_in_headless_chromium_with_its_figures(trained_run, tmp_path):
    runner.invoke(app, ["eval", str(trained_run)])
    page = (trained_run / "report.html").resolve()
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=3000", "--dump-dom",
         "--run-all-compositor-stages-before-draw", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Scores on held-out examples" in dom.stdout
    assert dom.stdout.count("<img") >= 3
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", f"--user-data-dir={tmp_path / 'profile2'}",
                    "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 20_000  # a page with figures, not a blank one


def test_json_only_scorers_end_the_arms_answers_where_they_are_decided(trained_run, tiny_model_dir):
    """With only JSON scorers, `eval` says in eval.json that answers end once they cannot become JSON, and no arm
    keeps an answer past that point: without its last token every stored answer can still become JSON."""
    from transformers import AutoTokenizer

    from specialist.core.json_prefix import can_become_json

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    scorers = "evaluation.scorers=[json_valid,exact_match,field_accuracy]"
    result = runner.invoke(app, ["eval", str(trained_run), "--set", scorers, "--set", "evaluation.forgetting=false"],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    report = json.loads((trained_run / "eval.json").read_text())
    assert report["decoding"]["answers_end"] == "once no continuation could parse as JSON"
    predictions = [json.loads(line) for line in (trained_run / "predictions.jsonl").read_text().splitlines()]
    for row in predictions:
        for arm in ("base", "few_shot", "retrieval", "tuned"):
            ids = tokenizer(row[arm], add_special_tokens=False)["input_ids"]
            assert can_become_json(tokenizer.decode(ids[:-1])), (arm, row[arm])
