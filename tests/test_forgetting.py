import math

import pytest
import torch

from specialist.evaluate.forgetting import (
    general_text,
    knowledge_accuracy,
    knowledge_probe,
    perplexity,
    probe_prompt,
)


def test_bundled_references_are_there():
    assert len(general_text()) == 300 and len(general_text(limit=10)) == 10
    probe = knowledge_probe()
    assert len(probe) == 57 and all(q["answer"] in "ABCD" and len(q["choices"]) == 4 for q in probe)


def test_replacement_corpus_is_read_one_text_a_line(tmp_path):
    corpus = tmp_path / "docs.txt"
    corpus.write_text("first doc\n\nsecond doc\n")
    assert general_text(corpus) == ["first doc", "second doc"]


def test_batched_padded_perplexity_equals_the_per_text_reference(tiny_model):
    model, tokenizer = tiny_model
    texts = ["Dec 10 06:55:46 LabSZ sshd[24200]: Invalid user", "INFO dfs.DataNode", "null true false 0123 blk"]
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            n = ids.shape[1] - 1
            total += model(input_ids=ids, labels=ids).loss.item() * n
            count += n
    assert perplexity(model, tokenizer, texts, batch_size=2) == pytest.approx(math.exp(total / count), rel=1e-4)


def test_batched_knowledge_probe_equals_one_question_at_a_time(tiny_model):
    model, tokenizer = tiny_model
    questions = knowledge_probe()[:6]
    letter_ids = [tokenizer(f" {x}", add_special_tokens=False)["input_ids"][-1] for x in "ABCD"]
    picks = []
    with torch.no_grad():
        for q in questions:
            ids = tokenizer(probe_prompt(q), return_tensors="pt")["input_ids"]
            picks.append("ABCD"[int(model(input_ids=ids).logits[0, -1, letter_ids].argmax())])
    rigged = [dict(q, answer=p) for q, p in zip(questions, picks)]
    assert knowledge_accuracy(model, tokenizer, rigged, batch_size=4) == 1.0
    wrong = [dict(q, answer="ABCD"[("ABCD".index(p) + 1) % 4]) for q, p in zip(questions, picks)]
    assert knowledge_accuracy(model, tokenizer, wrong, batch_size=4) == 0.0
