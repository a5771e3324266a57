"""TensorBoard events of a run, read back with TensorBoard's own event reader: per-epoch scalars
(losses, accuracies, contribution terms per modality), the run's hyper-parameters, and the switch."""

from __future__ import annotations

import json

import pytest

from calray.engine.trainer import train

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
plugin_data_pb2 = pytest.importorskip("tensorboard.plugins.hparams.plugin_data_pb2")


def read_events(path):
    acc = event_accumulator.EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_run_writes_epoch_scalars_and_hparams(tiny_cfg):
    cfg = tiny_cfg(optim={"epochs": 2})
    summary = train(cfg)
    events = cfg.run_dir() / "tensorboard"
    acc = read_events(events)
    tags = set(acc.Tags()["scalars"])
    for tag in ("loss/train_loss", "loss/train_loss_aib", "loss/train_aib_kl_audio", "acc/val_acc",
                "acc/val_acc_visual", "contribution/W/audio", "contribution/a/visual", "contribution/beta/audio",
                "lr/lr"):
        assert tag in tags, tag
    rows = [json.loads(line) for line in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    val = acc.Scalars("acc/val_acc")
    assert [e.step for e in val] == [0, 1]
    assert [e.value for e in val] == pytest.approx([r["val_acc"] for r in rows], rel=1e-6)
    assert [e.value for e in acc.Scalars("contribution/beta/audio")] == pytest.approx(
        [r["beta_audio"] for r in rows], rel=1e-6)
    # the HParams view: the config's keys and the final metrics, in their own event file
    (hp_file,) = (events / "hparams").glob("events.out.tfevents.*")
    hp = read_events(hp_file)
    content = hp.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert start.hparams["method.strategy"].string_value == "cal"
    assert start.hparams["optim.lr"].number_value == pytest.approx(cfg.optim.lr)
    assert hp.Scalars("hparam/test_acc")[0].value == pytest.approx(summary["test_acc"], rel=1e-6)


def test_tensorboard_off_writes_no_events(tiny_cfg):
    cfg = tiny_cfg(optim={"epochs": 1}, runtime={**tiny_cfg().runtime.model_dump(), "tensorboard": False})
    train(cfg)
    assert (cfg.run_dir() / "metrics.jsonl").is_file() and not (cfg.run_dir() / "tensorboard").exists()
