"""Quantisation (seeds 003/004): post-training INT8 and QAT (`Quantization`), QuantNoise as a trainer plug-in,
product quantisation (`ProductQuantization`); INT8 speed through ONNX QDQ export and onnxruntime."""
from .compressor import Quantization
from .noise import QuantNoise
from .pq import PQConv2d, PQLinear, ProductQuantization, product_quantize
from .prepare import activation_points, calibrate, fold_batchnorm, quantize_weights
from .quantizers import ActQuant, QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear, fake_quant_weight, quantize_weight

__all__ = ["Quantization", "QuantNoise", "ProductQuantization", "product_quantize", "PQConv2d", "PQLinear",
           "ActQuant", "QuantConv1d", "QuantConv2d", "QuantConv3d", "QuantLinear", "fake_quant_weight", "quantize_weight",
           "fold_batchnorm", "quantize_weights", "activation_points", "calibrate"]
