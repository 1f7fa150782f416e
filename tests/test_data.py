"""`prepare` on small hand-made files: every input format and shape, every step, every kind of bad input."""

import hashlib
import json

import pytest

from conftest import build_tiny_tokenizer
from specialist.config import DataConfig
from specialist.data import Measuring, PromptTemplate, prepare
from specialist.data.clean import Scrubber, normalize_text
from specialist.data.dedupe import MinHasher, near_duplicate_roots
from specialist.errors import DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def pairs(n, prefix="question"):
    """n rows that share no word shingles, so no dedupe step touches them."""
    return [{"prompt": f"{prefix} {i} alpha{i} beta{i} gamma{i}", "completion": f"answer{i} delta{i}"} for i in range(n)]


def run_prepare(tmp_path, data_path, method="lora", seed=0, tokenizer=None, max_length=None, **options):
    data = DataConfig.model_validate({"path": str(data_path), **options})
    template = PromptTemplate.for_tokenizer(tokenizer) if tokenizer is not None else None
    measuring = Measuring(tokenizer, template, max_length) if tokenizer is not None and max_length is not None else None
    return prepare(data, method, tmp_path / "out", seed, measuring=measuring, show_progress=False)


def all_rows(prepared):
    split = prepared.split
    return split.train + split.val + split.test


# ---- formats -------------------------------------------------------------------------------------------------


def test_every_file_format_reads_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    rows = pairs(20)
    sources = {
        "jsonl": write_jsonl(tmp_path / "d.jsonl", rows),
        "json": tmp_path / "d.json",
        "csv": tmp_path / "d.csv",
        "tsv": tmp_path / "d.tsv",
        "parquet": tmp_path / "d.parquet",
        "arrow": tmp_path / "saved",
    }
    sources["json"].write_text(json.dumps(rows))
    sources["csv"].write_text("prompt,completion\n" + "".join(f'"{r["prompt"]}",{r["completion"]}\n' for r in rows))
    sources["tsv"].write_text("prompt\tcompletion\n" + "".join(f'{r["prompt"]}\t{r["completion"]}\n' for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), sources["parquet"])
    Dataset.from_list(rows).save_to_disk(str(sources["arrow"]))
    expected = sorted(r["prompt"] for r in rows)
    for fmt, path in sources.items():
        prepared = run_prepare(tmp_path / fmt, path)
        assert prepared.report["source"]["format"] == fmt
        assert sorted(e.prompt for e in all_rows(prepared)) == expected, fmt


def test_jsonl_saved_as_json_is_read_line_by_line(tmp_path):
    path = write_jsonl(tmp_path / "d.json", pairs(10))
    assert run_prepare(tmp_path, path).report["source"]["format"] == "jsonl"


# ---- shapes --------------------------------------------------------------------------------------------------


def test_prompt_completion_aliases(tmp_path):
    rows = [{"input": f"in {i} x{i}", "output": f"out{i}"} for i in range(10)]
    prepared = run_prepare(tmp_path / "a", write_jsonl(tmp_path / "io.jsonl", rows))
    assert prepared.report["source"]["columns"] == {"prompt": "input", "completion": "output"}
    alpaca = [{"instruction": "Summarise", "input": f"text {i} y{i}", "output": f"s{i}"} for i in range(10)]
    prepared = run_prepare(tmp_path / "b", write_jsonl(tmp_path / "alpaca.jsonl", alpaca))
    assert {e.prompt for e in all_rows(prepared)} == {f"Summarise\n\ntext {i} y{i}" for i in range(10)}
    named = [{"log": f"l {i} z{i}", "json": {"k": i}} for i in range(10)]
    prepared = run_prepare(tmp_path / "c", write_jsonl(tmp_path / "named.jsonl", named),
                           prompt_column="log", completion_column="json")
    assert {e.completion for e in all_rows(prepared)} == {json.dumps({"k": i}) for i in range(10)}


