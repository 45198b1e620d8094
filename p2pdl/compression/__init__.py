"""Tensor compressors and the codec that turns named tensors into wire parts."""
