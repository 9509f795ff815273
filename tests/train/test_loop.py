"""The shared training loop: deterministic batches, schedule, checkpoints and resume."""
from __future__ import annotations

import pytest
import torch

import quantkit as qk
from quantkit.errors import DataError, QuantkitError
from quantkit.train import TrainConfig, train
from quantkit.train.loop import batch_for_step, lr_at

from measure_support import high_water_bytes, resident_bytes


def test_batches_are_a_function_of_seed_and_step(train_ids):
    cfg = TrainConfig(batch_size=3, seq_len=16, seed=5)
    assert torch.equal(batch_for_step(train_ids, cfg, 7), batch_for_step(train_ids, cfg, 7))
    assert not torch.equal(batch_for_step(train_ids, cfg, 7), batch_for_step(train_ids, cfg, 8))
    assert batch_for_step(train_ids, cfg, 0).shape == (3, 16)


def test_schedule_warms_up_then_decays_to_zero():
    cfg = TrainConfig(steps=10, lr=1.0, warmup=2)
    assert [lr_at(cfg, s) for s in (0, 1)] == [0.5, 1.0]
    assert lr_at(cfg, 2) == pytest.approx(1.0) and lr_at(cfg, 9) < 0.05
    assert lr_at(TrainConfig(steps=10, lr=0.3, schedule="constant"), 9) == 0.3


class _Interrupt(Exception):
    pass


def _interrupting(after: int):
    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += 1
        if calls["n"] > after:
            raise _Interrupt
        return m(input_ids=batch, labels=batch, use_cache=False).loss
    return loss_fn


@pytest.mark.parametrize("kind,optimizer", [("qlora", "adamw8bit"), ("qat", "adamw")])
def test_resume_from_a_checkpoint_gives_the_same_loss_curve(tiny_llama, train_ids, tmp_path, kind, optimizer):
    def fresh():
        torch.manual_seed(0)
        if kind == "qlora":  # dropout > 0: the RNG state must be restored too
            return qk.prepare_qlora(tiny_llama, r=4, alpha=8, dropout=0.1)
        return qk.prepare_qat(tiny_llama, "int4-g32", lsq=True)

    cfg = TrainConfig(steps=6, batch_size=2, seq_len=32, lr=5e-3, optimizer=optimizer, save_every=3, warmup=1)
    straight = train(fresh(), train_ids, cfg, out_dir=tmp_path / "a", progress=False)["losses"]
    with pytest.raises(_Interrupt):
        train(fresh(), train_ids, cfg, out_dir=tmp_path / "b", progress=False, loss_fn=_interrupting(4))
    resumed = train(fresh(), train_ids, cfg, out_dir=tmp_path / "b", resume=True, progress=False)
    assert resumed["resumed_at"] == 3
    assert len(resumed["losses"]) == 6
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(straight), rtol=0, atol=1e-6)
    assert straight[-1] < straight[0]


def test_resume_refuses_a_checkpoint_of_another_run(tiny_llama, train_ids, tmp_path):
    m = qk.prepare_qlora(tiny_llama, r=4)
    train(m, train_ids, TrainConfig(steps=1, batch_size=2, seq_len=16), out_dir=tmp_path, progress=False)
    with pytest.raises(QuantkitError, match="batch_size"):
        train(m, train_ids, TrainConfig(steps=2, batch_size=3, seq_len=16), out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(QuantkitError, match="nothing to resume"):
        train(m, train_ids, TrainConfig(steps=2), out_dir=tmp_path / "empty", resume=True, progress=False)


def test_bad_inputs_are_refused(tiny_llama, train_ids):
    m = qk.prepare_qlora(tiny_llama, r=4)
    with pytest.raises(DataError, match="too short"):
        train(m, train_ids[:10], TrainConfig(seq_len=32), progress=False)
    with pytest.raises(QuantkitError, match="optimizer"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(QuantkitError, match="learning rate"):
        TrainConfig(lr=0)
    with pytest.raises(QuantkitError, match="no trainable"):
        train(tiny_llama.requires_grad_(False), train_ids, TrainConfig(seq_len=16), progress=False)


def test_summary_reports_parameters_memory_and_state(tiny_llama, train_ids):
    m = qk.prepare_qlora(tiny_llama, r=4)
    rss_before = resident_bytes()
    s = train(m, train_ids, TrainConfig(steps=2, batch_size=2, seq_len=16, optimizer="adamw8bit"), progress=False)
    high_water = high_water_bytes()
    n = sum(p.numel() for p in m.parameters() if p.requires_grad)
    # the process's high-water mark at the end: at least what was resident before, at most the mark read after
    assert s["trainable_params"] == n and rss_before <= s["peak_rss_bytes"] <= high_water
    assert 0 < s["optimizer_state_bytes"] <= 0.30 * 8 * n + 64 * 4  # codes + block scales + step counters
