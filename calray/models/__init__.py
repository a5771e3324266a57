"""Models: encoder and fusion registries and the multimodal classifier."""

from calray.models.encoders import ENCODERS, build_encoder, register_encoder
from calray.models.fusion import FUSIONS, build_fusion
from calray.models.multimodal import ModelOutput, MultimodalModel, build_model

__all__ = ["ENCODERS", "FUSIONS", "ModelOutput", "MultimodalModel", "build_encoder", "build_fusion",
           "build_model", "register_encoder"]
