"""Live training progress in the terminal: step, epoch, loss, validation loss, lr, tokens/s, ETA."""

from __future__ import annotations

import time

from transformers import TrainerCallback

from specialist.console import console, progress


class RichProgressCallback(TrainerCallback):
    """A Rich progress bar fed by the Trainer's events (replaces the tqdm bars, which we turn off)."""

    def __init__(self) -> None:
        self._progress = None
        self._task = None
        self._started = 0.0
        self._last: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self._progress = progress()
        self._progress.start()
        self._task = self._progress.add_task("training", total=state.max_steps, info="")
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._progress is not None:
            self._progress.update(self._task, completed=state.global_step, info=self._info(state))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._progress is None or not logs:
            return
        for key in ("loss", "eval_loss", "learning_rate"):
            if key in logs:
                self._last[key] = float(logs[key])
        self._progress.update(self._task, info=self._info(state))
        fresh = "loss" in logs or "eval_loss" in logs  # not the end-of-training summary, which repeats them
        if fresh and not console.is_terminal:  # a live bar does not render into a log file; leave a line instead
            console.log(f"step {state.global_step}/{state.max_steps}  {self._info(state)}")

    def on_train_end(self, args, state, control, **kwargs):
        if self._progress is not None:
            self._progress.update(self._task, completed=state.global_step, info=self._info(state))
            self._progress.stop()
            self._progress = None
            console.log(f"training finished: {state.global_step} steps, {self._info(state)}")

    def _info(self, state) -> str:
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        parts = [f"epoch {state.epoch or 0:.2f}"]
        if "loss" in self._last:
            parts.append(f"loss {self._last['loss']:.4f}")
        if "eval_loss" in self._last:
            parts.append(f"val {self._last['eval_loss']:.4f}")
        if "learning_rate" in self._last:
            parts.append(f"lr {self._last['learning_rate']:.2e}")
        if state.num_input_tokens_seen:
            parts.append(f"{state.num_input_tokens_seen / elapsed:.0f} tok/s")
        return "  ".join(parts)
