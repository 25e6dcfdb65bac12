"""Numerics shared by the reference stages."""
import torch


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for float32 operands, never in tf32, without touching global settings.

    On CUDA the product runs in float64 and is rounded to float32 (cuBLAS may use tf32 for
    float32 when the user allows it, and flipping that switch here would race with other
    threads and clash with torch's new fp32_precision API); on CPU float32 is IEEE already.
    """
    if a.is_cuda:
        return torch.matmul(a.double(), b.double()).float()
    return torch.matmul(a, b)
