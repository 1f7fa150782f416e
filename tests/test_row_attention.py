"""Padding-free training: the rows of a micro-batch laid end to end give the padded batch's loss and gradients, with
attention computed one row at a time (specialist.train.row_attention), on Llama and on Gemma 3's sliding window."""

from contextlib import nullcontext

import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from specialist.config import MethodConfig, TrainingConfig
from specialist.data import Example, PromptTemplate
from specialist.logits import completion_loss
from specialist.train.row_attention import NAME, attending_by_rows, rows_attention, sliding_mask
from specialist.train.sft import build_dataset, lora_config, sft_config, trains_padding_free

ROWS = [Example("081109 INFO dfs.DataNode: Receiving block blk_1 src /10.0.0.1", '{"level": "INFO"}', 1),
        Example("Dec 10 sshd[1]: Invalid user x", '{"level": null}', 2),
        Example("a " * 14, '{"level": "WARN", "component": "a"}', 3)]


def tiny_gemma3(tokenizer, window: int = 3):
    """Gemma 3's text model, tiny, with a sliding window shorter than every row and grouped key/value heads."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=window,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, attn_implementation="sdpa")
    return Gemma3ForCausalLM(config)


def with_lora(model):
    from peft import get_peft_model

    model = get_peft_model(model, lora_config(MethodConfig(r=4, alpha=8)))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # zero at init: a nonzero B makes every adapter weight's gradient nonzero
            torch.nn.init.normal_(parameter, std=0.1)
    return model


def batch(tokenizer, padding_free: bool):
    rows = build_dataset(ROWS, PromptTemplate.for_tokenizer(tokenizer, "Parse."), tokenizer)
    features = [{"input_ids": r["input_ids"],
                 "labels": [t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])]} for r in rows]
    return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=padding_free)(features)


def loss_and_gradients(model, inputs):
    model.zero_grad()
    loss = completion_loss(model, inputs, None)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_padding_free_rows_give_the_padded_batch_loss_and_gradients(tiny_model, architecture):
    base, tokenizer = tiny_model
    model = with_lora(base if architecture == "llama" else tiny_gemma3(tokenizer))
    padded = batch(tokenizer, padding_free=False)
    flat = batch(tokenizer, padding_free=True)
    assert flat["input_ids"].shape[0] == 1 and flat["input_ids"].numel() < padded["input_ids"].numel()
    reference_loss, reference = loss_and_gradients(model, padded)
    with attending_by_rows(model) as by_rows:
        assert by_rows
        loss, gradients = loss_and_gradients(model, flat)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
    assert len(gradients) == len(reference) > 0
    for name, gradient in gradients.items():
        assert reference[name].abs().sum() > 0, name
        torch.testing.assert_close(gradient, reference[name], rtol=1e-4, atol=1e-6, msg=name)


def test_one_mask_over_the_whole_sequence_is_what_row_attention_replaces(tiny_model):
    """Without the row attention, the same padding-free batch (one transformers mask) gives the same loss: the
    rows are kept apart either way, only the cost differs."""
    base, tokenizer = tiny_model
    model = with_lora(tiny_gemma3(tokenizer))
    flat = batch(tokenizer, padding_free=True)
    whole_mask, _ = loss_and_gradients(model, flat)
    with attending_by_rows(model):
        by_rows, _ = loss_and_gradients(model, flat)
    torch.testing.assert_close(by_rows, whole_mask, rtol=1e-5, atol=1e-6)


def test_a_row_sees_nothing_of_the_row_before_it(tiny_model):
    """Changing the first row's tokens leaves the second row's outputs unchanged."""
    base, tokenizer = tiny_model
    model = tiny_gemma3(tokenizer).eval()
    flat = batch(tokenizer, padding_free=True)
    second = slice(int(flat["cu_seq_lens_q"][1]), int(flat["cu_seq_lens_q"][2]))
    changed = flat["input_ids"].clone()
    changed[0, 1:second.start] = torch.randint(4, len(tokenizer), (second.start - 1,))
    keys = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    with torch.no_grad(), attending_by_rows(model):
        before = model(input_ids=flat["input_ids"], **{k: flat[k] for k in keys}).logits
        after = model(input_ids=changed, **{k: flat[k] for k in keys}).logits
    torch.testing.assert_close(after[0, second], before[0, second], rtol=0, atol=1e-5)
    assert not torch.allclose(after[0, 1:second.start], before[0, 1:second.start])


def test_calls_without_row_boundaries_are_sdpa_unchanged(tiny_model):
    """Generation and padded batches under the context: the same logits as plain sdpa."""
    base, tokenizer = tiny_model
    model = tiny_gemma3(tokenizer).eval()
    padded = batch(tokenizer, padding_free=False)
    with torch.no_grad():
        reference = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        with attending_by_rows(model):
            logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
            generated = model.generate(padded["input_ids"][:1, :5], max_new_tokens=4, do_sample=False)
        plain = model.generate(padded["input_ids"][:1, :5], max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-6)
    assert generated.tolist() == plain.tolist()


def test_the_model_attends_with_sdpa_again_after_the_context_even_when_training_raised(tiny_model):
    base, tokenizer = tiny_model
    model = with_lora(tiny_gemma3(tokenizer))
    with pytest.raises(RuntimeError, match="killed"), attending_by_rows(model):
        assert model.get_base_model().config._attn_implementation == NAME
        raise RuntimeError("killed")
    assert model.get_base_model().config._attn_implementation == "sdpa"


def test_a_model_not_on_sdpa_is_left_as_it_is(tiny_model):
    base, tokenizer = tiny_model
    model = tiny_gemma3(tokenizer)
    model.set_attn_implementation("eager")
    with attending_by_rows(model) as by_rows:
        assert not by_rows
        assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("length, window, expected", [(3, 3, None), (4, None, None), (3, 10, None)])
def test_rows_within_the_window_attend_causally_without_a_mask(length, window, expected):
    assert sliding_mask(length, window, "cpu") is expected


def test_a_row_longer_than_the_window_sees_the_window_before_each_token():
    mask = sliding_mask(5, 2, "cpu")
    assert mask.tolist() == [[True, False, False, False, False], [True, True, False, False, False],
                             [False, True, True, False, False], [False, False, True, True, False],
                             [False, False, False, True, True]]


def test_a_cached_call_goes_to_sdpa_whatever_row_boundaries_came_with_it():
    """A cache (query shorter than the keys) goes to sdpa, whatever row boundaries came with it."""
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 1
    query, key = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 6, 8)
    out, _ = rows_attention(module, query, key, key, None, cu_seq_lens_q=torch.tensor([0, 1]))
    reference = torch.nn.functional.scaled_dot_product_attention(query, key, key)
    torch.testing.assert_close(out, reference.transpose(1, 2))


def test_padding_free_resolves_on_cpu_and_never_packs_plain_text(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert trains_padding_free(TrainingConfig())
    assert not trains_padding_free(TrainingConfig(), plain_text=True)
    assert not trains_padding_free(TrainingConfig(padding_free=False))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not trains_padding_free(TrainingConfig())
    assert trains_padding_free(TrainingConfig(padding_free=True))


@pytest.mark.parametrize("value", ["sometimes", 2, None, [True]])
def test_padding_free_accepts_a_bool_or_auto_only(value):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="padding_free"):
        TrainingConfig(padding_free=value)


def test_padding_free_rows_are_cut_to_max_length_as_padded_ones_are(tiny_model, tmp_path):
    _, tokenizer = tiny_model
    rows = build_dataset(ROWS, PromptTemplate.for_tokenizer(tokenizer, "Parse."), tokenizer, max_length=10)
    assert all(len(r["input_ids"]) == len(r["completion_mask"]) <= 10 for r in rows)
    whole = build_dataset(ROWS, PromptTemplate.for_tokenizer(tokenizer, "Parse."), tokenizer)
    assert [r["input_ids"][:10] for r in whole] == [r["input_ids"] for r in rows]
    args = sft_config(TrainingConfig(padding_free=True, report_to=[]), tmp_path, 3, bf16=False, has_val=False)
    assert args.padding_free and args.max_length is None  # TRL does not cut padding-free rows: build_dataset does


def test_a_padding_free_trainer_step_gives_the_padded_step_update(tiny_model_dir, tmp_path):
    """Through TRL's trainer and collator: one optimizer step, padding-free against padded, the same adapter (plain
    SGD: Adam's first step is the sign of each gradient entry, which rounding flips where an entry is near 0)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specialist.train.fast_loss import CompletionOnlySFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    template = PromptTemplate.for_tokenizer(tokenizer, "Parse.")
    adapters = {}
    for free in (False, True):
        training = TrainingConfig(max_steps=1, batch_size=3, report_to=[], micro_batch_tokens=None, max_length=64,
                                  learning_rate=0.05, warmup_ratio=0.0, padding_free=free)
        args = sft_config(training, tmp_path / str(free), len(ROWS), bf16=False, has_val=False)
        args.save_strategy, args.optim = "no", "sgd"
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        trainer = CompletionOnlySFTTrainer(model=model, args=args, processing_class=tokenizer,
                                           train_dataset=build_dataset(ROWS, template, tokenizer,
                                                                       64 if free else None),
                                           peft_config=lora_config(MethodConfig(r=4, alpha=8)))
        with attending_by_rows(model) if free else nullcontext():
            shapes = [tuple(b["input_ids"].shape) for b in trainer.get_train_dataloader()]
            trainer.train()
        assert shapes[0][0] == (1 if free else 3)
        adapters[free] = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert any(v.abs().sum() > 0 for n, v in adapters[True].items() if "lora_B" in n)  # the step moved B
    for name, value in adapters[True].items():
        torch.testing.assert_close(value, adapters[False][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["dpo", "classifier", "continued_pretraining", "grpo"])
def test_padding_free_asked_for_a_method_without_prompt_completion_rows_is_refused(kind):
    from specialist.config import validate_config
    from specialist.errors import ConfigError

    raw = {"data": {"path": "data.jsonl"}, "method": {"kind": kind}, "training": {"padding_free": True}}
    if kind == "classifier":
        raw["data"]["shape"] = "labelled"
    with pytest.raises(ConfigError, match="training.padding_free: auto"):
        validate_config(raw)
    raw["training"]["padding_free"] = "auto"  # auto leaves such a method padded, as it is
    try:
        validate_config(raw)
    except ConfigError as exc:
        assert "padding_free" not in str(exc)
