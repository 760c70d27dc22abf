"""Macula models: BAM/CBAM ResNets that return their attention maps, and a safe checkpoint format."""

from .attention import BAM, CBAM, AttentionMap, make_attention
from .checkpoint import CheckpointError, CheckpointMetadata, Preprocessing, load_checkpoint, save_checkpoint
from .fusion import fold_batchnorm
from .registry import create_model, list_models
from .resnet import ResNet

__all__ = [
    "BAM", "CBAM", "AttentionMap", "CheckpointError", "CheckpointMetadata", "Preprocessing", "ResNet",
    "create_model", "fold_batchnorm", "list_models", "load_checkpoint", "make_attention", "save_checkpoint",
]
