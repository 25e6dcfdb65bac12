"""Pruning on the vision side (LLaVA, where="vision"): the LLM receives k image tokens per
image instead of N, in a shorter prompt with contiguous positions.

1. The CLIP layer that produces the selected features (a Tap) hands over its queries and
   keys: importance = the CLS query's attention over the patch keys (softmax over all keys,
   CLS included; mean over heads).
2. The projector's forward hook prunes each image (features = the projected image features)
   and returns [n_images, k, D].
3. The outer model's pre-hook shortens the prompt to match: in every image's block of N
   placeholders the last N - k are dropped (placeholders are interchangeable: the kept
   features fill the remaining k in order). Samples that lose fewer tokens than others get
   padding on the left (pad token, attention_mask 0); position_ids, when given, become
   those of the shorter prompt. While decoding from that cache, attention_mask and
   position_ids are mapped the same way; generate() never notices.

Images are encoded before the prefill (generate() does it, then repeats them for
num_beams / num_return_sequences by counting placeholders against features; a forward given
pixel_values has them encoded by the same public get_image_features in its pre-hook): the
projector keeps all N features and remembers each image's selection; the prefill finds each
image of the `mm_encoder_outputs` it is given among those encoded (by value, whatever the
repetition) and hands the LLM its k kept features.

Continuing from a returned cache (`generate(input_ids=out.sequences,
past_key_values=out.past_key_values)`): the cache holds the shortened prompt, so generate
cuts the sequence by the cache's shorter length and the forward gets the prompt's tail back;
the mark the prefill left on that cache (mark_cache; a deepcopy carries it) knows how many
unpruned positions the cache covers, and only the really new tokens go on. Image
placeholders in a forward that continues from a cache are refused: images are pruned in a
prefill only.
"""
from __future__ import annotations

import copy

import torch

from ..attention_scores import attention_scores
from . import _attention
from ._common import (Hooks, Stop, cache_layout, check_dtype, get_cache, is_prefill,
                      left_packed, mark_cache, new_tokens, output_cache, runs)


class _Record:
    def __init__(self, length, removed, prompt_mask, had_mask):
        self.length = length            # the prompt's length as given
        self.removed = removed          # int64 [B]: tokens dropped per sample
        self.prompt_mask = prompt_mask  # [B, L'] the shortened prompt's mask (dtype as given)
        self.had_mask = had_mask


class _Encoded:
    """The images the projector encoded last (before the prefill: by generate(), or by the
    outer forward's pre-hook): their full projected features, selections and importance
    rows."""

    def __init__(self, feats, keep, rows):
        self.feats, self.keep, self.rows = feats, keep, rows


