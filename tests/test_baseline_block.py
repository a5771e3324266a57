"""BLOCK fusion (`model.fusion: block`, calray/models/block.py): the block-superdiagonal bilinear rule
against an independent computation (each block's third-order tensor built explicitly and contracted
with einsum), the reference's chunk sizes, zero-filled unimodal logits, a train step, the CLI and the
config errors."""

from __future__ import annotations

import json

import pytest
import torch

from calray.config import load_config, save_config
from calray.errors import ConfigError
from calray.models.block import BlockFusion, block_sizes
from calray.models.fusion import build_fusion
from calray.train import main as train_main
from calray.engine.trainer import Trainer


def block_cfg(tiny_cfg, **fusion_params):
    return tiny_cfg(model={"encoders": {"audio": {"name": "mlp", "hidden": [32]}, "visual": {"name": "mlp", "hidden": [24]}},
                           "fusion": "block", "fusion_params": {"mm_dim": 20, "chunks": 3, "rank": 4, **fusion_params}},
                    method={"strategy": "none", "aib": "off"})


def reference_block(f: BlockFusion, h0: torch.Tensor, h1: torch.Tensor, pos_norm: str) -> tuple:
    """BLOCK written out as a bilinear map per block: z_c[j] = x̃0ᵀ T_c[j] x̃1 with the third-order tensor
    T_c[j] = Σ_r w̃0_{r,j} w̃1_{r,j}ᵀ over the bias-augmented merge weights (x̃ = [x, 1])."""
    x0 = h0 @ f.linear0.weight.T + f.linear0.bias
    x1 = h1 @ f.linear1.weight.T + f.linear1.bias
    zs, start = [], 0
    for s, m0, m1 in zip(f.sizes, f.merge0, f.merge1):
        a = torch.cat([x0[:, start:start + s], torch.ones(len(x0), 1)], 1)
        b = torch.cat([x1[:, start:start + s], torch.ones(len(x1), 1)], 1)
        w0 = torch.cat([m0.weight, m0.bias[:, None]], 1).view(f.params.rank, s, s + 1)  # row r*s + j
        w1 = torch.cat([m1.weight, m1.bias[:, None]], 1).view(f.params.rank, s, s + 1)
        tensor = torch.einsum("rja,rjb->jab", w0, w1)  # s × (s+1) × (s+1)
        zs.append(torch.einsum("na,jab,nb->nj", a, tensor, b))
        start += s

    def norm(z):
        p = z.sign() * z.abs().sqrt()
        return p / p.norm(dim=1, keepdim=True).clamp_min(1e-12)

    z = torch.cat([norm(z) for z in zs], 1) if pos_norm == "before_cat" else norm(torch.cat(zs, 1))
    return z, z @ f.linear_out.weight.T + f.linear_out.bias


@pytest.mark.parametrize("pos_norm", ["before_cat", "after_cat"])
def test_block_matches_the_explicit_bilinear_tensor(pos_norm):
    torch.manual_seed(0)
    f = build_fusion("block", {"audio": 7, "visual": 5}, 3, None,
                     {"mm_dim": 11, "chunks": 3, "rank": 2, "pos_norm": pos_norm})
    assert f.sizes == [4, 4, 3]
    embs = {"audio": torch.randn(6, 7, dtype=torch.float64), "visual": torch.randn(6, 5, dtype=torch.float64)}
    f = f.double()
    z, logits = f(embs)
    z_ref, logits_ref = reference_block(f, embs["audio"], embs["visual"], pos_norm)
    assert torch.allclose(z, z_ref, atol=1e-10) and torch.allclose(logits, logits_ref, atol=1e-10)
    if pos_norm == "before_cat":  # each block is unit-norm
        assert torch.allclose(z[:, :4].norm(dim=1), torch.ones(6, dtype=torch.float64))
    else:
        assert torch.allclose(z.norm(dim=1), torch.ones(6, dtype=torch.float64))


