"""The one matrix product of the Triton kernels: products in the input dtype, float32 sums.

bf16 / fp16 products are exact in the float32 accumulator of the tensor cores (the sums
round as float32 sums do, in the order the hardware adds them); float32 inputs take
true-fp32 "ieee" dots, never tf32 (for 16-bit inputs "ieee" changes nothing).
Under the interpreter a bf16 dot is wrong (triton#11584), so there it goes through float32.
"""
from __future__ import annotations

import triton
import triton.language as tl

import torch

from . import interpreting


@triton.jit
def dot_fp32_acc(a, b, acc, UPCAST: tl.constexpr):
    """a @ b (+ acc, which may be None), accumulated in float32, never tf32."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


def upcast(dtype: torch.dtype) -> bool:
    """dot_fp32_acc's UPCAST for inputs of `dtype`."""
    return interpreting() and dtype == torch.bfloat16
