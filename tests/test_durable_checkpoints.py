"""The checkpoint folder rules on their own: what counts as complete, what rotation keeps, how removal is done."""

import json
import os

import pytest

from specialist.train.checkpoints import (
    COMPLETE_MARK,
    DISCARDED_PREFIX,
    checkpoint_folders,
    discard,
    is_complete,
    latest_complete_checkpoint,
    rotate,
    seal,
)


def checkpoint(parent, step, sealed=True):
    folder = parent / f"checkpoint-{step}"
    (folder / "shards").mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"w" * (100 + step))
    (folder / "optimizer.pt").write_bytes(b"o" * 50)
    (folder / "shards" / "rank1.pt").write_bytes(b"r" * 7)  # nested, as FSDP's sharded checkpoints are
    if sealed:
        seal(folder, step)
    return folder


def test_a_sealed_checkpoint_lists_every_file_with_its_size(tmp_path):
    folder = checkpoint(tmp_path, 4)
    mark = json.loads((folder / COMPLETE_MARK).read_text())
    assert mark["step"] == 4
    assert mark["files"] == {"adapter_model.safetensors": 104, "optimizer.pt": 50, "shards/rank1.pt": 7}
    assert not list(folder.glob(".*tmp"))  # the temporary mark was renamed into place
    assert is_complete(folder)


@pytest.mark.parametrize("damage", ["delete", "truncate", "grow"])
def test_a_checkpoint_that_lost_or_changed_a_file_after_sealing_is_not_complete(tmp_path, damage):
    folder = checkpoint(tmp_path, 4)
    target = folder / "shards" / "rank1.pt"
    if damage == "delete":
        target.unlink()
    else:
        target.write_bytes(b"r" * (3 if damage == "truncate" else 9))
    assert not is_complete(folder)


@pytest.mark.parametrize("mark", ["", "{", "[]", "null", '{"step": 4, "files": {}}', '{"step": 4, "files": []}',
                                  '{"step": 4, "files": {"../outside": 3}}', '{"step": 4, "files": {"OUTSIDE": 3}}'])
def test_a_damaged_or_hostile_mark_does_not_make_a_checkpoint_complete(tmp_path, mark):
    folder = checkpoint(tmp_path, 4, sealed=False)
    (tmp_path / "outside").write_bytes(b"abc")  # a file of the listed size, but not the checkpoint's
    (folder / COMPLETE_MARK).write_text(mark.replace("OUTSIDE", str(tmp_path / "outside")))
    assert not is_complete(folder)


def test_a_mark_from_an_earlier_version_still_counts(tmp_path):
    folder = checkpoint(tmp_path, 4, sealed=False)
    (folder / COMPLETE_MARK).write_text(json.dumps({"step": 4, "time": 1.0}))  # no file list then
    assert is_complete(folder)


def test_the_latest_complete_checkpoint_skips_unsealed_and_foreign_folders(tmp_path):
    checkpoint(tmp_path, 2)
    checkpoint(tmp_path, 10)
    checkpoint(tmp_path, 12, sealed=False)
    (tmp_path / "checkpoint-x").mkdir()
    (tmp_path / "checkpoint-99").write_text("a file, not a folder")
    (tmp_path / f"{DISCARDED_PREFIX}checkpoint-50").mkdir()
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"  # by step, not by name order
    assert latest_complete_checkpoint(tmp_path / "absent") is None


def test_rotation_keeps_the_newest_the_best_and_the_most_recent_up_to_the_limit(tmp_path):
    for step in (2, 4, 6, 8):
        checkpoint(tmp_path, step)
    checkpoint(tmp_path, 7, sealed=False)  # the remains of a killed save
    checkpoint(tmp_path, 10)  # from a run that went further before this one restarted it
    (tmp_path / f"{DISCARDED_PREFIX}checkpoint-1").mkdir()  # a removal a kill interrupted
    discarded = rotate(tmp_path, tmp_path / "checkpoint-8", keep=3, best=tmp_path / "checkpoint-4")
    assert [p.name for p in checkpoint_folders(tmp_path)] == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    assert sorted(p.name for p in discarded) == ["checkpoint-10", "checkpoint-2", "checkpoint-7"]
    assert not list(tmp_path.glob(f"{DISCARDED_PREFIX}*"))


@pytest.mark.parametrize(("keep", "kept"), [(1, [4, 8]), (2, [4, 8]), (None, [2, 4, 6, 8])])
def test_the_best_checkpoint_is_kept_even_beyond_the_limit(tmp_path, keep, kept):
    for step in (2, 4, 6, 8):
        checkpoint(tmp_path, step)
    rotate(tmp_path, tmp_path / "checkpoint-8", keep=keep, best=tmp_path / "checkpoint-4")
    assert [int(p.name.split("-")[1]) for p in checkpoint_folders(tmp_path)] == kept


def test_discarding_renames_out_of_the_namespace_before_removing(tmp_path, monkeypatch):
    folder = checkpoint(tmp_path, 2)
    seen = []
    real_rmtree = __import__("shutil").rmtree

    def spy(path, *args, **kwargs):
        seen.append((os.path.basename(path), sorted(p.name for p in tmp_path.iterdir())))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr("shutil.rmtree", spy)
    discard(folder)
    assert seen == [(f"{DISCARDED_PREFIX}checkpoint-2", [f"{DISCARDED_PREFIX}checkpoint-2"])]
    assert list(tmp_path.iterdir()) == []