def test_chunk_sizes_follow_the_reference():
    assert block_sizes(1600, 20) == [80] * 20
    assert block_sizes(1600, 18) == [89] * 17 + [87]  # the VQA2 option file's chunks
    assert block_sizes(9, 6) == [2, 2, 2, 1, 1, 1]  # the reference's negative-remainder branch
    with pytest.raises(ConfigError, match="cannot be split"):
        block_sizes(10, 6)  # the reference would build an empty block


def test_unimodal_logits_zero_fill_the_other_modality_and_depend_on_one_only():
    torch.manual_seed(1)
    f = build_fusion("block", {"audio": 6, "visual": 6}, 4, None, {"mm_dim": 12, "chunks": 2, "rank": 3})
    embs = {"audio": torch.randn(5, 6), "visual": torch.randn(5, 6)}
    uni = f.unimodal_logits(embs, "audio")
    assert torch.allclose(uni, f({"audio": embs["audio"], "visual": torch.zeros(5, 6)})[1])
    other = {"audio": embs["audio"], "visual": torch.randn(5, 6)}
    assert torch.allclose(f.unimodal_logits(other, "audio"), uni)  # the visual input does not matter
    assert not torch.allclose(f(other)[1], f(embs)[1])  # while the fused logits do
    # zero-fill is not "no interaction": the zeroed branch still passes its biases
    with torch.no_grad():
        f.linear1.bias.zero_()
        for m in f.merge1:
            m.bias.zero_()
    z, _ = f({"audio": embs["audio"], "visual": torch.zeros(5, 6)})
    assert torch.count_nonzero(z) == 0  # only with every bias of the other branch at 0 is the block empty


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="exactly two modalities"):
        build_fusion("block", {"a": 4, "b": 4, "c": 4}, 3, None, {"mm_dim": 8, "chunks": 2, "rank": 2})
    with pytest.raises(ConfigError, match="fusion_params.shared"):
        build_fusion("block", {"a": 4, "b": 5}, 3, None, {"mm_dim": 8, "chunks": 2, "rank": 2, "shared": True})
    with pytest.raises(ConfigError, match="fusion_params.chunks"):
        build_fusion("block", {"a": 4, "b": 5}, 3, None, {"mm_dim": 8, "chunks": 9, "rank": 2})
    shared = build_fusion("block", {"a": 4, "b": 4}, 3, None, {"mm_dim": 8, "chunks": 2, "rank": 2, "shared": True})
    assert shared.linear0 is shared.linear1 and shared.merge0 is shared.merge1


def test_defaults_are_the_reference_signature(tiny_cfg):
    cfg = tiny_cfg(model={"fusion": "block"})
    assert cfg.model.fusion_params == {"mm_dim": 1600, "chunks": 20, "rank": 15, "shared": False,
                                       "dropout_input": 0.0, "dropout_pre_lin": 0.0, "dropout_output": 0.0,
                                       "pos_norm": "before_cat"}
    with pytest.raises(ConfigError, match="fusion_params.*rank"):
        tiny_cfg(model={"fusion": "block", "fusion_params": {"rank": 0}})


def test_a_train_step_moves_every_block_parameter(tiny_cfg):
    trainer = Trainer(block_cfg(tiny_cfg))
    fusion = trainer.raw_model.fusion
    assert isinstance(fusion, BlockFusion)
    before = {k: v.detach().clone() for k, v in fusion.named_parameters()}
    inputs, y = next(iter(trainer.train_loader))
    loss = trainer.train_step(inputs, y, epoch=0, step=0)
    assert torch.isfinite(loss)
    moved = {k for k, v in fusion.named_parameters() if not torch.equal(v, before[k])}
    assert moved == set(before)


def test_cli_run_with_block_fusion(tiny_cfg, tmp_path):
    cfg = block_cfg(tiny_cfg)
    path = tmp_path / "block.yaml"
    save_config(cfg, path)
    assert train_main([str(path), "--set", "model.fusion_params.dropout_input=0.1", "--set", "name=blk"]) == 0
    run_cfg = load_config(path, ["name=blk"])
    summary = json.loads((run_cfg.run_dir() / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and 0.0 <= summary["test_acc"] <= 1.0
    saved = (run_cfg.run_dir() / "config.yaml").read_text()
    assert "fusion: block" in saved and "dropout_input: 0.1" in saved
