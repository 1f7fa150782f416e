"""Data features: a fixed test (and val) set, a split column, inputs built from several columns, and long inputs
shortened to fit max_length while the answer stays whole, in training, evaluation and serving alike."""

import json

import pytest
import yaml

from conftest import build_tiny_tokenizer
from specialist.config import DataConfig, load_config, validate_config
from specialist.data import Measuring, PromptTemplate, encode_for_training, prepare
from specialist.data.report import print_prepare_report
from specialist.data.template import FittedPrompt
from specialist.errors import ConfigError, DataError, SpecialistError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def pairs(n, prefix="question"):
    return [{"prompt": f"{prefix} {i} alpha{i} beta{i} gamma{i}", "completion": f"answer{i} delta{i}"} for i in range(n)]


def run_prepare(tmp_path, data_path, method="lora", tokenizer=None, max_length=None, template=None, **options):
    data = DataConfig.model_validate({"path": str(data_path), **options})
    if tokenizer is not None and template is None:
        template = PromptTemplate.for_tokenizer(tokenizer)
    measuring = Measuring(tokenizer, template, max_length) if tokenizer is not None and max_length is not None else None
    return prepare(data, method, tmp_path / "out", 0, measuring=measuring, show_progress=False)


# ---- a fixed test / val set ----------------------------------------------------------------------------------


def test_a_fixed_test_file_is_used_as_is_and_its_leaks_are_reported_not_removed(tmp_path, capsys):
    main = pairs(60)
    fixed = pairs(8, prefix="held out") + [main[3], main[17]] + [pairs(8, prefix="held out")[0]]
    data = write_jsonl(tmp_path / "train.jsonl", main)
    test = write_jsonl(tmp_path / "test.jsonl", fixed)
    prepared = run_prepare(tmp_path, data, test_path=str(test), val_fraction=0.1)
    split = prepared.split
    # every distinct test-file row is the test split, the two copies of training rows included
    assert sorted(e.prompt for e in split.test) == sorted(r["prompt"] for r in fixed)
    assert sorted(e.line for e in split.test) == list(range(1, 12))  # line 11 repeats line 1: reported, kept
    assert prepared.report["duplicates"]["fixed_kept"]["exact"] == 1
    train_and_val = {e.prompt for e in split.train + split.val}
    assert main[3]["prompt"] not in train_and_val and main[17]["prompt"] not in train_and_val
    assert len(train_and_val) == 58 and len(split.val) == 6
    leak = prepared.report["leakage"]["test"]
    assert leak["rows"] == 2 and sorted(leak["lines"]) == [9, 10] and leak["fixed"]
    assert leak["action"] == "training rows removed" and sorted(leak["train_lines"]) == [4, 18]
    fixed_report = prepared.report["fixed_sources"]["test"]
    assert fixed_report["path"] == str(test) and fixed_report["rows_read"] == 11 and fixed_report["rows_kept"] == 11
    assert prepared.report["split"] == {"by": "random", "fixed": ["test"], "ignored": ["test_fraction"], "extra_paths": []}
    manifest = json.loads((prepared.folder / "manifest.json").read_text())
    assert manifest["fixed_sources"]["test"]["sha256"] == fixed_report["sha256"]
    print_prepare_report(prepared.report)
    printed = " ".join(capsys.readouterr().err.split())
    assert "fixed test set" in printed and "2 fixed test rows (lines [9, 10]) matched a training row" in printed
    assert "duplicates in the fixed val/test set: 1 exact, 0 near, kept" in printed, printed


def test_a_fixed_test_file_with_near_duplicates_is_kept_whole_and_its_duplicates_reported(tmp_path):
    """150 log lines, a published test set: near dedupe finds the near-identical lines and removes none of them."""
    def log_line(i, user):
        return {"prompt": f"2024-05-0{i % 9 + 1} sshd[{i}]: Failed password for {user} from 10.0.{i}.9 port 22 ssh2",
                "completion": json.dumps({"event": "auth_failure", "user": user})}

    test_rows = [log_line(i, f"user{i}") for i in range(144)]
    test_rows += [{**test_rows[k], "prompt": test_rows[k]["prompt"] + " retry"} for k in range(6)]  # near copies
    test = write_jsonl(tmp_path / "test.jsonl", test_rows)
    data = write_jsonl(tmp_path / "train.jsonl", pairs(80))
    prepared = run_prepare(tmp_path, data, test_path=str(test), dedupe={"threshold": 0.7})
    assert len(prepared.split.test) == 150 and sorted(e.line for e in prepared.split.test) == list(range(1, 151))
    duplicates = prepared.report["duplicates"]
    assert duplicates["near"] == 0 and duplicates["fixed_kept"]["near"] >= 6
    fixed_clusters = [c for c in duplicates["largest_clusters"] if c.get("kept_in_fixed_split")]
    assert fixed_clusters and all("duplicate_lines" in c and "dropped_lines" not in c for c in fixed_clusters)
    assert prepared.report["fixed_sources"]["test"]["rows_kept"] == 150


