"""Reward fine-tuning (method.kind grpo) on tiny models: a reward moves the model, sandboxed scorers give the
rewards, a killed run resumes to the same adapter, the SFT arm sits beside the RFT arm, and the config's keys."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import LOG_EXAMPLES, build_tiny_tokenizer
from specialist.config import GRPO_BETA, load_config, validate_config
from specialist.errors import ConfigError
from specialist.pipeline import train_only

PROMPTS = [f"log line {i}" for i in range(40)]
MEASURED = PROMPTS[:16]  # before and after training: the same prompts, the same seed


@pytest.fixture(scope="module")
def confident_model_dir(tmp_path_factory):
    """A tiny Llama whose next-token distribution is peaked, as a trained model's is: untied output weights drawn
    wide (std 0.4). The conftest model (tied, std 0.02) is near-uniform over its 400 tokens, and LoRA on it cannot
    move a logit by more than about 0.6 (the final norm and the embeddings stay frozen)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("confident-model")
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        initializer_range=0.4)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def engine_of(loaded):
    from specialist.generation import Engine

    return Engine(loaded.model, loaded.tokenizer, loaded.template, context=loaded.context)


def sampled_share(engine, prefix: str, samples_per_prompt: int = 8) -> float:
    """Share of sampled answers (temperature 1, seed 0, the measured prompts) that start with `prefix`."""
    from specialist.generation import Request, Sampling

    torch.manual_seed(0)
    requests = [Request(engine.encode(p), 2) for p in MEASURED * samples_per_prompt]
    return sum(a.text.startswith(prefix) for a in engine.run(requests, Sampling(True, 1.0, 1.0))) / len(requests)


def likeliest_word(model_dir) -> str:
    """The letters-only token the model most often opens an answer with, on the training prompts (a rarer one
    would seldom be sampled at all, and a group where no answer wins teaches nothing)."""
    from specialist.artifacts import load_base_model

    loaded = load_base_model(str(model_dir))
    engine = engine_of(loaded)
    with torch.no_grad():
        probs = sum(torch.softmax(loaded.model(torch.tensor([engine.encode(p)])).logits[0, -1], -1) for p in PROMPTS)
    for token in probs.argsort(descending=True).tolist():
        text = loaded.tokenizer.decode([token])
        if text.isascii() and text.isalpha():
            return text
    raise AssertionError("no word among the model's answers")


