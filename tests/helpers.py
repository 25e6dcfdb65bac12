"""Shared test helpers: the device the tests run on, and the input and parity tools of
`d2pruner_kernels.testing`. (conftest.py only switches the Triton interpreter on.)"""
import torch

from d2pruner_kernels.testing import (assert_edges_match, band_free, band_margin,  # noqa: F401
                                      clustered_tokens, distinct_attention, fused_similarity64,
                                      in_band)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