def test_chat_messages_become_prompt_and_last_assistant_turn(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"hi {i} w{i}"},
                          {"role": "assistant", "content": f"hello{i}"}, {"role": "user", "content": f"and {i}?"},
                          {"role": "assistant", "content": f"done{i}"}]} for i in range(10)]
    prepared = run_prepare(tmp_path, write_jsonl(tmp_path / "chat.jsonl", rows))
    assert prepared.report["source"]["shape"] == "messages"
    example = next(e for e in all_rows(prepared) if e.completion == "done3")
    assert example.prompt == "Be brief.\n\nUser: hi 3 w3\n\nAssistant: hello3\n\nUser: and 3?"


def test_wrong_role_order_is_reported_with_its_line(tmp_path):
    good = [{"messages": [{"role": "user", "content": f"q {i} v{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(20)]
    bad = {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}
    prepared = run_prepare(tmp_path, write_jsonl(tmp_path / "chat.jsonl", [*good[:5], bad, *good[5:]]))
    dropped = prepared.report["dropped"]["role_order"]
    assert dropped["count"] == 1 and dropped["first"][0]["line"] == 6
    assert "expected [system,] user, assistant" in dropped["first"][0]["problem"]


def test_plain_text_for_continued_pretraining(tmp_path):
    rows = [{"text": f"document {i} with words{i} and more{i}"} for i in range(10)]
    prepared = run_prepare(tmp_path, write_jsonl(tmp_path / "t.jsonl", rows), method="continued_pretraining")
    assert {e.prompt for e in all_rows(prepared)} == {""} and len(all_rows(prepared)) == 10
    with pytest.raises(DataError, match="plain text rows have no answer"):
        run_prepare(tmp_path / "sft", tmp_path / "t.jsonl")


def test_preference_rows_keep_rejected_for_dpo_only(tmp_path):
    rows = [{"prompt": f"p {i} u{i}", "chosen": f"good{i}", "rejected": f"bad{i}"} for i in range(10)]
    path = write_jsonl(tmp_path / "pref.jsonl", rows)
    dpo = all_rows(run_prepare(tmp_path / "dpo", path, method="dpo"))
    assert {e.rejected for e in dpo} == {f"bad{i}" for i in range(10)}
    sft = all_rows(run_prepare(tmp_path / "sft", path))
    assert {e.completion for e in sft} == {f"good{i}" for i in range(10)} and {e.rejected for e in sft} == {None}
    with pytest.raises(DataError, match="dpo trains on preference rows"):
        run_prepare(tmp_path / "x", write_jsonl(tmp_path / "pc.jsonl", pairs(5)), method="dpo", shape="prompt_completion")


def test_labelled_rows_become_completions_through_the_template(tmp_path):
    rows = [{"text": f"ticket {i} about thing{i}", "label": ["ui", "security"][i % 2]} for i in range(20)]
    prepared = run_prepare(tmp_path, write_jsonl(tmp_path / "l.jsonl", rows), labels=["ui", "security"],
                           label_template='{"category": "{label}"}')
    assert {e.completion for e in all_rows(prepared)} == {'{"category": "ui"}', '{"category": "security"}'}
    assert prepared.report["labels"]["all"] == {"ui": 10, "security": 10}


def test_a_label_outside_the_declared_set_is_one_clear_error(tmp_path):
    rows = [{"text": f"ticket {i} z{i}", "label": "ui"} for i in range(9)] + [{"text": "t", "label": "perf"}]
    with pytest.raises(DataError) as err:
        run_prepare(tmp_path, write_jsonl(tmp_path / "l.jsonl", rows), labels=["ui", "security"])
    assert "outside data.labels" in str(err.value) and "'perf'" in str(err.value) and "l.jsonl:10" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_an_unknown_label_with_an_apostrophe_is_named_whole(tmp_path):
    rows = [{"text": f"ticket {i} z{i}", "label": "ui"} for i in range(9)] + [{"text": "t", "label": "won't fix"}]
    with pytest.raises(DataError) as err:
        run_prepare(tmp_path, write_jsonl(tmp_path / "l.jsonl", rows), labels=["ui", "security"])
    assert "e.g. [\"won't fix\"] at " in str(err.value) and "l.jsonl:10" in str(err.value)


# ---- bad input -----------------------------------------------------------------------------------------------


def test_bad_lines_are_skipped_with_file_and_line_under_the_limit(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in pairs(30)]
    lines[3] = '{"prompt": "broken", '
    lines[7] = json.dumps({"prompt": "x", "completion": "  "})
    lines[9] = json.dumps({"prompt": "only"})
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"prompt": "\xff", "completion": "b"}\n')
    prepared = run_prepare(tmp_path, path, max_bad_fraction=0.2)
    dropped = prepared.report["dropped"]
    assert dropped["malformed_json"]["first"][0]["line"] == 4
    assert dropped["empty_field"]["first"][0]["line"] == 8
    assert dropped["missing_field"]["first"][0]["line"] == 10
    assert dropped["not_utf8"]["first"][0]["line"] == 31
    assert len(all_rows(prepared)) == 27 and prepared.report["rows_read"] == 31


def test_too_many_bad_rows_stop_with_a_listing_and_write_nothing(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([json.dumps(r) for r in pairs(8)] + ["not json", "[1, 2]"]) + "\n")
    before = path.read_bytes()
    with pytest.raises(DataError) as err:
        run_prepare(tmp_path, path, max_bad_fraction=0.1)
    message = str(err.value)
    assert "2 of 10 rows" in message and f"{path}:9: malformed JSON" in message and "max_bad_fraction" in message
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    assert path.read_bytes() == before


def test_empty_file_and_unknown_column_are_clear_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="is empty"):
        run_prepare(tmp_path, tmp_path / "empty.jsonl")
    path = write_jsonl(tmp_path / "d.jsonl", pairs(5))
    with pytest.raises(DataError) as err:
        run_prepare(tmp_path, path, prompt_column="question_text")
    assert "unknown column(s) ['question_text']" in str(err.value) and "['completion', 'prompt']" in str(err.value)


def test_csv_row_with_extra_fields_is_named(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\n" + "".join(f"p {i} q{i},c{i}\n" for i in range(20)) + "a,b,c\n")
    prepared = run_prepare(tmp_path, path)
    assert prepared.report["dropped"]["malformed_row"]["first"][0]["line"] == 22


# ---- clean ---------------------------------------------------------------------------------------------------


def test_normalize_nfc_controls_and_trailing_space():
    assert normalize_text("Cafe\u0301\x00 \r\nnext  \t\n") == "Café\nnext"
    assert normalize_text("keep  inner   spacing\n\tand tabs") == "keep  inner   spacing\n\tand tabs"


def test_scrubber_replaces_every_kind_and_counts_it():
    text = ("mail bob.smith@example.com from 10.0.0.12 and fe80::1ff:fe23:4567:890a, key AKIAIOSFODNN7EXAMPLE, "
            "token sk-abcdefghijklmnopqrstuvwx12, Authorization: Bearer abcdef0123456789abcdef, "
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY----- done at 12:30:45")
    scrub = Scrubber(["email", "ipv4", "ipv6", "aws_key", "api_key", "bearer", "private_key"])
    out = scrub(text)
    for secret in ("bob.smith", "10.0.0.12", "fe80::", "AKIA", "sk-abc", "abcdef0123", "MIIE"):
        assert secret not in out
    assert "<EMAIL>" in out and "<PRIVATE_KEY>" in out and "12:30:45" in out
    assert scrub.counts == {"email": 1, "ipv4": 1, "ipv6": 1, "aws_key": 1, "api_key": 1, "bearer": 1,
                            "private_key": 1}


def test_scrub_in_prepare_is_counted_in_the_report(tmp_path):
    rows = [{"prompt": f"user {i} wrote from host{i} at ops{i}@corp.example", "completion": f"ok{i}"} for i in range(10)]
    prepared = run_prepare(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), clean={"scrub": ["email"]})
    assert prepared.report["clean"]["scrubbed"] == {"email": 10}
    assert all("<EMAIL>" in e.prompt for e in all_rows(prepared))


# ---- dedupe --------------------------------------------------------------------------------------------------


def test_exact_duplicates_fold_case_and_space_and_keep_the_first(tmp_path):
    rows = pairs(10) + [{"prompt": "QUESTION 3  alpha3 beta3 gamma3", "completion": "answer3 delta3"}]
    prepared = run_prepare(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows))
    assert prepared.report["duplicates"]["exact"] == 1
    cluster = prepared.report["duplicates"]["largest_clusters"][0]
    assert cluster == {"kind": "exact", "size": 2, "kept_line": 4, "dropped_lines": [11]}


def test_near_duplicates_are_clustered_and_the_first_kept(tmp_path):
    base = "the storage node lost its connection to the metadata service while writing block"
    rows = pairs(10) + [{"prompt": f"{base} {tail}", "completion": "error"} for tail in
                        ("blk_1 after three retries", "blk_1 after three retries today", "blk_1 after three retries now")]
    prepared = run_prepare(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), dedupe={"threshold": 0.7})
    assert prepared.report["duplicates"]["near"] == 2
    cluster = prepared.report["duplicates"]["largest_clusters"][0]
    assert cluster["kind"] == "near" and cluster["kept_line"] == 11 and cluster["dropped_lines"] == [12, 13]
    off = run_prepare(tmp_path / "off", tmp_path / "d.jsonl", dedupe={"near": False, "leakage": False})
    assert off.report["duplicates"]["near"] == 0 and len(all_rows(off)) == 13


def test_minhash_estimates_jaccard():
    hasher = MinHasher(num_perm=128, shingle_words=1)
    a = " ".join(f"w{i}" for i in range(100))
    b = " ".join(f"w{i}" for i in range(50, 150))  # Jaccard 50/150 = 0.33
    sig = hasher.signatures([a, b, a])
    assert abs((sig[0] == sig[1]).mean() - 1 / 3) < 0.12 and (sig[0] == sig[2]).all()
    roots = near_duplicate_roots(sig, threshold=0.9)
    assert roots.tolist() == [0, 1, 0]


# ---- split, leakage, balance ---------------------------------------------------------------------------------


def test_random_split_is_deterministic_and_partitions(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", pairs(100))
    first = run_prepare(tmp_path / "a", path, seed=7, val_fraction=0.1, test_fraction=0.2)
    again = run_prepare(tmp_path / "b", path, seed=7, val_fraction=0.1, test_fraction=0.2)
    other = run_prepare(tmp_path / "c", path, seed=8, val_fraction=0.1, test_fraction=0.2)
    assert first.split == again.split and first.split.test != other.split.test
    assert first.report["splits"] == {"train": 70, "val": 10, "test": 20}
    assert sorted(e.line for e in all_rows(first)) == list(range(1, 101))
    files = first.report["files"]
    assert files["val"]["sha256"] == hashlib.sha256((first.folder / "val.jsonl").read_bytes()).hexdigest()
    manifest = json.loads((first.folder / "manifest.json").read_text())
    assert manifest["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest["seed"] == 7 and manifest["steps"][0] == {"step": "read and validate", "rows_in": 100,
                                                             "rows_out": 100}


def test_stratified_split_keeps_label_shares(tmp_path):
    rows = [{**r, "label": "rare" if i % 10 == 0 else "common"} for i, r in enumerate(pairs(100))]
    prepared = run_prepare(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), split_by="stratified",
                           val_fraction=0.1, test_fraction=0.2)
    test_labels = [e.label for e in prepared.split.test]
    assert test_labels.count("rare") == 2 and test_labels.count("common") == 18


def test_grouped_split_never_shares_a_group(tmp_path):
    rows = [{**r, "template": f"T{i % 12}"} for i, r in enumerate(pairs(120))]
    prepared = run_prepare(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), split_by="grouped",
                           group_column="template")
    groups = {name: {e.group for e in part} for name, part in prepared.split.parts().items()}
    assert groups["test"] and not groups["test"] & groups["train"] and not groups["val"] & groups["train"]
    with pytest.raises(DataError, match="no 'template' value"):
        run_prepare(tmp_path / "x", write_jsonl(tmp_path / "g.jsonl", pairs(10)), split_by="grouped",
                    group_column="template")