class OnVision(Hooks):
    def __init__(self, adapter, selector, on_kept, collect=None):
        super().__init__()
        self.adapter, self.selector = adapter, selector
        self.on_kept, self.collect = on_kept, collect
        self.attn_module, self.vision_layer = adapter.vision_attention()
        self.n = adapter.tokens_per_image
        self.k = selector.budget(self.n, "LLaVA image") if collect is None else self.n
        self._rows = None
        self._pending = None   # (kept, row) of each image the prefill just cut to k
        self._fwd = None       # (record or None, image counts per sample) of this forward
        self._encoded = None   # _Encoded: the images encoded last

    def _install(self, h: list) -> None:
        a = self.adapter
        self._tap = _attention.Tap(self.attn_module, f"vision layer {self.vision_layer}")
        self._tap.install()
        self._tap.callback = self._capture
        if self.collect is not None:
            h.append(a.projector.register_forward_pre_hook(self._collect_pre))
        else:
            h.append(a.projector.register_forward_hook(self._projector_post))
            h.append(a.outer.register_forward_pre_hook(self._outer_pre, with_kwargs=True))
            h.append(a.outer.register_forward_hook(self._outer_post, with_kwargs=True,
                                                   always_call=True))
            self._install_labels(h)

    def _forget(self) -> None:
        self._rows = self._pending = self._fwd = self._encoded = None

    # -- the vision tower ------------------------------------------------------------------

    def _capture(self, query, key, kwargs):
        # CLS is token 0; the softmax runs over every key (CLS and patches), like the layer's
        check_dtype(query, "the vision tower")
        self._rows = attention_scores(query.detach()[:, :, :1], key.detach(),
                                      key_span=(1, key.shape[2]), scale=kwargs.get("scaling"))

    def _features(self, feats):
        rows, self._rows = self._rows, None
        if rows is None or tuple(rows.shape) != tuple(feats.shape[:2]):
            raise RuntimeError(f"the CLS row of vision layer {self.vision_layer} "
                               f"({None if rows is None else list(rows.shape)}) does not match "
                               f"the projector's input {list(feats.shape[:2])}")
        return rows

    def _collect_pre(self, module, args):
        feats = args[0]
        rows = self._features(feats)
        self.collect(list(rows), [self.adapter.grid] * rows.shape[0])
        raise Stop

    def _projector_post(self, module, args, output):
        rows = self._features(args[0])
        keep = self.selector.select_batched(output.detach(), rows, self.adapter.grid,
                                            "LLaVA image")
        # all N features go on (generate repeats them by counting placeholders); the
        # prefill cuts each image to its k
        self._encoded = _Encoded(output.detach(), keep, rows)
        return None

    def _encoded_features(self, kwargs: dict, n_images: int):
        """kwargs with mm_encoder_outputs' image features cut to the k kept per image (each
        image found, by value, among those encoded last), or None when not given."""
        mm = kwargs.get("mm_encoder_outputs")
        image = mm.get("image") if isinstance(mm, dict) else None
        feats = getattr(image, "pooler_output", None)
        if feats is None:
            return None
        enc = self._encoded
        given = list(feats)
        if len(given) != n_images:
            raise ValueError(f"mm_encoder_outputs holds {len(given)} images but the prompt "
                             f"holds {n_images}")
        if enc is None:
            raise ValueError("where='vision': the image features in mm_encoder_outputs were "
                             "not encoded under this pruner (encode them after apply(), e.g. "
                             "with model.get_image_features, or pass pixel_values)")
        out, pending = [], []
        for j, f in enumerate(given):
            i = next((i for i in range(enc.feats.shape[0])
                      if f.shape == enc.feats[i].shape and torch.equal(f.detach(),
                                                                       enc.feats[i])), None)
            if i is None:
                raise ValueError(f"where='vision': image {j} of mm_encoder_outputs is none of "
                                 f"the images encoded under this pruner (encode them after "
                                 f"apply(), or pass pixel_values)")
            out.append(f[enc.keep[i].to(f.device)])
            pending.append((enc.keep[i].cpu(), enc.rows[i].cpu()))
        self._pending = pending
        image = copy.copy(image)
        image.pooler_output = torch.stack(out) if isinstance(feats, torch.Tensor) else out
        return dict(kwargs, mm_encoder_outputs={**mm, "image": image})

    # -- the prompt ------------------------------------------------------------------------

    def _outer_pre(self, module, args, kwargs):
        self._fwd = None
        cache = get_cache(kwargs)
        if not is_prefill(cache):
            return self._continue(cache, args, kwargs)
        if cache is not None:
            mark_cache(cache, None)  # a prefill into it: an older mark no longer applies
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        if ids is None and emb is None:
            return None
        image = self.adapter.image_mask(ids, emb)
        batch, length = image.shape
        keep = torch.ones(batch, length, dtype=torch.bool, device=image.device)
        counts = []
        drop = self.n - self.k
        for b in range(batch):
            spans = self.adapter.images(b, runs(image[b]), kwargs, {})
            counts.append(len(spans))
            for s, _, _ in spans:
                keep[b, s + self.k:s + self.n] = False
        self._fwd = (None, counts)
        mm = kwargs.get("mm_encoder_outputs") or {}
        if kwargs.get("pixel_values") is not None and mm.get("image") is None:
            # encode here, through the model's own get_image_features, as generate() does
            # before the prefill: one path for both
            image = module.get_image_features(
                pixel_values=kwargs["pixel_values"],
                vision_feature_layer=kwargs.get("vision_feature_layer"),
                vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                image_sizes=kwargs.get("image_sizes"), return_dict=True)
            kwargs = dict(kwargs, pixel_values=None, mm_encoder_outputs={**mm, "image": image})
        encoded = self._encoded_features(kwargs, sum(counts))
        if encoded is not None:
            kwargs = encoded
        if drop == 0 or bool(keep.all()):  # nothing pruned: the cache is marked as such
            mask = kwargs.get("attention_mask")
            given = isinstance(mask, torch.Tensor) and mask.dim() == 2
            whole = mask if given else keep.long()
            self._fwd = (_Record(length, torch.zeros(batch, dtype=torch.int64), whole, given),
                         counts)
            return None if encoded is None else (args, kwargs)
        idx, slot = left_packed(keep)
        self._gather = (idx, slot)
        filler = ~slot
        new = dict(kwargs)
        if ids is not None:
            pad = self._pad_id()
            new["input_ids"] = ids.gather(1, idx).masked_fill(filler, pad)
            if "input_ids" not in kwargs:  # given positionally
                args = (new.pop("input_ids"),) + tuple(args[1:])
        if emb is not None:
            token = self.adapter.outer.get_input_embeddings()(
                torch.tensor(self._pad_id(), device=emb.device)).to(emb.dtype)
            shorter = emb.gather(1, idx.unsqueeze(-1).expand(-1, -1, emb.shape[-1]))
            new["inputs_embeds"] = torch.where(filler.unsqueeze(-1), token, shorter)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            if mask.dim() != 2:
                raise ValueError(f"where='vision' needs a 2-D attention_mask [B, L], got shape "
                                 f"{list(mask.shape)}")
            prompt_mask = mask.gather(1, idx).masked_fill(filler, 0)
        else:
            prompt_mask = slot.long()
        new["attention_mask"] = (prompt_mask if isinstance(mask, torch.Tensor)
                                 or bool(filler.any()) else None)
        dropped = (~keep).long()
        removed = dropped.sum(1)
        pos = kwargs.get("position_ids")
        if isinstance(pos, torch.Tensor):
            before = dropped.cumsum(1).gather(1, idx)  # dropped tokens before each kept one
            new["position_ids"] = (pos.expand(batch, -1).gather(1, idx) - before).masked_fill(
                filler, 0)
        rec = _Record(length, removed, prompt_mask, isinstance(mask, torch.Tensor))
        self._fwd = (rec, counts)
        return args, new

    def _continue(self, cache, args, kwargs):
        """A forward that continues from a cache: mapped onto the shortened prompt when the
        pruner filled that cache; image placeholders are refused (pruned in a prefill only)."""
        rec = cache_layout(cache)
        if rec is not None and not isinstance(rec, _Record):
            raise ValueError("this forward continues from a cache (past_key_values) pruned "
                             "with where='llm'; this pruner is where='vision': continue under "
                             "the pruner that filled it")
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        if ids is None and emb is None:
            return None
        if rec is not None:
            args, kwargs = new_tokens(rec.length, rec.prompt_mask.shape[1], cache, args,
                                      kwargs)
            ids = kwargs.get("input_ids", args[0] if args else None)
            emb = kwargs.get("inputs_embeds")
        # Refused: placeholders with pixels (or encoded images) to fill them, a new image
        # after the cache; or placeholders after a cache this pruner did not mark (a prompt's
        # tail re-fed). After a marked cache the tail is cut above, and an image token id left
        # without pixels is a token like any other to the model (a small random model may
        # generate it), as it is unpruned.
        images_given = (kwargs.get("pixel_values") is not None
                        or (kwargs.get("mm_encoder_outputs") or {}).get("image") is not None)
        n_images = (int(self.adapter.image_mask(ids, emb).sum())
                    if images_given or rec is None else 0)
        if n_images:
            raise ValueError(f"where='vision' prunes images in a prefill only: this forward "
                             f"continues from a cache (past_key_values, "
                             f"{cache.get_seq_length()} tokens) and carries {n_images} image "
                             f"placeholders. Start a new prefill (no past_key_values) for a "
                             f"prompt with new images; to continue a pruned conversation, pass "
                             f"the cache object the pruned generate returned, unchanged")
        if rec is None:
            return None
        return args, self._decode(rec, kwargs)

    def _decode(self, rec: _Record, kwargs: dict) -> dict:
        new = dict(kwargs)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            new["attention_mask"] = torch.cat(
                [rec.prompt_mask.to(mask.dtype), mask[:, rec.length:]], dim=1)
        elif not bool(rec.prompt_mask.bool().all()):
            ids = kwargs.get("input_ids")
            steps = (ids if ids is not None else kwargs["inputs_embeds"]).shape[1]
            past = get_cache(kwargs).get_seq_length() - rec.prompt_mask.shape[1]
            tail = rec.prompt_mask.new_ones(rec.prompt_mask.shape[0], past + steps)
            new["attention_mask"] = torch.cat([rec.prompt_mask, tail], dim=1)
        pos = kwargs.get("position_ids")
        if isinstance(pos, torch.Tensor):
            new["position_ids"] = pos - rec.removed.to(pos.device).view(-1, 1)
        return new

    def _outer_post(self, module, args, kwargs, output):
        fwd, self._fwd = self._fwd, None
        if fwd is None:
            self._pending = None
            return None
        rec, counts = fwd
        pending, self._pending = self._pending, None
        total = sum(counts)
        if total == 0:
            self.on_kept([[] for _ in counts], [[] for _ in counts], [[] for _ in counts])
        elif pending is not None:
            if len(pending) != total:
                raise RuntimeError(f"the projector pruned {len(pending)} images but the prompt "
                                   f"holds {total}")
            kept, scores, it = [], [], iter(pending)
            for c in counts:
                pairs = [next(it) for _ in range(c)]
                kept.append([kb for kb, _ in pairs])
                scores.append([row for _, row in pairs])
            self.on_kept(kept, [[self.adapter.grid] * c for c in counts], scores)
        cache = output_cache(output) if output is not None else None
        if cache is not None:
            mark_cache(cache, rec)
        return None

    def _pad_id(self) -> int:
        cfg = self.adapter.model.config
        for pad in (getattr(cfg, "pad_token_id", None),
                    getattr(getattr(cfg, "text_config", None), "pad_token_id", None), 0, 1):
            if isinstance(pad, int) and pad != self.adapter.image_token_id:
                return pad
        return 0
