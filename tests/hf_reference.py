"""What the tests of d2pruner_kernels.hf (tests/test_hf_*.py) share: running the unpruned
model and reading what it computes (the language model's inputs, the hidden states entering
a decoder layer, the eager attention rows), greedy generation, the positions a pruner kept,
and the checks every family passes the same way (keep-all is the unpruned model, remove()
restores it, a left-padded batch equals each sample alone, the pruned run equals a
reference). Each test file keeps its own reference (its masks and layers, written there);
nothing here calls the code under test but hf.apply and the model's own forward."""
import torch

from d2pruner_kernels import hf

TOL = {"rtol": 1e-4, "atol": 1e-4}


def generate(model, inputs, steps, **kw):
    """Greedy decoding of `steps` tokens, with each step's logits."""
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, **kw)


def lm_kwargs(model, inputs):
    """What the unpruned language model receives: inputs_embeds, position_ids, ..."""
    got = {}
    lm = model.model.language_model
    h = lm.register_forward_pre_hook(lambda mod, a, kw: got.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        h.remove()
    return got


def entering(model, inputs, layer, eager=False):
    """Of an unpruned forward: (the hidden states entering decoder layer `layer` (its forward
    pre-hook), the output of layer - 1, and with eager=True the attention weights [B, Hq, L,
    L] layer - 1's attention module returns (an eager model's), else None)."""
    got = {}

    def pre(mod, args, kw):  # the decoder may pass hidden_states by keyword
        got.setdefault("in", args[0] if args else kw["hidden_states"])

    def post(name, index):
        def hook(mod, args, out):
            got.setdefault(name, out if index is None else out[index])
        return hook

    lm = model.model.language_model
    hooks = [lm.layers[layer].register_forward_pre_hook(pre, with_kwargs=True),
             lm.layers[layer - 1].register_forward_hook(post("out", None))]
    if eager:
        hooks.append(lm.layers[layer - 1].self_attn.register_forward_hook(post("attn", 1)))
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    if eager:
        assert got["attn"] is not None, "not an eager model: no attention weights"
    return got["in"], got["out"], got.get("attn")


def last_tokens(inputs) -> list:
    """Each row's last real (not padding) position."""
    return [int(torch.nonzero(m).max()) for m in inputs["attention_mask"]]


def keep_mask(inputs, kept, found):
    """bool [B, L]: the positions kept (text and padding always), for the contiguous items
    found [[(start, end, ...)] per sample] and the pruner's kept indices."""
    keep = torch.ones(inputs["input_ids"].shape, dtype=torch.bool)
    for b, sample in enumerate(found):
        assert len(kept[b]) == len(sample)
        for (s, e, *_), k in zip(sample, kept[b]):
            keep[b, s:e] = False
            keep[b, s + k] = True
    return keep


def pruned_run(model, inputs, k, steps, **apply_kw):
    """Under hf.apply(model, k, **apply_kw): (a cached forward's output, the kept indices of
    that forward, greedy generation); generate's prefill keeps the same indices."""
    with hf.apply(model, k, **apply_kw) as pruner:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
        kept = pruner.kept
        gen = generate(model, inputs, steps)
        assert all(torch.equal(a, b) for a, b in zip(pruner.kept[0], kept[0], strict=True))
    return out, kept, gen


def cache_lengths(out, n_layers: int) -> list:
    cache = getattr(out, "cache", None) or out.past_key_values
    return [int(cache.get_seq_length(i)) for i in range(n_layers)]


def assert_equals_reference(out, gen, keep, tokens, logits, prefill=None):
    """Sample 0's prefill logits at the kept positions (the reference's, or `prefill`), the
    greedy tokens and every decoding step's logits (cached decoding == the reference's
    recomputation) equal the reference's."""
    full = keep.shape[1]
    assert out.logits.shape[1] == int(keep.sum())
    torch.testing.assert_close(out.logits[0], logits[0][0, keep[0]] if prefill is None
                               else prefill, **TOL)
    assert torch.equal(gen.sequences[:, full:], tokens)
    assert len(gen.logits) == len(logits)
    for step, got in enumerate(gen.logits):
        torch.testing.assert_close(got, logits[step][:, -1], **TOL)


def assert_keep_all_is_unpruned(model, inputs, k, steps, check=None, step_logits=False,
                                **apply_kw):
    """hf.apply(model, k) that keeps every token gives the unpruned model's logits and greedy
    tokens bit for bit (and each step's logits with step_logits); check(pruner) runs after
    the pruned forward and after the pruned generate."""
    with torch.no_grad():
        base = model(**inputs).logits
    base_gen = generate(model, inputs, steps)
    with hf.apply(model, k, **apply_kw) as pruner:
        with torch.no_grad():
            got = model(**inputs).logits
        if check is not None:
            check(pruner)
        gen = generate(model, inputs, steps)
        if check is not None:
            check(pruner)
    assert torch.equal(got, base)
    assert torch.equal(gen.sequences, base_gen.sequences)
    if step_logits:
        for a, b in zip(gen.logits, base_gen.logits, strict=True):
            assert torch.equal(a, b)


def assert_remove_restores(model, inputs, k, steps):
    """remove() (twice: the second does nothing) gives back the unpruned model's logits and
    greedy tokens bit for bit, and applying again prunes as before. Returns (unpruned,
    pruned) logits."""
    with torch.no_grad():
        before = model(**inputs).logits
    before_gen = generate(model, inputs, steps).sequences
    pruner = hf.apply(model, k)
    with torch.no_grad():
        pruned = model(**inputs).logits
    assert pruned.shape[1] < before.shape[1]
    pruner.remove()
    pruner.remove()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    assert torch.equal(generate(model, inputs, steps).sequences, before_gen)
    with hf.apply(model, k):  # applying again after remove() works
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, pruned)
    return before, pruned