def reward_module(tmp_path, monkeypatch, body: str) -> str:
    """Write a custom scorer module (package.module:function is how users name one) and make it importable."""
    (tmp_path / "grpo_test_rewards.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("grpo_test_rewards", None)
    return "grpo_test_rewards"


def grpo_config(tmp_path, model_dir, data, run_name, method=None, training=None, evaluation=None):
    return {
        "data": {"path": str(data), "val_fraction": 0.1, "test_fraction": 0.1,
                 "dedupe": {"near": False, "exact": False}},
        "model": {"name": str(model_dir), "dtype": "float32"},
        "method": {"kind": "grpo", "r": 4, "alpha": 8, "max_completion_length": 2, **(method or {})},
        "training": {"max_steps": 6, "batch_size": 16, "max_length": 64, "learning_rate": 0.05, "logging_steps": 1,
                     "report_to": [], **(training or {})},
        "evaluation": {"max_new_tokens": 2, "forgetting": False, "few_shot_k": 0, "train_sample": 4,
                       "bootstrap_samples": 100, **(evaluation or {})},
        "output": {"dir": str(tmp_path / "runs"), "run_name": run_name},
    }


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def metrics_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- a reward moves the model --------------------------------------------------------------------------------------

def word_reward_run(model_dir, tmp_path, monkeypatch, name, method=None, training=None):
    """(word, reward module, config) of a run rewarded for answers that start with the model's likeliest word."""
    word = likeliest_word(model_dir)
    module = reward_module(tmp_path, monkeypatch, f"""
        def starts_with_word(output, expected):
            return 1.0 if output.startswith({word!r}) else 0.0
    """)
    data = write_rows(tmp_path / "rows.jsonl", [{"prompt": p, "completion": word} for p in PROMPTS])
    config = grpo_config(tmp_path, model_dir, data, name, training=training, method={
        "rewards": [{"scorer": f"{module}:starts_with_word"}], "format_reward": False, **(method or {})})
    return word, module, config



def test_a_reward_for_one_token_drives_the_model_towards_it(confident_model_dir, tmp_path, monkeypatch):
    from specialist.artifacts import load_base_model, load_run
    from specialist.run_folder import RunFolder

    word, module, config = word_reward_run(confident_model_dir, tmp_path, monkeypatch, "rft", {"num_generations": 8})
    before = sampled_share(engine_of(load_base_model(str(confident_model_dir))), word)

    summary = train_only(validate_config(config), "rft")

    after = sampled_share(engine_of(load_run(RunFolder(summary.run_dir))), word)
    print(f"answers starting with {word!r}: {before:.3f} before, {after:.3f} after 6 steps")
    assert 0 < before < 0.4 and after >= before + 0.4, (word, before, after)
    steps = [r for r in metrics_rows(summary.run_dir) if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]  # every step's figures, in metrics.jsonl
    for row in steps:
        assert {f"rewards/{module}:starts_with_word/mean", "reward_group_std", "kl", "completions/mean_length",
                "frac_reward_zero_std"} <= set(row)
        # the spread of 0/1 rewards within a group of 8 (Bessel's std, as TRL's): at most 4 and 4, sqrt(8 / 28)
        assert 0 <= row["reward_group_std"] <= math.sqrt(8 / 28) + 1e-6
    assert steps[-1]["reward"] > steps[0]["reward"]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6) and max(r["kl"] for r in steps) > 0  # it left the start
    train = summary.metrics["train"]
    assert train["first_reward"] == steps[0]["reward"] and train["final_reward"] == steps[-1]["reward"]
    # the kept model is the checkpoint with the best validation reward (the GRPO loss says nothing about quality)
    evals = [(r["step"], r["eval_reward"]) for r in metrics_rows(summary.run_dir) if "eval_reward" in r]
    best_step = next(step for step, value in evals if value == max(v for _, v in evals))
    assert len(evals) == 6 and train["best_checkpoint"].endswith(f"checkpoint-{best_step}")
    assert train["best_val_reward"] == max(v for _, v in evals)
    assert (summary.run_dir / "adapter" / "adapter_config.json").is_file()  # LoRA by default


def test_validation_with_one_answer_a_prompt_logs_the_mean_reward(confident_model_dir, tmp_path, monkeypatch):
    """eval_generations 1: a quarter of the default's validation sampling; the reward is still measured."""
    _, _, config = word_reward_run(confident_model_dir, tmp_path, monkeypatch, "one", {"eval_generations": 1},
                                   {"max_steps": 2})
    summary = train_only(validate_config(config), "one")
    evals = [r for r in metrics_rows(summary.run_dir) if "eval_reward" in r]
    assert len(evals) == 2 and all(0.0 <= r["eval_reward"] <= 1.0 for r in evals)
    assert all(r["eval_reward_group_std"] == 0.0 for r in evals)  # groups of one have no spread


# -- rewards from the sandbox ---------------------------------------------------------------------------------------

SOLUTION = "def double(x):\n    return 2 * x\n"
CODE_PROMPT = f"Write pytest tests for this function.\n```python\n{SOLUTION}```"
PASSING = "```python\nfrom solution import double\n\n\ndef test_double():\n    assert double(3) == 6\n```"
FAILING = PASSING.replace("== 6", "== 7")
ESCAPING = "```python\nimport os\n\n\ndef test_leave():\n    os._exit(0)\n```"  # exits 0 before pytest reports