def test_duplicates_in_the_training_file_are_still_removed_beside_a_fixed_test_file(tmp_path):
    rows = pairs(40)
    data = write_jsonl(tmp_path / "train.jsonl", rows + rows[:3])
    test = write_jsonl(tmp_path / "test.jsonl", pairs(10, prefix="held out") * 2)
    prepared = run_prepare(tmp_path, data, test_path=str(test))
    assert prepared.report["duplicates"]["exact"] == 3 and prepared.report["duplicates"]["fixed_kept"]["exact"] == 10
    assert len(prepared.split.train) + len(prepared.split.val) == 40 and len(prepared.split.test) == 20


def test_fixed_split_leakage_can_drop_from_the_test_set_or_keep_both(tmp_path):
    main = pairs(40)
    data = write_jsonl(tmp_path / "train.jsonl", main)
    test = write_jsonl(tmp_path / "test.jsonl", pairs(6, prefix="held out") + [main[5]])
    from_test = run_prepare(tmp_path / "a", data, test_path=str(test), dedupe={"fixed_split_leakage": "drop_from_fixed"})
    assert main[5]["prompt"] not in {e.prompt for e in from_test.split.test}
    assert main[5]["prompt"] in {e.prompt for e in from_test.split.train + from_test.split.val}
    assert from_test.report["leakage"]["test"]["action"] == "removed from test"
    kept = run_prepare(tmp_path / "b", data, test_path=str(test), dedupe={"fixed_split_leakage": "keep"})
    assert main[5]["prompt"] in {e.prompt for e in kept.split.test}
    assert main[5]["prompt"] in {e.prompt for e in kept.split.train + kept.split.val}
    assert kept.report["leakage"]["test"]["rows"] == 1


def test_fixed_val_and_test_files_leave_the_main_file_to_train(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", pairs(30))
    val = write_jsonl(tmp_path / "val.jsonl", pairs(4, prefix="validation"))
    test = tmp_path / "test.csv"
    test.write_text("prompt,completion\n" + "".join(f"held out {i} z{i},c{i}\n" for i in range(5)))
    prepared = run_prepare(tmp_path, data, val_path=str(val), test_path=str(test), max_examples=10)
    assert prepared.report["splits"] == {"train": 10, "val": 4, "test": 5}  # max_examples never cuts a fixed set
    assert {e.prompt for e in prepared.split.val} == {r["prompt"] for r in pairs(4, prefix="validation")}
    assert prepared.report["fixed_sources"]["test"]["format"] == "csv"


def test_a_fixed_test_file_is_validated_like_the_data(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", pairs(30))
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in pairs(20, prefix="held out")) + "not json\n")
    prepared = run_prepare(tmp_path / "a", data, test_path=str(test))
    dropped = prepared.report["fixed_sources"]["test"]["dropped"]
    assert dropped["malformed_json"]["first"][0]["line"] == 21 and not prepared.report["dropped"]
    test.write_text('{"prompt": "p", "completion": "c"}\nnot json\n')
    with pytest.raises(DataError, match=r"(?s)1 of 2 rows in .*test.jsonl are unusable.*test.jsonl:2: malformed JSON"):
        run_prepare(tmp_path / "b", data, test_path=str(test))
    write_jsonl(test, [{"question_text": "q", "completion": "c"}])
    with pytest.raises(DataError, match=r"test.jsonl:1: cannot tell the shape"):
        run_prepare(tmp_path / "c", data, test_path=str(test))
    with pytest.raises(DataError, match="data file not found: .*missing.jsonl"):
        run_prepare(tmp_path / "d", data, test_path=str(tmp_path / "missing.jsonl"))


