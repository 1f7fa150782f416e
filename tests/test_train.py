"""Completion-only labels, the fast loss against the plain forward, and the format shared with evaluation."""

import pytest
import torch

from specialist.config import MethodConfig, TrainingConfig
from specialist.data import Example, PromptTemplate, encode_for_training
from specialist.logits import completion_loss, label_positions
from specialist.train.sft import build_dataset, lora_config, sft_config


def make_trainer(model, tokenizer, template, tmp_path, examples):
    from specialist.train.fast_loss import CompletionOnlySFTTrainer

    args = sft_config(TrainingConfig(max_steps=1, batch_size=2, report_to=[]), tmp_path, len(examples), bf16=False,
                      has_val=False)
    return CompletionOnlySFTTrainer(
        model=model, args=args, train_dataset=build_dataset(examples, template, tokenizer),
        processing_class=tokenizer, peft_config=lora_config(MethodConfig(r=4, alpha=8)),
    )


EXAMPLES = [Example("081109 INFO dfs.DataNode: Receiving block", '{"level": "INFO"}', 1),
            Example("Dec 10 sshd[1]: Invalid user x", '{"level": null}', 2)]


def test_prompt_positions_are_masked_and_completion_positions_are_not(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    template = PromptTemplate.for_tokenizer(tokenizer, "Parse the log line into JSON.")
    trainer = make_trainer(model, tokenizer, template, tmp_path, EXAMPLES)
    for row, example in zip(trainer.train_dataset, EXAMPLES):
        prompt_len = len(template.encode_prompt(example.prompt, tokenizer))
        labels = row["labels"]
        assert all(label == -100 for label in labels[:prompt_len])
        assert labels[prompt_len:] == row["input_ids"][prompt_len:]
        assert labels[-1] == tokenizer.eos_token_id  # the model learns to stop
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert (batch["labels"][batch["input_ids"] == tokenizer.pad_token_id] == -100).all()


def test_training_prompt_tokens_equal_inference_prompt_tokens(tiny_model):
    _, tokenizer = tiny_model
    template = PromptTemplate.for_tokenizer(tokenizer, "Parse.")
    encoded = encode_for_training(template, tokenizer, "a log line", '{"a": 1}')
    prompt_ids = template.encode_prompt("a log line", tokenizer)
    assert encoded["input_ids"][: len(prompt_ids)] == prompt_ids
    assert encoded["completion_mask"] == [0] * len(prompt_ids) + [1] * (len(encoded["input_ids"]) - len(prompt_ids))
    assert prompt_ids[0] == tokenizer.bos_token_id and prompt_ids.count(tokenizer.bos_token_id) == 1


def test_template_round_trips_through_the_run_folder(tiny_model, tmp_path):
    _, tokenizer = tiny_model
    template = PromptTemplate.for_tokenizer(tokenizer, "Parse.")
    template.save(tmp_path / "template.json")
    loaded = PromptTemplate.load(tmp_path / "template.json")
    assert loaded == template
    assert loaded.render_prompt("x") == "Parse.\n\n### Input:\nx\n\n### Output:\n"


def test_chat_template_is_used_when_the_tokenizer_has_one(tiny_model):
    _, tokenizer = tiny_model
    tokenizer.chat_template = "{% for m in messages %}<bos>[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "
    template = PromptTemplate.for_tokenizer(tokenizer, "Parse.")
    assert template.kind == "chat"
    assert template.render_prompt("x", tokenizer) == "<bos>[user] Parse.\n\nx\n[assistant] "
    ids = template.encode_prompt("x", tokenizer)
    assert ids.count(tokenizer.bos_token_id) == 1  # the template's BOS, not a second one from the tokenizer


def padded_batch(tokenizer, template):
    rows = [encode_for_training(template, tokenizer, ex.prompt, ex.completion) for ex in EXAMPLES]
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.tensor(r["input_ids"])
        attention[i, :n] = 1
        labels[i, :n] = torch.tensor([t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def test_label_positions_pair_each_kept_position_with_the_next_label():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, -100, -100]])
    keep, targets = label_positions(labels)
    assert keep.tolist() == [[False, True, True, False], [True, False, False, False]]
    assert targets.tolist() == [5, 6, 7]


@pytest.mark.parametrize("chunk_rows", [None, 256, 3])  # whole, one chunk, several chunks
def test_fast_loss_and_adapter_gradients_equal_the_full_logits_reference(tiny_model, chunk_rows):
    from peft import get_peft_model

    model, tokenizer = tiny_model
    template = PromptTemplate.for_tokenizer(tokenizer, "Parse.")
    batch = padded_batch(tokenizer, template)
    model = get_peft_model(model, lora_config(MethodConfig(r=4, alpha=8)))
    for name, param in model.named_parameters():  # B starts at zero; perturb so gradients reach A too
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)

    def loss_and_grads(loss_fn):
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref_grads = loss_and_grads(lambda: model(**batch).loss)
    fast_loss, fast_grads = loss_and_grads(lambda: completion_loss(model, batch, None, chunk_rows=chunk_rows))
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-3, atol=0)
    assert ref_grads.keys() == fast_grads.keys() and len(ref_grads) > 0
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=1e-3, atol=1e-6, msg=name)


