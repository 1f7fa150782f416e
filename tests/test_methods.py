"""Each training method on the tiny model: a few steps, the loss falls, the artifacts load back."""

import json

import pytest
import torch

from specialist.config import validate_config
from specialist.errors import ConfigError
from specialist.pipeline import run, train_only


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def configured(tiny_config, **method):
    tiny_config["method"].update(method)
    tiny_config["training"].update({"max_steps": 8, "eval_steps": 4, "learning_rate": 0.02})
    return validate_config(tiny_config)


def assert_loss_falls(run_dir):
    seen = losses(run_dir)
    assert len(seen) >= 4
    assert sum(seen[-2:]) / 2 < sum(seen[:2]) / 2, seen


def adapter_changes_the_model(tiny_model_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[2, 10, 11, 12]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, adapter_dir).eval()(ids).logits
    return not torch.allclose(before, after, atol=1e-4)


@pytest.mark.parametrize("switches", [{}, {"use_dora": True}, {"use_rslora": True}], ids=["lora", "dora", "rslora"])
def test_lora_variants_train_and_their_adapter_loads_back(tiny_config, tiny_model_dir, switches):
    summary = train_only(configured(tiny_config, kind="lora", **switches), "tiny")
    assert_loss_falls(summary.run_dir)
    adapter_config = json.loads((summary.run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["use_dora"] == switches.get("use_dora", False)
    assert adapter_config["use_rslora"] == switches.get("use_rslora", False)
    assert adapter_changes_the_model(tiny_model_dir, summary.run_dir / "adapter")


def test_full_fine_tuning_trains_every_weight_and_saves_a_model_folder(tiny_config, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    summary = train_only(configured(tiny_config, kind="full"), "tiny")
    assert_loss_falls(summary.run_dir)
    tuned = AutoModelForCausalLM.from_pretrained(summary.run_dir / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [name for name, p in tuned.named_parameters()
               if not torch.equal(p, dict(base.named_parameters())[name])]
    assert len(changed) == len(list(base.named_parameters()))
    assert (summary.run_dir / "model" / "tokenizer.json").is_file()


def test_continued_pretraining_learns_plain_text(tiny_config, tmp_path, tiny_model_dir):
    text = tmp_path / "docs.jsonl"
    line = "the datanode receives a block and the namenode updates the block map. "
    text.write_text("".join(json.dumps({"text": f"{line * (1 + i % 3)}doc {i}."}) + "\n" for i in range(40)))
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in [
        {"question": "who updates the block map?", "choices": ["the namenode", "the printer"], "answer": 0,
         "document": "the datanode"},
        {"question": "what does the datanode receive?", "choices": ["a cake", "a block", "a letter"],
         "answer": "a block"},
    ]))
    tiny_config["data"]["path"] = str(text)
    tiny_config["training"]["block_size"] = 32
    tiny_config["evaluation"].update({"questions": str(questions), "forgetting_max_texts": 8,
                                      "gates": ["domain.doc_ppl_change < 0", "tuned.question_accuracy >= 0"]})
    summary = run(configured(tiny_config, kind="continued_pretraining"), "tiny")
    assert_loss_falls(summary.run_dir)
    assert summary.metrics["scores"] == {}  # no prompts to generate from: perplexities and questions instead
    assert adapter_changes_the_model(tiny_model_dir, summary.run_dir / "adapter")
    report = json.loads((summary.run_dir / "eval.json").read_text())
    assert report["kind"] == "domain_adaptation" and report["questions"] == 2
    base, tuned = report["arms"]["base"], report["arms"]["tuned"]
    # trained on these very sentences: the held-out documents (the same sentences) get likelier
    assert tuned["doc_perplexity"] < 0.95 * base["doc_perplexity"]
    assert report["doc_ppl_change"] == pytest.approx(tuned["doc_perplexity"] / base["doc_perplexity"] - 1)
    assert 0 <= tuned["question_accuracy"]["mean"] <= 1
    assert report["question_subsets"]["trained"]["n"] == 1  # the one question naming its document
    assert [g["passed"] for g in report["gates"]] == [True, True]
    assert "held-out documents" in (summary.run_dir / "report.md").read_text()
    from typer.testing import CliRunner

    from specialist.cli import app

    again = CliRunner().invoke(app, ["eval", str(summary.run_dir)], terminal_width=200)
    assert again.exit_code == 0, again.output
    assert "domain adaptation: before and after" in again.output and "2 questions" in again.output
    tiny_config["output"]["run_name"] = "tiny-other"
    other_config = configured(tiny_config, kind="continued_pretraining")
    other_config.training.learning_rate = 0.05  # another run on the same data: another adapter
    other = run(other_config, "tiny")
    compared = CliRunner().invoke(app, ["compare", str(summary.run_dir), str(other.run_dir)], terminal_width=200)
    assert compared.exit_code == 0, compared.output
    arms = json.loads((summary.run_dir / "eval.json").read_text())["arms"]
    assert list(arms) == ["base", "tuned", "tiny-other"]  # the other run is scored, not dropped
    assert arms["tiny-other"]["doc_perplexity"] != arms["tuned"]["doc_perplexity"]


def test_question_files_are_checked_with_file_and_line(tmp_path):
    from specialist.errors import DataError
    from specialist.evaluate.domain import read_questions

    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "q", "choices": ["a"]}\n')
    with pytest.raises(DataError, match=r"q.jsonl:2"):
        read_questions(path)
    path.write_text('{"question": "q", "choices": ["a", "b"], "answer": "c"}\n')
    with pytest.raises(DataError, match=r"q.jsonl:1"):
        read_questions(path)
    with pytest.raises(DataError, match="is not a file"):
        read_questions(tmp_path / "missing.jsonl")


def preference_data(tmp_path):
    path = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"Dec 10 sshd[{i}]: Invalid user x", "chosen": '{"level": null}',
             "rejected": "I cannot parse logs."} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dpo_reports_reward_margin_and_accuracy(tiny_config, tmp_path, tiny_model_dir):
    tiny_config["data"]["path"] = str(preference_data(tmp_path))
    tiny_config["data"]["completion_column"] = "chosen"
    summary = train_only(configured(tiny_config, kind="dpo", beta=0.5), "tiny")
    assert_loss_falls(summary.run_dir)
    figures = summary.metrics["train"]
    assert figures["rewards_margins"] > 0 and 0 <= figures["rewards_accuracies"] <= 1
    assert adapter_changes_the_model(tiny_model_dir, summary.run_dir / "adapter")


