"""Numerics shared by the reference stages."""
import torch


class true_fp32:
    """Matrix products in real float32 on CUDA, whatever the user set (never tf32)."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved
