"""The packed candidate adjacency: the contract between the graph stage and the MIS stage.

Layout (both backends, the Triton graph kernel and the CUDA/C++ MIS read and write it):

* ``adj`` is ``int32 [B, C, words]`` with ``C = N - n_pivots`` candidates and
  ``words = ceil(C / 32)``, contiguous.
* Rows and columns are candidates in **rank order**: row ``i`` is the i-th best-ranked
  candidate, i.e. token ``order[b, n_pivots + i]``.
* Bit ``j % 32`` (least significant bit first) of word ``j // 32`` of row ``i`` is the edge
  ``(i, j)``. Only the strict lower triangle is stored: the bits ``j < i``, the better-ranked
  neighbours, which is all the greedy walk and the Luby rule ever read.
* Of row ``i``, words ``0 .. i // 32`` are defined (bits ``j >= i`` in them are zero); the
  words after them are **unspecified** (the kernel never writes them). Readers mask them.
"""
from __future__ import annotations

import torch


def num_words(c: int) -> int:
    return (c + 31) // 32


def _bit_weights(device) -> torch.Tensor:
    return torch.ones(8, dtype=torch.uint8, device=device) << torch.arange(8, dtype=torch.uint8, device=device)


def pack_lower(edges: torch.Tensor) -> torch.Tensor:
    """bool [B, C, C] edges (rank order) -> packed int32 [B, C, words] of the strict lower
    triangle. Bytes are packed and viewed as int32: byte 0 of a word holds columns 0-7,
    which is the LSB-first order on little-endian machines (x86, ARM, every GPU)."""
    b, c, _ = edges.shape
    w = num_words(c)
    if w == 0:
        return torch.zeros(b, c, 0, dtype=torch.int32, device=edges.device)
    lower = edges & torch.ones(c, c, dtype=torch.bool, device=edges.device).tril(-1)
    padded = torch.zeros(b, c, w * 32, dtype=torch.uint8, device=edges.device)
    padded[:, :, :c] = lower
    packed = (padded.view(b, c, w * 4, 8) * _bit_weights(edges.device)).sum(-1, dtype=torch.uint8)
    return packed.view(torch.int32)


def unpack_lower(adj: torch.Tensor, c: int) -> torch.Tensor:
    """packed int32 [B, C, words] -> bool [B, C, C], the strict lower triangle only
    (unspecified words are masked away)."""
    b = adj.shape[0]
    by = adj.contiguous().view(torch.uint8)  # [B, C, words * 4], byte 0 = columns 0-7
    bits = (by.unsqueeze(-1) & _bit_weights(adj.device)) != 0
    full = bits.view(b, c, -1)[:, :, :c]
    return full & torch.ones(c, c, dtype=torch.bool, device=adj.device).tril(-1)


def unpack_symmetric(adj: torch.Tensor, c: int) -> torch.Tensor:
    """packed int32 [B, C, words] -> bool [B, C, C] symmetric adjacency."""
    lower = unpack_lower(adj, c)
    return lower | lower.transpose(1, 2)
