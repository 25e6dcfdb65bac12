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
    return torch.ones(32, dtype=torch.int64, device=device) << torch.arange(32, device=device)


def pack_lower(edges: torch.Tensor) -> torch.Tensor:
    """bool [B, C, C] edges (rank order) -> packed int32 [B, C, words] of the strict lower triangle."""
    b, c, _ = edges.shape
    w = num_words(c)
    lower = edges & torch.ones(c, c, dtype=torch.bool, device=edges.device).tril(-1)
    padded = torch.zeros(b, c, w * 32, dtype=torch.int64, device=edges.device)
    padded[:, :, :c] = lower
    words = (padded.view(b, c, w, 32) * _bit_weights(edges.device)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement into int32
    return words.to(torch.int32)


def unpack_lower(adj: torch.Tensor, c: int) -> torch.Tensor:
    """packed int32 [B, C, words] -> bool [B, C, C], the strict lower triangle only
    (unspecified words are masked away)."""
    b = adj.shape[0]
    bits = (adj.to(torch.int64).unsqueeze(-1) >> torch.arange(32, device=adj.device)) & 1
    full = bits.view(b, c, -1)[:, :, :c].bool()
    return full & torch.ones(c, c, dtype=torch.bool, device=adj.device).tril(-1)


def unpack_symmetric(adj: torch.Tensor, c: int) -> torch.Tensor:
    """packed int32 [B, C, words] -> bool [B, C, C] symmetric adjacency."""
    lower = unpack_lower(adj, c)
    return lower | lower.transpose(1, 2)