def test_near_duplicates_across_splits_are_removed_from_test_as_leakage(tmp_path):
    base = "the storage node lost its connection to the metadata service while writing"
    near = [{"prompt": f"{base} block {i}", "completion": "x", "template": f"T{i}"} for i in range(12)]
    other = [{**r, "template": f"T{i % 12}"} for i, r in enumerate(pairs(48))]
    prepared = run_prepare(tmp_path, write_jsonl(tmp_path / "d.jsonl", near + other), split_by="grouped",
                           group_column="template", val_fraction=0.0,
                           dedupe={"near": False, "leakage": True, "threshold": 0.6})
    in_train = sum(e.prompt.startswith(base) for e in prepared.split.train)
    assert not any(e.prompt.startswith(base) for e in prepared.split.test)
    assert prepared.report["leakage"]["test"]["rows"] == 12 - in_train > 0


def test_exact_copies_across_splits_are_leakage_even_without_dedupe(tmp_path):
    rows = [{**r, "template": f"T{i % 6}"} for i, r in enumerate(pairs(36))]
    rows += [{**rows[i], "template": f"T{(i + 1) % 6}"} for i in range(6)]  # each copy lands in another group
    prepared = run_prepare(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), split_by="grouped",
                           group_column="template", val_fraction=0.0,
                           dedupe={"exact": False, "near": False, "leakage": False})
    train_prompts = {e.prompt for e in prepared.split.train}
    assert not any(e.prompt in train_prompts for e in prepared.split.test)
    assert prepared.report["leakage"]["test"]["rows"] >= 1


