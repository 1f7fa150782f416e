"""training.report_to takes every tracker TrainingArguments knows, and the evaluation's figures reach the same
trackers: TensorBoard for real (events read back), wandb, mlflow, trackio and comet_ml through stand-in modules
that record what they were asked (no network, none of them installed)."""

from __future__ import annotations

import json
import sys
import types
from contextlib import contextmanager

import pytest

from specialist.config import TRACKERS, TrainingConfig, validate_config
from specialist.core.stats import Interval
from specialist.errors import ConfigError
from specialist.run_folder import RunFolder
from specialist.trackers import evaluation_scalars, log_evaluation, record_tracker_runs

REPORT = {"arms": {"base": {"scores": {"json_valid": Interval(0.25, 0.1, 0.4, "wilson", 40).as_dict()}},
                   "tuned": {"scores": {"json_valid": Interval(0.75, 0.6, 0.9, "wilson", 40).as_dict(),
                                        "exact_match": Interval(0.5, None, None, "none", 1).as_dict()}}},
          "forgetting": {"ppl_increase": 0.05, "corpus": "bundled"},
          "gates": [{"gate": "tuned.json_valid >= 0.5", "passed": True}, {"gate": "x", "passed": False}]}


@pytest.mark.parametrize("given, kept", [("wandb", ["wandb"]), (["trackio", "comet_ml"], ["trackio", "comet_ml"]),
                                         (["mlflow", "tensorboard"], ["mlflow", "tensorboard"]), ("none", []),
                                         ([], []), ("all", ["all"])])
def test_report_to_takes_the_trackers_training_arguments_knows(given, kept):
    assert TrainingConfig(report_to=given).report_to == kept


@pytest.mark.parametrize("given, words", [(["wandbb"], "did you mean 'wandb'"), (["none", "wandb"], "stands alone"),
                                          ("comet", "did you mean 'comet_ml'")])
def test_an_unknown_tracker_is_refused_with_the_close_name(given, words, tiny_config):
    tiny_config["training"]["report_to"] = given
    with pytest.raises(ConfigError, match=words):
        validate_config(tiny_config)


def test_the_tracker_list_is_the_one_transformers_has():
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    assert set(TRACKERS) == set(INTEGRATION_TO_CALLBACK)


def test_training_arguments_get_the_trackers_as_configured(tmp_path):
    from specialist.train.sft import sft_config

    args = sft_config(TrainingConfig(max_steps=1, report_to=["trackio", "mlflow"]), tmp_path, 4, bf16=False,
                      has_val=False)
    assert args.report_to == ["trackio", "mlflow"]


def test_evaluation_scalars_are_every_arms_figures_with_intervals_and_the_gates():
    scalars = evaluation_scalars(REPORT)
    assert scalars["eval/tuned/json_valid"] == 0.75 and scalars["eval/tuned/json_valid_low"] == 0.6
    assert scalars["eval/base/json_valid_high"] == 0.4 and scalars["eval/forgetting/ppl_increase"] == 0.05
    assert "eval/tuned/exact_match" in scalars and "eval/tuned/exact_match_low" not in scalars  # no interval
    assert scalars["eval/gates_passed"] == 1 and scalars["eval/gates"] == 2
    assert "eval/forgetting/corpus" not in scalars  # text is no figure
    assert "eval/tuned_x/score" in evaluation_scalars({"arms": {"tuned?x": {"scores": {"score": 1.0}}}})


def run_folder(tmp_path, recorded: dict | None = None) -> RunFolder:
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    run.metrics.write_text(json.dumps({"train": {"steps": 7}}))
    if recorded is not None:
        run.tracker_runs.write_text(json.dumps(recorded))
    return run


def test_tensorboard_gets_the_figures_beside_trainings_last_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = run_folder(tmp_path)
    assert log_evaluation(run, ["tensorboard"], REPORT) == ["tensorboard"]
    events = EventAccumulator(str(run.tensorboard))
    events.Reload()
    assert {"eval/tuned/json_valid", "eval/tuned/json_valid_high", "eval/gates_passed"} <= set(events.Tags()["scalars"])
    point = events.Scalars("eval/tuned/json_valid")[0]
    assert point.value == pytest.approx(0.75) and point.step == 7


