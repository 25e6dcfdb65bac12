"""prune() as a torch.library custom op: traced by torch.compile(fullgraph=True)."""
import torch

from d2pruner_kernels import prune
from helpers import DEVICE, ON_GPU, clustered_tokens, distinct_attention


def test_compile_fullgraph_traces_through_prune():
    g = torch.Generator().manual_seed(0)
    x = clustered_tokens(2, 48, 16, generator=g).to(DEVICE)
    a = distinct_attention(2, 3, 48, generator=g).to(DEVICE)

    def model(tokens, attn):
        keep = prune(tokens, attn, (6, 8), 12)
        return torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))

    compiled = torch.compile(model, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    torch.testing.assert_close(compiled(x, a), model(x, a), rtol=0, atol=0)