def assert_batch_equals_alone(model, inputs, samples, k, steps, **apply_kw):
    """Under one hf.apply(model, k): each row of the left-padded batch `inputs` keeps what
    its sample keeps alone (same items, kinds and indices) and generates the same tokens and
    step logits. Returns the batch's kept indices."""
    with hf.apply(model, k, **apply_kw) as pruner:
        gen = generate(model, inputs, steps)
        kept, kinds = pruner.kept, pruner.kinds
        alone = [(generate(model, s, steps), pruner.kept[0], pruner.kinds[0]) for s in samples]
    assert len(kept) == len(alone)
    full = inputs["input_ids"].shape[1]
    for b, (g, k_alone, kinds_alone) in enumerate(alone):
        assert kinds[b] == kinds_alone
        assert len(kept[b]) == len(k_alone)
        for mine, theirs in zip(kept[b], k_alone):
            assert torch.equal(mine, theirs), b
        n = samples[b]["input_ids"].shape[1]
        assert torch.equal(gen.sequences[b, full:], g.sequences[0, n:]), b
        for step in range(steps):
            torch.testing.assert_close(gen.logits[step][b], g.logits[step][0], **TOL)
    return kept


def next_text_position(pos, step):
    """The position of a generated token: the prompt's largest + 1 (M-RoPE: on all three
    axes, per row)."""
    if pos.dim() == 3:
        b = pos.shape[1]
        return (pos.amax(dim=(0, 2)) + 1).view(1, b, 1).expand(3, b, 1)
    return pos.amax(-1, keepdim=True) + 1


def masked_greedy(model, inputs, keep, layer, steps, next_pos=next_text_position,
                  after_layer=None):
    """The reference of the causal families (a test's own, written without the pruner):
    (greedy tokens [B, steps], per-step logits [B, n, V]). Every decoder layer runs on the
    full sequence with an explicit mask (causal, padding) that from `layer` on also hides
    the pruned keys (keep False); each step recomputes the whole sequence (no cache).
    next_pos(pos, step): the positions of step's new token (None: the last step needs
    none); after_layer(i, h, kw, keep) -> h: what the model adds after decoder layer i (kw:
    the language model's inputs)."""
    kw = lm_kwargs(model, inputs)
    lm = model.model.language_model
    emb = kw["inputs_embeds"]
    b, n = emb.shape[:2]
    pos = kw.get("position_ids")
    if pos is None:
        pos = torch.arange(n).expand(b, -1)
    if pos.dim() == 3 and pos.shape[0] == 4:  # Qwen's [text; t; h; w]
        pos = pos[1:]
    valid = inputs["attention_mask"].bool()
    low = torch.finfo(emb.dtype).min
    tokens, logits_steps = [], []
    with torch.no_grad():
        for step in range(steps):
            n = emb.shape[1]
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            full = causal & valid[:, None, :]
            pruned = full & keep[:, None, :]
            h = emb
            pe = lm.rotary_emb(h, pos)
            for i, lay in enumerate(lm.layers):
                m = torch.where(full if i < layer else pruned, 0.0, low)[:, None]
                out = lay(h, attention_mask=m, position_embeddings=pe, use_cache=False)
                h = out[0] if isinstance(out, tuple) else out
                if after_layer is not None:
                    h = after_layer(i, h, kw, keep)
            logits = model.lm_head(lm.norm(h))
            logits_steps.append(logits)
            nxt = logits[:, -1].argmax(-1)
            tokens.append(nxt)
            emb = torch.cat([emb, model.get_input_embeddings()(nxt)[:, None]], 1)
            nxt_pos = next_pos(pos, step)
            if nxt_pos is not None:
                pos = torch.cat([pos, nxt_pos], -1)
            valid = torch.cat([valid, torch.ones(b, 1, dtype=torch.bool)], 1)
            keep = torch.cat([keep, torch.ones(b, 1, dtype=torch.bool)], 1)
    return torch.stack(tokens, 1), logits_steps


def runs_of(row: list, tokens) -> list:
    """[(start, end)] of the runs of one token (any of `tokens`) in a prompt row, in order."""
    out, i = [], 0
    while i < len(row):
        if row[i] in tokens:
            j = i
            while j < len(row) and row[j] == row[i]:
                j += 1
            out.append((i, j))
            i = j
        else:
            i += 1
    return out


def continue_generation(model, first, inputs, steps, cache=None, **kw):
    """generate(input_ids=first.sequences, past_key_values=...) for `steps` more tokens: the
    chat pattern (first: a generate output of `inputs`; cache: another cache to go on from)."""
    mask = torch.cat([inputs["attention_mask"],
                      torch.ones(first.sequences.shape[0], steps, dtype=torch.long)], 1)
    with torch.no_grad():
        return model.generate(input_ids=first.sequences, attention_mask=mask,
                              past_key_values=first.past_key_values if cache is None else cache,
                              max_new_tokens=steps, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, **kw)


def assert_prior_is_the_mean(prior, grid, rows, rtol=1e-6, atol=1e-12):
    """A calibrated prior on `grid` is the mean of the importance maps `rows`."""
    assert prior.grid == grid and prior.count == len(rows)
    torch.testing.assert_close(prior.mean, torch.stack(list(rows)).double().mean(0),
                               rtol=rtol, atol=atol)


def importance_rows(model, batches, k) -> list:
    """Every importance row hf.apply(model, k) reads on the batches, flat, in order."""
    rows = []
    with hf.apply(model, k) as pruner:
        for batch in batches:
            with torch.no_grad():
                model(**batch)
            rows += [r for sample in pruner.importance for r in sample]
    return rows
