"""Encoder registry: one module per modality mapping its input to an embedding h_m (B×d)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from calray.errors import ConfigError
from calray.registry import ENCODERS

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def register_encoder(name: str):
    return ENCODERS.register(name)


class ResNetEncoder(nn.Module):
    """A torchvision ResNet without its classifier, with configurable input channels.

    `frames=True`: input B×T×C×H×W is folded into the batch and the pooled features are
    averaged over time, as the OGM-GE/ARL audio-visual models pool their visual stream.
    """

    def __init__(self, arch: str, in_channels: int = 3, frames: bool = False):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.out_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net
        self.frames = frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frames:
            if x.dim() != 5:
                raise ValueError(f"frames encoder expects B×T×C×H×W, got shape {tuple(x.shape)}")
            b, t = x.shape[:2]
            return self.net(x.flatten(0, 1)).view(b, t, -1).mean(dim=1)
        if x.dim() == 3:  # B×H×W spectrogram without a channel axis
            x = x.unsqueeze(1)
        return self.net(x)

    def adapt_state_dict(self, state: dict) -> dict:
        """Accept torchvision checkpoints: drop `fc.*`, add the `net.` prefix, and average
        3-channel conv1 weights into the configured number of input channels."""
        if not any(k.startswith("net.") for k in state):
            state = {f"net.{k}": v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("net.fc.")}
        w = state.get("net.conv1.weight")
        want = self.net.conv1.weight.shape[1]
        if w is not None and w.shape[1] != want:
            state["net.conv1.weight"] = w.mean(dim=1, keepdim=True).repeat(1, want, 1, 1)
        return state


class MLPEncoder(nn.Module):
    """Feature vectors (B×d_in) → B×out_dim through Linear-ReLU blocks."""

    def __init__(self, in_dim: int, hidden: list[int], out_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        sizes = [in_dim, *hidden] + ([out_dim] if out_dim else [])
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2 or out_dim is None:
                layers.append(nn.ReLU())
                if dropout:
                    layers.append(nn.Dropout(dropout))
        self.net = nn.Sequential(*layers) if layers else nn.Identity()
        self.out_dim = sizes[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class BertEncoder(nn.Module):
    """transformers `AutoModel` from a local directory, or a random-init BERT from a config.

    Never reaches a hub: `local_files_only=True`. Input: dict with input_ids, attention_mask
    (and optionally token_type_ids); output: the final [CLS] hidden state.
    """

    def __init__(self, pretrained_path: str | None, bert_config: dict | None):
        super().__init__()
        from transformers import AutoModel, BertConfig, BertModel

        if pretrained_path:
            if not Path(pretrained_path).is_dir():
                raise ConfigError(f"model.encoders.*.pretrained_path: {pretrained_path} is not a directory")
            self.net = AutoModel.from_pretrained(pretrained_path, local_files_only=True)
        else:
            self.net = BertModel(BertConfig(**(bert_config or {})), add_pooling_layer=False)
        self.out_dim = self.net.config.hidden_size

    def forward(self, x: dict) -> torch.Tensor:
        kwargs = {k: x[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in x}
        return self.net(**kwargs).last_hidden_state[:, 0]


for _arch in RESNETS:
    ENCODERS.register(_arch)((lambda arch: lambda ecfg, sample: ResNetEncoder(
        arch, in_channels=ecfg.in_channels or _infer_channels(sample, ecfg.frames), frames=ecfg.frames))(_arch))


@register_encoder("mlp")
def _mlp(ecfg, sample):
    if not isinstance(sample, torch.Tensor):
        raise ConfigError("mlp encoder needs tensor inputs")
    return MLPEncoder(int(sample[0].numel()), ecfg.hidden, ecfg.out_dim, ecfg.dropout)


@register_encoder("bert")
def _bert(ecfg, sample):
    return BertEncoder(ecfg.pretrained_path, ecfg.bert_config)


def _infer_channels(sample, frames: bool) -> int:
    """Channels of a batched sample: B×C×H×W (or B×T×C×H×W with frames); B×H×W → 1."""
    if not isinstance(sample, torch.Tensor):
        return 3
    if frames:
        return int(sample.shape[2])
    return 1 if sample.dim() == 3 else int(sample.shape[1])


def load_encoder_weights(encoder: nn.Module, path: str, modality: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"model.encoders.{modality}.weights: file not found: {p}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"model.encoders.{modality}.weights: cannot load {p}: {e}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if hasattr(encoder, "adapt_state_dict"):
        state = encoder.adapt_state_dict(state)
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing:
        raise ConfigError(f"model.encoders.{modality}.weights: {p} lacks {len(missing)} keys, e.g. {missing[:3]}")
    if unexpected:
        raise ConfigError(f"model.encoders.{modality}.weights: {p} has unexpected keys, e.g. {unexpected[:3]}")


def build_encoder(ecfg, sample, modality: str) -> nn.Module:
    """`sample` is a batched example input (B×…) used to infer input sizes."""
    if ecfg.name not in ENCODERS:
        raise ConfigError(f"model.encoders.{modality}.name: unknown encoder {ecfg.name!r}; known: {ENCODERS.names()}")
    enc = ENCODERS.get(ecfg.name)(ecfg, sample)
    if ecfg.weights:
        load_encoder_weights(enc, ecfg.weights, modality)
    return enc
