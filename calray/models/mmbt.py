"""MMBT: the supervised multimodal bitransformer (`model.fusion: mmbt`).

Paper: D. Kiela, S. Bhooshan, H. Firooz, E. Perez, D. Testuggine, "Supervised Multimodal
Bitransformers for Classifying Images and Text", arXiv:1909.02950 (2019). Reference code read:
facebookresearch/mmbt `mmbt/models/mmbt.py`, `mmbt/models/image.py`, `mmbt/data/dataset.py`,
`mmbt/train.py`, and the copy QMF's MVSA baseline runs, QingyangZhang/QMF
`text-image-classification/src/models/mmbt.py`, `src/models/image.py`, `src/data/dataset.py`,
`train_qmf.py` (defaults: 3 image embeddings, BertAdam lr 5e-5, warm-up 0.1).

The rule: the image's ResNet feature map is pooled into N regions, each projected to BERT's hidden
size and fed as a token, and one BERT encodes both segments together:
    [CLS] W·r_1 … W·r_N [SEP] | t_1 … t_L          (segment ids 0 | 1, positions 0…N+1 | 0…L−1)
then BERT's embedding LayerNorm/dropout and its transformer; the prediction is a linear classifier
on the pooled [CLS] output, tanh(W_p h_CLS + b_p) (BERT's pooler). Trained on the fused CE only.

Embeddings and "modality m alone": `encode` returns token sequences, {image: B×N×H projected
regions, text: B×L×H word embeddings, zero at padding}; `forward` runs the bitransformer on them
and a token whose embedding is all zero is left out of attention. So the shared-head zero fill is
the missing-modality model: the unimodal logits of text are MMBT on "[CLS] [SEP] text" (image
tokens absent), those of image on "[CLS] regions [SEP]"; with two modalities CAL's `zero`
ablation ("fusion without m") is then exactly the other modality's unimodal logits. Each forward
runs BERT three times (joint + the two unimodal passes). Because the embeddings are sequences,
the AIB (`method.aib`), the `mean` ablation, `contribution_space: embeddings` and separate
unimodal heads are refused. θ_text is the whole BERT (it also encodes the image tokens), θ_image
the ResNet; the region projection, pooler and classifier are shared.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from pydantic import Field

from calray.config import Strict
from calray.errors import ConfigError
from calray.models.encoders import BertEncoder, ResNetEncoder
from calray.models.fusion import Fusion
from calray.registry import FUSIONS

# the reference's region grids (image.py): N regions → adaptive pooling output size
REGION_GRID = {1: (1, 1), 2: (2, 1), 3: (3, 1), 4: (2, 2), 5: (5, 1), 6: (3, 2), 7: (7, 1), 8: (4, 2), 9: (3, 3)}


@FUSIONS.register("mmbt")
class MMBTFusion(Fusion):
    class Params(Strict):
        num_image_embeds: int = Field(3, ge=1, le=9)  # QMF train_qmf.py (facebookresearch/mmbt: 1)
        img_embed_pool_type: Literal["avg", "max"] = "avg"
        # the vocabulary's [CLS]/[SEP] ids; None: read from the tokenizer (data.params.tokenizer,
        # else the text encoder's pretrained_path)
        cls_token_id: int | None = Field(None, ge=0)
        sep_token_id: int | None = Field(None, ge=0)
        # epochs (from the first) without an update of the ResNet / of BERT's transformer layers: QMF
        # train_qmf.py's --freeze_img 3 --freeze_txt 5 (facebookresearch/mmbt: 0, 0); the word embeddings,
        # region projection, pooler and classifier always train
        freeze_image_epochs: int = Field(3, ge=0)
        freeze_text_epochs: int = Field(5, ge=0)

    def __init__(self, dims, num_classes, fusion_dim, params=None):
        super().__init__(dims, num_classes, fusion_dim, params)
        if len(dims) != 2:
            raise ConfigError(f"model.fusion: mmbt joins one image and one text modality, got {list(dims)}")
        grid = REGION_GRID[self.params.num_image_embeds]
        pool = nn.AdaptiveAvgPool2d if self.params.img_embed_pool_type == "avg" else nn.AdaptiveMaxPool2d
        self.pool = pool(grid)
        self._bert: list[nn.Module] = []  # the text encoder's BertModel, referenced (not owned): bind
        self._freeze: list[tuple[int, list[nn.Parameter]]] = []  # (epochs, parameters), referenced: bind

    def bind(self, encoders, cfg) -> None:
        kinds = {m: type(e) for m, e in encoders.items()}
        text = [m for m, k in kinds.items() if issubclass(k, BertEncoder)]
        image = [m for m, k in kinds.items() if issubclass(k, ResNetEncoder) and not encoders[m].frames]
        if len(text) != 1 or len(image) != 1:
            raise ConfigError(f"model.encoders: mmbt needs one bert and one resnet (frames: false) encoder, "
                              f"got {({m: k.__name__ for m, k in kinds.items()})}")
        check_settings(cfg)
        self.text, self.image = text[0], image[0]
        bert = encoders[self.text].net
        hidden = bert.config.hidden_size
        self.cls_id, self.sep_id = special_ids(self.params, cfg, self.text)
        self.proj = nn.Linear(encoders[self.image].out_dim, hidden)
        self.pooler = nn.Linear(hidden, hidden)
        if getattr(bert, "pooler", None) is not None:  # a pretrained BERT's pooler, as the reference uses
            self.pooler.load_state_dict(bert.pooler.dense.state_dict())
        self.head = nn.Linear(hidden, self.num_classes)
        self._bert[:] = [bert]
        self._freeze[:] = [(self.params.freeze_image_epochs, list(encoders[self.image].parameters())),
                           (self.params.freeze_text_epochs, list(bert.encoder.parameters()))]

    def frozen_parameters(self, epoch):
        """The reference's schedule (model_forward): the image encoder while epoch < freeze_image_epochs,
        BERT's encoder (its transformer layers, not the embeddings) while epoch < freeze_text_epochs."""
        return [p for epochs, params in self._freeze if epoch < epochs for p in params]

    def encode(self, encoders, inputs):
        net = encoders[self.image].net
        fmap = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(inputs[self.image]))))))))
        regions = self.pool(fmap).flatten(2).transpose(1, 2)  # B×C×h×w → B×N×C
        txt = inputs[self.text]
        ids = txt["input_ids"][:, 1:]  # the tokenizer's [CLS] is dropped: MMBT's [CLS] opens the image segment
        mask = txt["attention_mask"][:, 1:] if "attention_mask" in txt else torch.ones_like(ids)
        words = encoders[self.text].net.embeddings.word_embeddings(ids) * mask[..., None].to(self.proj.weight.dtype)
        return {self.image: self.proj(regions), self.text: words}

    def forward(self, embs):
        if not self._bert:
            raise RuntimeError("MMBTFusion.bind() was not called (build the model with build_model)")
        bert = self._bert[0]
        img, txt = embs[self.image], embs[self.text]
        b, n, length = img.shape[0], img.shape[1], txt.shape[1]
        word = bert.embeddings.word_embeddings
        special = word(torch.tensor([self.cls_id, self.sep_id], device=img.device)).to(img.dtype)
        seq = torch.cat([special[0].expand(b, 1, -1), img, special[1].expand(b, 1, -1), txt.to(img.dtype)], dim=1)
        ones = torch.ones(b, 1, dtype=torch.bool, device=img.device)
        attend = torch.cat([ones, (img != 0).any(-1), ones, (txt != 0).any(-1)], dim=1)
        segment = torch.cat([torch.zeros(n + 2, dtype=torch.long), torch.ones(length, dtype=torch.long)])
        position = torch.cat([torch.arange(n + 2), torch.arange(length)])
        out = bert(inputs_embeds=seq, attention_mask=attend.long(), token_type_ids=segment.to(img.device).expand(b, -1),
                   position_ids=position.to(img.device).expand(b, -1)).last_hidden_state[:, 0]
        z = torch.tanh(self.pooler(out))
        return z, self.head(z)


