"""MMTM (`model.fusion: mmtm`, calray/models/mmtm.py): the transfer rule against a hand computation,
one train step of the loop on the NYUD2 fixture, the CLI run, refusals. Ray: test_baselines_t2b_ray.py."""

from __future__ import annotations

import copy
import math
import json

import pytest
import torch
import torch.nn.functional as F

from calray.config import load_config, save_config
from calray.data.base import build_datasets
from calray.engine.trainer import Trainer
from calray.errors import ConfigError
from calray.models import build_model
from calray.models.encoders import MLPEncoder, ResNetEncoder
from calray.models.mmtm import MMTMFusion
from calray.models.multimodal import MultimodalModel, batched_sample
from tests.test_data_e2e import CONFIGS, fixture_overrides

MODS = ("rgb", "depth")


def bound_fusion(params=None, in_channels=(3, 1)):
    torch.manual_seed(0)
    encoders = {m: ResNetEncoder("resnet18", in_channels=c) for m, c in zip(MODS, in_channels)}
    fusion = MMTMFusion({m: 512 for m in MODS}, 3, None, params)
    fusion.bind(encoders, None)
    return encoders, fusion


def hand_mmtm(encoders, fusion, x, scale=1.0, stages=(2, 3, 4)):
    """Both ResNets stage by stage; after each listed stage: squeeze (spatial mean), joint FC + ReLU,
    per-branch FC + sigmoid (× scale), channel-wise product — written out with matmuls."""
    a = {m: encoders[m].net.maxpool(encoders[m].net.relu(encoders[m].net.bn1(encoders[m].net.conv1(x[m]))))
         for m in MODS}
    for s in range(1, 5):
        a = {m: getattr(encoders[m].net, f"layer{s}")(a[m]) for m in MODS}
        if s in stages:
            t = fusion.transfer[str(s)]
            squeeze = torch.cat([a[m].mean(dim=(2, 3)) for m in MODS], dim=1)
            z = (squeeze @ t.squeeze.weight.T + t.squeeze.bias).clamp(min=0)
            for i, m in enumerate(MODS):
                gate = scale / (1 + torch.exp(-(z @ t.excite[i].weight.T + t.excite[i].bias)))
                a[m] = torch.einsum("bchw,bc->bchw", a[m], gate)
    return {m: a[m].mean(dim=(2, 3)) for m in MODS}


def test_transfer_rule_matches_a_hand_computation():
    encoders, fusion = bound_fusion()
    assert sorted(fusion.transfer) == ["2", "3", "4"]  # QMF NYUD2: after layer2, layer3, layer4
    # bottleneck ⌊2·ΣC/ratio⌋ (ratio 4): 128+128 → 128, 256+256 → 256, 512+512 → 512
    assert [fusion.transfer[k].squeeze.out_features for k in "234"] == [128, 256, 512]
    for e in encoders.values():
        e.eval()
    x = {"rgb": torch.randn(2, 3, 32, 32), "depth": torch.randn(2, 1, 32, 32)}
    with torch.no_grad():
        got = fusion.encode(encoders, x)
        want = hand_mmtm(encoders, fusion, x)
        for m in MODS:
            assert torch.allclose(got[m], want[m], atol=1e-5), m
            assert not torch.allclose(got[m], encoders[m](x[m]), atol=1e-3)  # the gates did act
        # the joint squeeze: rgb's embedding depends on the depth input
        other = fusion.encode(encoders, {"rgb": x["rgb"], "depth": torch.randn(2, 1, 32, 32)})
        assert not torch.allclose(other["rgb"], got["rgb"])
        # the late-fusion head: fused = mean of the per-branch heads, unimodal = the branch's head
        z, fused = fusion(got)
        heads = {m: got[m] @ fusion.heads[m].weight.T + fusion.heads[m].bias for m in MODS}
        assert torch.allclose(fused, (heads["rgb"] + heads["depth"]) / 2, atol=1e-6)
        assert torch.allclose(fusion.unimodal_logits(got, "depth"), heads["depth"], atol=1e-6)


def test_params_scale_and_stages():
    encoders, fusion = bound_fusion({"stages": [3], "ratio": 2, "excitation_scale": 2.0})
    assert sorted(fusion.transfer) == ["3"] and fusion.transfer["3"].squeeze.out_features == 512
    for e in encoders.values():
        e.eval()
    x = {"rgb": torch.randn(2, 3, 32, 32), "depth": torch.randn(2, 1, 32, 32)}
    with torch.no_grad():
        want = hand_mmtm(encoders, fusion, x, scale=2.0, stages=(3,))
        got = fusion.encode(encoders, x)
    assert all(torch.allclose(got[m], want[m], atol=1e-5) for m in MODS)


