"""How long a run is: `epochs: auto`, `time_budget` (on a fake clock, so the chosen steps are exact), and the
progress lines a log file gets."""

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState, get_scheduler

import specialist.train.budget as budget
import specialist.train.progress as progress
from specialist.config import TrainingConfig, parse_duration, validate_config
from specialist.console import console
from specialist.errors import ConfigError
from specialist.pipeline import train_only
from specialist.train.checkpoints import is_complete
from specialist.train.schedule import auto_epochs, planned_steps


# -- epochs: auto ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("rows", "epochs"), [
    (1, 25), (4, 25), (5, 20), (10, 10), (32, 3), (33, 3), (34, 3), (100, 3), (8333, 3), (8334, 2), (12_500, 2),
    (25_001, 1), (10_000_000, 1), (0, 25),
])
def test_auto_epochs_follow_the_hosted_fine_tuning_rule(rows, epochs):
    chosen, why = auto_epochs(rows)
    assert chosen == epochs
    assert f"-> {epochs}" in why and "OpenAI" in why


def test_auto_epochs_set_the_planned_steps_and_an_explicit_count_is_kept():
    auto = TrainingConfig(epochs="auto", batch_size=4)
    assert planned_steps(auto, 10) == 3 * 10  # 10 rows: 10 epochs of 3 steps (4 + 4 + 2 rows)
    assert planned_steps(TrainingConfig(epochs=2, batch_size=4), 10) == 6
    assert planned_steps(TrainingConfig(epochs="auto", batch_size=4, max_steps=7), 10) == 7  # max_steps wins


@pytest.mark.parametrize("value", [0, -1, "Auto", "three", None, [3]])
def test_epochs_refuse_anything_but_a_positive_number_or_auto(value):
    with pytest.raises(ConfigError, match="training.epochs"):
        validate_config({"data": {"path": "d.jsonl"}, "training": {"epochs": value}})


# -- time_budget: the config key --------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("10m", 600), ("1h30m", 5400), ("1.5h", 5400),
                                              (" 2m 5s ", 125), ("36000h", 129_600_000)])
