"""Runs the CUDA kernels on a few graphs, for `compute-sanitizer --tool memcheck|racecheck`:
full and lazy MIS (prefix, then the rest), odd sizes across the 1024-candidate window,
then small prune() calls end to end (whole graph, lazy graph). Exits non-zero on a wrong answer."""
import torch

from d2pruner_kernels import prune, reference
from d2pruner_kernels.kernels import mis
from d2pruner_kernels.testing import clustered_tokens, distinct_attention, random_graph

g = torch.Generator().manual_seed(0)
for c, p, n_p, k in [(37, 0.2, 3, 20), (1100, 0.01, 5, 400), (1500, 0.003, 0, 1500), (600, 0.5, 2, 12)]:
    adj, order = random_graph(2, c, p, n_p, g)
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
