"""Reward fine-tuning (`method.kind: grpo`) with TRL's GRPOTrainer.

Each step samples `num_generations` answers to each of a few training prompts, scores every answer with the run's
rewards, and moves the model towards the answers that beat their own group's mean (no value model: the group is
the baseline). The rewards are the evaluation's scorers, called as the evaluation calls them (`score_rows`: the
answer, the row's expected completion, and the row's input for scorers that read it), so a code scorer runs each
answer's tests in the same sandbox (`core.code_tests`); plus, by default, a format reward (1 for an answer in
the run's output language, `Constraint.check`).

Prompts are the run's PromptTemplate, encoded as the generation engine encodes them (the same ids evaluation and
serving give the model, the input shortened where the run truncates), and the answer a scorer sees is the text the
engine would return: special tokens dropped, cut at the format's stop string, stripped. Sampling stops at the
tokens the engine stops at (EOS and a chat model's end of turn).

Trade-offs, as configured here:
- LoRA (the default) keeps the reference model free: the KL term's reference is the same weights with the adapter
  off. Starting from an SFT run (`from_adapter`), that adapter is merged first (as DPO does), so the reference is
  the SFT model and the new adapter is what RFT added; evaluation loads the run the same way.
- Generation is transformers' `generate` on the training model, one batch of `generations_per_step` answers per
  optimizer step (on-policy: no stale samples, no importance correction). On 2 CPU cores sampling is most of a
  step, so the defaults keep groups small (4) and answers short (the evaluation's own token limit).
- Rewards are computed in the training process, one answer at a time; slow scorers (the sandbox) slow each step.
- Tokens sampled after a stop string (the built-in format's next turn) are still part of the policy's sample: the
  reward sees the cut text, the gradient the whole sample.

Monitoring (metrics.jsonl, TensorBoard, the progress line): TRL's `reward` (weighted sum, batch mean),
`rewards/<scorer>/mean` and `/std`, `reward_std` (over the batch), `frac_reward_zero_std` (groups that teach
nothing), `kl`, `completions/mean_length` and `/clipped_ratio`, `entropy`; and ours, `reward_group_std` (the mean
spread within a group, the signal GRPO learns from). With validation rows, evaluations log `eval_reward`, which
picks the best checkpoint and drives early stopping (higher is better).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

from trl import GRPOTrainer

from specialist.config import MethodConfig, RunConfig, TrainingConfig
from specialist.data import Example, PromptTemplate
from specialist.errors import ConfigError
from specialist.run_folder import RunFolder, merge_adapter
from specialist.train.checkpoints import DurableCheckpoints
from specialist.train.common import TrainResult, common_arguments
from specialist.train.job import TrainJob
from specialist.train.loop import fit, use_bf16_autocast

GROUP_SPREAD = "reward_group_std"
FORMAT_REWARD = "format"
FORMAT_SCORERS = ("json_valid", "json_schema")  # what the format reward stands for, while it is on
# Scorers that measure rather than reward (a length reward buys verbosity, a refusal reward buys refusals): left
# out of the default rewards; method.rewards may still name them, with a weight of either sign.
STATISTIC_SCORERS = ("length", "refusal_rate")


class DurableGRPOTrainer(DurableCheckpoints, GRPOTrainer):
    """TRL's GRPOTrainer with durable checkpoints, the run's own prompt encoding, and the within-group spread.

    `prompt_ids` maps each rendered prompt to its ids: TRL would tokenize the rendered text again, adding a second
    BOS to a chat template's own.
    """

    def __init__(self, *args, prompt_ids: dict[str, list[int]], **kwargs) -> None:
        self._prompt_ids = prompt_ids
        super().__init__(*args, **kwargs)

    def _tokenize_prompts(self, prompts: list):
        return [list(self._prompt_ids[prompt]) for prompt in prompts], None, {}

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        mode = "train" if self.model.training else "eval"
        size = self.num_generations if mode == "train" else self.num_generations_eval
        self._metrics[mode][GROUP_SPREAD].append(group_spread(rewards, self.reward_weights, size))
        return rewards


def group_spread(rewards_per_func, weights, group_size: int) -> float:
    """Mean over groups of the standard deviation of the weighted reward within a group (TRL's `nanstd`, the one
    it scales advantages by). 0 means no answer beat another: nothing to learn from that batch."""
    from trl.trainer.utils import nanstd

    if group_size < 2:  # evaluation with eval_generations 1: no group to spread
        return 0.0
    total = (rewards_per_func * weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
    groups = total.view(-1, group_size)
    return sum(nanstd(group).item() for group in groups) / len(groups)


def answer_text(completion: str, stops: tuple[str, ...]) -> str:
    """What the generation engine would return for this sample: cut at the first stop string, stripped."""
    from specialist.generation import cut_at_stop

    return cut_at_stop(completion, stops)


class ScorerReward:
    """An evaluation scorer as a TRL reward function: one float per answer, from `score_rows` as evaluation calls it."""

    def __init__(self, name: str, scorer: Callable, stops: tuple[str, ...]) -> None:
        self.__name__ = name  # TRL names the reward's metrics after it: rewards/<name>/mean
        self.scorer, self.stops = scorer, stops

    def __call__(self, completions: list[str], row_input: list[str], expected: list[str], **_: Any) -> list[float]:
        from specialist.core.scorers import score_rows

        texts = [answer_text(c, self.stops) for c in completions]
        try:
            values = score_rows(texts, expected, {self.__name__: self.scorer}, row_input, strict=True)[self.__name__]
        except (ValueError, TypeError, ArithmeticError, LookupError, AttributeError) as exc:
            raise ConfigError(f"reward scorer {self.__name__!r} failed on a sampled answer: {exc!r}",
                              hint="a scorer must return a number for any text, however malformed") from exc
        bad = next((v for v in values if not math.isfinite(v)), None)
        if bad is not None:
            raise ConfigError(f"reward scorer {self.__name__!r} returned {bad}, which cannot be a reward",
                              hint="make the scorer return a finite number for every answer")
        return values


class FormatReward:
    """1 for an answer inside the run's output language (`Constraint.check`), else 0."""

    __name__ = FORMAT_REWARD

    def __init__(self, check: Callable[[str], bool], stops: tuple[str, ...]) -> None:
        self.check, self.stops = check, stops

    def __call__(self, completions: list[str], **_: Any) -> list[float]:
        return [float(self.check(answer_text(c, self.stops))) for c in completions]


