"""attention_scores: the Triton kernel and the torch reference against softmax(q kᵀ * scale)
in float64 on the same (rounded) inputs, to 1e-5 relative; then the input checks."""
from __future__ import annotations

import math

import pytest
import torch

from d2pruner_kernels.attention_scores import attention_scores
from helpers import DEVICE, ON_GPU

RTOL = 1e-5
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _qk(b, hq, nq, hk, n_keys, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g)
    k = torch.randn(b, hk, n_keys, d, generator=g)
    # A few strong keys: the softmax is far from uniform, as in a real attention row.
    k[:, :, torch.randint(0, n_keys, (5,), generator=g)] *= 3.0
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype)


def logits64(q, k, scale=None, positions=None):
    """Full float64 logits of the rows, on the inputs as given (already rounded to their
    dtype), -inf where the causal limit hides a key."""
    q64, k64 = q.double().cpu(), k.double().cpu()
    hq, hk, n_keys, d = q.shape[1], k.shape[1], k.shape[2], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    logits = q64 @ k64.repeat_interleave(hq // hk, 1).transpose(-1, -2) * scale
    if positions is not None:
        pos = positions.cpu().reshape(-1, 1, q.shape[2], 1)
        logits = logits.masked_fill(torch.arange(n_keys) > pos, float("-inf"))
    return logits


def exact(q, k, span, scale=None, positions=None):
    """The definition: softmax over the keys each row sees, the span, the mean."""
    p = torch.softmax(logits64(q, k, scale, positions), dim=-1)
    return p[..., span[0]:span[1]].mean(dim=(1, 2))


def exact_lse(q, k, scale=None, positions=None):
    return torch.logsumexp(logits64(q, k, scale, positions), dim=-1)


def assert_rel_close(out, want, rtol=RTOL):
    assert out.dtype == torch.float32
    assert out.shape == want.shape, (out.shape, want.shape)
    out = out.double().cpu()
    assert torch.isfinite(out).all()
    zero = want == 0
    assert (out[zero] == 0).all(), "keys a row cannot see must get exactly 0"
    rel = ((out - want).abs() / want.abs().clamp_min(1e-300))[~zero]
    worst = rel.max().item() if rel.numel() else 0.0
    assert worst <= rtol, f"max relative error {worst:.3g} > {rtol} at {int(rel.argmax())}"


BACKENDS = ("kernels", "reference")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", (64, 80, 96, 128))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_dtypes_head_dims(dtype, d, backend):
    # GQA 6 query heads on 2 key heads, 3 query rows, odd L, a span inside the sequence.
    q, k = _qk(2, 6, 3, 2, 203, d, dtype, seed=d + DTYPES.index(dtype))
    out = attention_scores(q, k, key_span=(11, 190), backend=backend)
    assert_rel_close(out, exact(q, k, (11, 190)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hq,hk", [(4, 4), (8, 1), (8, 2)])
def test_parity_head_layouts(hq, hk, backend):
    q, k = _qk(1, hq, 1, hk, 157, 64, torch.float32, seed=hq * 10 + hk)
    out = attention_scores(q, k, key_span=(0, 157), scale=0.2, backend=backend)
    want = exact(q, k, (0, 157), scale=0.2)
    assert_rel_close(out, want)
    assert torch.allclose(out.double().sum(-1).cpu(), torch.ones(1, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_limits(dtype, backend):
    # Per-row positions: one before the span (sees none of it), one inside, one past L;
    # a [B, Nq] tensor gives each image its own positions.
    q, k = _qk(2, 4, 3, 2, 181, 80, dtype, seed=7)
    pos = torch.tensor([[20, 120, 400], [180, 60, 99]], device=DEVICE)
    out = attention_scores(q, k, key_span=(30, 150), q_positions=pos, backend=backend)
    want = exact(q, k, (30, 150), positions=pos)
    assert_rel_close(out, want)
    assert (want[1, 70:] > 0).all() and (out[1, 90:] > 0).all()   # row 0 of image 1 sees them
    pos1 = torch.tensor([29, 100, 170], dtype=torch.int32, device=DEVICE)
    out1 = attention_scores(q, k, key_span=(30, 150), q_positions=pos1, backend=backend)
    assert_rel_close(out1, exact(q, k, (30, 150), positions=pos1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_seeing_no_key_adds_zeros(backend):
    q, k = _qk(1, 2, 2, 1, 64, 64, torch.float32, seed=3)
    pos = torch.tensor([-1, 63], device=DEVICE)
    out = attention_scores(q, k, key_span=(0, 64), q_positions=pos, backend=backend)
    half = exact(q[:, :, 1:], k, (0, 64)) / 2   # the blind row counts in the mean as zeros
    assert_rel_close(out, half)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lse_path(dtype, backend):
    q, k = _qk(2, 8, 2, 2, 229, 96, dtype, seed=11)
    lse = exact_lse(q, k).float().to(DEVICE)
    out = attention_scores(q, k, key_span=(5, 200), lse=lse, backend=backend)
    assert_rel_close(out, exact(q, k, (5, 200)))
    pos = torch.tensor([150, 228], device=DEVICE)
    lse = exact_lse(q, k, positions=pos).float().to(DEVICE)
    out = attention_scores(q, k, key_span=(5, 200), lse=lse, q_positions=pos, backend=backend)
    assert_rel_close(out, exact(q, k, (5, 200), positions=pos))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_is_used_not_recomputed(backend):
    # A wrong lse by +log 2 halves every probability: proof the normalising pass is skipped.
    q, k = _qk(1, 4, 1, 2, 100, 64, torch.float32, seed=5)
    lse = exact_lse(q, k).float().to(DEVICE) + math.log(2.0)
    out = attention_scores(q, k, key_span=(10, 90), lse=lse, backend=backend)
    assert_rel_close(out, exact(q, k, (10, 90)) / 2)


@pytest.mark.parametrize("chunk,block_span,span_programs", [(128, 32, 1), (256, 128, 1000),
                                                            (64, 64, 30)])
def test_chunked_and_split_passes(chunk, block_span, span_programs):
    # Several chunks of pass 1 merged in pass 2, several span blocks, the key heads split
    # over pass-2 programs (3 heads: groups of 1, or of 2 and 1), causal limits that end
    # some chunks early and skip others entirely, several row blocks (BLOCK_M = 16 < 18).
    from d2pruner_kernels.kernels import attention as kern
    q, k = _qk(2, 9, 6, 3, 517, 64, torch.float16, seed=chunk)
    pos = torch.tensor([[100, 516, 7, 300, 200, 12], [300, 2, 516, 516, 40, 41]], device=DEVICE)
    cfg = dict(chunk=chunk, BLOCK_N_SPAN=block_span, span_programs=span_programs, BLOCK_M=16)
    out = kern.attention_scores(q, k, (3, 517), 0.125, q_positions=pos, config=cfg)
    assert_rel_close(out, exact(q, k, (3, 517), scale=0.125, positions=pos))
    lse = exact_lse(q, k, scale=0.125, positions=pos).float().to(DEVICE)
    out = kern.attention_scores(q, k, (3, 517), 0.125, lse=lse, q_positions=pos, config=cfg)
    assert_rel_close(out, exact(q, k, (3, 517), scale=0.125, positions=pos))


def test_strided_inputs_and_eager_row():
    # q and k as the model holds them ([B, L, H, d], transposed views), RoPE not our business;
    # the result is the eager attention row of the last text token, averaged over heads.
    g = torch.Generator().manual_seed(21)
    b, n_keys, hq, hk, d = 1, 120, 4, 2, 64
    q_all = torch.randn(b, n_keys, hq, d, generator=g).to(DEVICE).transpose(1, 2)
    k = torch.randn(b, n_keys, hk, d, generator=g).to(DEVICE).transpose(1, 2)
    # eager causal attention, float64, full L x L matrix
    logits = (q_all.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) / 8.0
    causal = torch.ones(n_keys, n_keys, dtype=torch.bool, device=DEVICE).tril()
    attn = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    eager_row = attn[:, :, -1, 10:100].mean(dim=1)
    for backend in BACKENDS:
        out = attention_scores(q_all[:, :, -1:], k, key_span=(10, 100), backend=backend)
        assert_rel_close(out, eager_row.cpu())
        mid = attention_scores(q_all[:, :, 60:61], k, key_span=(10, 100), backend=backend,
                               q_positions=torch.tensor([60], device=DEVICE))
        assert_rel_close(mid, attn[:, :, 60, 10:100].mean(dim=1).cpu())


def test_deterministic_and_inputs_untouched():
    q, k = _qk(1, 8, 2, 2, 300, 128, torch.bfloat16, seed=9)
    q0, k0 = q.clone(), k.clone()
    a = attention_scores(q, k, key_span=(1, 299), backend="kernels")
    b = attention_scores(q, k, key_span=(1, 299), backend="kernels")
    assert torch.equal(a, b)
    assert torch.equal(q, q0) and torch.equal(k, k0)


@pytest.mark.skipif(not ON_GPU, reason="long sequences only on a GPU")
@pytest.mark.parametrize("n_keys", (4096, 32768))
def test_long_sequences_gpu(n_keys):
    q, k = _qk(1, 32, 1, 8, n_keys, 128, torch.bfloat16, seed=n_keys)
    span = (35, 35 + 2880)
    want = exact(q, k, span)
    assert_rel_close(attention_scores(q, k, key_span=span), want)
    lse = exact_lse(q, k).float().to(DEVICE)
    assert_rel_close(attention_scores(q, k, key_span=span, lse=lse), want)


# -- bad input ---------------------------------------------------------------------------

def _good():
    q, k = _qk(2, 4, 1, 2, 50, 64, torch.float32, seed=1)
    return dict(q=q, k=k, key_span=(5, 40))


@pytest.mark.parametrize("change,exc,match", [
    (lambda a: a.update(q=a["q"][0]), ValueError, r"q must be 4-D \[B, Hq, Nq, d\], got shape \[4, 1, 64\]"),
    (lambda a: a.update(k=a["k"][:, :, :, None]), ValueError, r"k must be 4-D"),
    (lambda a: a.update(q=a["q"].numpy() if not ON_GPU else [1]), TypeError, r"q must be a torch.Tensor"),
    (lambda a: a.update(q=a["q"].double(), k=a["k"].double()), TypeError, r"q must be float16, bfloat16 or float32, got torch.float64"),
    (lambda a: a.update(k=a["k"].half()), TypeError, r"k must have the dtype of q \(torch.float32\), got torch.float16"),
    (lambda a: a.update(k=a["k"][:1]), ValueError, r"k has batch 1 but q has B=2"),
    (lambda a: a.update(k=a["k"][..., :32]), ValueError, r"k has head dim d=32 but q has d=64"),
    (lambda a: a.update(q=a["q"][:, :3]), ValueError, r"Hq=3 must be a multiple of k heads Hk=2"),
    (lambda a: a.update(key_span=(40, 5)), ValueError, r"0 <= start < end <= L=50, got \(40, 5\)"),
    (lambda a: a.update(key_span=(0, 51)), ValueError, r"L=50, got \(0, 51\)"),
    (lambda a: a.update(key_span=(-1, 10)), ValueError, r"got \(-1, 10\)"),
    (lambda a: a.update(key_span=(0.0, 10)), TypeError, r"key_span must be a pair of ints"),
    (lambda a: a.update(key_span=5), TypeError, r"key_span must be a pair of ints"),
    (lambda a: a.update(scale=0.0), ValueError, r"scale must be a positive finite float, got 0.0"),
    (lambda a: a.update(scale=float("nan")), ValueError, r"scale must be a positive finite"),
    (lambda a: a.update(scale="1"), TypeError, r"scale must be a float"),
    (lambda a: a.update(lse=torch.zeros(2, 4, device=DEVICE)), ValueError, r"lse must have shape \[B, Hq, Nq\] = \[2, 4, 1\], got \[2, 4\]"),
    (lambda a: a.update(lse=torch.zeros(2, 4, 1, dtype=torch.float64, device=DEVICE)), TypeError, r"lse must be float32"),
    (lambda a: a.update(q_positions=torch.tensor([1.0], device=DEVICE)), TypeError, r"q_positions must be int32 or int64, got torch.float32"),
    (lambda a: a.update(q_positions=torch.tensor([1, 2], device=DEVICE)), ValueError, r"q_positions must have shape \[Nq\] = \[1\] or \[B, Nq\] = \[2, 1\], got \[2\]"),
    (lambda a: a.update(backend="triton"), ValueError, r"backend must be one of"),
])
def test_bad_inputs(change, exc, match):
    args = _good()
    change(args)
    with pytest.raises(exc, match=match):
        attention_scores(args.pop("q"), args.pop("k"), **args)


def test_device_mismatch():
    q, k = _qk(1, 2, 1, 1, 20, 64, torch.float32, seed=2)
    meta = torch.empty(k.shape, device="meta")
    with pytest.raises(ValueError, match=r"k is on meta but q is on"):
        attention_scores(q, meta, key_span=(0, 20))
    with pytest.raises(ValueError, match=r"lse is on meta but q is on"):
        attention_scores(q, k, key_span=(0, 20), lse=torch.empty(1, 2, 1, device="meta"))
