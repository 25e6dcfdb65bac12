"""Runs the CUDA kernels on a few graphs, for `compute-sanitizer --tool memcheck|racecheck`:
full and lazy MIS (prefix, then the rest), odd sizes across the 1024-candidate window,
then small prune() calls end to end (whole graph, lazy graph). Exits non-zero on a wrong answer."""
import torch

from d2pruner_kernels import layout, prune, reference
from d2pruner_kernels.kernels import mis
from d2pruner_kernels.testing import clustered_tokens, distinct_attention

g = torch.Generator().manual_seed(0)
for c, p, n_p, k in [(37, 0.2, 3, 20), (1100, 0.01, 5, 400), (1500, 0.003, 0, 1500), (600, 0.5, 2, 12)]:
    e = torch.rand(2, c, c, generator=g) < p
    e = (e | e.transpose(1, 2)) & ~torch.eye(c, dtype=torch.bool)
    order = torch.stack([torch.randperm(c + n_p, generator=g) for _ in range(2)])
    adj = layout.pack_lower(e)
    want = reference.greedy_mis(adj, order, n_p, k)
    adj_d, order_d = adj.cuda(), order.cuda()
    got = mis.greedy_mis(adj_d, order_d, n_p, k)
    done = torch.empty(2, dtype=torch.int32, device="cuda")
    kept = mis.greedy_mis(adj_d, order_d, n_p, k, rows_ready=c // 2, done=done)
    mis.greedy_mis(adj_d, order_d, n_p, k, skip=done, kept=kept)
    torch.cuda.synchronize()
    assert torch.equal(got.cpu(), want) and torch.equal(kept.cpu(), want), (c, p)
for b, k in [(2, 64), (4, 128)]:  # the whole graph split-K; lazy ranges (more tiles than SMs)
    x = clustered_tokens(b, 576, 256, dtype=torch.bfloat16, generator=g).cuda()
    a = distinct_attention(b, 4, 576, generator=g).cuda()
    prune(x, a, (24, 24), k)
torch.cuda.synchronize()
print("sanitize.py: all answers right")