def test_refusals_name_the_key():
    with pytest.raises(ConfigError, match="model.encoders.depth.name"):
        MMTMFusion({m: 8 for m in MODS}, 3, None).bind({"rgb": ResNetEncoder("resnet18"), "depth": MLPEncoder(4, [8])},
                                                      None)
    with pytest.raises(ConfigError, match="model.fusion_params.stages"):
        MMTMFusion({m: 8 for m in MODS}, 3, None, {"stages": [0, 2]})
    with pytest.raises(ConfigError, match="two modalities"):
        MMTMFusion({"rgb": 8}, 3, None)


@pytest.fixture
def nyud2_cfg(tmp_path):
    def make(**extra):
        ov = fixture_overrides("nyud2", tmp_path)
        ov.update({"data.batch_size": 6, **extra})
        return load_config(CONFIGS / "nyud2_mmtm.yaml", ov)

    return make


def test_one_train_step_is_the_references_loss_and_moves_the_transfer_modules(nyud2_cfg):
    trainer = Trainer(nyud2_cfg(**{"optim.grad_accum": 1}))
    model = trainer.raw_model
    shared = {id(p) for p in model.shared_parameters()}
    assert all(id(p) in shared for p in model.fusion.transfer.parameters())  # θ_s, never modulated
    assert {id(p) for p in model.modality_parameters("rgb")} == {id(p) for p in model.encoders["rgb"].parameters()}
    g = torch.Generator().manual_seed(1)
    inputs = {m: torch.randn(6, 3, 16, 16, generator=g) for m in MODS}  # distinct samples (the fixture's are not)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    before = {k: v.clone() for k, v in model.fusion.transfer.state_dict().items()}
    start = copy.deepcopy(model)
    loss = trainer.train_step(inputs, labels, epoch=0, step=0)
    # QMF's MMTM loss: CE(fused) + CE(rgb) + CE(depth), recomputed on a copy of the start point
    with torch.no_grad():
        out = start(inputs)
    want = sum(F.cross_entropy(v, labels) for v in [out.fused_logits, *out.unimodal_logits.values()])
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    assert float(want) > 3 * math.log(3) + 1e-3  # not the degenerate loss of constant logits
    moved = [k for k, v in model.fusion.transfer.state_dict().items() if not torch.equal(v, before[k])]
    assert moved and all(k.split(".")[0] in "234" for k in moved)


def test_zero_ablation_removes_the_branch_head(nyud2_cfg):
    cfg = nyud2_cfg(**{"method.strategy": "cal"})
    splits = build_datasets(cfg)
    model = build_model(cfg, splits).eval()
    assert isinstance(model, MultimodalModel) and not model._ablation_is_unimodal()
    inputs = batched_sample(splits.train, 4)[0]
    with torch.no_grad():
        out = model(inputs, ablation="zero")
    bias = {m: model.fusion.heads[m].bias for m in MODS}
    # fusion without rgb: mean of depth's head and rgb's head on a zero embedding (its bias)
    assert torch.allclose(out.ablated_logits["rgb"], (out.unimodal_logits["depth"] + bias["rgb"]) / 2, atol=1e-6)
    assert torch.allclose(out.ablated_logits["depth"], (out.unimodal_logits["rgb"] + bias["depth"]) / 2, atol=1e-6)


def test_cli_run_on_the_nyud2_fixture(nyud2_cfg, tmp_path):
    from calray.train import main

    cfg = nyud2_cfg(**{"runtime.max_steps_per_epoch": 2})
    path = tmp_path / "mmtm.yaml"
    save_config(cfg, path)
    assert main([str(path), "--set", "model.fusion=mmtm", "--set", "method.strategy=cal"]) == 0
    summary = json.loads((cfg.run_dir() / "summary.json").read_text())
    assert summary["epochs_run"] == 1 and summary["test"]["n"] == 3
    saved = (cfg.run_dir() / "config.yaml").read_text()
    assert "excitation_scale: 1.0" in saved and "ratio: 4.0" in saved  # resolved fusion params recorded
    rows = [json.loads(r) for r in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    assert "W_rgb" in rows[0] and "a_depth" in rows[0]  # CAL's contribution machinery ran on top of MMTM