def test_balance_caps_and_upsamples_the_training_split_only(tmp_path):
    rows = [{**r, "label": "major" if i < 80 else "blocker"} for i, r in enumerate(pairs(100))]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    prepared = run_prepare(tmp_path, path, split_by="stratified", test_fraction=0.2, val_fraction=0.0,
                           balance={"mode": "cap_and_upsample", "max_per_class": 30, "min_per_class": 30})
    balance = prepared.report["labels"]["balance"]
    assert balance["train_before"] == {"major": 64, "blocker": 16}
    assert balance["train_after"] == {"major": 30, "blocker": 30}
    assert [e.label for e in prepared.split.test].count("blocker") == 4  # test keeps the natural share
    report_only = run_prepare(tmp_path / "r", path, balance={"mode": "report"})
    assert report_only.report["labels"]["balance"]["train_before"] == report_only.report["labels"]["balance"]["train_after"]


# ---- length --------------------------------------------------------------------------------------------------


def test_over_length_rows_are_dropped_or_have_their_input_shortened_never_their_answer(tmp_path):
    tokenizer = build_tiny_tokenizer()
    rows = pairs(20) + [{"prompt": "long " * 200, "completion": "c"}, {"prompt": "p", "completion": "long " * 200}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    dropped = run_prepare(tmp_path / "d", path, tokenizer=tokenizer, max_length=64)
    assert dropped.report["dropped"]["over_max_length"]["count"] == 2
    assert dropped.report["lengths"]["total"]["max"] > 64 and dropped.report["tokens_per_epoch"] > 0
    truncated = run_prepare(tmp_path / "t", path, tokenizer=tokenizer, max_length=64, over_length="truncate")
    # the long input is shortened and kept; the answer that alone overflows max_length is the one row dropped
    assert truncated.report["dropped"]["answer_over_max_length"]["first"][0]["line"] == 22
    assert truncated.report["dropped"]["answer_over_max_length"]["count"] == 1
    assert truncated.report["lengths"]["truncated"] == 1 and truncated.report["lengths"]["tokens_cut"] > 100
    assert any(e.line == 21 and e.completion == "c" for e in all_rows(truncated))


def test_a_dataset_left_with_no_completion_tokens_stops(tmp_path):
    tokenizer = build_tiny_tokenizer()
    rows = [{"prompt": f"p{i}", "completion": f"long answer {i} " * 40} for i in range(10)]
    with pytest.raises(DataError, match="no completion tokens remain"):
        run_prepare(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), tokenizer=tokenizer, max_length=32,
                    over_length="truncate", max_bad_fraction=1.0)


# ---- output --------------------------------------------------------------------------------------------------


def test_a_prepared_folder_is_used_as_is(tmp_path):
    first = run_prepare(tmp_path / "a", write_jsonl(tmp_path / "d.jsonl", pairs(30)))
    reused = run_prepare(tmp_path / "b", first.folder)
    assert reused.split == first.split
    assert (reused.folder / "manifest.json").read_text() == (first.folder / "manifest.json").read_text()
