"""Pruning inside the language model (the paper's setting): importance from decoder layer
K - 1, tokens dropped from layer K on.

Every prefill (a forward with no cache or an empty one) with image tokens:

1. the outer model's forward pre-hook notes where the image placeholders are;
2. the language model's pre-hook finds each sample's images (the family adapter: runs of
   placeholders, their grids), its last prompt token (the last position whose
   attention_mask is 1) and which keys it sees (itself and before, padding excluded);
3. layer K - 1's attention (a Tap) hands over its queries and keys: per sample,
   `attention_scores` of the last prompt token's query over the keys it sees, the images'
   columns (softmax over all of them, mean over query heads);
4. layer K's pre-hook prunes every image (`prune_varlen`, features = the hidden states
   entering layer K) and replaces, for layer K and every later layer, the hidden states,
   the RoPE cos/sin, the position ids and the mask with those of the kept positions:
   kept tokens keep their original positions; samples that keep fewer tokens than the
   longest get masked filler slots on the left (none for a single sample);
5. layers from K on therefore cache only the kept tokens. While decoding from that cache,
   the layers from K on get a mask over [kept prompt | new tokens] instead of the full
   one (positions, cos/sin and layers below K are untouched).

Masks are built with transformers' own mask functions for the attention implementation
the model uses at the call (AttentionMaskInterface; read at every forward, so
`set_attn_implementation` after apply() is followed), from a 2-D validity mask of the kept
positions.

Families whose layers differ (Gemma 3's sliding and full layers, Qwen3.5's linear and full
ones) give the adapter `layer_kind(index)` and `layer_mask(kind, index, seq)`: the layers
from K on then get, per kind, the mask the adapter builds from a `PrunedSeq`; each layer's
own RoPE cos/sin are gathered (Gemma 3 has one pair per kind). A tapped call given
`sliding_window` reads its row over the keys inside the window only.
"""
from __future__ import annotations

import functools

import torch

from ..attention_scores import attention_scores
from . import _attention
from ._common import (Hooks, Stop, cache_layout, check_dtype, gather_seq, get_cache,
                      is_prefill, left_packed, mark_cache, new_tokens, runs)


class _Prefill:
    def __init__(self, spans, valid, last, batch, length):
        self.spans = spans      # per sample [(start, end, grid)]
        self.valid = valid      # bool [B, L]: not padding
        self.last = last        # per sample: the last prompt token
        self.rows = None        # per sample, per image: float32 importance (layer K - 1)
        self.batch, self.length = batch, length
        self.replace = None     # kwargs for the layers from K on
        self.idx = None         # [B, L'] kept positions (with filler slots)
        self.valid_c = None     # bool [B, L'] validity of the kept positions
        self.kept = None
        self.cache = None
        self.outer = None       # what the outer forward noted
        self.seq = None         # PrunedSeq, for adapters with layer_kind


class _Record:
    """What decoding from a pruned cache needs (written on the cache: mark_cache)."""

    def __init__(self, length, length_c, valid_c, layer, positions=None):
        self.length, self.length_c, self.valid_c = length, length_c, valid_c
        self.layer = layer
        self.positions = positions  # [B, L'] the prompt position of each kept slot


class PrunedSeq:
    """What an adapter's `layer_mask(kind, index, seq)` builds a pruned layer's mask from:
    `valid` bool and `positions` int64 [B, T] over the compact sequence the layers from K on
    hold ([kept prompt | tokens since], filler slots invalid; `positions` the original
    sequence index of each entry), the query its last `q_len` entries; `outer` what the
    outer forward of the prefill gave (adapter.prefill_inputs; None while decoding) plus
    `idx`, the kept positions [B, L']; `cache` the forward's cache. `default()` is the
    causal + padding mask of the implementation in use; `build(fn, q_len, kv_len)` that
    implementation's mask from an index mask function fn(b, h, q_idx, kv_idx) (indices
    absolute in [0, T)) and the validity."""

    def __init__(self, owner, valid, positions, q_len, hidden, outer, cache, prefill):
        self.valid, self.positions, self.q_len = valid, positions, q_len
        self.total = valid.shape[1]
        self.dtype, self.device = hidden.dtype, hidden.device
        self.outer, self.cache, self.prefill = outer, cache, prefill
        self._owner, self._hidden = owner, hidden

    def default(self):
        return self._owner._mask(self.valid, self.q_len, self.total, self._hidden)

    def build(self, mask_function, q_len: int, kv_len: int):
        valid = None if bool(self.valid.all()) else self.valid
        return self._owner.mask_fn(batch_size=self.valid.shape[0], q_length=q_len,
                                   kv_length=kv_len, q_offset=self.total - q_len,
                                   kv_offset=self.total - kv_len, mask_function=mask_function,
                                   attention_mask=valid, allow_is_causal_skip=False,
                                   dtype=self.dtype, device=self.device)


