"""attention_scores (Triton, two passes; and pass 2 alone, given FlashAttention's lse)
against the eager way of getting the same row: softmax(q kᵀ * scale) in the input dtype,
softmax in float32 (as Hugging Face's eager attention does), span, mean over heads.

CPU: a small fp32 smoke shape (L = 256) under the Triton interpreter (timings mean nothing).
GPU: Hq = 32, Hk = 8, d = 128, bf16, one query row (the last text token), L = 4096 and
32768, the visual span most of the sequence. `kernels+lse - kernels` is pass 1's cost.

    pytest benchmarks/bench_attention.py --benchmark-only            # GPU numbers
    pytest benchmarks/bench_attention.py --benchmark-disable         # CPU smoke test
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from d2pruner_kernels import timing
from d2pruner_kernels.attention_scores import attention_scores
from d2pruner_kernels.kernels import interpreting

from .harness import DEVICE, ON_GPU, run_benchmark

COPIES = 3  # input sets rotated among, so GPU timings do not run from L2


@dataclass(frozen=True)
class AttnShape:
    name: str
    b: int
    hq: int
    hk: int
    n_keys: int
    d: int
    span: tuple[int, int]
    dtype: torch.dtype
    gpu: bool

    def describe(self) -> str:
        return (f"B={self.b} Hq={self.hq} Hk={self.hk} L={self.n_keys} d={self.d} "
                f"span={self.span} {str(self.dtype).removeprefix('torch.')}")


SHAPES = [
    AttnShape("cpu-L256", 1, 4, 2, 256, 64, (16, 208), torch.float32, gpu=False),
    AttnShape("gpu-L4096", 1, 32, 8, 4096, 128, (35, 35 + 2880), torch.bfloat16, gpu=True),
    AttnShape("gpu-L32768", 1, 32, 8, 32768, 128, (35, 32768 - 64), torch.bfloat16, gpu=True),
]


def eager_row(q, k, span):
    """What an eager attention layer computes for these rows, then the span, head-averaged."""
    g = q.shape[1] // k.shape[1]
    logits = q @ k.repeat_interleave(g, dim=1).transpose(-1, -2) / math.sqrt(q.shape[-1])
    p = torch.softmax(logits, dim=-1, dtype=torch.float32)
    return p[..., span[0]:span[1]].mean(dim=(1, 2))


def inputs(shape: AttnShape):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(COPIES):
        q = torch.randn(shape.b, shape.hq, 1, shape.d, generator=gen)
        k = torch.randn(shape.b, shape.hk, shape.n_keys, shape.d, generator=gen)
        q, k = q.to(DEVICE, shape.dtype), k.to(DEVICE, shape.dtype)
        lse = torch.logsumexp(
            (q.float() @ k.float().repeat_interleave(shape.hq // shape.hk, 1).transpose(-1, -2))
            / math.sqrt(shape.d), dim=-1)
        out.append((q, k, lse))
    return out


@pytest.mark.parametrize("variant", ["kernels", "kernels+lse", "eager", "reference"])
@pytest.mark.parametrize(
    "shape", [pytest.param(s, marks=pytest.mark.skipif(s.gpu and not ON_GPU, reason="GPU shape"))
              for s in SHAPES], ids=lambda s: s.name)
def test_attention_scores(benchmark, shape, variant):
    if not shape.gpu and ON_GPU:
        pytest.skip("CPU smoke shape: GPU runs use the real shapes")
    span = shape.span
    backend = "reference" if variant == "reference" else "kernels"
    copies = inputs(shape)
    if variant == "eager":
        calls = [lambda q=q, k=k: eager_row(q, k, span) for q, k, _ in copies]
    else:
        use_lse = variant == "kernels+lse"
        calls = [lambda q=q, k=k, lse=lse: attention_scores(
                     q, k, key_span=span, lse=lse if use_lse else None, backend=backend)
                 for q, k, lse in copies]
    # The timed thing must be right: the eager row in float32 on the same inputs (the bf16
    # eager row itself is only ~1e-2 close: its logits are rounded to bf16).
    got = calls[0]().float()
    want = eager_row(copies[0][0].float(), copies[0][1].float(), span)
    tol = 0.1 if variant == "eager" and shape.dtype != torch.float32 else 1e-4
    assert torch.allclose(got, want, rtol=tol, atol=0), ((got - want).abs() / want).max()
    run_benchmark(benchmark, "attention_scores", shape, variant, calls,
                  slow=interpreting() and backend == "kernels")


# -- `python -m benchmarks.bench_attention` (GPU): the two-pass split and block sizes -----

def _sweep() -> None:
    """Median GPU times (replays of a CUDA graph, which leaves out Python's launch
    overhead, each on an idle GPU with the L2 flushed) and back-to-back host times (the
    per-call cost a model pays) of the eager row, the two passes, pass 2 alone (lse given)
    and a few block-size choices; prints a table."""
    import triton

    from d2pruner_kernels.kernels import attention as kern

    cases = [(s, 1) for s in SHAPES if s.gpu] + [
        (AttnShape("gpu-L4096-span576", 1, 32, 8, 4096, 128, (35, 35 + 576), torch.bfloat16,
                   gpu=True), 1),
        (AttnShape("gpu-L32768-span576", 1, 32, 8, 32768, 128, (35, 35 + 576), torch.bfloat16,
                   gpu=True), 1),
        (SHAPES[1], 32)]                                   # 32 query rows averaged
    configs = [{}, dict(span_programs=1), dict(span_programs=1056), dict(BLOCK_N_SPAN=32),
               dict(BLOCK_N_SPAN=128), dict(BLOCK_N=128), dict(programs=132),
               dict(programs=1056)]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}")
    print(f"{'shape':<20}{'rows':>5}  {'variant':<34}{'GPU us':>8}{'host us':>9}")
    for shape, nq in cases:
        gen = torch.Generator().manual_seed(1)
        q = torch.randn(shape.b, shape.hq, nq, shape.d, generator=gen).to(DEVICE, shape.dtype)
        k = torch.randn(shape.b, shape.hk, shape.n_keys, shape.d, generator=gen).to(DEVICE, shape.dtype)
        scale = 1 / math.sqrt(shape.d)
        lse = torch.logsumexp((q.float() @ k.float().repeat_interleave(
            shape.hq // shape.hk, 1).transpose(-1, -2)) * scale, dim=-1)
        want = eager_row(q.float(), k.float(), shape.span)
        rows = [("eager (bf16 logits, fp32 softmax)", lambda: eager_row(q, k, shape.span)),
                ("public attention_scores()", lambda: attention_scores(q, k, key_span=shape.span))]
        for cfg in configs:
            name = "two passes " + (",".join(f"{a}={b}" for a, b in cfg.items()) or "default")
            rows.append((name, lambda cfg=cfg: kern.attention_scores(
                q, k, shape.span, scale, config=cfg)))
        rows.append(("pass 2 only (lse given)", lambda: kern.attention_scores(
            q, k, shape.span, scale, lse=lse)))
        for name, fn in rows:
            got = fn().float()
            err = ((got - want).abs() / want).max().item()
            gpu = timing.median_seconds(timing.graph_replay(fn), 100, device=DEVICE, flush=True)
            host = timing.back_to_back_seconds(fn, 200, DEVICE)
            print(f"{shape.name:<20}{nq:>5}  {name:<34}{gpu * 1e6:>8.1f}{host * 1e6:>9.1f}"
                  f"   max rel err {err:.1e}")


if __name__ == "__main__":
    _sweep()