def test_fixed_paths_resolve_from_the_config_file_and_are_never_overwritten(tmp_path):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", pairs(30))
    write_jsonl(tmp_path / "data" / "test.jsonl", pairs(5, prefix="held out"))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": {"path": "data/train.jsonl", "test_path": "data/test.jsonl"}}))
    loaded = load_config(config)
    assert loaded.data.test_path == (tmp_path / "data" / "test.jsonl").resolve()
    before = (tmp_path / "data" / "test.jsonl").read_bytes()
    with pytest.raises(DataError, match="holds"):
        prepare(loaded.data, "lora", tmp_path / "data", 0, show_progress=False)
    assert (tmp_path / "data" / "test.jsonl").read_bytes() == before
    with pytest.raises(ConfigError, match="split_column and test_path"):
        validate_config({"data": {"path": "d.jsonl", "test_path": "t.jsonl", "split_column": "split"}})


def test_a_prepared_folder_refuses_a_second_split(tmp_path):
    first = run_prepare(tmp_path / "a", write_jsonl(tmp_path / "d.jsonl", pairs(30)))
    with pytest.raises(DataError, match="prepared folder, whose split is already fixed"):
        run_prepare(tmp_path / "b", first.folder, test_path=str(tmp_path / "d.jsonl"))


# ---- a split column ------------------------------------------------------------------------------------------


def test_a_split_column_decides_each_row_and_other_values_are_bad_rows(tmp_path):
    rows = [{**r, "split": ["train", "train", "train", "val", "test"][i % 5]} for i, r in enumerate(pairs(40))]
    rows[7]["split"] = "validation"
    rows[8]["split"] = " test "  # spaces around are forgiven, other spellings are not
    rows[9].pop("split")
    prepared = run_prepare(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), split_column="split",
                           max_bad_fraction=0.1)
    by_line = {e.line: name for name, part in prepared.split.parts().items() for e in part}
    expected = {i + 1: r["split"].strip() for i, r in enumerate(rows) if r.get("split") in ("train", "val", "test",
                                                                                           " test ")}
    assert by_line == expected
    bad = prepared.report["dropped"]["bad_split_value"]
    assert bad["count"] == 2 and [p["line"] for p in bad["first"]] == [8, 10]
    assert "'validation'" in bad["first"][0]["problem"] and "exactly train, val or test" in bad["first"][0]["problem"]
    assert prepared.report["split"]["by"] == "column 'split'"


def test_a_split_column_keeps_test_rows_that_copy_training_rows(tmp_path):
    rows = [{**r, "split": "train"} for r in pairs(20)] + [{**pairs(20)[4], "split": "test"},
                                                           {**pairs(3, "held")[0], "split": "test"}]
    prepared = run_prepare(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), split_column="split")
    assert {e.line for e in prepared.split.test} == {21, 22}
    assert pairs(20)[4]["prompt"] not in {e.prompt for e in prepared.split.train}
    assert prepared.report["leakage"]["test"]["train_lines"] == [5]


def test_a_split_column_must_exist_and_excludes_split_by(tmp_path):
    with pytest.raises(DataError, match=r"unknown column\(s\) \['split'\].*data.split_column"):
        run_prepare(tmp_path, write_jsonl(tmp_path / "d.jsonl", pairs(10)), split_column="split")
    with pytest.raises(ConfigError, match="split_column decides every row's split"):
        validate_config({"data": {"path": "d.jsonl", "split_column": "split", "split_by": "stratified"}})


# ---- inputs from several columns -----------------------------------------------------------------------------


def test_a_prompt_template_builds_the_input_from_two_columns(tmp_path):
    rows = [{"title": f"Title {i}", "body": f"body text {i} w{i}", "answer": f"a{i}"} for i in range(10)]
    rows[4].pop("body")
    rows[6]["body"] = None
    prepared = run_prepare(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), prompt_template="{title}\n\n{body}",
                           max_bad_fraction=0.3)
    by_line = {e.line: e for e in prepared.split.train + prepared.split.val + prepared.split.test}
    assert by_line[1].prompt == "Title 0\n\nbody text 0 w0" and by_line[1].completion == "a0"
    missing = prepared.report["dropped"]["missing_field"]
    assert [p["line"] for p in missing["first"]] == [5, 7] and "['body']" in missing["first"][0]["problem"]
    assert prepared.report["source"]["prompt_template_columns"] == ["title", "body"]