def test_durations_parse(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("value", ["", "   ", "10", "abc", "1d", "-5m", "0s", "0h0m", "5m5m", "1e3s", ".5m",
                                   "١٠m", "10m; rm -rf /", 600, 1.5, True, ["10m"]])
def test_time_budget_refuses_what_is_not_a_duration(value):
    with pytest.raises(ConfigError, match="training.time_budget"):
        validate_config({"data": {"path": "d.jsonl"}, "training": {"time_budget": value}})


# -- time_budget: the callback, piece by piece ------------------------------------------------------------------
def test_rebuilt_schedule_gives_the_learning_rates_of_a_schedule_made_for_the_new_total():
    def scheduler(total, warmup):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return get_scheduler("cosine", optimizer, num_warmup_steps=warmup, num_training_steps=total)

    def step(schedule, times):
        for _ in range(times):
            schedule.optimizer.step()
            schedule.step()

    rebuilt, fresh = scheduler(40, 2), scheduler(12, 0)
    step(rebuilt, 5)
    step(fresh, 5)
    budget.rebuild_schedule(rebuilt, 12, 0)
    for _ in range(8):
        assert rebuilt.get_last_lr() == pytest.approx(fresh.get_last_lr(), abs=1e-12)
        assert rebuilt.optimizer.param_groups[0]["lr"] == pytest.approx(fresh.get_last_lr()[0], abs=1e-12)
        step(rebuilt, 1)
        step(fresh, 1)
    with pytest.raises(RuntimeError, match="StepLR"):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        budget.rebuild_schedule(torch.optim.lr_scheduler.StepLR(optimizer, 3), 12, 0)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def drive(callback, clock, state, seconds_per_step, steps):
    """The Trainer's calls around `steps` optimizer steps, each taking the next of `seconds_per_step`."""
    args, control = SimpleNamespace(eval_strategy="steps"), TrainerControl()
    callback.on_train_begin(args, state, control)
    for _ in range(steps):
        clock.t += seconds_per_step.pop(0) if seconds_per_step else 1.0
        state.global_step += 1
        callback.on_step_end(args, state, control)
        if control.should_training_stop:
            break
    return control


@pytest.mark.parametrize(("text", "planned", "expected"), [
    ("60s", 24, 17),  # 16 s spent (10 warm-up + 2 x 3), 44 s left: 14 more steps of 3 s
    ("1h", 24, 24),  # the budget never raises the plan
    ("12s", 24, 3),  # spent during the measurement: the third step is the last
])
def test_budget_chooses_the_steps_that_fit(monkeypatch, text, planned, expected):
    clock = FakeClock()
    monkeypatch.setattr(budget, "now", clock)
    callback = budget.TimeBudgetCallback(TrainingConfig(time_budget=text))
    state = TrainerState(max_steps=planned)
    control = drive(callback, clock, state, [10.0, 3.0, 3.0], 3)
    assert callback.choice == {"budget": text, "budget_seconds": parse_duration(text), "seconds_per_step": 3.0,
                               "measured_steps": "2-3", "planned_steps": planned, "chosen_steps": expected}
    assert state.max_steps == expected
    assert (state.eval_steps, state.save_steps) == (max(1, expected // 4), max(1, expected // 4))
    stopped = expected == 3
    assert (control.should_training_stop, control.should_evaluate, control.should_save) == (stopped,) * 3


@pytest.mark.parametrize(("min_steps", "expected"), [(10, 10), (30, 24), (2, 3)])
def test_min_steps_is_a_floor_the_budget_never_cuts_below(monkeypatch, min_steps, expected):
    """12 s are spent in the measurement (3 steps): without a floor the third step is the last."""
    clock = FakeClock()
    monkeypatch.setattr(budget, "now", clock)
    callback = budget.TimeBudgetCallback(TrainingConfig(time_budget="12s", min_steps=min_steps))
    state = TrainerState(max_steps=24)
    drive(callback, clock, state, [10.0, 3.0, 3.0], 3)
    assert callback.choice["chosen_steps"] == state.max_steps == expected  # never past the plan (24) either


def test_a_budget_cut_is_said_in_steps_and_epochs_and_silence_when_nothing_was_cut():
    choice = {"budget": "6m", "planned_steps": 64, "chosen_steps": 18}
    assert budget.budget_cut(choice, 1.0) == ("trained 18 of 64 planned steps (0.28 epoch): time_budget 6m cut the "
                                              "rest; set training.min_steps for a floor, or a longer time_budget")
    assert budget.budget_cut({**choice, "chosen_steps": 64}, 1.0) is None
    assert budget.budget_cut(None, 1.0) is None
    assert "(" not in budget.budget_cut(choice, None)


def drive_with_evaluations(callback, clock, evaluation_seconds: float, on_step=None) -> float:
    """Steps of 10 s then 3 s, an evaluation every 4 steps costing `evaluation_seconds`, until the plan's end;
    returns the seconds spent by the loop."""
    state = TrainerState(max_steps=24)
    args, control = SimpleNamespace(eval_strategy="steps"), TrainerControl()
    callback.on_train_begin(args, state, control)
    started = clock.t
    for step in range(1, 25):
        clock.t += 10.0 if step == 1 else 3.0
        state.global_step = step
        callback.on_step_end(args, state, control)
        if on_step is not None:
            on_step(step)
        if control.should_training_stop or step >= state.max_steps:
            break
        if step % 4 == 0:  # the Trainer evaluates and saves: time the first measurement did not see
            clock.t += evaluation_seconds
            callback.on_evaluate(args, state, control)
    assert state.global_step == state.max_steps == callback.choice["chosen_steps"]
    return clock.t - started


def test_evaluations_that_cost_time_lower_the_plan_so_the_loop_ends_within_its_budget(monkeypatch):
    """60 s, steps of 3 s: 17 steps chosen at step 3. Then each evaluation (at 4, 8, ...) costs 6 s more: the
    plan is revised down, and the time spent when the loop stops is within the budget."""
    clock = FakeClock()
    monkeypatch.setattr(budget, "now", clock)
    callback = budget.TimeBudgetCallback(TrainingConfig(time_budget="60s"))
    spent = drive_with_evaluations(callback, clock, 6.0)
    assert callback.choice["chosen_steps"] < 17 and callback.choice["revised_at_step"] >= 4
    assert spent <= 60.0 + 3.0  # at most the step under way when the budget ran out
    assert "with evaluations and saves" in budget.describe_choice(callback.choice)


def test_the_plan_keeps_time_for_the_final_evaluation_estimated_then_measured(monkeypatch):
    """60 s, steps of 3 s, one evaluation estimated at 5 steps: 16 s spent at step 3, 15 s kept, 29 s left: 9 more
    steps. The first evaluation (every 4 steps) then takes 12 s: the plan is revised to keep 12 s (the measure, not
    the guess), and the loop and the final evaluation together end within the budget."""
    clock = FakeClock()
    monkeypatch.setattr(budget, "now", clock)
    callback = budget.TimeBudgetCallback(TrainingConfig(time_budget="60s", eval_steps=4), evaluation_steps=5.0)

    def at_step(step):
        if step == 3:
            assert callback.choice["chosen_steps"] == 12 and callback.choice["final_evaluation_seconds"] == 15.0
            assert "15 s kept for the final evaluation" in budget.describe_choice(callback.choice)

    spent = drive_with_evaluations(callback, clock, 12.0, at_step)
    assert callback.choice["final_evaluation_seconds"] == 12.0 and "revised_at_step" in callback.choice
    assert spent + 12.0 <= 60.0 + 3.0  # with the evaluation of the last step


def test_without_validation_nothing_is_kept_for_an_evaluation(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(budget, "now", clock)
    callback = budget.TimeBudgetCallback(TrainingConfig(time_budget="60s"), evaluation_steps=5.0)
    state = TrainerState(max_steps=24)
    callback.on_train_begin(SimpleNamespace(eval_strategy="no"), state, TrainerControl())
    for step in range(1, 4):
        clock.t += 10.0 if step == 1 else 3.0
        state.global_step = step
        callback.on_step_end(SimpleNamespace(eval_strategy="no"), state, TrainerControl())
    assert callback.choice["chosen_steps"] == 17 and "final_evaluation_seconds" not in callback.choice


def test_a_grpo_evaluation_costs_its_sampled_answers_in_steps():
    from specialist.config import MethodConfig
    from specialist.train.common import forward_evaluation_steps
    from specialist.train.grpo import sampled_evaluation_steps

    method = MethodConfig(kind="grpo", num_generations=4, generations_per_step=4)
    # test-generation's GRPO: 8 validation functions x 4 answers = 32 answers, 4 a step: 8 steps of sampling
    assert sampled_evaluation_steps(method, TrainingConfig(batch_size=4), 8) == 8.0
    assert forward_evaluation_steps(TrainingConfig(batch_size=8, gradient_accumulation_steps=2), 48) == 1.0


def test_a_resumed_run_keeps_the_steps_chosen_before_and_measures_nothing(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(budget, "now", clock)
    chosen = {"budget": "60s", "budget_seconds": 60.0, "seconds_per_step": 3.0, "measured_steps": "2-3",
              "planned_steps": 24, "chosen_steps": 17}
    state = TrainerState(max_steps=24, global_step=8,
                         stateful_callbacks={"TimeBudgetCallback": {"args": {}, "attributes": {"choice": chosen}}})
    callback = budget.TimeBudgetCallback(TrainingConfig(time_budget="60s"))
    drive(callback, clock, state, [500.0] * 5, 5)  # far slower now: a fresh measurement would stop at once
    assert callback.choice == chosen and state.max_steps == 17 and state.global_step == 13
    assert callback.state() == {"args": {}, "attributes": {"choice": chosen}}  # saved again with each checkpoint


def test_a_run_too_short_to_measure_reports_the_plan_it_kept(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(budget, "now", clock)
    callback = budget.TimeBudgetCallback(TrainingConfig(time_budget="10m"))
    state = TrainerState(max_steps=2)
    drive(callback, clock, state, [10.0, 3.0], 2)
    callback.on_train_end(None, state, TrainerControl())
    assert callback.choice["chosen_steps"] == 2 and callback.choice["seconds_per_step"] is None
    assert "before the rate could be measured" in budget.describe_choice(callback.choice)


# -- time_budget: a real run on the tiny model --------------------------------------------------------------------
def budget_config(tiny_config, run_name, time_budget="60s"):
    tiny_config["training"].update({"epochs": "auto", "max_steps": -1, "time_budget": time_budget,
                                    "micro_batch_tokens": None, "save_total_limit": 50})
    tiny_config["output"]["run_name"] = run_name
    return validate_config(tiny_config)


def clock_driven_by_steps(monkeypatch, seconds_for_step):
    """The budget's clock advances only when a training step runs: `seconds_for_step(global_step)` each."""
    from specialist.train.fast_loss import CompletionOnlySFTTrainer

    clock = FakeClock()
    monkeypatch.setattr(budget, "now", clock)
    original = CompletionOnlySFTTrainer.training_step

    def timed_step(self, *args, **kwargs):
        clock.t += seconds_for_step(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CompletionOnlySFTTrainer, "training_step", timed_step)
    return clock


def cosine(step, total, warmup):
    if step < warmup:
        return step / max(1, warmup)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def test_time_budget_lowers_the_steps_and_moves_schedule_evaluations_and_checkpoints(tiny_config, monkeypatch,
                                                                                   capsys):
    """32 rows, batch 4, epochs auto (3): 24 steps planned. Steps take 10 s, then 3 s: 60 s fit 17 steps."""
    clock_driven_by_steps(monkeypatch, lambda step: 10.0 if step == 0 else 3.0)
    monkeypatch.setattr(console, "width", 300)  # one message, one line
    summary = train_only(budget_config(tiny_config, "budget"), "tiny")
    train = summary.metrics["train"]
    # 1 s kept for the final evaluation: 4 validation rows, a forward pass of a third of a 4-row step
    choice = {"budget": "60s", "budget_seconds": 60.0, "seconds_per_step": 3.0, "measured_steps": "2-3",
              "planned_steps": 24, "chosen_steps": 17, "final_evaluation_seconds": 1.0}
    assert train["steps"] == 17 and train["epochs"] == 3 and train["time_budget"] == choice
    assert train["cut_by_budget"].startswith("trained 17 of 24 planned steps (2.12 epoch): time_budget 60s")
    err = capsys.readouterr().err
    assert ("time budget 60s: 3 s/step measured over steps 2-3 -> 17 steps (planned 24), 1 s kept for the final "
            "evaluation") in err
    assert "epochs auto -> 3 (32 rows x 3 < 100 examples seen" in err

    rows = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["time_budget"] for r in rows if "time_budget" in r] == [choice]
    # Evaluations and checkpoints spread over the new total (4 per run), and the last step evaluated and saved.
    assert [r["step"] for r in rows if "eval_loss" in r] == [4, 8, 12, 16, 17]
    saved = sorted(int(p.name.split("-")[1]) for p in (summary.run_dir / "checkpoints").glob("checkpoint-*"))
    assert saved == [4, 8, 12, 16, 17] and is_complete(summary.run_dir / "checkpoints" / "checkpoint-17")
    # The learning rate of step k is the schedule's value after k-1 steps: the 24-step plan (warm-up 1) until the
    # choice at step 3, then a cosine over 17 steps (warm-up int(0.05 x 17) = 0).
    rates = {r["step"]: r["learning_rate"] for r in rows if "learning_rate" in r}
    assert sorted(rates) == list(range(1, 18))
    for step, rate in rates.items():
        expected = cosine(step - 1, 24, 1) if step <= 3 else cosine(step - 1, 17, 0)
        assert rate == pytest.approx(0.01 * expected, rel=1e-6, abs=1e-12), step

    # Interrupted after step 8 and resumed on a far slower machine: the promise made stands, and the weights
    # equal the uninterrupted run's.
    reference = load_file(summary.run_dir / "adapter" / "adapter_model.safetensors")
    for later in (12, 16, 17):
        shutil.rmtree(summary.run_dir / "checkpoints" / f"checkpoint-{later}")
    shutil.rmtree(summary.run_dir / "adapter")
    clock_driven_by_steps(monkeypatch, lambda step: 100.0)
    resumed = train_only(budget_config(tiny_config, "budget"), "tiny", resume=True)
    assert resumed.metrics["train"]["steps"] == 17 and resumed.metrics["train"]["time_budget"] == choice
    got = load_file(resumed.run_dir / "adapter" / "adapter_model.safetensors")
    for key in reference:
        torch.testing.assert_close(got[key], reference[key], rtol=1e-4, atol=1e-6, msg=key)


def test_a_budget_spent_in_the_measurement_stops_at_once_evaluated_and_saved(tiny_config, monkeypatch):
    clock_driven_by_steps(monkeypatch, lambda step: 10.0)
    summary = train_only(budget_config(tiny_config, "spent", "15s"), "tiny")
    assert summary.metrics["train"]["steps"] == 3
    assert summary.metrics["train"]["time_budget"]["chosen_steps"] == 3
    rows = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [3]
    assert is_complete(summary.run_dir / "checkpoints" / "checkpoint-3")


# -- progress lines in a log file -----------------------------------------------------------------------------------
@pytest.fixture
def log_file_clock(monkeypatch) -> FakeClock:
    """The progress callback's clock, faked, with the console writing to a log file (not a terminal), wide."""
    clock = FakeClock()
    monkeypatch.setattr(progress, "now", clock)
    monkeypatch.setattr(console, "_force_terminal", False)
    monkeypatch.setattr(console, "width", 300)
    return clock


def test_a_log_file_gets_a_progress_line_at_least_every_30_seconds(log_file_clock):
    clock = log_file_clock
    callback = progress.RichProgressCallback()
    args, control = None, TrainerControl()
    state = TrainerState(max_steps=20, is_world_process_zero=True)
    with console.capture() as captured:
        callback.on_train_begin(args, state, control)
        for step in range(1, 21):
            clock.t += 7.0  # a step every 7 s, the loss logged only at step 1
            state.global_step, state.epoch, state.num_input_tokens_seen = step, step / 20, 100 * step
            callback.on_step_end(args, state, control)
            if step == 1:
                callback.on_log(args, state, control, logs={"loss": 1.5, "learning_rate": 1e-3})
        callback.on_train_end(args, state, control)
    lines = [line for line in captured.get().splitlines() if "ETA" in line]
    # the start, step 1 (its loss), then each step at which 30 s have passed since the last line: 6, 11, 16
    assert [int(line.split("step ")[1].split("/")[0]) for line in lines] == [0, 1, 6, 11, 16]
    assert "step 6/20" in lines[2] and "loss 1.5000" in lines[2] and "14 tok/s" in lines[2]
    assert "ETA 1m38s" in lines[2]  # 42 s for 6 steps, 14 steps to go


def test_a_log_file_hears_from_the_clock_while_a_step_runs(log_file_clock, capsys):
    """A step longer than the line interval (or the first step, after loading) still gets lines: the clock writes
    them. capsys, not console.capture(): Rich buffers a capture per thread, and the clock writes from its own."""
    import threading
    import time as real_time

    clock = log_file_clock
    callback = progress.RichProgressCallback(line_every=0.2)
    state = TrainerState(max_steps=5, is_world_process_zero=True)
    callback.on_train_begin(None, state, TrainerControl())
    clock.t += 1.0  # the first step has taken longer than the interval and has not ended
    real_time.sleep(0.5)
    callback.on_train_end(None, state, TrainerControl())
    lines = [line for line in capsys.readouterr().err.splitlines() if "step 0/5" in line and "ETA" in line]
    assert len(lines) >= 2  # the start's line, then the clock's
    assert not any(t.name == "training-progress" and t.is_alive() for t in threading.enumerate())


def test_a_validation_pass_in_a_log_file_gets_a_line_every_30_seconds(log_file_clock):
    clock = log_file_clock
    callback = progress.RichProgressCallback()
    state = TrainerState(max_steps=20, is_world_process_zero=True)
    with console.capture() as captured:
        callback.on_train_begin(None, state, TrainerControl())
        state.global_step = 10
        for _ in range(10):  # ten validation batches of 8 s each, after step 10
            clock.t += 8.0
            callback.on_prediction_step(None, state, TrainerControl())
        callback.on_train_end(None, state, TrainerControl())
    lines = [line for line in captured.get().splitlines() if "validating" in line]
    assert len(lines) == 2 and all("step 10/20" in line for line in lines)  # at 32 s and 64 s


def test_a_terminal_gets_the_bar_and_no_extra_lines(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(progress, "now", clock)
    monkeypatch.setattr(console, "_force_terminal", True)
    callback = progress.RichProgressCallback()
    state = TrainerState(max_steps=5, is_world_process_zero=True)
    with console.capture() as captured:
        callback.on_train_begin(None, state, TrainerControl())
        for step in range(1, 6):
            clock.t += 60.0
            state.global_step = step
            callback.on_step_end(None, state, TrainerControl())
        callback.on_train_end(None, state, TrainerControl())
    assert "ETA" not in captured.get() and "training finished: 5 steps" in captured.get()


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (59.4, "59s"), (60, "1m00s"), (3599, "59m59s"),
                                              (3600, "1h00m"), (90061, "25h01m")])
def test_eta_is_written_for_people(seconds, text):
    assert progress.format_seconds(seconds) == text


@pytest.mark.parametrize(("multiplies_bf16", "expected"), [(True, True), (False, False)])
def test_training_autocasts_to_bf16_where_the_cpu_multiplies_it(monkeypatch, tiny_model, multiplies_bf16, expected):
    """Detected, not assumed: fp32 weights on a CPU with AVX512-BF16 (or AMX) train under bf16 autocast; an AVX2
    machine keeps fp32 throughout."""
    import specialist.decode
    import specialist.models
    from specialist.train.loop import use_bf16_autocast

    model, _ = tiny_model
    monkeypatch.setattr(specialist.models, "bf16_is_fast", lambda: False)  # no AMX, no CUDA
    monkeypatch.setattr(specialist.decode, "cpu_multiplies_bf16", lambda cpuinfo=None: multiplies_bf16)
    assert use_bf16_autocast(model) is expected
    assert use_bf16_autocast(model, False) is False and use_bf16_autocast(model, True) is True  # training.bf16
    assert use_bf16_autocast(model.to(torch.bfloat16)) is True  # bf16 weights always compute in bf16


def test_a_training_that_raises_leaves_no_progress_clock_running(monkeypatch):
    """run_trainer stops the clock even when the Trainer raises before on_train_end (a kill, a bad batch)."""
    import threading
    from types import SimpleNamespace

    from specialist.train.loop import run_trainer

    monkeypatch.setattr(console, "_force_terminal", False)
    callback = progress.RichProgressCallback(line_every=0.2)

    class Raising:
        callback_handler = SimpleNamespace(callbacks=[callback])
        state = TrainerState(max_steps=5, is_world_process_zero=True)

        def remove_callback(self, _):
            pass

        def train(self, resume_from_checkpoint=None):
            callback.on_train_begin(None, self.state, TrainerControl())
            raise RuntimeError("a batch the model cannot take")

    with pytest.raises(RuntimeError, match="cannot take"):
        run_trainer(Raising(), None)
    assert not any(t.name == "training-progress" and t.is_alive() for t in threading.enumerate())


def test_the_clock_writes_before_the_interval_passes_whatever_the_writer_does():
    """Lines from the clock alone: no gap between two reaches the interval (checked every interval/4 and written
    at the interval, gaps of 1.25x it had been seen)."""
    import time as real_time

    from specialist.console import QuietLineClock

    written = [real_time.perf_counter()]
    clock = QuietLineClock(0.4, lambda: real_time.perf_counter() - written[-1],
                           lambda: written.append(real_time.perf_counter()), "test-clock").start()
    real_time.sleep(2.0)
    clock.stop()
    gaps = [b - a for a, b in zip(written, written[1:])]
    assert len(gaps) >= 4 and max(gaps) < 0.4


def test_a_step_without_a_count_says_when_it_starts_in_a_log_file(monkeypatch):
    from specialist.console import status

    monkeypatch.setattr(console, "_force_terminal", False)
    with console.capture() as captured:
        with status("converting model.gguf to safetensors (once)"):
            console.log("inside")
    lines = captured.get().splitlines()
    first = next(i for i, line in enumerate(lines) if "converting model.gguf" in line)
    assert first < next(i for i, line in enumerate(lines) if "inside" in line)
    assert any("done" in line and "converting model.gguf" in line for line in lines)
