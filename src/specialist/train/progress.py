"""Live training progress: step, epoch, loss, validation loss, lr, tokens/s, ETA.

On a terminal, a Rich progress bar. Into a log file (not a terminal) a bar does not render, so lines are printed
instead: one per logged loss, and one at least every `PLAIN_LINE_SECONDS` between them, since on a slow CPU the
logging steps may be minutes apart and a silent log looks like a hung run.
"""

from __future__ import annotations

import time

from transformers import TrainerCallback

from specialist.console import QuietLineClock, console, progress

PLAIN_LINE_SECONDS = 30.0
SHOWN = ("loss", "eval_loss", "learning_rate")
# Reward fine-tuning's figures (method.kind grpo), shown when a run logs them, and each scorer's mean reward
# (`rewards/<scorer>/mean`)
REWARD_FIGURES = {"reward_group_std": "spread", "kl": "kl", "completions/mean_length": "len"}


def now() -> float:
    """The clock rates and ETAs are measured on (a test replaces it)."""
    return time.perf_counter()


class RichProgressCallback(TrainerCallback):
    """A Rich progress bar fed by the Trainer's events (replaces the tqdm bars, which we turn off)."""

    def __init__(self, line_every: float = PLAIN_LINE_SECONDS) -> None:
        self.line_every = line_every
        self._progress = None
        self._task = None
        self._started = 0.0
        self._first_step = 0
        self._first_tokens = 0
        self._last_line = 0.0
        self._last: dict[str, float] = {}
        self._clock: QuietLineClock | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self._progress = progress()
        self._progress.start()
        self._task = self._progress.add_task("training", total=state.max_steps, info="")
        self._started = self._last_line = now()
        # a resumed run's rates count this session's steps and tokens only
        self._first_step, self._first_tokens = state.global_step, state.num_input_tokens_seen or 0
        if not console.is_terminal:
            # a line now, then one from the clock whenever `line_every` passes without one: a line at a step's end
            # alone leaves up to a step more than `line_every` silent (39 s in the demo's log on 2 cores)
            self._print_line(state)
            self._clock = QuietLineClock(self.line_every, lambda: now() - self._last_line,
                                         lambda: self._print_line(state), "training-progress").start()

    def on_step_end(self, args, state, control, **kwargs):
        if self._progress is None:
            return
        # the total can drop mid-run (training.time_budget)
        self._progress.update(self._task, completed=state.global_step, total=state.max_steps, info=self._info(state))
        if not console.is_terminal and now() - self._last_line >= self.line_every:
            self._print_line(state)

    def on_prediction_step(self, args, state, control, **kwargs):
        # a validation pass runs between two steps: 55 s without a line on one core for the demo's 74 rows
        if self._progress is not None and not console.is_terminal and now() - self._last_line >= self.line_every:
            self._last_line = now()
            console.log(f"step {state.global_step}/{state.max_steps}  validating  ETA {self._eta(state)}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._progress is None or not logs:
            return
        for key, value in logs.items():
            shown = key in SHOWN or key in ("reward", "eval_reward") or key in REWARD_FIGURES or _is_scorer_mean(key)
            if shown and isinstance(value, (int, float)):
                self._last[key] = float(value)
        self._progress.update(self._task, info=self._info(state))
        fresh = "loss" in logs or "eval_loss" in logs  # not the end-of-training summary, which repeats them
        if fresh and not console.is_terminal:  # a live bar does not render into a log file; leave a line instead
            self._print_line(state)

    def stop_clock(self) -> None:
        """End the clock's lines (at the end of training, or when training raised: run_trainer calls this)."""
        if self._clock is not None:
            self._clock.stop()
            self._clock = None

    def on_train_end(self, args, state, control, **kwargs):
        self.stop_clock()
        if self._progress is not None:
            self._progress.update(self._task, completed=state.global_step, info=self._info(state))
            self._progress.stop()
            self._progress = None
            console.log(f"training finished: {state.global_step} steps, {self._info(state)}")

    def _print_line(self, state) -> None:
        self._last_line = now()
        console.log(f"step {state.global_step}/{state.max_steps}  {self._info(state)}  ETA {self._eta(state)}")

    def _eta(self, state) -> str:
        done = state.global_step - self._first_step
        if done <= 0:
            return "?"
        left = (now() - self._started) / done * max(0, state.max_steps - state.global_step)
        return format_seconds(left)

    def _info(self, state) -> str:
        elapsed = max(now() - self._started, 1e-9)
        parts = [f"epoch {state.epoch or 0:.2f}"]
        if "loss" in self._last:
            parts.append(f"loss {self._last['loss']:.4f}")
        if "eval_loss" in self._last:
            parts.append(f"val {self._last['eval_loss']:.4f}")
        if "learning_rate" in self._last:
            parts.append(f"lr {self._last['learning_rate']:.2e}")
        parts.extend(reward_parts(self._last))
        tokens = (state.num_input_tokens_seen or 0) - self._first_tokens
        if tokens > 0:
            parts.append(f"{tokens / elapsed:.0f} tok/s")
        return "  ".join(parts)


def _is_scorer_mean(key: str) -> bool:
    return key.startswith("rewards/") and key.endswith("/mean")


def reward_parts(last: dict[str, float]) -> list[str]:
    """e.g. ['reward 0.750 (exact_match 0.50 format 1.00)', 'spread 0.31', 'kl 0.0021', 'len 14.00',
    'val reward 0.625']; [] for methods that log no reward."""
    if "reward" not in last:
        return []
    scorers = " ".join(f"{key[len('rewards/'):-len('/mean')]} {value:.2f}" for key, value in last.items()
                       if _is_scorer_mean(key))
    parts = [f"reward {last['reward']:.3f}" + (f" ({scorers})" if scorers else "")]
    for key, label in REWARD_FIGURES.items():
        if key in last:
            parts.append(f"{label} {last[key]:.4f}" if key == "kl" else f"{label} {last[key]:.2f}")
    if "eval_reward" in last:
        parts.append(f"val reward {last['eval_reward']:.3f}")
    return parts


def format_seconds(seconds: float) -> str:
    """e.g. 45s, 12m05s, 2h03m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
