"""`prepare` against hostile folders and files: it never deletes what it did not write, and a file built to break
it costs one row (with its line) or ends in a DataError naming the file, never a traceback."""

import csv
import io
import json
import os
import random

import pytest
import yaml
from typer.testing import CliRunner

from specialist.cli import app
from specialist.config import DataConfig, load_config
from specialist.data import prepare
from specialist.data.readers import iter_rows
from specialist.errors import DataError

runner = CliRunner()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def pairs(n, prefix="question"):
    return [{"prompt": f"{prefix} {i} alpha{i} beta{i} gamma{i}", "completion": f"answer{i} delta{i}"} for i in range(n)]


def run_prepare(out_dir, data_path, protect=None, **options):
    data = DataConfig.model_validate({"path": str(data_path), **options})
    return prepare(data, "lora", out_dir, 0, show_progress=False, protect=protect)


def snapshot(folder):
    """Every file under `folder` with its bytes (hidden ones too)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- the output folder ---------------------------------------------------------------------------------------


def test_prepare_into_the_folder_holding_config_and_data_is_refused_and_deletes_nothing(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    write_jsonl(project / "data.jsonl", pairs(30))
    (project / "config.yaml").write_text(yaml.safe_dump({"data": {"path": "data.jsonl"}}))
    (project / "unrelated.txt").write_text("my notes, not data")
    before = snapshot(project)
    result = runner.invoke(app, ["prepare", str(project / "config.yaml"), "--out", str(project), "--no-lengths"],
                           terminal_width=200)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "holds" in result.output and "nothing was written" in result.output
    assert snapshot(project) == before  # byte for byte, and nothing added
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]  # no scratch or renamed folder left beside it


def test_prepare_into_a_non_empty_unrelated_folder_is_refused(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", pairs(30))
    target = tmp_path / "photos"
    (target / "2024").mkdir(parents=True)
    (target / "2024" / "beach.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    before = snapshot(target)
    with pytest.raises(DataError, match="is not empty .*2024.*not written by `specialist prepare`"):
        run_prepare(target, data)
    assert snapshot(target) == before
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(DataError, match="exists and is not a folder"):
        run_prepare(tmp_path / "a_file", data)
    assert (tmp_path / "a_file").read_text() == "x"


def test_the_config_folder_is_protected_when_the_caller_names_the_config(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", pairs(30))
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "run.yaml").write_text("data: {path: ../d.jsonl}\n")
    with pytest.raises(DataError, match="holds .*run.yaml"):
        run_prepare(configs, data, protect=[configs / "run.yaml"])
    with pytest.raises(DataError, match="holds"):
        run_prepare(tmp_path, data)  # a folder above the data, even several levels up
    assert (configs / "run.yaml").read_text() == "data: {path: ../d.jsonl}\n"
    with pytest.raises(DataError, match=r"output folder .*d.jsonl is .*d.jsonl"):
        run_prepare(data, data)


def test_prepare_inside_a_data_folder_is_refused(tmp_path):
    from datasets import Dataset

    saved = tmp_path / "saved"
    Dataset.from_list(pairs(30)).save_to_disk(str(saved))
    before = snapshot(saved)
    with pytest.raises(DataError, match="lies inside"):
        run_prepare(saved / "prepared", saved)
    assert snapshot(saved) == before


def test_an_earlier_prepare_output_is_replaced_and_an_empty_folder_used(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", pairs(30))
    out = tmp_path / "out"
    out.mkdir()
    first = run_prepare(out, data)
    assert first.report["splits"]["train"] > 0
    write_jsonl(data, pairs(40, prefix="other"))
    again = run_prepare(out, data)
    assert sum(again.report["splits"].values()) == 40
    assert all(e.prompt.startswith("other") for e in again.split.train)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "out"]


def test_an_earlier_output_holding_a_users_file_is_not_replaced(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", pairs(30))
    run_prepare(tmp_path / "out", data)
    (tmp_path / "out" / "my_analysis.ipynb").write_text("{}")
    before = snapshot(tmp_path / "out")
    with pytest.raises(DataError, match="also holds \\['my_analysis.ipynb'\\]"):
        run_prepare(tmp_path / "out", data)
    assert snapshot(tmp_path / "out") == before


def test_reusing_a_prepared_folder_never_copies_over_a_users_folder(tmp_path):
    first = run_prepare(tmp_path / "prepared", write_jsonl(tmp_path / "d.jsonl", pairs(30)))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "train.jsonl").write_text("mine\n")
    with pytest.raises(DataError, match="not empty"):
        run_prepare(busy, first.folder)
    assert (busy / "train.jsonl").read_text() == "mine\n"


# ---- CSV read strictly ---------------------------------------------------------------------------------------


def test_one_unclosed_quote_costs_one_line_not_the_file(tmp_path):
    lines = ["prompt,completion", *(f"p {i} x{i} y{i},c{i}" for i in range(5)), '"oops, this quote never closes,c',
             *(f"p {i} x{i} y{i},c{i}" for i in range(5, 20_000))]
    path = tmp_path / "d.csv"
    path.write_text("\n".join(lines) + "\n")
    prepared = run_prepare(tmp_path / "out", path, dedupe={"near": False, "leakage": False})
    dropped = prepared.report["dropped"]
    assert list(dropped) == ["unclosed_quote"] and dropped["unclosed_quote"]["count"] == 1
    assert dropped["unclosed_quote"]["first"][0]["line"] == 7
    assert "reading resumed on line 8" in dropped["unclosed_quote"]["first"][0]["problem"]
    assert sum(prepared.report["splits"].values()) == 20_000


def test_a_quote_open_at_the_end_of_the_file_is_one_bad_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\n" + "".join(f"p {i} x{i},c{i}\n" for i in range(20)) + '"last row,c\n')
    rows = list(iter_rows(path))
    assert [r.line for r in rows if r.row is None] == [22]
    assert "the file ends inside it" in rows[-1].problem and len([r for r in rows if r.row]) == 20


def test_a_closed_field_longer_than_the_held_lines_is_one_field(tmp_path):
    """csv_max_field_lines only bounds what is held in memory: a longer field that closes is read again, whole."""
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\n"three\nline\nfield",ok\n"four\nline\nquoted\nfield",long\nnext,row\n')
    rows = list(iter_rows(path, csv_max_field_lines=3))
    assert rows[0].row == {"prompt": "three\nline\nfield", "completion": "ok"} and rows[0].span == 3
    assert rows[1].row == {"prompt": "four\nline\nquoted\nfield", "completion": "long"} and rows[1].line == 5
    assert rows[1].span == 4
    assert rows[-1].row == {"prompt": "next", "completion": "row"} and rows[-1].line == 9


def test_a_quote_that_never_closes_resumes_on_the_next_line_past_the_held_lines(tmp_path):
    path = tmp_path / "d.csv"
    body = "".join(f"p {i},c{i}\n" for i in range(50))
    path.write_text('prompt,completion\nfirst,row\n"never closed,x\n' + body)
    rows = list(iter_rows(path, csv_max_field_lines=3))
    bad = [r for r in rows if r.row is None]
    assert [(r.line, r.kind) for r in bad] == [(3, "unclosed_quote")] and "resumed on line 4" in bad[0].problem
    assert [r.row["completion"] for r in rows if r.row] == ["row", *(f"c{i}" for i in range(50))]
    assert rows[2].line == 4


def test_quote_rules_follow_the_csv_module(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b'prompt,completion\n"say ""hi""\r\nthere",c1\na "quote mid-field,c2\n"x"y,c3\n\n"\xef\xbb",c4\n')
    rows = list(iter_rows(path))
    assert rows[0].row == {"prompt": 'say "hi"\r\nthere', "completion": "c1"}
    assert rows[1].row == {"prompt": 'a "quote mid-field', "completion": "c2"} and rows[1].line == 4
    assert rows[2].row == {"prompt": "xy", "completion": "c3"}
    assert rows[3].row is None and rows[3].kind == "not_utf8" and rows[3].line == 7  # the blank line 6 is skipped


def test_the_quote_scanner_agrees_with_csv_dictreader_on_random_files(tmp_path):
    rng = random.Random(3)
    alphabet = ['"', ",", "\n", "\r\n", "a", "b", " ", "\t", '""']
    for trial in range(40):
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer, quoting=rng.choice([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))
        writer.writerow(["prompt", "completion"])
        for _ in range(30):
            writer.writerow(["".join(rng.choice(alphabet) for _ in range(rng.randrange(8))) for _ in range(2)])
        path = tmp_path / f"r{trial}.csv"
        path.write_text(buffer.getvalue(), newline="")
        with path.open(newline="") as handle:
            expected = [dict(row) for row in csv.DictReader(handle)]
        assert [r.row for r in iter_rows(path)] == expected, buffer.getvalue()


def test_the_bad_share_counts_physical_lines_in_csv(tmp_path):
    path = tmp_path / "d.csv"
    spread = '"one record,\n' + "spread\n" * 8 + 'over ten lines",x,extra field\n'
    path.write_text("prompt,completion\n" + "".join(f"p {i} x{i},c{i}\n" for i in range(30)) + spread)
    with pytest.raises(DataError, match=r"10 of 40 lines in .*d.csv are unusable \(25.0%"):
        run_prepare(tmp_path / "out", path)
    assert run_prepare(tmp_path / "ok", path, max_bad_fraction=0.3).report["source"]["lines_read"] == 40


def test_an_unreadable_csv_header_names_line_1(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('"prompt,completion\n' + "a,b\n" * 5)
    with pytest.raises(DataError, match=r"d.csv:1: the header line cannot be read \(a quote opened on line 1"):
        run_prepare(tmp_path / "out", path)


# ---- hostile JSON and paths ----------------------------------------------------------------------------------


def cli_validate(tmp_path, data_name, **data_options):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data": {"path": data_name, **data_options}}))
    return runner.invoke(app, ["validate", str(config)], terminal_width=300)


HOSTILE_LINES = {
    "deep": "[" * 10_000 + "]" * 10_000,
    "huge_int": '{"prompt": "p", "completion": ' + "9" * 5000 + "}",
    "nan": '{"prompt": "p", "completion": NaN}',
    "infinity": '{"prompt": "p", "completion": -Infinity}',
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_LINES))
def test_a_hostile_jsonl_row_is_a_bad_row_with_its_line(tmp_path, kind):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pairs(20)) + HOSTILE_LINES[kind] + "\n")
    prepared = run_prepare(tmp_path / "out", path)
    (problem,) = [p for entry in prepared.report["dropped"].values() for p in entry["first"]]
    assert problem["line"] == 21 and sum(prepared.report["splits"].values()) == 20
    result = cli_validate(tmp_path, "d.jsonl", max_bad_fraction=0.01)  # now too many: exit 2 with the line
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "d.jsonl:21:" in result.output.replace("\n", "")


@pytest.mark.parametrize("kind, line", [("deep", 3), ("huge_int", 3), ("nan", 3), ("infinity", 3)])
def test_a_hostile_json_array_file_fails_naming_file_and_line(tmp_path, kind, line):
    body = HOSTILE_LINES[kind] if kind == "deep" else HOSTILE_LINES[kind]
    (tmp_path / "d.json").write_text("[\n" + json.dumps(pairs(1)[0]) + ",\n" + body + "\n]\n")
    result = cli_validate(tmp_path, "d.json")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"d.json:{line}:" in result.output.replace("\n", ""), result.output


def test_a_value_too_deep_to_write_back_is_a_bad_row(tmp_path):
    deep = {"prompt": "p", "completion": json.loads("[" * 900 + "]" * 900)}
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pairs(20)) + json.dumps(deep) + "\n")
    prepared = run_prepare(tmp_path / "out", path)  # kept as JSON text or dropped as too deep, never a traceback
    assert prepared.report["rows_read"] == 21


def test_a_symlink_loop_is_named(tmp_path):
    (tmp_path / "loop.jsonl").symlink_to(tmp_path / "loop.jsonl")
    result = cli_validate(tmp_path, "loop.jsonl")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "loop.jsonl is a symlink loop" in result.output.replace("\n", "")
    assert str(load_config(tmp_path / "config.yaml").data.path) == str(tmp_path / "loop.jsonl")


def test_a_folder_or_a_pipe_given_as_the_data_file_is_named(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    result = cli_validate(tmp_path, "dir.jsonl", format="jsonl")
    assert result.exit_code == 2 and "dir.jsonl is a folder, not a file" in result.output.replace("\n", "")
    os.mkfifo(tmp_path / "pipe.jsonl")
    result = cli_validate(tmp_path, "pipe.jsonl")
    assert result.exit_code == 2 and "not a regular file" in result.output and "Traceback" not in result.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_named(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", pairs(5))
    path.chmod(0)
    result = cli_validate(tmp_path, "d.jsonl")
    assert result.exit_code == 2 and "permission denied" in result.output


def test_a_damaged_manifest_is_named_and_never_taken_for_a_prepared_folder(tmp_path):
    from specialist.data.prepare import read_manifest

    first = run_prepare(tmp_path / "out", write_jsonl(tmp_path / "d.jsonl", pairs(30)))
    assert read_manifest(first.folder)["files"]["train"]["rows"] == first.report["splits"]["train"]
    (first.folder / "manifest.json").write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(DataError, match="manifest.json cannot be read"):
        read_manifest(first.folder)
    with pytest.raises(DataError, match="not empty"):  # no longer recognised as an earlier output: kept, not replaced
        run_prepare(tmp_path / "out", tmp_path / "d.jsonl")


def _issue_report_csv(path, n=40, bad_at=None):
    """A GitHub issue-report export: title, body (stack traces up to 300 lines, with quotes and commas), label."""
    handle = io.StringIO()
    writer = csv.writer(handle, lineterminator="\n")
    writer.writerow(["title", "body", "label"])
    labels = ["bug", "feature", "question"]
    for i in range(n):
        depth = 300 if i % 4 == 0 else 230 if i % 4 == 1 else 5 + i
        trace = "\n".join(f'  File "/srv/app{i}/mod{k}.py", line {k}, in _fp_read_{i}_{k}, x="{k}"'
                          for k in range(depth))
        writer.writerow([f"crash {i} in reader{i}", f'Traceback for issue{i}, "{i}":\n{trace}\nValueError: v{i}',
                         labels[i % 3]])
    text = handle.getvalue()
    if bad_at is not None:  # a row whose quote never closes, written by hand after the good rows
        text += f'"unclosed title {bad_at}, body,bug\n' + "".join(f"after{k} t{k},b{k} w{k},bug\n" for k in range(3))
    path.write_text(text, encoding="utf-8")
    return path


def test_an_issue_report_csv_with_long_quoted_bodies_reads_with_no_junk_row(tmp_path):
    path = _issue_report_csv(tmp_path / "issues.csv")
    prepared = run_prepare(tmp_path / "out", path, prompt_template="{title}\n\n{body}", labels=["bug", "feature",
                           "question"], label_column="label")
    assert prepared.report["dropped"] == {} and sum(prepared.report["splits"].values()) == 40
    rows = {r["source_line"]: r for name in ("train", "val", "test")
            for r in map(json.loads, (tmp_path / "out" / f"{name}.jsonl").read_text().splitlines())}
    assert sorted(r["label"] for r in rows.values()) == sorted(["bug", "feature", "question"] * 13 + ["bug"])
    longest = max(rows.values(), key=lambda r: len(r["prompt"]))
    assert longest["prompt"].count("\n") == 2 + 300 + 1 and 'x="299"' in longest["prompt"]


def test_an_unclosed_quote_in_an_issue_report_costs_that_row_only(tmp_path):
    path = _issue_report_csv(tmp_path / "issues.csv", n=40, bad_at=41)
    lines = path.read_text().count("\n")
    prepared = run_prepare(tmp_path / "out", path, prompt_template="{title}\n\n{body}", labels=["bug", "feature",
                           "question"], label_column="label")
    dropped = prepared.report["dropped"]
    bad_line = lines - 3
    assert list(dropped) == ["unclosed_quote"] and dropped["unclosed_quote"]["count"] == 1
    assert dropped["unclosed_quote"]["first"][0]["line"] == bad_line
    assert f"reading resumed on line {bad_line + 1}" in dropped["unclosed_quote"]["first"][0]["problem"]
    assert sum(prepared.report["splits"].values()) == 43  # the 40 issues and the 3 rows after the broken one
