"""The loop's mixed precision switch (calray.engine.evaluate.amp_autocast): bf16 autocast on CUDA when
enabled, and no context at all otherwise (a disabled torch.autocast still costs per step)."""

from __future__ import annotations

import contextlib
import warnings

import torch

from calray.engine.evaluate import amp_autocast


def test_amp_autocast_is_cuda_bf16_when_enabled_and_nothing_otherwise():
    with warnings.catch_warnings():  # without CUDA torch warns that it disables the context
        warnings.simplefilter("ignore", UserWarning)
        on = amp_autocast(True)
    assert isinstance(on, torch.autocast) and on.device == "cuda" and on.fast_dtype == torch.bfloat16
    assert isinstance(amp_autocast(False), contextlib.nullcontext)


def test_the_trainer_enables_amp_only_on_cuda(tiny_cfg):
    from calray.engine.trainer import Trainer

    trainer = Trainer(tiny_cfg(runtime={"device": "cpu", "amp": True, "progress": False}))
    assert trainer.amp is False  # CPU: fp32, whatever runtime.amp says
