"""`training.time_budget`: fit the run into a wall-clock budget by choosing its optimizer steps as it goes.

The first step is slower (allocation, first-touch of the weights, lazy kernels), so it is left out: the rate is
measured over the next `MEASURED_STEPS` steps, and the steps that fit in what is left of the budget are added to
the steps already done. The choice only lowers the plan (epochs or max_steps stay the ceiling). Everything that
depends on the total moves with it: the learning-rate schedule is rebuilt for the new total at the step it has
reached, evaluations and checkpoints are spread over the new total (4 per run unless set), and the last step is
evaluated and saved. The choice is stored in the checkpoints, so a resumed run keeps it.

Evaluations and checkpoint saves are not in the first measured rate; once one has happened, the plan is
revised at every step from the rate measured so far with them included (only ever lowered, the schedule
following), so the loop ends within its budget rather than a few evaluations after it.

The evaluation of the last step is inside the budget too: the plan keeps time for it, estimated before any
evaluation from `evaluation_steps` (what one evaluation costs in optimizer steps, which the method knows: a
forward pass over the validation rows, or for GRPO sampled answers to every validation prompt), then the longest
evaluation measured. A GRPO run whose validation alone would take most of the budget trains few steps and says so,
rather than ending its 12 minutes with a 10-minute validation after them.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from specialist.config import TrainingConfig, parse_duration
from specialist.console import console
from specialist.train.schedule import eval_and_save_steps, warmup_steps

WARMUP_STEPS = 1
MEASURED_STEPS = 2


def now() -> float:
    """The clock the budget is measured on (a test replaces it)."""
    return time.perf_counter()


class TimeBudgetCallback(ExportableState, TrainerCallback):
    """Chooses the run's optimizer steps from the measured rate; `choice` says what it chose and why."""

    def __init__(self, training: TrainingConfig, record: Callable[[dict[str, Any]], None] | None = None,
                 evaluation_steps: float = 0.0) -> None:
        self.training = training
        self.evaluation_steps = evaluation_steps  # one evaluation's estimated cost, in optimizer steps
        self.budget = training.time_budget or ""
        self.seconds = parse_duration(self.budget)
        self.record = record  # where the choice is written down besides the console (metrics.jsonl)
        self.choice: dict[str, Any] | None = None
        self._started = 0.0
        self._first_step = 0
        self._warm_at: float | None = None
        self._step_ended: float | None = None
        self._evaluation_seconds: float | None = None  # the longest evaluation measured

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": {"choice": self.choice}}

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        stored = (state.stateful_callbacks or {}).get(type(self).__name__)
        chosen_before = stored.get("attributes", {}).get("choice") if isinstance(stored, dict) else None
        if self.choice is None and chosen_before and chosen_before.get("chosen_steps"):
            self.choice = chosen_before  # resumed: keep the promise made when the run started
            self._apply(state, lr_scheduler, chosen_before["chosen_steps"])
            if state.is_world_process_zero:
                console.log(f"time budget {self.budget}: keeping the {self.choice['chosen_steps']} steps chosen "
                            "before the interruption")
        self._started = now()
        self._first_step = state.global_step

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        try:
            self._on_step_end(args, state, control, lr_scheduler)
        finally:
            self._step_ended = now()  # an evaluation after this step is timed from here

    def _on_step_end(self, args, state, control, lr_scheduler) -> None:
        if self.choice is not None:
            self._revise(args, state, control, lr_scheduler)
            return
        done = state.global_step - self._first_step
        if done == WARMUP_STEPS:
            self._warm_at = now()
        if done < WARMUP_STEPS + MEASURED_STEPS or self._warm_at is None:
            return
        clock = now()
        per_step = (clock - self._warm_at) / MEASURED_STEPS
        reserve = self._final_evaluation_seconds(args, per_step)
        fits = self._steps_that_fit(clock, per_step, reserve)
        chosen = self._floored(same_on_every_rank(min(state.max_steps, state.global_step + fits)), state.max_steps)
        first = state.global_step - MEASURED_STEPS + 1
        self.choice = {"budget": self.budget, "budget_seconds": self.seconds, "seconds_per_step": round(per_step, 4),
                       "measured_steps": f"{first}-{state.global_step}", "planned_steps": state.max_steps,
                       "chosen_steps": chosen}
        if reserve:
            self.choice["final_evaluation_seconds"] = round(reserve, 1)
        self._apply(state, lr_scheduler, chosen)
        if chosen <= state.global_step:  # the budget is spent already: this step is the last one
            control.should_training_stop = True
            control.should_evaluate = args.eval_strategy == "steps"
            control.should_save = True
        self._announce(state)

    def on_evaluate(self, args, state, control, **kwargs):
        self._evaluated = True
        if self._step_ended is not None:  # callbacks before this one (select_by's scoring) are part of the evaluation
            took = now() - self._step_ended
            self._evaluation_seconds = max(self._evaluation_seconds or 0.0, took)

    def _final_evaluation_seconds(self, args, per_step: float) -> float:
        """Time to keep for the evaluation of the last step: the longest measured, else the method's estimate."""
        if getattr(args, "eval_strategy", "no") == "no":
            return 0.0
        if self._evaluation_seconds is not None:
            return self._evaluation_seconds
        return self.evaluation_steps * per_step

    def _steps_that_fit(self, clock: float, per_step: float, reserve: float) -> int:
        left = self.seconds - (clock - self._started) - reserve
        return math.floor(max(0.0, left) / max(per_step, 1e-9))

    def on_save(self, args, state, control, **kwargs):
        self._evaluated = True  # a save costs time the first rate did not see, like an evaluation

    def _revise(self, args, state, control, lr_scheduler) -> None:
        """Lower the plan when the rate with evaluations and saves included says it would overrun."""
        if not getattr(self, "_evaluated", False) or self._warm_at is None or state.global_step >= state.max_steps:
            return
        clock = now()
        per_step = (clock - self._warm_at) / max(1, state.global_step - self._first_step - WARMUP_STEPS)
        reserve = self._final_evaluation_seconds(args, per_step)
        fits = self._steps_that_fit(clock, per_step, reserve)
        revised = self._floored(same_on_every_rank(min(state.max_steps, state.global_step + fits)), state.max_steps)
        if revised >= state.max_steps - 1:  # within a step of the plan: not worth moving the schedule
            return
        self.choice = {**self.choice, "chosen_steps": revised, "revised_at_step": state.global_step,
                       "seconds_per_step_with_evaluations": round(per_step, 4)}
        if reserve:
            self.choice["final_evaluation_seconds"] = round(reserve, 1)
        self._apply(state, lr_scheduler, max(revised, state.global_step))
        if revised <= state.global_step:
            control.should_training_stop = True
            control.should_evaluate = args.eval_strategy == "steps"
            control.should_save = True
        self._announce(state)

    def _floored(self, chosen: int, planned: int) -> int:
        """training.min_steps: the budget never cuts below it (nor past the plan)."""
        return max(chosen, min(self.training.min_steps or 0, planned))

    def on_train_end(self, args, state, control, **kwargs):
        if self.choice is None:  # too few steps to measure: the plan stood
            self.choice = {"budget": self.budget, "budget_seconds": self.seconds, "seconds_per_step": None,
                           "measured_steps": None, "planned_steps": state.max_steps, "chosen_steps": state.max_steps}
            self._announce(state)

    def _apply(self, state, lr_scheduler, chosen: int) -> None:
        state.max_steps = chosen
        state.eval_steps, state.save_steps = eval_and_save_steps(self.training, chosen)
        if lr_scheduler is not None:
            rebuild_schedule(lr_scheduler, chosen, warmup_steps(self.training, chosen))

    def _announce(self, state) -> None:
        if not state.is_world_process_zero:
            return
        console.log(describe_choice(self.choice))
        if self.record is not None:
            self.record({"step": state.global_step, "time_budget": self.choice})