@pytest.fixture
def sandbox_calls(monkeypatch):
    """Every sandboxed pytest run, as (solution, tests, passed, isolation); the scorers' cache starts empty."""
    from specialist.core import code_tests

    calls = []
    real = code_tests.run_pytest

    def recorded(solution, tests, *args, **kwargs):
        result = real(solution, tests, *args, **kwargs)
        calls.append((solution, tests, result.passed, result.isolation))
        return result

    code_tests._passes.cache_clear()
    monkeypatch.setattr(code_tests, "run_pytest", recorded)
    yield calls
    code_tests._passes.cache_clear()


def test_sandbox_scorer_rewards_are_real_sandbox_runs(tiny_model_dir, tmp_path, sandbox_calls):
    from specialist.core.code_tests import available_isolations
    from specialist.data import Example, PromptTemplate
    from specialist.train.grpo import reward_functions

    data = write_rows(tmp_path / "code.jsonl", [{"prompt": CODE_PROMPT, "completion": PASSING}] * 4)
    config = validate_config(grpo_config(tmp_path, tiny_model_dir, data, "code",
                                         method={"rewards": [{"scorer": "tests_pass"}]}))
    template = PromptTemplate.for_tokenizer(build_tiny_tokenizer())
    functions, weights = reward_functions(config.method, config, [Example(CODE_PROMPT, PASSING, 1)], template)
    assert [f.__name__ for f in functions] == ["tests_pass"] and weights == [1.0]  # free text: no format reward
    answers = [PASSING, FAILING, ESCAPING, PASSING + "\n### Input:\nmore"]  # the last one runs past its turn
    values = functions[0](prompts=["rendered"] * 4, completions=answers, row_input=[CODE_PROMPT] * 4,
                          expected=[PASSING] * 4)
    assert values == [1.0, 0.0, 0.0, 1.0]
    assert [c[2] for c in sandbox_calls] == [True, False, False]  # the 4th answer, cut at the turn, is the 1st
    assert all(c[0] == SOLUTION and c[3] == available_isolations()[0] for c in sandbox_calls)


def test_a_grpo_run_scores_every_sampled_answer_in_the_sandbox(tiny_model_dir, tmp_path, sandbox_calls):
    from specialist.core.code_tests import available_isolations

    data = write_rows(tmp_path / "code.jsonl",
                      [{"prompt": CODE_PROMPT.replace("this", f"this #{i}"), "completion": PASSING} for i in range(20)])
    config = grpo_config(tmp_path, tiny_model_dir, data, "code", method={"rewards": [{"scorer": "tests_pass"}]},
                         training={"max_steps": 1, "batch_size": 8, "max_length": 256})
    config["data"]["val_fraction"] = 0.0  # no evaluation pass: every sandbox run below is a training answer's
    summary = train_only(validate_config(config), "code")
    row = next(r for r in metrics_rows(summary.run_dir) if "reward" in r)
    assert 1 <= len(sandbox_calls) <= 8  # one sandbox run per distinct sampled answer of the step
    assert {c[0] for c in sandbox_calls} == {SOLUTION}  # the row's own input reached the scorer, not the template
    assert {c[3] for c in sandbox_calls} == {available_isolations()[0]}
    # a random model's answers are no test module: each failed in the sandbox, and the logged reward says so
    assert not any(c[2] for c in sandbox_calls) and row["rewards/tests_pass/mean"] == 0.0


# -- resume --------------------------------------------------------------------------------------------------------

KILL_AFTER_SEAL = textwrap.dedent("""
    import os, signal, sys
    import specialist.train.checkpoints as checkpoints
    from specialist.config import load_config
    from specialist.pipeline import train_only

    sys.path.insert(0, sys.argv[2])  # the custom reward's module
    seal = checkpoints.seal

    def seal_then_die(folder, step):
        seal(folder, step)
        if step == 4:  # checkpoint-4 is whole and marked; nothing after it happened
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoints.seal = seal_then_die
    train_only(load_config(sys.argv[1], ["output.run_name=killed"]), "rft")
""")


