import json
import math

import pytest
import torch
import yaml

from calray.engine.checkpoint import load_checkpoint
from calray.errors import TrainingError
from calray.engine.trainer import Trainer, train


def read_rows(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_learns_above_chance_and_writes_outputs(tiny_cfg):
    cfg = tiny_cfg(optim={"name": "sgd", "lr": 0.05, "epochs": 4})
    summary = train(cfg)
    run_dir = cfg.run_dir()
    assert summary["test_acc"] > 0.6  # 4 classes: chance is 0.25
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "env.json", "data_info.json",
                 "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (run_dir / name).is_file(), name
    rows = read_rows(run_dir)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    for key in ("train_loss", "val_acc", "val_macro_f1", "val_acc_audio", "W_audio", "a_visual", "beta_audio",
                "I_audio", "phi_visual", "R_audio", "D_visual"):
        assert key in rows[-1], key
    env = json.loads((run_dir / "env.json").read_text())
    assert env["versions"]["torch"] and env["seeds"]["runtime"] == 0
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["optim"]["epochs"] == 4 and saved["method"]["lambda"] == 0.1
    # model selection on validation: the best epoch is the argmax of val_acc, test is evaluated once
    best = max(rows, key=lambda r: r["val_acc"])
    assert summary["best_epoch"] == best["epoch"] and "test_acc" not in rows[-1]


def test_resume_continues_from_checkpoint(tiny_cfg):
    full = tiny_cfg(optim={"epochs": 4}, runtime={"output_dir": tiny_cfg().runtime.output_dir + "/full",
                                                  "progress": False})
    ref = train(full)
    part = tiny_cfg(optim={"epochs": 2})
    train(part)
    ckpt = load_checkpoint(part.run_dir() / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 1
    resumed = tiny_cfg(optim={"epochs": 4})
    trainer = Trainer(resumed)
    summary = trainer.fit()
    assert trainer.start_epoch == 2
    rows = read_rows(resumed.run_dir())
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    # same seeds and data order: the resumed run reproduces the uninterrupted one
    ref_rows = read_rows(full.run_dir())
    for a, b in zip(rows, ref_rows):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert summary["test_acc"] == pytest.approx(ref["test_acc"])


def test_resume_drops_rows_of_epochs_to_rerun(tiny_cfg):
    cfg = tiny_cfg(optim={"epochs": 3})
    train(cfg)
    run_dir = cfg.run_dir()
    # simulate a crash after epoch 1's checkpoint but after epoch 2's row was written
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    state["epoch"] = 1
    torch.save(state, run_dir / "checkpoints" / "last.pt")
    train(cfg)
    assert [r["epoch"] for r in read_rows(run_dir)] == [0, 1, 2]


def test_nan_loss_stops_with_epoch_and_step(tiny_cfg):
    cfg = tiny_cfg(optim={"name": "sgd", "lr": 1e6, "momentum": 0.9, "epochs": 3},
                   method={"strategy": "none", "aib": "off"})
    with pytest.raises(TrainingError, match=r"non-finite loss .* epoch \d+, step \d+"):
        train(cfg)


def test_early_stopping_and_schedulers(tiny_cfg):
    for sched in ("step", "multistep", "cosine", "plateau"):
        cfg = tiny_cfg(optim={"epochs": 2, "scheduler": sched, "step_size": 1, "milestones": [1]},
                       runtime={"output_dir": tiny_cfg().runtime.output_dir + f"/{sched}", "progress": False})
        assert math.isfinite(train(cfg)["test_acc"])
    cfg = tiny_cfg(optim={"epochs": 30, "lr": 1e-9, "early_stop_patience": 2})
    summary = train(cfg)
    assert summary["stopped_early"] and summary["epochs_run"] < 30


def test_gradient_accumulation_equals_the_larger_batch(tiny_cfg):
    """2 accumulated batches of 16 = one batch of 32 (same order, no BatchNorm, no AIB sampling)."""
    common = {"method": {"strategy": "cal", "aib": "off"}, "optim": {"name": "sgd", "lr": 0.05, "epochs": 2}}
    big = tiny_cfg(data={**tiny_cfg().data.model_dump(), "batch_size": 32}, **common,
                   runtime={"output_dir": tiny_cfg().runtime.output_dir + "/big", "progress": False})
    accum = tiny_cfg(data={**tiny_cfg().data.model_dump(), "batch_size": 16},
                     method=common["method"], optim={**common["optim"], "grad_accum": 2},
                     runtime={"output_dir": tiny_cfg().runtime.output_dir + "/accum", "progress": False})
    a, b = Trainer(big), Trainer(accum)
    a.fit()
    b.fit()
    for (name, pa), pb in zip(a.raw_model.state_dict().items(), b.raw_model.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=name)
    ra, rb = read_rows(big.run_dir()), read_rows(accum.run_dir())
    assert [r["a_audio"] for r in ra] == pytest.approx([r["a_audio"] for r in rb], rel=1e-6)


def warmup_lr(u, U, w, lr):
    """optim.scheduler linear_warmup written out: lr·u/(wU) while u < wU, then lr·(U−u)/(U−wU)."""
    W = w * U
    return lr * (u / W if u < W else (U - u) / (U - W))


def record_updates(trainer):
    """The lr each optimizer.step() call runs with, one entry per call."""
    lrs = []
    trainer.optimizer.optimizers[0].register_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    return lrs


@pytest.mark.parametrize("batch_size, accum, max_steps, per_epoch", [
    (40, 2, None, 4),  # 256 samples: 7 batches (the last 16) → updates after 2, 4, 6 and the tail 7
    (32, 3, 5, 2),     # 8 batches capped at 5 → updates after 3 and the tail 5
])
def test_linear_warmup_per_update(tiny_cfg, batch_size, accum, max_steps, per_epoch):
    lr, w, epochs = 0.05, 0.3, 3
    cfg = tiny_cfg(data={**tiny_cfg().data.model_dump(), "batch_size": batch_size},
                   optim={"name": "sgd", "lr": lr, "epochs": epochs, "grad_accum": accum,
                          "scheduler": "linear_warmup", "warmup_proportion": w},
                   runtime={**tiny_cfg().runtime.model_dump(), "max_steps_per_epoch": max_steps})
    trainer = Trainer(cfg)
    lrs = record_updates(trainer)
    trainer.fit()
    U = per_epoch * epochs
    assert trainer.total_updates() == U == len(lrs)  # U is exactly the number of optimizer.step() calls
    assert lrs == pytest.approx([warmup_lr(u, U, w, lr) for u in range(U)], rel=1e-12, abs=1e-15)
    assert lrs[0] == 0.0 and max(lrs) <= lr
    assert trainer.optimizer.param_groups[0]["lr"] == 0.0  # after the last update the schedule is at U: 0
    # epoch rows log the lr the epoch starts with: stepped per update, not per epoch
    assert [r["lr"] for r in read_rows(cfg.run_dir())] == pytest.approx(
        [warmup_lr(e * per_epoch, U, w, lr) for e in range(epochs)], rel=1e-12, abs=1e-15)


def test_linear_warmup_resume_mid_run_repeats_the_lr_sequence(tiny_cfg):
    from calray.engine.trainer import RunContext

    def make(sub):
        return tiny_cfg(data={**tiny_cfg().data.model_dump(), "batch_size": 40},
                        optim={"name": "sgd", "lr": 0.05, "epochs": 3, "grad_accum": 2,
                               "scheduler": "linear_warmup", "warmup_proportion": 0.5},
                        runtime={**tiny_cfg().runtime.model_dump(), "output_dir": tiny_cfg().runtime.output_dir + sub})

    full = Trainer(make("/full"))
    ref = record_updates(full)
    full.fit()
    assert len(ref) == 12  # 4 updates per epoch, warm-up over the first 6

    class Crash(Exception):
        pass

    def crash_after_first_epoch(row, ckpt):
        if row["epoch"] == 0:
            raise Crash

    cfg = make("/part")
    first = Trainer(cfg, RunContext(reporter=crash_after_first_epoch))
    got = record_updates(first)
    with pytest.raises(Crash):
        first.fit()  # epoch 0's checkpoint is written, mid warm-up (u = 4 of 6)
    assert load_checkpoint(cfg.run_dir() / "checkpoints" / "last.pt")["scheduler"]["last_epoch"] == 4
    resumed = Trainer(cfg)
    rest = record_updates(resumed)
    resumed.fit()
    assert resumed.start_epoch == 1
    assert len(got) == 4 and got + rest == ref  # the same lr for every update, exactly
    assert resumed.optimizer.param_groups[0]["lr"] == 0.0
    rows, ref_rows = read_rows(cfg.run_dir()), read_rows(full.run_dir)
    assert [r["lr"] for r in rows] == [r["lr"] for r in ref_rows]
    assert [r["train_loss"] for r in rows] == pytest.approx([r["train_loss"] for r in ref_rows], rel=1e-5)


def test_non_finite_loss_names_an_exploded_aib_latent(tiny_cfg):
    trainer = Trainer(tiny_cfg())
    parts = {"loss_fused": torch.tensor(float("nan")), "aib_kl_audio": torch.tensor(float("inf")),
             "aib_kl_visual": torch.tensor(2.0)}
    with pytest.raises(TrainingError, match=r"AIB latent of audio diverged.*beta_T"):
        trainer.guard.check((torch.tensor(float("nan")), parts, 4, 1))
    with pytest.raises(TrainingError) as err:
        trainer.guard.check((torch.tensor(float("nan")), {"loss_fused": torch.tensor(1.0)}, 0, 0))
    assert "AIB" not in str(err.value) and "epoch 0, step 0" in str(err.value)
