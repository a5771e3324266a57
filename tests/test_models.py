import pytest
import torch

from calray.config import EncoderConfig, config_from_dict
from calray.data import build_datasets
from calray.errors import ConfigError
from calray.models import build_encoder, build_model
from calray.models.fusion import FUSIONS, Fusion
from calray.models.multimodal import batched_sample
from tests.conftest import tiny_run_dict


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
@pytest.mark.parametrize("head", ["shared", "separate"])
@pytest.mark.parametrize("aib", ["beta", "off"])
def test_output_shapes(tmp_path, fusion, head, aib):
    if FUSIONS.get(fusion).bind is not Fusion.bind:  # a joint encoder (mmtm, mmbt) needs its own encoders
        pytest.skip(f"{fusion} joins specific encoders: tests/test_baseline_{fusion}.py")
    cfg = config_from_dict(tiny_run_dict(tmp_path, model={"encoders": {}, "fusion": fusion, "unimodal_head": head},
                                         method={"aib": aib}))
    splits = build_datasets(cfg)
    model = build_model(cfg, splits)
    inputs, y = batched_sample(splits.train, 5)
    out = model(inputs, ablation="zero")
    assert out.fused_logits.shape == (5, 4)
    assert set(out.unimodal_logits) == {"audio", "visual"}
    assert all(v.shape == (5, 4) for v in out.unimodal_logits.values())
    assert all(v.shape == (5, 4) and not v.requires_grad for v in out.ablated_logits.values())
    assert set(out.mu) == ({"audio", "visual"} if aib == "beta" else set())


def test_concat_shared_head_is_weight_slice(tmp_path):
    """ARL's unimodal logits: the shared concat head with the other modality zero-filled = W[:, slice]·h + b."""
    cfg = config_from_dict(tiny_run_dict(tmp_path, method={"aib": "off"}))
    splits = build_datasets(cfg)
    model = build_model(cfg, splits).eval()
    inputs, _ = batched_sample(splits.train, 3)
    out = model(inputs)
    head = model.fusion.head
    d_a = model.fusion.dims["audio"]
    h_a = out.embeddings["audio"]
    expected = h_a @ head.weight[:, :d_a].T + head.bias
    torch.testing.assert_close(out.unimodal_logits["audio"], expected)
    # ... and equal to the zero-filled fusion, for both modalities (the slice is only a shortcut)
    for m in ("audio", "visual"):
        zero_filled = model.fusion(model.fusion.zero_filled(out.embeddings, {m}))[1]
        torch.testing.assert_close(out.unimodal_logits[m], zero_filled, rtol=1e-6, atol=1e-6)


def test_modality_parameters_partition(tmp_path):
    cfg = config_from_dict(tiny_run_dict(tmp_path))
    model = build_model(cfg, build_datasets(cfg))
    a = {id(p) for p in model.modality_parameters("audio")}
    v = {id(p) for p in model.modality_parameters("visual")}
    s = {id(p) for p in model.shared_parameters()}
    assert a and v and s and not (a & v) and not (a & s) and not (v & s)
    assert a | v | s == {id(p) for p in model.parameters()}


def test_resnet_frames_mode_and_channels():
    audio = build_encoder(EncoderConfig(name="resnet18", in_channels=1), torch.zeros(2, 1, 64, 48), "audio")
    assert audio(torch.randn(2, 1, 64, 48)).shape == (2, 512)
    visual = build_encoder(EncoderConfig(name="resnet18", frames=True), torch.zeros(2, 3, 3, 32, 32), "visual")
    frames = torch.randn(2, 3, 3, 32, 32)
    out = visual(frames)
    assert out.shape == (2, 512)
    # frames mode = mean over time of the per-frame pooled features
    visual.eval()
    per_frame = torch.stack([visual.net(frames[:, t]) for t in range(3)], 1).mean(1)
    torch.testing.assert_close(visual(frames), per_frame)


def test_encoder_weights_from_local_file(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pt"
    torch.save(ref.state_dict(), path)  # a torchvision checkpoint, 3-channel conv1 and an fc
    enc = build_encoder(EncoderConfig(name="resnet18", in_channels=1, weights=str(path)), torch.zeros(1, 1, 32, 32), "audio")
    torch.testing.assert_close(enc.net.layer1[0].conv1.weight, ref.layer1[0].conv1.weight)
    torch.testing.assert_close(enc.net.conv1.weight, ref.conv1.weight.mean(1, keepdim=True))
    with pytest.raises(ConfigError, match="weights"):
        build_encoder(EncoderConfig(name="resnet18", weights=str(tmp_path / "missing.pt")), torch.zeros(1, 3, 32, 32), "visual")


def test_bert_random_init_from_config():
    enc = build_encoder(EncoderConfig(name="bert", bert_config={"hidden_size": 32, "num_hidden_layers": 1,
                                                                 "num_attention_heads": 2, "intermediate_size": 64,
                                                                 "vocab_size": 100}), None, "text")
    x = {"input_ids": torch.randint(0, 100, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    assert enc(x).shape == (3, 32)


def test_unknown_encoder_and_fusion(tmp_path):
    cfg = config_from_dict(tiny_run_dict(tmp_path, model={"encoders": {"audio": {"name": "transformer9000"}}}))
    with pytest.raises(ConfigError, match=r"model\.encoders\.audio\.name"):
        build_model(cfg, build_datasets(cfg))