def logits_of(model, ids=((2, 10, 11, 12),)):
    was_training = model.training
    with torch.no_grad():
        logits = model.eval()(torch.tensor(ids)).logits
    model.train(was_training)
    return logits


def test_dpo_starts_from_the_sft_runs_weights(tiny_config, tmp_path, tiny_run_dir, tiny_model_dir, monkeypatch):
    """The model DPO's first step trains is the base with the SFT run's adapter in it, not the bare base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import specialist.train.dpo as dpo

    fit, started = dpo.fit, []

    def fit_noting_the_start(job, *args, **kwargs):
        started.append(logits_of(job.model))
        return fit(job, *args, **kwargs)

    monkeypatch.setattr(dpo, "fit", fit_noting_the_start)
    tiny_config["data"]["path"] = str(preference_data(tmp_path))
    tiny_config["data"]["completion_column"] = "chosen"
    summary = train_only(configured(tiny_config, kind="dpo", from_adapter=str(tiny_run_dir / "adapter")), "tiny")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    bare = logits_of(base)
    sft = logits_of(PeftModel.from_pretrained(base, tiny_run_dir / "adapter"))
    assert len(started) == 1 and not torch.allclose(sft, bare, atol=1e-4)  # the SFT adapter changes the model
    assert torch.allclose(started[0], sft, atol=1e-5), float((started[0] - sft).abs().max())
    assert (summary.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert adapter_changes_the_model(tiny_model_dir, summary.run_dir / "adapter")


def test_qlora_stops_at_config_time_without_cuda(tiny_config):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal is for machines without it")
    with pytest.raises(ConfigError, match="qlora needs a CUDA GPU") as err:
        run(configured(tiny_config, kind="qlora"), "tiny")
    assert "method.kind=lora" in str(err.value)
    assert not validate_config(tiny_config).output.dir.exists()  # refused before any run folder was made


def test_early_stopping_without_validation_rows_is_refused(tiny_config):
    tiny_config["data"]["val_fraction"] = 0.0
    tiny_config["training"]["early_stopping_patience"] = 2
    with pytest.raises(ConfigError, match="early stopping needs validation rows"):
        train_only(validate_config(tiny_config), "tiny")