def test_a_prompt_template_feeds_labelled_rows(tmp_path):
    rows = [{"subject": f"Login fails {i}", "body": f"error {i} z{i}", "label": ["bug", "question"][i % 2]}
            for i in range(12)]
    prepared = run_prepare(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows),
                           prompt_template="Subject: {subject}\n{body}", label_template='{"type": "{label}"}')
    example = next(e for e in prepared.split.train + prepared.split.test + prepared.split.val if e.line == 2)
    assert prepared.report["source"]["shape"] == "labelled"
    assert example.prompt == "Subject: Login fails 1\nerror 1 z1" and example.completion == '{"type": "question"}'


def test_a_prompt_template_naming_an_unknown_column_is_one_clear_error(tmp_path):
    rows = [{"title": f"t{i}", "body": f"b{i}", "completion": f"c{i}"} for i in range(5)]
    with pytest.raises(DataError) as err:
        run_prepare(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), prompt_template="{title}\n{bdoy}")
    message = str(err.value)
    assert "unknown column(s) ['bdoy'] in data.prompt_template" in message
    assert "['body', 'completion', 'title']" in message and "d.jsonl:1" in message


@pytest.mark.parametrize("template, problem", [("{}", "positional"), ("{0}", "positional"),
                                               ("{a.__class__}", "attribute"), ("{a!r}", "conversions"),
                                               ("no columns", "names no column"), ("{a", "expected '}'")])
def test_a_malformed_prompt_template_is_a_config_error(template, problem):
    with pytest.raises(ConfigError, match="data.prompt_template") as err:
        validate_config({"data": {"path": "d.jsonl", "prompt_template": template}})
    assert problem in str(err.value)


# ---- long inputs shortened, answers kept ---------------------------------------------------------------------

LONG_TEXT = " ".join(f"w{i}" for i in range(150))  # far over the 48-token budget below


@pytest.mark.parametrize("side", ["right", "left", "middle"])
def test_every_long_labelled_row_survives_truncation_with_its_label_intact(tmp_path, side):
    tokenizer = build_tiny_tokenizer()
    rows = [{"text": f"case{i} {LONG_TEXT} end{i}", "label": ["INFO", "WARN", "ERROR"][i % 3]} for i in range(12)]
    template = PromptTemplate.for_tokenizer(tokenizer, "Classify.", max_length=48, truncate_side=side)
    prepared = run_prepare(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), tokenizer=tokenizer, max_length=48,
                           template=template, over_length="truncate", truncate_side=side,
                           dedupe={"near": False, "exact": False, "leakage": False})
    assert sum(prepared.report["splits"].values()) == 12 and not prepared.report["dropped"]
    assert prepared.report["lengths"]["truncated"] == 12 and prepared.report["lengths"]["tokens_cut"] > 12 * 100
    for example in prepared.split.train + prepared.split.val + prepared.split.test:
        assert example.prompt == next(r["text"] for r in rows if r["text"].startswith(f"case{example.line - 1} "))
        encoded = encode_for_training(template, tokenizer, example.prompt, example.completion)
        assert len(encoded["input_ids"]) <= 48
        answer = [t for t, m in zip(encoded["input_ids"], encoded["completion_mask"], strict=True) if m]
        assert tokenizer.decode(answer) == example.completion + "<eos>"
        prompt = tokenizer.decode([t for t, m in zip(encoded["input_ids"], encoded["completion_mask"]) if not m])
        head, tail = f"case{example.line - 1} ", f" end{example.line - 1}"
        assert "Classify." in prompt and prompt.endswith("### Output:\n")
        assert (head in prompt) == (side in ("right", "middle")) and (tail in prompt) == (side in ("left", "middle"))
        assert "w75 " not in prompt  # the middle of the input is what every side can spare


def test_a_row_is_dropped_only_when_instruction_and_answer_alone_overflow(tmp_path):
    tokenizer = build_tiny_tokenizer()
    rows = pairs(20) + [{"prompt": LONG_TEXT, "completion": "short"}, {"prompt": "p", "completion": LONG_TEXT}]
    prepared = run_prepare(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), tokenizer=tokenizer, max_length=64,
                           over_length="truncate", dedupe={"near": False})  # prepare adds truncation to the template
    assert prepared.report["lengths"]["truncated"] == 1
    dropped = prepared.report["dropped"]["answer_over_max_length"]
    assert dropped["count"] == 1 and dropped["first"][0]["line"] == 22
    assert "even an empty input leaves no room" in dropped["first"][0]["problem"]
    assert 21 in {e.line for e in prepared.split.train + prepared.split.val + prepared.split.test}
    assert prepared.report["lengths"]["truncate_side"] == "right"