def check_settings(cfg) -> None:
    """What MMBT's sequence embeddings rule out (module docstring)."""
    m = cfg.method
    refused = {"method.aib": (m.aib != "off", f"{m.aib!r}; set method.aib: off"),
               "method.phi_ablation": (m.track_contributions and m.phi_ablation == "mean", "'mean'; use 'zero'"),
               "method.contribution_space": (m.track_contributions and m.contribution_space == "embeddings",
                                             "'embeddings'; use 'logits'"),
               "model.unimodal_head": (cfg.model.unimodal_head == "separate", "'separate'; use 'shared'")}
    for key, (bad, hint) in refused.items():
        if bad:
            raise ConfigError(f"{key}: model.fusion mmbt embeds each modality as a token sequence, which {key} "
                              f"cannot take: got {hint}")


def special_ids(params, cfg, text: str) -> tuple[int, int]:
    """[CLS] and [SEP] ids: the fusion params, else the local tokenizer's."""
    if params.cls_token_id is not None and params.sep_token_id is not None:
        return params.cls_token_id, params.sep_token_id
    path = cfg.data.params.get("tokenizer") or cfg.model.encoders[text].pretrained_path
    if not path:
        raise ConfigError("model.fusion_params.cls_token_id/sep_token_id: mmbt needs the vocabulary's [CLS] and "
                          "[SEP] ids; set them, or data.params.tokenizer")
    from transformers import AutoTokenizer  # optional heavy dependency, only for this lookup

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise ConfigError(f"model.fusion_params.cls_token_id: cannot read the tokenizer at {path}: {e}") from None
    cls_id = params.cls_token_id if params.cls_token_id is not None else tok.cls_token_id
    sep_id = params.sep_token_id if params.sep_token_id is not None else tok.sep_token_id
    return int(cls_id), int(sep_id)
