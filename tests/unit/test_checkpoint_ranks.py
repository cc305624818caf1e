"""Several training processes share one checkpoints folder: only rank 0 prepares it (removing another run's
checkpoints or one cut short), the others wait at the trainer's barrier and then read what it left."""

from __future__ import annotations

import types

import pytest

from qatune import training


def stale_folder(tmp_path):
    """Checkpoints of another run, one of them complete."""
    folder = tmp_path / "ckpts"
    (folder / "checkpoint-4").mkdir(parents=True)
    (folder / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4}')
    (folder / training.FINGERPRINT).write_text("another run\n")
    return folder


def test_a_rank_other_than_0_leaves_the_folder_alone(tmp_path, monkeypatch):
    folder = stale_folder(tmp_path)
    monkeypatch.setenv("RANK", "1")
    assert training.prepare_checkpoints(folder, "this run") is False
    assert (folder / "checkpoint-4").is_dir()
    assert (folder / training.FINGERPRINT).read_text() == "another run\n"


def test_rank_0_prepares_it(tmp_path, monkeypatch):
    folder = stale_folder(tmp_path)
    monkeypatch.setenv("RANK", "0")
    assert training.prepare_checkpoints(folder, "this run") is False
    assert not (folder / "checkpoint-4").exists()
    assert (folder / training.FINGERPRINT).read_text() == "this run\n"


class Barrier:
    """A trainer whose accelerator's barrier runs rank 0's preparation when the other rank reaches it, as
    the real barrier lets rank 0 finish first."""

    def __init__(self, on_wait):
        self.on_wait, self.waited = on_wait, 0
        self.accelerator = types.SimpleNamespace(wait_for_everyone=self.wait)

    def wait(self):
        self.waited += 1
        self.on_wait()


@pytest.mark.parametrize("rank_0_resumes", [True, False])
def test_every_rank_agrees_with_rank_0_after_the_barrier(tmp_path, monkeypatch, rank_0_resumes):
    folder = tmp_path / "ckpts"
    stamp = "this run"
    # rank 0's run: the same fingerprint with a complete checkpoint (resume), or a different one (start over)
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    (folder / training.FINGERPRINT).write_text((stamp if rank_0_resumes else "old") + "\n")

    monkeypatch.setenv("RANK", "1")
    early = training.prepare_checkpoints(folder, stamp)  # before the barrier: rank 1 knows nothing yet

    def rank_0():
        monkeypatch.setenv("RANK", "0")
        answers["rank 0"] = training.prepare_checkpoints(folder, stamp)
        monkeypatch.setenv("RANK", "1")

    answers: dict[str, bool] = {}
    trainer = Barrier(rank_0)
    answers["rank 1"] = training.agreed_resume(trainer, folder, early)
    assert trainer.waited == 1
    assert answers == {"rank 0": rank_0_resumes, "rank 1": rank_0_resumes}
    monkeypatch.setenv("RANK", "0")
    assert training.agreed_resume(Barrier(lambda: None), folder, answers["rank 0"]) is rank_0_resumes