def test_evaluation_and_serving_fit_the_prompt_into_max_length_minus_new_tokens():
    tokenizer = build_tiny_tokenizer()
    template = PromptTemplate.for_tokenizer(tokenizer, "Parse.", max_length=128, truncate_side="left")
    budget = template.prompt_budget(max_new_tokens=16)
    assert budget == 112
    ids = template.encode_prompt(LONG_TEXT, tokenizer, budget=budget)
    assert len(ids) <= 112 and tokenizer.decode(ids).rstrip().endswith("w149\n\n### Output:")
    fitted = template.fit_prompt(LONG_TEXT, tokenizer, budget=budget)
    assert fitted.fits and fitted.ids == ids and fitted.tokens_cut == len(template.encode_prompt(LONG_TEXT, tokenizer)) - len(ids)
    shots = [("example input", "example output")]
    with_shots = template.fit_prompt(LONG_TEXT, tokenizer, shots, budget=budget)
    assert with_shots.fits and "example output" in tokenizer.decode(with_shots.ids)  # shots are never cut
    short = template.fit_prompt("short", tokenizer, budget=budget)
    assert short == FittedPrompt(template.encode_prompt("short", tokenizer), 0, True)
    impossible = template.fit_prompt(LONG_TEXT, tokenizer, budget=3)
    assert not impossible.fits and "w1" not in tokenizer.decode(impossible.ids)  # shortest: the input emptied


def test_truncation_is_off_without_both_settings_and_for_old_template_files(tmp_path):
    tokenizer = build_tiny_tokenizer()
    full = PromptTemplate.for_tokenizer(tokenizer).encode_prompt(LONG_TEXT, tokenizer)
    for template in (PromptTemplate.for_tokenizer(tokenizer, max_length=32),
                     PromptTemplate.for_tokenizer(tokenizer, truncate_side="right")):
        assert not template.truncates and template.prompt_budget(8) is None
        assert template.encode_prompt(LONG_TEXT, tokenizer, budget=16) == full
    old = tmp_path / "template.json"
    old.write_text(json.dumps({"kind": "builtin", "instruction": "Parse.", "eos_token": "<eos>", "chat_template": None}))
    loaded = PromptTemplate.load(old)
    assert loaded.max_length is None and loaded.truncate_side is None and loaded.prompt_budget(10) is None
    saved = PromptTemplate.for_tokenizer(tokenizer, "Parse.", max_length=64, truncate_side="middle")
    saved.save(tmp_path / "new.json")
    assert PromptTemplate.load(tmp_path / "new.json") == saved
    old.write_text(json.dumps({"kind": "builtin", "instruction": "", "eos_token": "<eos>", "from_the_future": 1}))
    with pytest.raises(SpecialistError, match="from_the_future"):
        PromptTemplate.load(old)
    with pytest.raises(ValueError, match="truncate_side"):
        PromptTemplate("builtin", "", "<eos>", max_length=8, truncate_side="top")


def test_a_chat_template_prompt_is_fitted_too():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    template = PromptTemplate.for_tokenizer(tokenizer, "Parse.", max_length=40, truncate_side="right")
    fitted = template.fit_prompt(LONG_TEXT, tokenizer, budget=30)
    assert template.kind == "chat" and fitted.fits and len(fitted.ids) <= 30
    assert tokenizer.decode(fitted.ids).endswith("<assistant>")


class GrowingTokenizer:
    """One token a character, but decoding adds two characters: every re-encode of a cut grows."""

    eos_token = "<eos>"

    def __init__(self):
        self.calls = 0

    def __call__(self, text, add_special_tokens=True):
        self.calls += 1
        encode = lambda t: [ord(c) for c in t]  # noqa: E731
        return {"input_ids": [encode(t) for t in text] if isinstance(text, list) else encode(text)}

    def decode(self, ids, **_):
        return "".join(chr(i) for i in ids) + "~~"


def test_fitting_ends_on_a_tokenizer_that_grows_on_re_encode():
    tokenizer = GrowingTokenizer()
    template = PromptTemplate("builtin", "", "<eos>", max_length=200, truncate_side="right")
    fitted = template.fit_prompt("x" * 5000, tokenizer, budget=100)
    assert fitted.fits and len(fitted.ids) <= 100 and tokenizer.calls < 20
    hopeless = template.fit_prompt("x" * 5000, tokenizer, budget=5)  # the scaffolding alone is longer
    assert not hopeless.fits and tokenizer.calls < 60