def test_a_killed_grpo_run_resumes_to_the_same_adapter(confident_model_dir, tmp_path, monkeypatch):
    """Sampling is part of the state: the checkpoint carries the RNG state, and the prompt order comes from the
    seed, so the resumed run samples the same answers, gets the same rewards and ends on the same weights."""
    module = reward_module(tmp_path, monkeypatch, """
        def starts_with_n(output, expected):
            return 1.0 if output[:1] in "Nn" else 0.0
    """)
    data = write_rows(tmp_path / "rows.jsonl", [{"prompt": p, "completion": "No"} for p in PROMPTS])
    raw = grpo_config(tmp_path, confident_model_dir, data, "straight",
                      method={"rewards": [{"scorer": f"{module}:starts_with_n"}], "format_reward": False},
                      training={"batch_size": 8, "learning_rate": 0.02, "save_steps": 2, "eval_steps": 2,
                                "save_total_limit": 1})
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    straight = train_only(load_config(config_path), "rft")

    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_SEAL, str(config_path), str(tmp_path)],
                            env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_dir = tmp_path / "runs" / "killed"
    assert not (run_dir / "adapter").exists()
    resumed = train_only(load_config(config_path, ["output.run_name=killed"]), "rft", resume=True)

    assert resumed.metrics["train"]["steps"] == 6
    want = load_file(straight.run_dir / "adapter" / "adapter_model.safetensors")
    got = load_file(resumed.run_dir / "adapter" / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)
    rewards = [(r["step"], r["reward"]) for r in metrics_rows(straight.run_dir) if "reward" in r]
    resumed_rewards = [(r["step"], r["reward"]) for r in metrics_rows(run_dir) if "reward" in r]
    assert resumed_rewards == rewards  # steps 1-4 from the killed session, 5-6 after the resume
    assert len({reward for _, reward in rewards}) > 1  # the rewards varied: the same ones were not by chance


def test_early_stopping_reads_the_validation_reward(confident_model_dir, tmp_path, monkeypatch):
    module = reward_module(tmp_path, monkeypatch, """
        def anything(output, expected):
            return float(len(output) % 2)
    """)
    data = write_rows(tmp_path / "rows.jsonl", [{"prompt": p, "completion": "x"} for p in PROMPTS])
    config = grpo_config(tmp_path, confident_model_dir, data, "stop",
                         method={"rewards": [{"scorer": f"{module}:anything"}], "format_reward": False},
                         training={"max_steps": 40, "batch_size": 8, "eval_steps": 1, "save_steps": 1,
                                   "early_stopping_patience": 2, "early_stopping_min_delta": 10.0})
    summary = train_only(validate_config(config), "stop")
    # no reward can gain 10: after the first evaluation, two more without such a gain end the run
    assert summary.metrics["train"]["steps"] == 3
    evals = [(r["step"], r["eval_reward"]) for r in metrics_rows(summary.run_dir) if "eval_reward" in r]
    best_step = next(step for step, value in evals if value == max(v for _, v in evals))
    assert len(evals) == 3 and summary.metrics["train"]["best_checkpoint"].endswith(f"checkpoint-{best_step}")


# -- from an SFT run, evaluated beside it ---------------------------------------------------------------------------