def describe_choice(choice: dict[str, Any]) -> str:
    """e.g. 'time budget 10m: 2.9 s/step measured over steps 2-3 -> 190 steps (planned 256)'."""
    kept = (f", {choice['final_evaluation_seconds']:.0f} s kept for the final evaluation"
            if choice.get("final_evaluation_seconds") else "")
    if "revised_at_step" in choice:
        return (f"time budget {choice['budget']}: {choice['seconds_per_step_with_evaluations']:.3g} s/step with "
                f"evaluations and saves, at step {choice['revised_at_step']} -> {choice['chosen_steps']} steps{kept}")
    if choice["seconds_per_step"] is None:
        return (f"time budget {choice['budget']}: the run ended after {choice['chosen_steps']} steps, before "
                f"the rate could be measured (planned {choice['planned_steps']})")
    return (f"time budget {choice['budget']}: {choice['seconds_per_step']:.3g} s/step measured over steps "
            f"{choice['measured_steps']} -> {choice['chosen_steps']} steps (planned {choice['planned_steps']}){kept}")


def budget_cut(choice: dict[str, Any] | None, epochs: float | None) -> str | None:
    """What the budget cut, said where the result is shown, e.g. 'trained 18 of 64 planned steps (0.28 epoch):
    time_budget 6m'; None when it cut nothing."""
    if not choice or not choice.get("planned_steps") or choice["chosen_steps"] >= choice["planned_steps"]:
        return None
    share = choice["chosen_steps"] / choice["planned_steps"]
    epoch = f" ({share * epochs:.2f} epoch)" if epochs else ""
    return (f"trained {choice['chosen_steps']} of {choice['planned_steps']} planned steps{epoch}: time_budget "
            f"{choice['budget']} cut the rest; set training.min_steps for a floor, or a longer time_budget")


def rebuild_schedule(lr_scheduler, total_steps: int, warmup: int) -> None:
    """Point the scheduler's step functions at a new total and set the learning rate for the step it has reached.

    The Trainer's schedules (cosine, linear, ...) are LambdaLR over a `functools.partial` that holds the total, so
    the same scheduler object (which the Trainer and the optimizer keep) gets new partials; its step count stays.
    """
    inner = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it in some launches
    lambdas = getattr(inner, "lr_lambdas", None)
    if not lambdas or not all(isinstance(f, functools.partial) and "num_training_steps" in f.keywords
                              for f in lambdas):
        raise RuntimeError(f"cannot change the total steps of a {type(inner).__name__} learning-rate schedule")
    inner.lr_lambdas = [functools.partial(f.func, *f.args, **{**f.keywords, "num_training_steps": total_steps,
                                                                "num_warmup_steps": warmup}) for f in lambdas]
    rates = [base * schedule(inner.last_epoch) for base, schedule in zip(inner.base_lrs, inner.lr_lambdas, strict=True)]
    for group, rate in zip(inner.optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    inner._last_lr = rates


def same_on_every_rank(value: int) -> int:
    """Rank 0's value on every rank: each process measures its own clock, but all must stop at the same step."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])
