"""propulsion_ds.train.checkpoint in one process, with a stand-in for DeepSpeed's engine.

The phases of a save run in order and each is a seam tests/fault_entry.py can wrap; a failure in
any rank-0 phase leaves the previous checkpoint and `latest` as they were and no work directory;
a load restores this rank's RNG. The kill -9 / disk-full versions run in tests/test_faults.py.
"""
from __future__ import annotations

import json
import random

import pytest
import torch

from propulsion_ds import collective, fsutil
from propulsion_ds.train import checkpoint as ck
from propulsion_ds.train.checkpointer import check_resumable
from propulsion_ds.errors import CheckpointError


class FakeEngine:
    """Writes and reads one .pt file per tag, as DeepSpeed's save_checkpoint/load_checkpoint do."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters):
        d = ck.Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        (ck.Path(save_dir) / "zero_to_fp32.py").write_text("# DeepSpeed's recovery script\n")
        torch.save({"client": client_state}, d / "zero_pp_rank_0_mp_rank_00_model_states.pt")

    def load_checkpoint(self, load_dir, tag, **kw):
        path = ck.Path(load_dir) / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt"
        return str(path), torch.load(path, weights_only=True)["client"]


def test_save_runs_its_phases_in_order_and_keeps_the_last(tmp_path, monkeypatch):
    calls = []
    for name in ("_prepare", "_write_parts", "_seal", "_rename", "_point_latest", "_prune", "_trash"):
        real = getattr(ck, name)
        monkeypatch.setattr(ck, name, lambda s, *a, _real=real, _name=name: (calls.append((_name, s.tag)), _real(s, *a))[1])
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        assert ck.save(FakeEngine(), root, step, {"step": step}, keep_last=2, fingerprint={"model": "m"}) \
            == root / f"step_{step}"
    order = ["_prepare", "_write_parts", "_seal", "_rename", "_point_latest", "_prune"]
    assert [n for n, t in calls if t == "step_2"] == order
    assert [n for n, t in calls if t == "step_6"] == order + ["_trash"]      # step_2 leaves
    assert ck.complete_steps(root) == [4, 6] and ck.latest_step(root) == 6
    assert (root / "latest").read_text() == "step_6\n"
    assert json.loads((root / "step_6" / "meta.json").read_text()) == {"step": 6, "world_size": 1, "model": "m"}
    assert not list((root / ".partial").iterdir())
    assert not list(root.glob("latest.tmp*"))


@pytest.mark.parametrize("phase", ["_seal", "_rename"])
def test_a_failed_phase_keeps_the_previous_checkpoint(tmp_path, monkeypatch, phase):
    root = tmp_path / "checkpoints"
    ck.save(FakeEngine(), root, 2, {}, keep_last=2, fingerprint={})

    def full(s, *a):
        raise OSError(28, "No space left on device", str(s.work / "meta.json"))
    monkeypatch.setattr(ck, phase, full)
    with pytest.raises(CheckpointError) as e:
        ck.save(FakeEngine(), root, 4, {}, keep_last=2, fingerprint={})
    msg = str(e.value)
    assert msg.startswith(f"could not write checkpoint step_4 under {root} ([Errno 28] No space left on device")
    assert "the disk is full" in msg and f"the previous checkpoint {root / 'step_2'} is intact" in msg
    assert ck.complete_steps(root) == [2] and ck.latest_step(root) == 2
    assert not (root / ".partial" / "step_4").exists() and not (root / "step_4").exists()


def test_a_checkpoint_lacking_a_ranks_files_is_not_sealed(tmp_path):
    """With output_dir on node-local disks rank 1's files land elsewhere: rank 0 refuses to seal."""
    s = ck._Save(tmp_path / "checkpoints", 2)
    s.work.mkdir(parents=True)
    for name in ("rng_rank0.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_rank1.pt"):
        (s.work / name).write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"^checkpoint step_2 lacks the files of rank\(s\) \[1\] \(rank 1: "
                                              r"zero_pp_rank_1_mp_rank_00_optim_states.pt\): every rank must write"):
        ck._check_every_rank_wrote(s, 2)
    (s.work / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x")
    ck._check_every_rank_wrote(s, 2)


def test_load_restores_rng_and_refuses_a_missing_rng_file(tmp_path):
    root = tmp_path / "checkpoints"
    random.seed(1)
    torch.manual_seed(1)
    ck.save(FakeEngine(), root, 2, {"step": 2}, keep_last=2, fingerprint={"model": "m"})
    want = (random.random(), torch.rand(3))
    random.seed(2)
    torch.manual_seed(2)
    check_resumable(root, 2, {"model": "m"})
    assert ck.load(FakeEngine(), root, 2) == {"step": 2}
    got = (random.random(), torch.rand(3))
    assert got[0] == want[0] and torch.equal(got[1], want[1])
    with pytest.raises(CheckpointError, match="was written with model='m', this run has model='n'"):
        check_resumable(root, 2, {"model": "n"})
    (root / "step_2" / "rng_rank0.pt").unlink()
    with pytest.raises(CheckpointError, match=r"^checkpoint .*step_2 lacks rng_rank0.pt$"):
        ck.load(FakeEngine(), root, 2)


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "latest"
    fsutil.write_text_atomic(path, "step_2\n")

    def torn(tmp):
        tmp.write_text("step_")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        fsutil.write_atomic(path, torn)
    assert path.read_text() == "step_2\n" and sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_move_aside_takes_a_directory_out_of_sight(tmp_path):
    d = tmp_path / "step_2"
    d.mkdir()
    (d / "f").write_text("x")
    trash = fsutil.move_aside(d, tmp_path / ".partial", "trash-")
    assert not d.exists() and trash.parent == tmp_path / ".partial" and trash.name.startswith("trash-step_2-")
    assert (trash / "f").read_text() == "x"


def test_agree_without_a_process_group():
    collective.agree(None, "what", ".")
    collective.agree_as_is(None)
    with pytest.raises(CheckpointError, match=r"^cannot write x \(boom"):
        collective.agree(ValueError("boom"), "cannot write x", ".")
    with pytest.raises(CheckpointError, match=r"^checkpoint x lacks y$"):
        collective.agree_as_is(CheckpointError("checkpoint x lacks y"))