def test_chunked_loss_gives_the_tied_head_and_embedding_the_reference_gradient(tiny_model):
    """Full fine-tuning: the head weight trains (tied to the input embedding), so its gradient must match too."""
    model, tokenizer = tiny_model
    batch = padded_batch(tokenizer, PromptTemplate.for_tokenizer(tokenizer, "Parse."))
    model.train()

    def loss_and_grads(loss_fn):
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = loss_and_grads(lambda: model(**batch).loss)
    fast_loss, fast_grads = loss_and_grads(lambda: completion_loss(model, batch, None, chunk_rows=4))
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-3, atol=0)
    assert ref_grads.keys() == fast_grads.keys() and any("embed_tokens" in n for n in ref_grads)
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=1e-3, atol=1e-6, msg=name)


def test_completion_only_loss_can_be_turned_off(tiny_model, tmp_path):
    from specialist.train.fast_loss import CompletionOnlySFTTrainer

    model, tokenizer = tiny_model
    template = PromptTemplate.for_tokenizer(tokenizer, "Parse.")
    args = sft_config(TrainingConfig(max_steps=1, batch_size=2, report_to=[], completion_only_loss=False), tmp_path,
                      len(EXAMPLES), bf16=False, has_val=False)
    trainer = CompletionOnlySFTTrainer(model=model, args=args, processing_class=tokenizer,
                                       train_dataset=build_dataset(EXAMPLES, template, tokenizer),
                                       peft_config=lora_config(MethodConfig(r=4, alpha=8)))
    row = trainer.train_dataset[0]
    assert row["labels"] == row["input_ids"]


def test_evaluation_uses_the_format_stored_with_the_run(tiny_config, monkeypatch):
    """Changing the instruction in the config after training must not change the prompts evaluation builds."""
    import specialist.evaluate.runner as runner
    from specialist.config import validate_config
    from specialist.pipeline import train_only

    run_dir = train_only(validate_config(tiny_config), "tiny").run_dir
    stored = PromptTemplate.load(run_dir / "template.json")
    seen = []

    def capture(engine, examples, *args, **kwargs):
        seen.append(engine.template)
        return ["{}"] * len(examples)

    monkeypatch.setattr(runner, "generate", capture)
    tiny_config["data"]["instruction"] = "Something else entirely."
    tiny_config["evaluation"]["forgetting"] = False
    runner.evaluate_run(run_dir, validate_config(tiny_config))
    assert seen and all(t == stored for t in seen)
    assert stored.instruction == "Parse the log line into JSON."


@pytest.mark.parametrize(("tokens", "batch", "accumulation", "expected"), [
    (256, 8, 1, (1, 8)), (512, 8, 1, (2, 4)), (700, 6, 2, (2, 6)), (4096, 8, 1, (8, 1)), (None, 8, 2, (8, 2)),
])
def test_micro_batches_divide_the_batch_within_the_token_budget(tokens, batch, accumulation, expected):
    from specialist.train.common import micro_batches

    training = TrainingConfig(batch_size=batch, gradient_accumulation_steps=accumulation, micro_batch_tokens=tokens)
    assert micro_batches(training, 256) == expected


def test_micro_batched_step_matches_the_whole_batch_step(tiny_model_dir, tmp_path):
    """One optimizer step over 4 rows as 4 micro-batches gives the adapter the whole batch's update."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specialist.train.fast_loss import CompletionOnlySFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    template = PromptTemplate.for_tokenizer(tokenizer, "Parse.")
    examples = [Example(f"line {i} " * (1 + i), f'{{"n": {i}}}', i) for i in range(4)]
    adapters = []
    for tokens in (None, 8):  # whole batch; a budget smaller than a row: one row per forward pass
        training = TrainingConfig(max_steps=1, batch_size=4, report_to=[], micro_batch_tokens=tokens,
                                  learning_rate=0.05, warmup_ratio=0.0, gradient_checkpointing=False)
        args = sft_config(training, tmp_path / str(tokens), len(examples), bf16=False, has_val=False)
        args.save_strategy = "no"
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        trainer = CompletionOnlySFTTrainer(model=model, args=args, processing_class=tokenizer,
                                           train_dataset=build_dataset(examples, template, tokenizer),
                                           peft_config=lora_config(MethodConfig(r=4, alpha=8)))
        assert args.gradient_accumulation_steps == (1 if tokens is None else 4)
        trainer.train()
        adapters.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n})
    for name in adapters[0]:
        torch.testing.assert_close(adapters[1][name], adapters[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_rows_batched_together_never_see_each_other(tiny_model):
    """Perturbing one row of a padded batch leaves the other row's logits and loss terms unchanged."""
    model, tokenizer = tiny_model
    batch = padded_batch(tokenizer, PromptTemplate.for_tokenizer(tokenizer, "Parse."))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        perturbed = batch["input_ids"].clone()
        width = int(batch["attention_mask"][1].sum())
        perturbed[1, :width] = torch.randint(4, len(tokenizer), (width,))
        after = model(input_ids=perturbed, attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"][0].bool()
    torch.testing.assert_close(after[0][real], before[0][real], rtol=0, atol=1e-5)
    assert not torch.allclose(after[1, :width], before[1, :width])
