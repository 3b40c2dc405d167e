"""ViT dimension pruning with learned gates (VTP, seed 001)."""
from .compressor import VTP, VisionTransformerPruning, gate_scores, train_gates
from .columns import SelectFeatures, select_reader_columns
from .unfuse import SelfAttention, unfuse_attention
from .gates import FeatureGate, fold_gates, gates_of, insert_gates

__all__ = ["VTP", "VisionTransformerPruning", "FeatureGate", "insert_gates", "fold_gates", "gates_of", "gate_scores",
           "train_gates", "SelectFeatures", "select_reader_columns",
           "SelfAttention", "unfuse_attention"]
