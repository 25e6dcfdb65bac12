"""attention_scores: the Triton kernel and the torch reference against softmax(q kᵀ * scale)
in float64 on the same (rounded) inputs, to 1e-5 relative; a left-padded batch (a span
per sample, the padding mask) against each sample's own eager attention on its real
tokens; then the input checks."""
from __future__ import annotations

import json
import math

import pytest
import torch

import d2pruner_kernels as d2p
from d2pruner_kernels.attention_scores import attention_scores
from d2pruner_kernels.kernels import interpreting
from helpers import DEVICE, ON_GPU, run_json

RTOL = 1e-5
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
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


# -- padded and packed batches: a span per sample, a key-padding mask ---------------------

SYS_LEN = 3


def _left_padded(images, texts, dtype, seed, hq=4, hk=2, d=64):
    """B samples (system prompt | image | text), of different lengths, padded on the left
    to the longest as an HF batch with padding_side='left' holds them. The padding keys
    and queries are random and the keys strong (3x): a softmax that let them in would be
    far off. Returns q_all [B, Hq, L, d], k [B, Hk, L, d] (rounded to dtype), the padding
    length of each sample, and the mask [B, L] (True = a real key)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [SYS_LEN + n + t for n, t in zip(images, texts)]
    b, n_keys = len(lengths), max(lengths)
    q_all = torch.randn(b, hq, n_keys, d, generator=g)
    k = torch.randn(b, hk, n_keys, d, generator=g)
    pads = [n_keys - n for n in lengths]
    for i, p in enumerate(pads):
        k[i, :, :p] *= 3.0
    mask = torch.arange(n_keys)[None, :] >= torch.tensor(pads)[:, None]
    return q_all.to(DEVICE, dtype), k.to(DEVICE, dtype), pads, mask.to(DEVICE)


def eager_unpadded(q_all, k, pads, rows, cols, scale=None):
    """Sample by sample on its real tokens only (the padding cut off, so nothing has to
    mask it): the float64 causal eager attention matrix, its rows `rows[b]` and columns
    cols[b] = (start, end) in unpadded positions, averaged over heads and rows. Returns
    the rows (a list) and the log-sum-exp of those rows, [B, Hq, Nq] (what FlashAttention
    returns)."""
    out, lses = [], []
    hq, hk, d = q_all.shape[1], k.shape[1], q_all.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    for b, p in enumerate(pads):
        qb, kb = q_all[b, :, p:].double().cpu(), k[b, :, p:].double().cpu()
        n = qb.shape[1]
        logits = qb @ kb.repeat_interleave(hq // hk, 0).transpose(-1, -2) * scale
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        logits = logits.masked_fill(~causal, float("-inf"))[:, rows[b]]   # [Hq, Nq, n]
        attn = torch.softmax(logits, dim=-1)
        out.append(attn[..., cols[b][0]:cols[b][1]].mean(dim=(0, 1)))
        lses.append(torch.logsumexp(logits, dim=-1))
    return out, torch.stack(lses)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("images", [(20, 20, 20), (12, 30, 21)], ids=["equal", "ragged"])
def test_left_padded_batch(images, dtype, backend):
    # B = 3 samples of different lengths (texts differ), left-padded; two query rows per
    # sample: one inside its image (sees part of it) and the last token. Each sample's
    # span sits elsewhere among the padded keys.
    texts = (9, 2, 5)
    q_all, k, pads, mask = _left_padded(images, texts, dtype, seed=sum(images) + DTYPES.index(dtype))
    n_keys = k.shape[2]
    rows = [[SYS_LEN + n // 2, n_keys - p - 1] for n, p in zip(images, pads)]  # unpadded
    cols = [(SYS_LEN, SYS_LEN + n) for n in images]
    want, lse = eager_unpadded(q_all, k, pads, rows, cols)
    idx = torch.tensor([[p + r for r in rr] for p, rr in zip(pads, rows)])    # padded [B, Nq]
    q = torch.stack([q_all[b][:, idx[b].to(DEVICE)] for b in range(3)])       # [B, Hq, Nq, d]
    spans = [(p + s, p + e) for p, (s, e) in zip(pads, cols)]
    kw = dict(q_positions=idx.to(DEVICE), key_padding_mask=mask, backend=backend)
    if len(set(images)) == 1:                                    # equal lengths: [B, n]
        assert_rel_close(attention_scores(q, k, key_span=spans, **kw), torch.stack(want))
    else:
        with pytest.raises(ValueError, match=r"lengths differ between samples \(sample 0 "
                           r"has 12 keys, sample 1 has 30; all: \[12, 30, 21\]\)"):
            attention_scores(q, k, key_span=spans, **kw)
    packed = torch.cat(want)                                     # [sum n_b], samples in order
    assert_rel_close(attention_scores(q, k, key_span=spans, packed=True, **kw), packed)
    # the same from a host span tensor and an int mask (HF's attention_mask) ...
    kw.update(key_padding_mask=mask.long())
    assert_rel_close(attention_scores(q, k, key_span=torch.tensor(spans), packed=True, **kw),
                     packed)
    # ... and with FlashAttention's lse (which already leaves the padding out)
    out = attention_scores(q, k, key_span=spans, packed=True, lse=lse.float().to(DEVICE), **kw)
    assert_rel_close(out, packed)


def exact_masked(q, k, spans, mask, scale=None, positions=None):
    """The definition with padding: logits of the keys the mask removes set to -inf, the
    softmax, a row that sees nothing all zeros, each sample's span; rows back to back."""
    logits = logits64(q, k, scale, positions).masked_fill(~mask.cpu()[:, None, None, :],
                                                          float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return torch.cat([p[b, ..., s:e].mean(dim=(0, 1)) for b, (s, e) in enumerate(spans)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_mask_shared_span(backend):
    # One span for both samples (today's path) with the mask: holes inside the span score
    # exactly 0, and a row that sees only padding (keys <= 20, all masked) adds zeros.
    q, k = _qk(2, 4, 2, 2, 90, 64, torch.float32, seed=13)
    mask = torch.ones(2, 90, dtype=torch.bool, device=DEVICE)
    mask[0, :30] = False
    mask[1, 40:50] = False
    pos = torch.tensor([[20, 89], [89, 70]], device=DEVICE)
    out = attention_scores(q, k, key_span=(10, 80), q_positions=pos, key_padding_mask=mask,
                           backend=backend)
    want = exact_masked(q, k, [(10, 80)] * 2, mask, positions=pos).view(2, 70)
    assert_rel_close(out, want)
    assert (out[1, 30:40] == 0).all() and (out[0, :20] == 0).all()
    # a list of identical spans is the shared span; packed=True flattens it
    same = attention_scores(q, k, key_span=[(10, 80)] * 2, q_positions=pos,
                            key_padding_mask=mask, packed=True, backend=backend)
    assert torch.equal(same, out.flatten())


def test_per_sample_chunked_and_split_passes():
    # Per-sample spans and a mask through several pass-1 chunks, short span blocks (some
    # past a sample's span: they write nothing), the key heads split over pass-2 programs,
    # two row blocks (BLOCK_M = 16 < 18); a left padding that fills whole chunks.
    from d2pruner_kernels.kernels import attention as kern
    q, k = _qk(3, 9, 6, 3, 260, 64, torch.float16, seed=17)
    mask = torch.ones(3, 260, dtype=torch.bool, device=DEVICE)
    mask[1, :37] = False
    mask[2, :130] = False
    mask[2, 150:155] = False
    spans = [(5, 25), (40, 240), (130, 210)]
    pos = torch.tensor([[259, 10, 100, 259, 200, 24]] * 2 + [[259, 140, 129, 259, 259, 180]],
                       device=DEVICE)
    cfg = dict(chunk=64, BLOCK_N_SPAN=16, span_programs=1000, BLOCK_M=16)
    want = exact_masked(q, k, spans, mask, scale=0.125, positions=pos)
    out = kern.attention_scores(q, k, spans, 0.125, q_positions=pos, config=cfg,
                                key_padding_mask=mask)
    assert_rel_close(out, want)
    lse = torch.logsumexp(logits64(q, k, 0.125, pos).masked_fill(
        ~mask.cpu()[:, None, None, :], float("-inf")), dim=-1).float().to(DEVICE)
    lse = lse.nan_to_num(0.0, neginf=0.0)   # rows that see nothing: lse unused
    out = kern.attention_scores(q, k, spans, 0.125, lse=lse, q_positions=pos, config=cfg,
                                key_padding_mask=mask)
    assert_rel_close(out, want)


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
    # per-sample spans
    (lambda a: a.update(key_span=[(5, 40)] * 3), ValueError, r"key_span has 3 \(start, end\) pairs but q has B=2"),
    (lambda a: a.update(key_span=[(5, 40), (5,)]), TypeError, r"key_span\[1\] must be a pair of ints \(start, end\), got \(5,\)"),
    (lambda a: a.update(key_span=[(5, 40), (5.0, 40)]), TypeError, r"key_span\[1\] must be a pair of ints"),
    (lambda a: a.update(key_span=[(5, 40), (45, 51)]), ValueError, r"key_span\[1\] \(sample 1\) must satisfy 0 <= start < end <= L=50, got \(45, 51\)"),
    (lambda a: a.update(key_span=[(-1, 34), (5, 40)]), ValueError, r"key_span\[0\] \(sample 0\) must satisfy .* got \(-1, 34\)"),
    (lambda a: a.update(key_span=[(5, 40), (30, 30)]), ValueError, r"key_span\[1\] \(sample 1\) .* got \(30, 30\)"),
    (lambda a: a.update(key_span=[]), TypeError, r"key_span must be a pair of ints \(start, end\), B such pairs or an int tensor \[B, 2\]"),
    (lambda a: a.update(key_span=torch.tensor([[5, 40, 1], [5, 40, 1]])), ValueError, r"key_span tensor must have shape \[B, 2\] = \[2, 2\], got \[2, 3\]"),
    (lambda a: a.update(key_span=torch.tensor([5, 40])), ValueError, r"key_span tensor must have shape \[B, 2\] = \[2, 2\], got \[2\]"),
    (lambda a: a.update(key_span=torch.tensor([[5.0, 40.0]] * 2)), TypeError, r"key_span tensor must be int32 or int64, got torch.float32"),
    (lambda a: a.update(key_span=torch.empty(2, 2, dtype=torch.int64, device="meta")), ValueError, r"key_span tensor must be on the CPU .* got meta"),
    (lambda a: a.update(key_span=torch.tensor([[5, 40], [0, 51]])), ValueError, r"key_span\[1\] \(sample 1\) .* L=50, got \(0, 51\)"),
    (lambda a: a.update(key_span=[(5, 40), (5, 30)]), ValueError, r"key_span lengths differ between samples \(sample 0 has 35 keys, sample 1 has 25; all: \[35, 25\]\): pass packed=True .* \[60\]"),
    (lambda a: a.update(packed=1), TypeError, r"packed must be a bool, got int 1"),
    # key-padding mask
    (lambda a: a.update(key_padding_mask=torch.ones(2, 49, dtype=torch.bool, device=DEVICE)), ValueError, r"key_padding_mask must have shape \[B, L\] = \[2, 50\], got \[2, 49\]"),
    (lambda a: a.update(key_padding_mask=torch.ones(50, dtype=torch.bool, device=DEVICE)), ValueError, r"key_padding_mask must have shape \[B, L\] = \[2, 50\], got \[50\]"),
    (lambda a: a.update(key_padding_mask=torch.ones(2, 1, 1, 50, dtype=torch.bool, device=DEVICE)), ValueError, r"key_padding_mask must have shape .* got \[2, 1, 1, 50\]"),
    (lambda a: a.update(key_padding_mask=torch.zeros(2, 50, device=DEVICE)), TypeError, r"key_padding_mask must be bool or an integer dtype .* got torch.float32"),
    (lambda a: a.update(key_padding_mask=[[1] * 50] * 2), TypeError, r"key_padding_mask must be a torch.Tensor or None, got list"),
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
    with pytest.raises(ValueError, match=r"key_padding_mask is on meta but q is on"):
        attention_scores(q, k, key_span=(0, 20),
                         key_padding_mask=torch.ones(1, 20, dtype=torch.bool, device="meta"))


# -- memory safety: offsets, positions and scales at their limits ------------------------------------------------------------------------

def test_key_offsets_past_2_31_elements():
    """k a strided view whose row index x row stride passes 2^31 elements (a fused QKV
    buffer): the row offsets must be 64-bit. On the CPU the buffer is a sparse file mapped
    in memory (only the rows read take pages)."""
    got = run_json("""
        import json, os, tempfile, torch
        from d2pruner_kernels import attention_scores
        from d2pruner_kernels.kernels import interpreting
        L, d, stride = 4, 16, 2**30
        n = (L - 1) * stride + d
        if torch.cuda.is_available():
            buf, backend = torch.zeros(n, dtype=torch.float16, device="cuda"), "kernels"
        else:
            fd, path = tempfile.mkstemp()
            os.ftruncate(fd, 2 * n)
            os.close(fd)
            buf = torch.from_file(path, shared=True, size=n, dtype=torch.float16)
            os.unlink(path)
            backend = "kernels" if interpreting() else "reference"
        k = buf.as_strided((1, 1, L, d), (0, 0, stride, 1))
        g = torch.Generator().manual_seed(0)
        k.copy_(torch.randn(1, 1, L, d, generator=g).half())
        q = torch.randn(1, 2, 3, d, generator=g).half().to(buf.device)
        kc = k.contiguous()
        out = {}
        for pos in (None, torch.tensor([0, 2, 3], device=buf.device)):
            got = attention_scores(q, k, key_span=(1, L), q_positions=pos, backend=backend)
            want = attention_scores(q, kc, key_span=(1, L), q_positions=pos, backend="reference")
            out[str(pos is None)] = (got - want).abs().max().item()
        print(json.dumps(out))
    """)
    assert all(v < 1e-4 for v in got.values()), got


def _qk_small(seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 3, 32, generator=g).to(dtype)
    k = torch.randn(2, 2, 70, 32, generator=g).to(dtype)
    return q.to(device), k.to(device)


def _kernel_backend():
    if not (ON_GPU or interpreting()):
        pytest.skip("the Triton kernels need a GPU or the interpreter")
    return "kernels"


@pytest.mark.parametrize("dtype,value", [(torch.int32, 2**31 - 1), (torch.int64, INT64_MAX),
                                         (torch.int64, 2**40), (torch.int64, INT64_MIN)])
def test_extreme_q_positions(dtype, value):
    """INT32_MAX / INT64_MAX made `max(pos) + 1` overflow: pass 1 read no key and the result
    was unnormalised (sum 42.8 instead of 0.676)."""
    backend = _kernel_backend()
    device = "cuda" if ON_GPU else "cpu"
    q, k = _qk_small(device=device)
    pos = torch.tensor([value, 5, value], dtype=dtype, device=device)
    got = d2p.attention_scores(q, k, key_span=(10, 60), q_positions=pos, backend=backend)
    want = d2p.attention_scores(q, k, key_span=(10, 60), q_positions=pos, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scale", [1e8, 1e10, 1e20])
@pytest.mark.parametrize("with_lse", [False, True])
def test_huge_scale_stays_finite(scale, with_lse):
    """A huge softmax scale still gives probabilities: finite, in [0, 1], row sums <= 1, and
    the reference's. With a given lse the result is ill-conditioned: exp(scale * <q, k> - lse)
    moves by e^(+-50) with one ulp of a 1e9 logit, and the kernel, cuBLAS and the reference
    (float64 logits rounded, on CUDA) each round the dot in their own order. So the
    comparison takes its lse from the very logits both sides compute: inputs on a 1/8 grid
    (every product and partial sum exact in float32, in any order: MMA, FMA, the
    interpreter), the scale the power of two nearest `scale` (scale * <q, k> exact too, an
    FMA contraction changes nothing), one largest logit per row, the lse in float64. On
    random inputs with an lse from float64 logits only the bounds are checked."""
    import math
    backend = _kernel_backend()
    device = "cuda" if ON_GPU else "cpu"
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float16):
        q, k = _qk_small(seed=3, dtype=dtype, device=device)
        if with_lse:
            q8 = (torch.randint(-8, 9, q.shape, generator=g) / 8).to(device, dtype)
            k8 = (torch.randint(-8, 9, k.shape, generator=g) / 8).to(device, dtype)
            exact = 2.0 ** round(math.log2(scale))
            logits = (q8.double() @ k8.double().repeat_interleave(2, 1).transpose(-1, -2)) * exact
            assert torch.equal(logits.float().double(), logits)  # exact in float32
            top2 = logits.topk(2, dim=-1).values
            assert (top2[..., 0] > top2[..., 1]).all(), "ties at the top: sums would exceed 1"
            lse8 = torch.logsumexp(logits, dim=-1).float()
            kw8 = dict(key_span=(5, 60), scale=exact, lse=lse8)
            got = d2p.attention_scores(q8, k8, backend=backend, **kw8)
            torch.testing.assert_close(got, d2p.attention_scores(q8, k8, backend="reference", **kw8),
                                       rtol=1e-4, atol=1e-5)
            assert got.sum() > 0  # some largest logit lies in the span: not all zeros
            # random inputs: bounds only (whatever the kernel's rounding, p = 2^min(e2, 0))
            lse = torch.logsumexp((q.double() @ k.double().repeat_interleave(2, 1)
                                   .transpose(-1, -2)) * scale, dim=-1).float()
        else:
            lse = None
        got = d2p.attention_scores(q, k, key_span=(5, 60), scale=scale, lse=lse, backend=backend)
        assert torch.isfinite(got).all() and (got >= 0).all() and (got <= 1).all()
        assert (got.sum(1) <= 1 + 1e-5).all()
        if lse is None:
            want = d2p.attention_scores(q, k, key_span=(5, 60), scale=scale, backend="reference")
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