def default_rewards(method: MethodConfig, scorers: list[str], has_format: bool) -> list[tuple[str, float]]:
    """(scorer, weight) pairs: method.rewards, or the evaluation's scorers at weight 1 less those that measure
    rather than reward, and less the format scorers where a format reward stands for them (`has_format`)."""
    if method.rewards is not None:
        return [(reward.scorer, reward.weight) for reward in method.rewards]
    left_out = set(STATISTIC_SCORERS) | (set(FORMAT_SCORERS) if has_format else set())
    return [(name, 1.0) for name in scorers if name not in left_out]


def format_check(config: RunConfig, train: list[Example]) -> Callable[[str], bool] | None:
    """`Constraint.check` of the run's output language, or None where the run has none (free text).

    The language is constrained decoding's (`constraint_of`): an explicit evaluation.constraint, else the schema,
    the label set or the regex the config gives; without any of them, JSON only where every training answer is.
    """
    from specialist.constrain import constraint_of
    from specialist.core.scorers import score_json_valid

    evaluation, data = config.evaluation, config.data
    named = evaluation.constraint != "auto" or evaluation.json_schema or data.labels or evaluation.constraint_regex
    if not named and not all(score_json_valid(ex.completion, "") for ex in train):
        return None
    return constraint_of(config).check


def reward_functions(method: MethodConfig, config: RunConfig, train: list[Example],
                     template: PromptTemplate) -> tuple[list[Callable], list[float]]:
    """The reward functions of `method` and their weights, with the evaluation's scorer settings and the run's
    format from `config`; ConfigError when there is nothing to reward."""
    from specialist.core.labels import label_rule
    from specialist.core.scorers import resolve_scorers

    evaluation = config.evaluation
    check = format_check(config, train) if method.format_reward else None
    pairs = default_rewards(method, evaluation.scorers, has_format=check is not None)
    scorers = resolve_scorers([name for name, _ in pairs], label_rule(evaluation), evaluation.json_schema)
    stops = tuple(template.stop_strings)
    functions: list[Callable] = [ScorerReward(name, scorers[name], stops) for name, _ in pairs]
    weights = [weight for _, weight in pairs]
    if check is not None:
        functions.append(FormatReward(check, stops))
        weights.append(1.0)
    if not functions:
        raise ConfigError(
            "grpo has nothing to reward: no method.rewards, no evaluation scorer that is a goal, and no format "
            "(no schema, labels or regex, and the training answers are not all JSON)",
            hint="list the scorers to reward in method.rewards, e.g. [{scorer: exact_match, weight: 1.0}]",
        )
    return functions, weights


def check_rewards(method: MethodConfig) -> None:
    """Before anything loads: custom reward scorers import, and pytest is there for the code scorers."""
    from specialist.core.scorers import resolve_scorers

    # json_schema needs the schema file, which the run config's own check covers
    resolve_scorers([reward.scorer for reward in method.rewards or [] if reward.scorer != "json_schema"])


