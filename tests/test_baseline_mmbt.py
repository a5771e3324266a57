"""MMBT (`model.fusion: mmbt`, calray/models/mmbt.py): the bitransformer's input layout and the
missing-modality passes against a hand computation, one train step of the loop on the MVSA
fixture, the CLI run, refusals. Ray: test_baselines_t2b_ray.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from calray.config import load_config, save_config
from calray.data.base import build_datasets
from calray.engine.trainer import Trainer
from calray.errors import ConfigError
from calray.models import build_model
from calray.models.multimodal import batched_sample
from tests.test_data_e2e import CONFIGS, fixture_overrides


@pytest.fixture
def mvsa_cfg(tmp_path):
    def make(**extra):
        ov = fixture_overrides("mvsa", tmp_path)
        ov.update(extra)
        return load_config(CONFIGS / "mvsa_mmbt.yaml", ov)

    return make


def hand_mmbt(model, inputs, keep=("image", "text")):
    """The reference's MultimodalBertEncoder written out: image segment [CLS] regions [SEP] (type 0,
    positions 0..N+1), text segment = the words without the tokenizer's [CLS] (type 1, positions
    from 0), both through BERT's embedding LayerNorm, its encoder with an additive mask, the pooler
    and the classifier. A modality left out of `keep` is dropped from the sequence altogether."""
    bert, fusion = model.encoders["text"].net, model.fusion
    emb = bert.embeddings
    net = model.encoders["image"].net
    fmap = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(inputs["image"]))))))))
    regions = F.adaptive_avg_pool2d(fmap, (3, 1)).squeeze(-1).transpose(1, 2)  # B×3×C
    b, n = regions.shape[:2]
    ids = inputs["text"]["input_ids"][:, 1:]
    length = int(inputs["text"]["attention_mask"][:, 1:].sum(1).max())
    ids = ids[:, :length]
    mask = inputs["text"]["attention_mask"][:, 1:1 + length]
    word = emb.word_embeddings.weight
    img_tok = torch.cat([word[2].expand(b, 1, -1), regions @ fusion.proj.weight.T + fusion.proj.bias,
                         word[3].expand(b, 1, -1)], dim=1)
    img_pos = torch.arange(n + 2)
    if "image" not in keep:  # [CLS] and [SEP] stay, at their positions 0 and N+1
        img_tok, img_pos = img_tok[:, [0, n + 1]], img_pos[[0, n + 1]]
    img_part = emb.LayerNorm(img_tok + emb.position_embeddings.weight[img_pos] + emb.token_type_embeddings.weight[0])
    txt_part = emb.LayerNorm(word[ids] + emb.position_embeddings.weight[:length] + emb.token_type_embeddings.weight[1])
    parts, masks = [img_part], [torch.ones(b, img_part.shape[1])]
    if "text" in keep:
        parts.append(txt_part)
        masks.append(mask.float())
    seq, m = torch.cat(parts, 1), torch.cat(masks, 1)
    extended = (1.0 - m[:, None, None, :]) * torch.finfo(seq.dtype).min
    hidden = bert.encoder(seq, attention_mask=extended).last_hidden_state
    pooled = torch.tanh(hidden[:, 0] @ fusion.pooler.weight.T + fusion.pooler.bias)
    return pooled @ fusion.head.weight.T + fusion.head.bias


def test_bitransformer_and_missing_modality_passes_match_a_hand_computation(mvsa_cfg):
    cfg = mvsa_cfg()
    splits = build_datasets(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, splits).eval()
    assert (model.fusion.cls_id, model.fusion.sep_id) == (2, 3)  # read from the fixture's tokenizer
    inputs = batched_sample(splits.train, 4)[0]
    with torch.no_grad():
        out = model(inputs, ablation="zero")
        assert out.embeddings["image"].shape == (4, 3, 16) and out.embeddings["text"].shape == (4, 15, 16)
        assert torch.allclose(out.fused_logits, hand_mmbt(model, inputs), atol=1e-5)
        assert torch.allclose(out.unimodal_logits["text"], hand_mmbt(model, inputs, keep=("text",)), atol=1e-5)
        assert torch.allclose(out.unimodal_logits["image"], hand_mmbt(model, inputs, keep=("image",)), atol=1e-5)
        assert not torch.allclose(out.unimodal_logits["text"], out.fused_logits, atol=1e-4)
    # CAL's zero ablation: "fusion without text" is the image-alone pass, and the other way round
    assert torch.equal(out.ablated_logits["text"], out.unimodal_logits["image"])
    assert torch.equal(out.ablated_logits["image"], out.unimodal_logits["text"])


def test_region_grid_and_pool_type(mvsa_cfg):
    cfg = mvsa_cfg(**{"model.fusion_params": {"num_image_embeds": 4, "img_embed_pool_type": "max",
                                              "cls_token_id": 7, "sep_token_id": 8}})
    splits = build_datasets(cfg)
    model = build_model(cfg, splits).eval()
    assert (model.fusion.cls_id, model.fusion.sep_id) == (7, 8)
    image = batched_sample(splits.train, 2)[0]["image"]
    with torch.no_grad():
        embs = model.fusion.encode(model.encoders, batched_sample(splits.train, 2)[0])
        net = model.encoders["image"].net
        fmap = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(image))))))))
    want = F.adaptive_max_pool2d(fmap, (2, 2)).flatten(2).transpose(1, 2) @ model.fusion.proj.weight.T
    assert torch.allclose(embs["image"], want + model.fusion.proj.bias, atol=1e-5)


def exact_step_overrides() -> dict:
    """One plain SGD update per batch, dropout off: a step is a deterministic function of the batch."""
    return {"optim.grad_accum": 1, "optim.name": "sgd", "optim.lr": 0.1, "optim.scheduler": "none",
            "model.encoders.text.bert_config.hidden_dropout_prob": 0.0,
            "model.encoders.text.bert_config.attention_probs_dropout_prob": 0.0}


def test_one_train_step_is_the_fused_ce_and_trains_both_encoders(mvsa_cfg):
    """MMBT as QMF trains it: CE(fused) only (`method.unimodal_weight: 0`); the gradient reaches the
    ResNet, the BERT and the shared projection/pooler/classifier. Dropout and the freeze schedule off: the
    step is exact."""
    cfg = mvsa_cfg(**exact_step_overrides(), **{"model.fusion_params.freeze_image_epochs": 0,
                                                 "model.fusion_params.freeze_text_epochs": 0})
    trainer = Trainer(cfg)
    model = trainer.raw_model
    inputs, labels = next(iter(trainer.train_loader))
    start = copy.deepcopy(model)
    loss = trainer.train_step(inputs, labels, epoch=0, step=0)
    with torch.no_grad():
        out = start(inputs)
    assert float(loss) == pytest.approx(float(F.cross_entropy(out.fused_logits, labels)), rel=1e-6)
    before = dict(start.named_parameters())
    changed = {".".join(name.split(".")[:2]) for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert {"encoders.image", "encoders.text", "fusion.proj", "fusion.head", "fusion.pooler"} <= changed


def test_refusals_name_the_key(mvsa_cfg, tmp_path):
    splits = build_datasets(mvsa_cfg())
    for key, value in [("method.aib", "beta"), ("model.unimodal_head", "separate"),
                       ("method.phi_ablation", "mean"), ("method.contribution_space", "embeddings")]:
        with pytest.raises(ConfigError, match=key):
            build_model(mvsa_cfg(**{key: value, "method.strategy": "cal"}), splits)
    with pytest.raises(ConfigError, match="one bert and one resnet"):
        build_model(mvsa_cfg(**{"model.encoders.image": {"name": "mlp"}}), splits)
    no_tok = mvsa_cfg(**{"data.params.tokenizer": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="cannot read the tokenizer"):
        build_model(no_tok, splits)


def test_cli_run_on_the_mvsa_fixture(mvsa_cfg, tmp_path):
    from calray.train import main

    cfg = mvsa_cfg(**{"runtime.max_steps_per_epoch": 2})
    path = tmp_path / "mmbt.yaml"
    save_config(cfg, path)
    assert main([str(path), "--set", "model.fusion=mmbt", "--set", "method.strategy=cal",
                 "--set", "method.unimodal_weight=1"]) == 0
    summary = json.loads((cfg.run_dir() / "summary.json").read_text())
    assert summary["epochs_run"] == 1 and summary["test"]["n"] == 3 and "acc_text" in summary["test"]
    rows = [json.loads(r) for r in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    assert "W_text" in rows[0] and "a_image" in rows[0]  # CAL's contributions on top of MMBT


@pytest.mark.parametrize("epoch,frozen", [(0, ("encoders.image.", "encoders.text.net.encoder.")),
                                          (2, ("encoders.image.", "encoders.text.net.encoder.")),
                                          (3, ("encoders.text.net.encoder.",)), (5, ())])
def test_freeze_schedule_skips_the_reference_s_parameters_and_nothing_else(mvsa_cfg, epoch, frozen):
    """QMF's --freeze_img 3 --freeze_txt 5 (the defaults): in epoch e < 3 the ResNet and BERT's transformer
    layers keep their values, from 3 the ResNet trains, from 5 everything. Every other parameter (the
    word embeddings among them) takes exactly the update of a run without the schedule."""
    no_freeze = {"model.fusion_params.freeze_image_epochs": 0, "model.fusion_params.freeze_text_epochs": 0}
    runs = {name: Trainer(mvsa_cfg(**exact_step_overrides(), **extra)) for name, extra in
            [("schedule", {}), ("none", no_freeze)]}
    assert runs["schedule"].raw_model.fusion.params.freeze_image_epochs == 3
    start = {k: v.clone() for k, v in runs["none"].raw_model.state_dict().items()}
    inputs, labels = next(iter(runs["none"].train_loader))
    for trainer in runs.values():
        trainer.train_step(inputs, labels, epoch=epoch, step=0)
    free = dict(runs["none"].raw_model.named_parameters())
    for name, p in runs["schedule"].raw_model.named_parameters():
        if name.startswith(frozen):
            assert torch.equal(p, start[name]), name
        else:
            assert torch.equal(p, free[name]), name
    moved = {name for name, p in free.items() if not torch.equal(p, start[name])}
    assert bool(frozen) == any(name.startswith(frozen) for name in moved)  # the schedule held back updates
    assert any(name.startswith("encoders.text.net.embeddings.") for name in moved)


def test_preset_skips_the_backward_of_the_two_unimodal_passes(mvsa_cfg):
    """The preset's loss is the fused CE only (strategy none, unimodal weight 0): the two missing-modality
    BERT passes run without autograd (1.79× faster steps at BERT-base size, docs/baselines/mmbt.md), and
    the update is the one with autograd on them."""
    trainer = Trainer(mvsa_cfg(**exact_step_overrides()))
    assert trainer.raw_model.unimodal_grad is False
    reference = copy.deepcopy(trainer)
    reference.raw_model.unimodal_grad = True
    inputs, labels = next(iter(trainer.train_loader))
    for t in (trainer, reference):
        t.train_step(inputs, labels, epoch=5, step=0)  # past the freeze schedule: every parameter moves
    for (name, a), b in zip(trainer.raw_model.named_parameters(), reference.raw_model.parameters()):
        assert torch.equal(a, b), name