class _Decode:
    def __init__(self, record, past, mask2d, q_len):
        self.record, self.past, self.mask2d, self.q_len = record, past, mask2d, q_len
        self.replace = None
        self.seq = None


class InLLM(Hooks):
    """Installs and removes the hooks; `on_kept(kept, grids, importance)` after each prefill;
    `collect(rows, grids)` instead of pruning (calibration: the forward stops at layer K).

    source: None (importance from decoder layer K - 1), or the vision side's rows
    (qwen_vision.VisionRows: Qwen2.5-VL / Qwen3-VL, where="vision") with layer 0: the
    items are pruned before the first decoder layer, each item's importance found by its
    features (the hidden states entering layer 0) among those the tower encoded."""

    def __init__(self, adapter, layer: int, selector, on_kept, collect=None, source=None):
        super().__init__()
        self.adapter, self.layer, self.selector = adapter, layer, selector
        self.on_kept, self.collect = on_kept, collect
        self.source = source
        if (source is None) == (layer == 0):
            raise ValueError(f"layer 0 takes its importance from the vision side and only it "
                             f"(layer={layer}, source={source!r})")
        self._implementation()  # an unsupported one raises at apply()
        self._outer = None
        self._fwd = None

    # -- install / remove ------------------------------------------------------------------

    def _install(self, h: list) -> None:
        a, k = self.adapter, self.layer
        layers = a.language_model.layers
        if self.source is not None:
            self.source.install(h)
        else:
            self._tap = _attention.Tap(layers[k - 1].self_attn, f"decoder layer {k - 1}")
            self._tap.install()
        h.append(a.outer.register_forward_pre_hook(self._outer_pre, with_kwargs=True))
        h.append(a.outer.register_forward_hook(self._outer_post, always_call=True))
        h.append(a.language_model.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        h.append(a.language_model.register_forward_hook(self._lm_post, with_kwargs=True,
                                                        always_call=True))
        for i in range(k, len(layers)):
            h.append(layers[i].register_forward_pre_hook(
                functools.partial(self._layer_pre, i), with_kwargs=True))
        self.adapter.install_llm(k, h)  # a family's own hooks (Qwen3-VL's DeepStack)
        if self.collect is None:
            self._install_labels(h)

    def _forget(self) -> None:
        self._outer = self._fwd = None
        if self.source is not None:
            self.source.forget()

    def _tap_callback(self, callback) -> None:
        if self._tap is not None:
            self._tap.callback = callback

    def _implementation(self) -> None:
        """The attention implementation the language model uses now, and its mask function
        (read at every forward: the model may have switched since apply())."""
        lm = self.adapter.language_model
        self.impl = _attention.base_implementation(lm.config, "the language model")
        self.mask_fn = _attention.mask_function(self.impl)

    # -- hooks -----------------------------------------------------------------------------

    def _outer_pre(self, module, args, kwargs):
        self._outer = None
        cache = get_cache(kwargs)
        if not is_prefill(cache):
            # the model's 2-D mask, for a language model given a dict of masks (Gemma 3)
            self._outer = {"attention_mask": kwargs.get("attention_mask"), "decode": True}
            rec = cache_layout(cache)
            if self.layer == 0 and isinstance(rec, _Record) and rec.layer == 0:
                # every layer holds the shortened prompt: generate() continuing from the
                # cache re-feeds part of the prompt (see new_tokens), and a forward given
                # neither a mask nor positions would be placed by the cache's shorter length
                args, kwargs = new_tokens(rec.length, rec.length_c, cache, args, kwargs)
                if kwargs.get("position_ids") is None and kwargs.get("attention_mask") is None:
                    ids = kwargs.get("input_ids", args[0] if args else None)
                    x = ids if ids is not None else kwargs["inputs_embeds"]
                    past = rec.length + int(cache.get_seq_length()) - rec.length_c
                    kwargs = dict(kwargs, position_ids=self.adapter.decode_positions(
                        past, x.shape[1], x.shape[0], x.device))
                return args, kwargs
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        if ids is None and emb is None:
            return None
        self._outer = {"image": self.adapter.image_mask(ids, emb),
                       "attention_mask": kwargs.get("attention_mask"),
                       "image_grid_thw": kwargs.get("image_grid_thw")}
        self._outer.update(self.adapter.prefill_inputs(ids, emb, kwargs))
        return None

    def _outer_post(self, module, args, output):
        self._outer = None  # also when the forward raised before the language model ran
        return None

    def _lm_pre(self, module, args, kwargs):
        self._fwd = None
        self._tap_callback(None)
        cache = get_cache(kwargs)
        emb = kwargs.get("inputs_embeds")
        if emb is None:
            return None
        batch, length = emb.shape[:2]
        self._implementation()
        if not is_prefill(cache):
            rec = cache_layout(cache)
            if rec is None:
                self._check_unknown(cache)
                return None
            if not isinstance(rec, _Record) or rec.layer != self.layer:
                what = _describe(rec.layer) if isinstance(rec, _Record) else "where='vision'"
                raise ValueError(f"this forward continues from a cache (past_key_values) "
                                 f"pruned with {what}; this pruner is "
                                 f"{_describe(self.layer)}: continue under the pruner that "
                                 f"filled it")
            mask2d = kwargs.get("attention_mask")
            if isinstance(mask2d, dict) and self._outer is not None:  # masks per layer kind
                mask2d = self._outer.get("attention_mask")
            self._outer = None
            # int(): a linear-attention layer's count is a tensor its forward bumps in place
            self._fwd = _Decode(rec, int(cache.get_seq_length()), mask2d, length)
            return None
        if cache is not None:
            mark_cache(cache, None)  # a prefill into it: an older mark no longer applies
        outer, self._outer = self._outer, None
        if outer is None or "image" not in outer or tuple(outer["image"].shape) != (batch,
                                                                                length):
            return None  # called without the outer model: no placeholders to find
        image = outer["image"].to(emb.device)
        if not bool(image.any()):
            self.on_kept([[] for _ in range(batch)], [[] for _ in range(batch)],
                         [[] for _ in range(batch)])
            return None
        if cache is not None:
            _check_cache(cache)
        given = [kwargs.get("attention_mask"), outer["attention_mask"]]  # the LM's, the model's
        if isinstance(given[0], dict):  # masks per layer kind (Gemma 3), built from the model's
            given[0] = None
        flat = [m for m in given if isinstance(m, torch.Tensor) and m.dim() == 2]
        if flat:
            valid = flat[0].to(device=emb.device, dtype=torch.bool)
        elif all(m is None for m in given):
            valid = torch.ones(batch, length, dtype=torch.bool, device=emb.device)
        else:  # a prepared 4-D mask or a dict of them: padding cannot be read back
            raise ValueError(f"d2pruner_kernels.hf needs a 2-D attention_mask [B, L] (or none) "
                             f"in a prefill, got {type(given[0]).__name__} "
                             f"{list(getattr(given[0], 'shape', []))}")
        spans, last = [], []
        for b in range(batch):
            sample_runs = runs(image[b])
            spans.append(self.adapter.images(b, sample_runs, kwargs, outer))
            pos = torch.nonzero(valid[b]).flatten()
            if pos.numel() == 0:
                if spans[b]:
                    raise ValueError(f"sample {b} has images but its attention_mask is all 0")
                last.append(length - 1)
                continue
            last.append(int(pos[-1]))
            for i, (s, e, *_) in enumerate(spans[b]):
                if not bool(valid[b, s:e].all()):
                    raise ValueError(f"sample {b}, image {i}: image tokens {s}..{e - 1} are "
                                     f"masked out by attention_mask")
        self.adapter.check_images(spans, outer)
        self._fwd = _Prefill(spans, valid, last, batch, length)
        self._fwd.outer = outer
        self._tap_callback(self._capture)
        return None

    def _capture(self, query, key, kwargs):
        f = self._fwd
        if not isinstance(f, _Prefill) or f.rows is not None:
            return
        check_dtype(query, "the language model")
        scale = kwargs.get("scaling")
        q, k = query.detach(), key.detach()
        # One call for the whole batch: each sample's last prompt token over the keys it
        # sees (padding masked, causal), its images' span (first image start to last image
        # end) packed back to back; then each span cut into its images.
        with_images = [b for b, spans in enumerate(f.spans) if spans]
        rows = [[] for _ in f.spans]
        if with_images:
            sel = torch.tensor(with_images, device=q.device)
            last = torch.tensor([f.last[b] for b in with_images], device=q.device)
            q_rows = q[sel, :, last].unsqueeze(2)                      # [S, Hq, 1, d]
            spans = [(f.spans[b][0][0], f.spans[b][-1][1]) for b in with_images]
            keys_seen = f.valid.index_select(0, sel)
            window = kwargs.get("sliding_window")
            if window is not None:  # a sliding layer: the keys inside the query's window
                cols = torch.arange(keys_seen.shape[1], device=keys_seen.device)
                keys_seen = keys_seen & (cols[None] > last[:, None] - int(window))
            packed = attention_scores(q_rows, k.index_select(0, sel), key_span=spans,
                                      scale=scale, q_positions=last[:, None],
                                      key_padding_mask=keys_seen, packed=True)
            start = 0
            for b, (s0, e0) in zip(with_images, spans):
                row = packed[start:start + e0 - s0]
                rows[b] = [row[_shift(_at(item), s0)] for item in f.spans[b]]
                start += e0 - s0
        f.rows = rows
        self._tap_callback(None)

    def _layer_pre(self, index, module, args, kwargs):
        f = self._fwd
        if f is None:
            return None
        if index == self.layer:
            if isinstance(f, _Prefill):
                hidden = args[0] if args else kwargs["hidden_states"]
                self._select(f, hidden, kwargs)
                if f.replace is None:
                    return None
                hidden = gather_seq(hidden, f.idx, -2)
                if args:
                    args = (hidden,) + tuple(args[1:])
                else:
                    kwargs = dict(kwargs, hidden_states=hidden)
            else:
                self._decode_mask(f, kwargs, args[0] if args else kwargs["hidden_states"])
        if f.replace is None:
            return None
        return args, dict(kwargs, **self._per_layer(index, f, kwargs))

    def _per_layer(self, index: int, f, kwargs: dict) -> dict:
        """f.replace, with this layer's own RoPE gathered where it differs from layer K's
        (Gemma 3: one pair per layer kind) and the adapter's mask for its kind."""
        replace = f.replace
        pe = kwargs.get("position_embeddings")
        if isinstance(f, _Prefill) and pe is not None and pe is not f.pe_in:
            got = f.pe_out.get(id(pe))
            if got is None:
                got = (gather_seq(pe[0], f.idx, -2), gather_seq(pe[1], f.idx, -2))
                f.pe_out[id(pe)] = got
            replace = dict(replace, position_embeddings=got)
        kind_of = getattr(self.adapter, "layer_kind", None)
        if kind_of is not None and f.seq is not None:
            kind = kind_of(index)
            if kind not in f.masks:
                f.masks[kind] = self.adapter.layer_mask(kind, index, f.seq)
            replace = dict(replace, attention_mask=f.masks[kind])
        return replace

    def _lm_post(self, module, args, kwargs, output):
        f, self._fwd = self._fwd, None
        self._tap_callback(None)
        if isinstance(f, _Prefill) and f.kept is not None:
            if f.replace is not None and f.cache is not None:
                mark_cache(f.cache, _Record(f.length, f.idx.shape[1], f.valid_c, self.layer,
                                            f.idx))
            self.on_kept(f.kept, [[item[2] for item in spans] for spans in f.spans],
                         [[row.cpu() for row in rows] for rows in f.rows],
                         [[_kind(item) for item in spans] for spans in f.spans])
        return None

    def _check_unknown(self, cache) -> None:
        """A cache with no mark whose layers from K on hold fewer tokens than layer 0 was
        pruned elsewhere: its masks cannot be rebuilt."""
        try:
            held = [cache.get_seq_length(i) for i in (0, self.layer)]
        except (IndexError, TypeError, AttributeError):
            return
        if held[0] != held[1]:
            raise ValueError(f"this forward continues from a pruned cache (past_key_values: "
                             f"layer 0 holds {held[0]} tokens, layer {self.layer} {held[1]}) "
                             f"that carries no d2pruner mark (pruned by something else, or "
                             f"rebuilt from its tensors): its masks cannot be rebuilt; "
                             f"continue from the cache the pruned generate or forward "
                             f"returned (or a copy of it)")

    # -- the work --------------------------------------------------------------------------

    def _select(self, f: _Prefill, hidden: torch.Tensor, kwargs: dict) -> None:
        if self.source is not None:
            f.rows = self._vision_rows(f, hidden)
        if f.rows is None:
            raise RuntimeError(f"decoder layer {self.layer - 1} did not run its attention "
                               f"through transformers' AttentionInterface: no importance")
        images, labels = [], []
        for b, spans in enumerate(f.spans):
            for i, item in enumerate(spans):
                images.append((b, _at(item), item[2]))
                labels.append(f"sample {b}, {_kind(item)} {i}")
        feats = hidden.detach()
        attn = [row for b in range(f.batch) for row in f.rows[b]]
        grids = [g for *_, g in images]
        if self.collect is not None:
            self.collect(attn, grids)
            raise Stop
        tokens = torch.cat([feats[b, at] for b, at, _ in images])
        local = self.selector.select_packed(tokens, torch.cat(attn), grids, labels)
        keep = torch.ones(f.batch, f.length, dtype=torch.bool, device=hidden.device)
        kept = [[] for _ in range(f.batch)]
        for (b, at, _), loc in zip(images, local):
            keep[b, at] = False
            keep[b, _shift(at, 0, loc)] = True
            kept[b].append(loc.cpu())
        f.kept = kept
        f.cache = get_cache(kwargs)
        if bool(keep.all()):
            return  # every token kept (k = N): the forward runs untouched
        idx, slot = left_packed(keep)
        f.idx = idx
        self._gather = (idx, slot)
        f.valid_c = f.valid.gather(1, idx) & slot
        cos, sin = kwargs["position_embeddings"]
        f.pe_in, f.pe_out = kwargs["position_embeddings"], {}
        replace = {"position_embeddings": (gather_seq(cos, idx, -2), gather_seq(sin, idx, -2)),
                   "attention_mask": self._mask(f.valid_c, idx.shape[1], idx.shape[1], hidden)}
        if getattr(self.adapter, "layer_kind", None) is not None:
            f.seq = PrunedSeq(self, f.valid_c, idx, idx.shape[1], hidden,
                              dict(f.outer or {}, idx=idx), get_cache(kwargs), True)
            f.masks = {}
        pos = kwargs.get("position_ids")
        if isinstance(pos, torch.Tensor) and self.impl.startswith("flash"):
            # flash-attention reads gaps in position_ids as packed sequences: cos/sin carry
            # the positions, the mask the padding
            replace["position_ids"] = None
        elif isinstance(pos, torch.Tensor):
            replace["position_ids"] = gather_seq(pos, idx, -1)
        f.replace = replace
        self.adapter.pruned(idx, slot)

    def _vision_rows(self, f: _Prefill, hidden: torch.Tensor) -> list:
        """Each item's importance from the vision side, found by its features."""
        rows = []
        for b, spans in enumerate(f.spans):
            rows.append([])
            for i, item in enumerate(spans):
                row = self.source.rows_for(hidden[b, _at(item)].detach())
                if row is None:
                    raise ValueError(f"where='vision': sample {b}, {_kind(item)} {i} is none "
                                     f"of the items the vision tower encoded under this pruner "
                                     f"(pass pixel_values, or encode the images after "
                                     f"apply(); inputs_embeds made elsewhere carry no "
                                     f"importance)")
                rows[b].append(row.to(hidden.device))
        self.source.used()
        return rows

    def _decode_mask(self, f: _Decode, kwargs: dict, hidden: torch.Tensor) -> None:
        rec = f.record
        # tokens since the prompt: layer 0 holds the unpruned prompt, unless it is pruned too
        n_prev = f.past - (rec.length_c if self.layer == 0 else rec.length)
        cache = get_cache(kwargs)
        held = int(cache.get_seq_length(self.layer)) if cache is not None else -1
        if n_prev < 0 or held != rec.length_c + n_prev:
            raise RuntimeError(f"the cache does not match the pruned prefill (layer "
                               f"{self.layer} holds {held} tokens, expected "
                               f"{rec.length_c} + {n_prev}); was it cropped or reused?")
        batch = rec.valid_c.shape[0]
        new = n_prev + f.q_len
        m = f.mask2d
        if isinstance(m, torch.Tensor) and m.dim() == 2:
            if m.shape[1] != rec.length + new:
                raise ValueError(f"attention_mask has {m.shape[1]} columns, expected "
                                 f"{rec.length + new} (prompt {rec.length} + {new} new)")
            tail = m[:, rec.length:].to(device=rec.valid_c.device, dtype=torch.bool)
        elif m is None:
            tail = torch.ones(batch, new, dtype=torch.bool, device=rec.valid_c.device)
        else:
            raise ValueError(f"d2pruner_kernels.hf needs a 2-D attention_mask [B, L] (or none) "
                             f"while decoding, got {type(m).__name__}")
        valid = torch.cat([rec.valid_c, tail], dim=1)
        kv = rec.length_c + new
        f.replace = {"attention_mask": self._mask(valid, f.q_len, kv, hidden)}
        if getattr(self.adapter, "layer_kind", None) is not None:
            since = torch.arange(rec.length, rec.length + new, device=valid.device)
            positions = torch.cat([rec.positions.to(valid.device),
                                   since.expand(batch, new)], dim=1)
            f.seq = PrunedSeq(self, valid, positions, f.q_len, hidden, None, cache, False)
            f.masks = {}

    def _mask(self, valid: torch.Tensor, q_len: int, kv_len: int, hidden: torch.Tensor):
        return self.mask_fn(batch_size=valid.shape[0], q_length=q_len, kv_length=kv_len,
                            q_offset=kv_len - q_len, kv_offset=0,
                            attention_mask=None if bool(valid.all()) else valid,
                            dtype=hidden.dtype, device=hidden.device)


def _describe(layer: int) -> str:
    return "where='vision'" if layer == 0 else f"where='llm', layer={layer}"


def _at(item):
    """An item's token positions: slice(start, end), or the int64 positions it lists (an
    item whose tokens are not contiguous, e.g. a Qwen3-VL video's frames with their
    timestamp text between them): item = (start, end, grid[, positions[, kind]])."""
    return item[3] if len(item) > 3 and item[3] is not None else slice(item[0], item[1])


def _kind(item) -> str:
    return item[4] if len(item) > 4 else "image"


def _shift(at, offset, loc=None):
    """`at` moved by -offset (positions within a row that starts at offset), or, with loc,
    the positions at[loc] (loc: int64 indices into the item's tokens)."""
    if isinstance(at, slice):
        if loc is not None:
            return at.start + loc
        return slice(at.start - offset, at.stop - offset)
    if loc is not None:
        return at.to(loc.device)[loc]
    return at - offset


def _check_cache(cache) -> None:
    from transformers import DynamicCache
    if not isinstance(cache, DynamicCache):
        raise ValueError(f"d2pruner_kernels.hf prunes the KV cache of a DynamicCache (layers "
                         f"from K on hold fewer tokens), got {type(cache).__name__}")