def completion_limit(config: RunConfig, tokenizer, train: list[Example]) -> int:
    """method.max_completion_length, else the evaluation's own answer limit (so RFT trains what evaluation scores)."""
    from specialist.generation import default_max_new_tokens

    return (config.method.max_completion_length or config.evaluation.max_new_tokens
            or default_max_new_tokens(tokenizer, train))


def prompt_dataset(examples: list[Example], template: PromptTemplate, tokenizer,
                   max_new_tokens: int) -> tuple[Any, dict[str, list[int]]]:
    """A `datasets.Dataset` of prompt (rendered), row_input (the row's own input, which scorers such as tests_pass
    read, as in evaluation) and expected, and each prompt's ids."""
    from datasets import Dataset

    from specialist.generation import encode_prompt

    rows, ids = [], {}
    for ex in examples:
        rendered = template.render_prompt(ex.prompt, tokenizer)
        ids[rendered] = encode_prompt(template, tokenizer, ex.prompt, (), max_new_tokens)
        rows.append({"prompt": rendered, "row_input": ex.prompt, "expected": ex.completion})
    return Dataset.from_list(rows), ids


def answers_per_step(method: MethodConfig, training: TrainingConfig) -> int:
    return method.generations_per_step or training.batch_size * training.gradient_accumulation_steps


def sampled_evaluation_steps(method: MethodConfig, training: TrainingConfig, val_prompts: int) -> float:
    """One GRPO evaluation in optimizer steps: it samples `eval_generations` answers to every validation prompt and
    scores them, as a step does for `answers_per_step` answers (sampling and rewards are most of a step)."""
    return val_prompts * eval_generations(method) / answers_per_step(method, training)


def eval_generations(method: MethodConfig) -> int:
    return method.eval_generations or method.num_generations


def grpo_arguments(config: RunConfig, run: RunFolder, n_train: int, has_val: bool, bf16: bool, max_new_tokens: int,
                   weights: list[float]):
    """GRPOConfig: the shared Trainer arguments, counted in answers (a step is `generations_per_step` answers, an
    epoch `num_generations` answers to every prompt), and the sampling and KL settings."""
    from trl import GRPOConfig

    method, training = config.method, config.training
    per_step = answers_per_step(method, training)
    counted_in_answers = training.model_copy(update={"batch_size": per_step, "gradient_accumulation_steps": 1})
    shared = common_arguments(counted_in_answers, run.checkpoints, n_train * method.num_generations, has_val, bf16,
                              sequence_length=training.max_length, tensorboard_dir=run.tensorboard)
    per_eval = eval_generations(method)
    shared["per_device_eval_batch_size"] = max(per_eval, per_step // per_eval * per_eval)  # whole groups
    shared["include_num_input_tokens_seen"] = "no"  # GRPO counts prompt and answer tokens itself
    if shared["load_best_model_at_end"]:  # the GRPO loss is about 0 by construction; the reward is the figure
        shared.update(metric_for_best_model="eval_reward", greater_is_better=True)
    return GRPOConfig(
        **shared,
        num_generations=method.num_generations,
        num_generations_eval=per_eval,
        max_completion_length=max_new_tokens,
        temperature=method.temperature,
        beta=method.beta,
        reward_weights=weights,
        log_completions=False,
    )


def train_grpo(job: TrainJob) -> TrainResult:
    """Reward fine-tuning on the prompts of the job's train rows (their completions are what the scorers compare
    against); the job's config supplies the evaluation's scorer settings and the output format."""
    from specialist.generation import stop_token_ids

    config, tokenizer, template = job.config, job.tokenizer, job.template
    rewards, weights = reward_functions(config.method, config, job.train, template)
    if config.method.from_adapter is not None:
        job = job.with_model(merge_adapter(job.model, config.method.from_adapter))
    # TRL samples until one of the model's EOS ids and masks what follows: make them the engine's stop ids
    job.model.generation_config.eos_token_id = stop_token_ids(tokenizer)
    max_new_tokens = completion_limit(config, tokenizer, job.train)
    train_ds, prompt_ids = prompt_dataset(job.train, template, tokenizer, max_new_tokens)
    val_ds, val_ids = prompt_dataset(job.val, template, tokenizer, max_new_tokens) if job.val else (None, {})
    args = grpo_arguments(config, job.run, len(train_ds), val_ds is not None, use_bf16_autocast(job.model, config.training.bf16),
                          max_new_tokens, weights)
    trainer_class = functools.partial(DurableGRPOTrainer, reward_funcs=rewards, prompt_ids=prompt_ids | val_ids)
    with warnings.catch_warnings():
        # TRL switches activation checkpointing off for every generation through names transformers 5 deprecates
        warnings.filterwarnings("ignore", r".*gradient_checkpointing\w*` is deprecated", FutureWarning)
        return fit(job, trainer_class, args, train_ds, val_ds, evaluation_steps=sampled_evaluation_steps(
            config.method, config.training, len(val_ds) if val_ds else 0))