def test_grpo_from_an_sft_adapter_is_evaluated_beside_the_sft_arm(tiny_run_dir, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from specialist.artifacts import load_run
    from specialist.cli import app
    from specialist.run_folder import RunFolder, merge_adapter

    data = write_rows(tmp_path / "logs.jsonl", [{"prompt": f"{LOG_EXAMPLES[i % 3][0]} #{i}",
                                                  "completion": json.dumps(LOG_EXAMPLES[i % 3][1])} for i in range(40)])
    config = grpo_config(tmp_path, tiny_model_dir, data, "rft", method={"from_adapter": str(tiny_run_dir / "adapter")},
                         training={"max_steps": 2, "batch_size": 8, "max_length": 128})
    summary = train_only(validate_config(config), "rft")
    names = {r.removeprefix("rewards/").removesuffix("/mean") for r in metrics_rows(summary.run_dir)[0]
             if r.startswith("rewards/") and r.endswith("/mean")}
    assert names == {"exact_match", "field_accuracy", "format"}  # the evaluation's goals, and the JSON format

    # the run loads as it trained: the SFT adapter merged into the base, the RFT adapter on top
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    loaded = load_run(RunFolder(summary.run_dir))
    with torch.no_grad(), loaded.context():
        got = loaded.model(ids).logits
        merged = merge_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiny_run_dir / "adapter")
        want = PeftModel.from_pretrained(merged, summary.run_dir / "adapter").eval()(ids).logits
        unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                             summary.run_dir / "adapter").eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, unmerged, atol=1e-4)

    result = CliRunner().invoke(app, ["eval", str(summary.run_dir), "--arm", f"sft={tiny_run_dir}"],
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    report = json.loads((summary.run_dir / "eval.json").read_text())
    assert set(report["arms"]) == {"base", "nearest", "tuned", "sft"}  # few_shot_k 0: no few-shot, no retrieval
    assert {"tuned_vs_base", "tuned_vs_sft"} <= set(report["comparisons"])


# -- the pieces ----------------------------------------------------------------------------------------------------

def test_the_prompt_ids_are_the_engines_with_one_bos_under_a_chat_template(tiny_model_dir):
    from specialist.data import Example, PromptTemplate
    from specialist.generation import encode_prompt
    from specialist.train.grpo import prompt_dataset

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                               "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    examples = [Example("Dec 10 sshd[24200]: Invalid user", "{}", 1), Example("x" * 50, "{}", 2)]
    for template in (PromptTemplate.for_tokenizer(tokenizer),
                     PromptTemplate.for_tokenizer(tokenizer, max_length=20, truncate_side="left")):
        dataset, ids = prompt_dataset(examples, template, tokenizer, max_new_tokens=4)
        assert dataset["row_input"] == [ex.prompt for ex in examples] and dataset["expected"] == ["{}", "{}"]
        for row, ex in zip(dataset, examples):
            assert ids[row["prompt"]] == encode_prompt(template, tokenizer, ex.prompt, (), 4)
            assert ids[row["prompt"]].count(tokenizer.bos_token_id) == 1
    assert len(ids[dataset[1]["prompt"]]) <= 16  # truncating runs leave room for the answer (20 - 4)


@pytest.mark.parametrize(("method", "training", "steps"), [
    ({}, {}, 13),  # 50 prompts, 8 answers a step = 2 prompts: 25 steps an epoch, half an epoch
    ({"num_generations": 8, "generations_per_step": 32}, {}, 7),  # 4 prompts a step: ceil(50 / 4) = 13, halved
    ({}, {"batch_size": 4, "gradient_accumulation_steps": 3}, 9),  # 12 answers = 3 prompts: 17 steps, halved
    ({"eval_generations": 1}, {}, 13),  # validation samples one answer a prompt
    ({"eval_generations": 3}, {}, 13),  # 3 does not divide 8: evaluation batches of 6
])
def test_the_trainer_arguments_count_answers_and_keep_the_best_reward(tmp_path, method, training, steps):
    from specialist.run_folder import RunFolder
    from specialist.train.grpo import grpo_arguments

    config = validate_config({"data": {"path": "d.jsonl"}, "method": {"kind": "grpo", **method},
                              "training": {"epochs": 0.5, "max_length": 256, **training}})
    args = grpo_arguments(config, RunFolder(tmp_path), n_train=50, has_val=True, bf16=False, max_new_tokens=40,
                          weights=[1.0, 2.0])
    per_step = config.method.generations_per_step or config.training.batch_size * config.training.gradient_accumulation_steps
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == per_step
    assert args.generation_batch_size == per_step and args.steps_per_generation == args.gradient_accumulation_steps
    assert args.num_generations == config.method.num_generations and args.max_completion_length == 40
    # the run's steps, as the Trainer will count them (checked against trained runs: 36 prompts at 4 x 2, half an
    # epoch: 9 steps; 8 x 4: 9; 4 x 3: 12), set where evaluations and checkpoints fall (4 a run by default)
    assert (args.eval_steps, args.save_steps) == (max(1, steps // 4), max(1, steps // 4))
    assert args.num_generations_eval == (config.method.eval_generations or config.method.num_generations)
    assert args.per_device_eval_batch_size % args.num_generations_eval == 0
    assert 0 < args.per_device_eval_batch_size <= max(per_step, args.num_generations_eval)
    assert (args.metric_for_best_model, args.greater_is_better) == ("eval_reward", True)
    assert (args.beta, args.temperature, args.reward_weights) == (GRPO_BETA, 1.0, [1.0, 2.0])


def test_the_trl_methods_we_replace_still_exist():
    """A rename in TRL would leave our prompt encoding and spread figure silently unused."""
    import inspect

    from trl import GRPOTrainer

    assert list(inspect.signature(GRPOTrainer._tokenize_prompts).parameters) == ["self", "prompts"]
    assert list(inspect.signature(GRPOTrainer._calculate_rewards).parameters) == [
        "self", "inputs", "prompts", "completions", "completion_ids_list"]


def test_group_spread_is_the_mean_within_group_deviation_of_the_weighted_reward():
    from specialist.train.grpo import group_spread

    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0],   # group 1: totals 3, 1, 2, 2
                            [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])  # group 2: no spread at all
    weights = torch.tensor([2.0, 1.0])
    want = (torch.tensor([3.0, 1.0, 2.0, 2.0]).std().item() + 0.0) / 2
    assert group_spread(rewards, weights, 4) == pytest.approx(want)


@pytest.mark.parametrize(("settings", "completions", "checks"), [
    ({}, ['{"a": 1}', '{"b": 2}'], {'{"a": 3}': 1.0, '{"a": ': 0.0, "prose": 0.0}),  # JSON answers: JSON
    ({}, ["yes", "no"], None),  # free text: no format reward
    ({"data": {"labels": ["low", "high"], "label_template": '{"p": "{label}"}'}}, ["x", "y"],
     {'{"p": "low"}': 1.0, '{"p": "mid"}': 0.0, "low": 0.0}),
])
def test_the_format_reward_is_the_runs_output_language(tiny_model_dir, tmp_path, settings, completions, checks):
    from specialist.data import Example, PromptTemplate
    from specialist.train.grpo import reward_functions

    raw = grpo_config(tmp_path, tiny_model_dir, tmp_path / "unused.jsonl", "fmt")
    for section, values in settings.items():
        raw[section].update(values)
    config = validate_config(raw)
    train = [Example(f"in {i}", c, i) for i, c in enumerate(completions)]
    functions, weights = reward_functions(config.method, config, train,
                                          PromptTemplate.for_tokenizer(build_tiny_tokenizer()))
    formats = [f for f in functions if f.__name__ == "format"]
    if checks is None:  # and json_valid, which the format reward would have stood for, is a reward of its own
        assert [f.__name__ for f in functions] == ["json_valid", "exact_match", "field_accuracy"]
        assert formats == [] and weights == [1.0, 1.0, 1.0]
        return
    assert [f.__name__ for f in functions] == ["exact_match", "field_accuracy", "format"]
    texts = list(checks)
    assert formats[0](completions=[f"  {t}\n### Input:\nnext" for t in texts]) == list(checks.values())


@pytest.mark.parametrize(("body", "message"), [
    ('return float("nan")', "returned nan, which cannot be a reward"),
    ('return float("inf") if output else 0.0', "returned inf"),
    ("return output['score']", "failed on a sampled answer: TypeError"),
    ("return None", "failed on a sampled answer"),
])
def test_a_reward_that_is_no_number_stops_the_run_with_its_name(tiny_model_dir, tmp_path, monkeypatch, body,
                                                                 message):
    from specialist.data import Example, PromptTemplate
    from specialist.train.grpo import reward_functions

    module = reward_module(tmp_path, monkeypatch, f"""
        def broken(output, expected):
            {body}
    """)
    config = validate_config(grpo_config(tmp_path, tiny_model_dir, tmp_path / "unused.jsonl", "nan",
                                         method={"rewards": [{"scorer": f"{module}:broken"}]}))
    functions, _ = reward_functions(config.method, config, [Example("a", "b", 1)],
                                    PromptTemplate.for_tokenizer(build_tiny_tokenizer()))
    with pytest.raises(ConfigError, match=f"{module}:broken.*{message}"):
        functions[0](completions=["x"], row_input=["a"], expected=["b"])


def test_no_overfitting_warning_from_a_grpo_loss():
    from specialist.pipeline import overfitting_warning

    history = [{"step": 1, "loss": 0.02}, {"step": 1, "eval_loss": 0.001}, {"step": 2, "loss": 0.01},
               {"step": 2, "eval_loss": 0.06}]
    assert "possible overfitting" in overfitting_warning(history)  # a supervised run with this history
    rewarded = [dict(e, reward=0.5) if "loss" in e else dict(e, eval_reward=0.5) for e in history]
    assert overfitting_warning(rewarded) is None  # the GRPO loss centres on 0 whatever the model learned


def test_the_progress_line_shows_the_reward_figures():
    from specialist.train.progress import reward_parts

    parts = reward_parts({"loss": 0.1, "reward": 0.75, "rewards/exact_match/mean": 0.5, "rewards/format/mean": 1.0,
                          "reward_group_std": 0.31, "kl": 0.0021, "completions/mean_length": 14.0,
                          "eval_reward": 0.625})
    assert parts == ["reward 0.750 (exact_match 0.50 format 1.00)", "spread 0.31", "kl 0.0021", "len 14.00",
                     "val reward 0.625"]
    assert reward_parts({"loss": 0.1, "rewards/chosen": 1.0}) == []  # methods without a reward (DPO) show none


# -- config --------------------------------------------------------------------------------------------------------

def method_config(**method):
    return {"data": {"path": "d.jsonl"}, "method": method}


def test_grpo_defaults_fit_a_small_cpu():
    method = validate_config(method_config(kind="grpo")).method
    assert (method.num_generations, method.generations_per_step, method.temperature) == (4, None, 1.0)
    assert method.beta == GRPO_BETA and method.format_reward and method.rewards is None and method.uses_lora
    assert validate_config(method_config(kind="dpo")).method.beta == 0.1  # dpo keeps its own default
    saved = validate_config(yaml.safe_load(validate_config(method_config(kind="lora")).to_yaml()))
    assert saved.method.kind == "lora"  # a saved non-grpo config, holding every grpo default, loads back


@pytest.mark.parametrize(("method", "extra", "message"), [
    ({"rewards": [{"scorer": "exact_macth"}]}, {}, "unknown scorer 'exact_macth'"),
    ({"rewards": [{"scorer": "no module:f"}]}, {}, "unknown scorer"),
    ({"rewards": [{"scorer": "pkg.mod:"}]}, {}, "unknown scorer"),
    ({"rewards": [{"scorer": "exact_match", "weight": 0}]}, {}, "a weight of 0 adds nothing"),
    ({"rewards": [{"scorer": "exact_match", "weight": math.inf}]}, {}, "finite number"),
    ({"rewards": [{"scorer": "exact_match", "weight": "heavy"}]}, {}, "valid number"),
    ({"rewards": [{"scorer": "exact_match", "wieght": 2}]}, {}, "unknown key"),
    ({"rewards": "exact_match"}, {}, "valid list"),
    ({"rewards": [{"scorer": "rouge_l"}, {"scorer": "rouge_l", "weight": 2}]}, {}, "more than once"),
    ({"rewards": [], "format_reward": False}, {}, "nothing to reward"),
    ({"num_generations": 1}, {}, "greater than or equal to 2"),
    ({"num_generations": 3}, {}, "not a multiple of method.num_generations"),
    ({"generations_per_step": 6}, {}, "must be a multiple of num_generations"),
    ({"temperature": 0}, {}, "greater than 0"),
    ({"max_completion_length": -1}, {}, "greater than 0"),
    ({"beta": -0.1}, {}, "greater than or equal to 0"),
    ({"adapter": False, "from_adapter": "runs/sft/adapter"}, {}, "measure the KL against the base"),
    ({"rewards": [{"scorer": "json_schema"}]}, {}, "needs evaluation.json_schema"),
])
def test_bad_grpo_keys_are_refused_with_the_key_and_the_fix(method, extra, message):
    with pytest.raises(ConfigError, match=message) as err:
        validate_config({**method_config(kind="grpo", **method), **extra})
    assert "method" in str(err.value) or "run config" in str(err.value)


@pytest.mark.parametrize("key", ["num_generations", "rewards", "format_reward", "temperature",
                                 "max_completion_length", "generations_per_step"])
def test_grpo_keys_on_another_kind_are_refused_not_ignored(key):
    value = {"num_generations": 8, "rewards": [{"scorer": "exact_match"}], "format_reward": False,
             "temperature": 0.5, "max_completion_length": 9, "generations_per_step": 8}[key]
    with pytest.raises(ConfigError, match=f"{key}: grpo keys, which kind 'lora' does not use"):
        validate_config(method_config(kind="lora", **{key: value}))


def test_accepted_grpo_settings():
    method = validate_config(method_config(
        kind="grpo", from_adapter="runs/sft/adapter", adapter=False, beta=0, generations_per_step=16,
        rewards=[{"scorer": "tests_pass", "weight": 2}, {"scorer": "length", "weight": -0.01},
                 {"scorer": "my_pkg.scorers:brevity"}])).method
    assert method.start_adapter is not None and not method.uses_lora and method.beta == 0
    assert [(r.scorer, r.weight) for r in method.rewards] == [("tests_pass", 2), ("length", -0.01),
                                                              ("my_pkg.scorers:brevity", 1.0)]
    assert validate_config(method_config(kind="dpo", from_adapter="a")).method.start_adapter is not None
    with pytest.raises(ConfigError, match="dpo needs beta above 0"):
        validate_config(method_config(kind="dpo", beta=0))


def test_a_reward_that_does_not_import_stops_before_any_run_folder(tiny_config):
    tiny_config["method"].update({"kind": "grpo", "rewards": [{"scorer": "no_such_module_here:score"}]})
    config = validate_config(tiny_config)
    with pytest.raises(ConfigError, match="no_such_module_here:score.*cannot be imported"):
        train_only(config, "tiny")
    assert not config.output.dir.exists()


def test_default_rewards_leave_out_statistics_and_what_the_format_reward_covers():
    from specialist.train.grpo import default_rewards

    scorers = ["json_valid", "exact_match", "length", "refusal_rate", "tests_pass"]
    grpo = validate_config(method_config(kind="grpo")).method
    assert default_rewards(grpo, scorers, has_format=True) == [("exact_match", 1.0), ("tests_pass", 1.0)]
    # no format reward (switched off, or free text): json_valid stays a reward of its own
    assert default_rewards(grpo, scorers, has_format=False) == [("json_valid", 1.0), ("exact_match", 1.0),
                                                                ("tests_pass", 1.0)]
    chosen = validate_config(method_config(kind="grpo", rewards=[{"scorer": "length", "weight": -0.5}])).method
    assert default_rewards(chosen, scorers, has_format=True) == [("length", -0.5)]  # method.rewards as given


@pytest.mark.parametrize("value", [0, -1, 257, "two", 1.5, [1], None])
def test_eval_generations_refuses_what_is_not_a_count(value):
    method = {"kind": "grpo", "eval_generations": value}
    if value is None:  # None is the default: num_generations
        assert validate_config({"data": {"path": "d.jsonl"}, "method": method}).method.eval_generations is None
        return
    with pytest.raises(ConfigError, match="eval_generations"):
        validate_config({"data": {"path": "d.jsonl"}, "method": method})


def test_eval_generations_belongs_to_grpo_only():
    with pytest.raises(ConfigError, match="eval_generations: grpo keys"):
        validate_config({"data": {"path": "d.jsonl"}, "method": {"kind": "lora", "eval_generations": 1}})
