"""Checkpoints: atomic writes, weights-only loading, clear errors."""

import os

import pytest
import torch

from minildm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def test_round_trip_keeps_tensors_and_plain_values(tmp_path):
    state = {"kind": "toy", "step": 7, "model": {"w": torch.arange(6.0).reshape(2, 3)}, "history": [{"loss": 0.5}],
             "config": {"channel_mult": (1, 2), "name": "x"}}
    path = save_checkpoint(tmp_path / "ck.pt", state)
    back = load_checkpoint(path, kind="toy")
    assert back["step"] == 7 and back["history"] == [{"loss": 0.5}]
    assert torch.equal(back["model"]["w"], state["model"]["w"])
    assert list(back["config"]["channel_mult"]) == [1, 2]


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "ck.pt", {"kind": "toy", "step": 1})

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"kind": "toy", "step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1, "a failed save must leave the previous checkpoint intact"
    assert os.listdir(tmp_path) == ["ck.pt"]


def test_missing_checkpoint_says_how_to_get_one(tmp_path):
    with pytest.raises(CheckpointError, match="No checkpoint at .*Train one first"):
        load_checkpoint(tmp_path / "nope.pt")


def test_corrupt_checkpoint_is_reported_as_corrupt(tmp_path):
    path = save_checkpoint(tmp_path / "ck.pt", {"kind": "toy", "model": {"w": torch.ones(1000)}})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated, as after a crash mid-copy
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


class _RunsCode:
    """Pickles to a call of os.system: the classic malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "minildm-checkpoint-v1", "kind": "toy", "payload": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="Refusing to load .*could execute code"):
        load_checkpoint(path)
    assert not marker.exists()


def test_wrong_kind_and_foreign_files_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "ck.pt", {"kind": "autoencoder"})
    with pytest.raises(CheckpointError, match="holds a 'autoencoder' checkpoint, but a 'ldm'"):
        load_checkpoint(path, kind="ldm")
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, plain)
    with pytest.raises(CheckpointError, match="not a minildm checkpoint"):
        load_checkpoint(plain)