class Recorder(types.ModuleType):
    """A tracker module stand-in: every call is kept in `calls` as (name, args, kwargs)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.calls: list[tuple] = []

    def record(self, call: str, /, *args, **kwargs):
        self.calls.append((call, args, kwargs))
        return self


def fake_wandb(recorder: Recorder, open_run=None) -> None:
    recorder.run = open_run
    recorder.init = lambda **kw: recorder.record("init", **kw)
    recorder.log = lambda data: recorder.record("log", data)
    recorder.finish = lambda: recorder.record("finish")


def fake_mlflow(recorder: Recorder) -> None:
    @contextmanager
    def start_run(run_id):
        recorder.record("start_run", run_id=run_id)
        yield

    recorder.active_run = lambda: None
    recorder.start_run = start_run
    recorder.set_tracking_uri = lambda uri: recorder.record("set_tracking_uri", uri)
    recorder.log_metrics = lambda data, step: recorder.record("log_metrics", data, step=step)


def fake_trackio(recorder: Recorder) -> None:
    recorder.init = lambda **kw: recorder.record("init", **kw)
    recorder.log = lambda data: recorder.record("log", data)
    recorder.finish = lambda: recorder.record("finish")


def fake_comet(recorder: Recorder) -> None:
    recorder.start = lambda **kw: recorder.record("start", **kw)
    recorder.log_metrics = lambda data, step: recorder.record("log_metrics", data, step=step)
    recorder.end = lambda: recorder.record("end")


RECORDED = {"wandb": {"id": "abc123", "project": "triage", "entity": "acme"},
            "mlflow": {"run_id": "r-9", "tracking_uri": "file:///tmp/mlruns"},
            "trackio": {"project": "triage", "name": "tiny", "space_id": None},
            "comet_ml": {"experiment_key": "k-1"}}


def test_the_evaluation_reopens_each_trackers_training_run_and_logs_there(tmp_path, monkeypatch):
    modules = {name: Recorder(name) for name in ("wandb", "mlflow", "trackio", "comet_ml")}
    fake_wandb(modules["wandb"])
    fake_mlflow(modules["mlflow"])
    fake_trackio(modules["trackio"])
    fake_comet(modules["comet_ml"])
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    run = run_folder(tmp_path, RECORDED)
    assert log_evaluation(run, ["wandb", "mlflow", "trackio", "comet_ml"], REPORT) == [
        "wandb", "mlflow", "trackio", "comet_ml"]
    scalars = evaluation_scalars(REPORT)
    assert modules["wandb"].calls == [("init", (), {"id": "abc123", "project": "triage", "entity": "acme",
                                                     "resume": "must"}), ("log", (scalars,), {}), ("finish", (), {})]
    assert modules["mlflow"].calls == [("set_tracking_uri", ("file:///tmp/mlruns",), {}),
                                       ("start_run", (), {"run_id": "r-9"}), ("log_metrics", (scalars,), {"step": 7})]
    assert modules["trackio"].calls[0] == ("init", (), {"project": "triage", "name": "tiny", "space_id": None,
                                                        "resume": "must"})
    assert modules["comet_ml"].calls == [("start", (), {"experiment_key": "k-1"}),
                                         ("log_metrics", (scalars,), {"step": 7}), ("end", (), {})]


def test_a_tracker_that_fails_or_has_no_recorded_run_is_skipped_and_the_rest_still_logged(tmp_path, monkeypatch):
    broken = Recorder("wandb")
    broken.run = None
    broken.init = lambda **kw: (_ for _ in ()).throw(RuntimeError("offline"))
    monkeypatch.setitem(sys.modules, "wandb", broken)
    run = run_folder(tmp_path, {"wandb": RECORDED["wandb"]})
    assert log_evaluation(run, ["wandb", "tensorboard", "mlflow", "neptune"], REPORT) == ["tensorboard"]


def test_training_records_the_open_tracker_runs_and_nothing_without_one(tmp_path, monkeypatch):
    wandb = Recorder("wandb")
    fake_wandb(wandb, open_run=types.SimpleNamespace(id="abc123", project="triage", entity="acme"))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.delitem(sys.modules, "mlflow", raising=False)
    monkeypatch.delitem(sys.modules, "trackio", raising=False)
    monkeypatch.delitem(sys.modules, "comet_ml", raising=False)
    path = tmp_path / "trackers.json"
    record_tracker_runs(path, types.SimpleNamespace(project=None))
    assert json.loads(path.read_text()) == {"wandb": RECORDED["wandb"]}
    trackio = Recorder("trackio")  # an unnamed run: trackio generated the name, and keeps it in its context
    trackio.context_vars = types.SimpleNamespace(current_run=types.SimpleNamespace(
        get=lambda: types.SimpleNamespace(project="triage", name="brisk-otter-3")))
    monkeypatch.setitem(sys.modules, "trackio", trackio)
    record_tracker_runs(path, types.SimpleNamespace(project="triage", run_name=None, trackio_space_id=None))
    assert json.loads(path.read_text())["trackio"] == {"project": "triage", "name": "brisk-otter-3",
                                                       "space_id": None}
    monkeypatch.delitem(sys.modules, "wandb")
    monkeypatch.delitem(sys.modules, "trackio")
    record_tracker_runs(tmp_path / "none.json", types.SimpleNamespace(project=None))
    assert not (tmp_path / "none.json").exists()


def test_a_run_with_tensorboard_gets_its_evaluation_in_the_same_event_folder(tiny_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from specialist.pipeline import run

    tiny_config["training"]["report_to"] = ["tensorboard"]
    tiny_config["evaluation"].update(forgetting=False, baselines=[])
    run_dir = run(validate_config(tiny_config), config_name="tiny").run_dir
    events = EventAccumulator(str(RunFolder(run_dir).tensorboard))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert any(tag.startswith("train/") for tag in tags)  # the Trainer's own curves
    assert {"eval/tuned/json_valid", "eval/base/json_valid"} <= tags
    assert events.Scalars("eval/tuned/json_valid")[0].step == 2
