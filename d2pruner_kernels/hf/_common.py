"""Pieces the in-LLM and vision-side machinery share: the family adapter's interface, the
cache keyword, runs of image tokens, gathers along the sequence, left-padded layouts."""
from __future__ import annotations

import torch


class Stop(Exception):
    """Raised by a hook to end a calibration forward early (caught by calibrate_prior)."""


class Adapter:
    """What the machinery needs to know about one model family (one small file per family).

    outer:           the module whose forward takes input_ids / inputs_embeds (the images'
                     placeholder tokens are visible there)
    language_model:  the decoder, with .layers (each with .self_attn) and .config
    image_token_id:  the placeholder token of an image
    tokens_per_image: the LLM tokens of one image where that is static (LLaVA), else None
    """

    family = ""
    outer = None
    language_model = None
    image_token_id = None
    tokens_per_image = None
    # The transformers classes (by name) a built-in adapter serves, subclasses included.
    # Each class is named by one adapter only; a model gets the adapter of the nearest
    # named class in its MRO (hf._pruner._adapter), so the table's order never decides.
    model_classes: tuple = ()

    def __init__(self, model):
        self.model = model

    @classmethod
    def classes(cls) -> tuple:
        """The classes of `model_classes` that the installed transformers has."""
        import transformers
        return tuple(getattr(transformers, name) for name in cls.model_classes
                     if hasattr(transformers, name))

    def _transformers_parts(self) -> None:
        """outer, language_model and image_token_id where transformers' multimodal
        *ForConditionalGeneration models keep them (model.model, its language_model,
        config.image_token_id)."""
        self.outer = self.model.model
        self.language_model = self.model.model.language_model
        self.image_token_id = self.model.config.image_token_id

    def _llm_only(self, where: str, why: str = "has none") -> None:
        """Refuses where='vision' (LLaVA's CLS row, Qwen2.5-VL's / Qwen3-VL's tower
        attention) for a family without it."""
        if where != "llm":
            raise ValueError(f"where='vision' is for LLaVA (a CLS row), Qwen2.5-VL and "
                             f"Qwen3-VL (their towers' attention); "
                             f"{type(self.model).__name__} {why}: use where='llm'")

    def vision_source(self):
        """where='vision' by the vision tower's own importance, pruned before the first
        decoder layer (hf/qwen_vision.VisionRows), or None (LLaVA's CLS row: _vision.py)."""
        return None

    def check(self, where: str) -> None:
        """Raises if the model's configuration cannot be pruned `where`."""

    def images(self, sample: int, runs: list, lm_kwargs: dict, outer: dict) -> list:
        """The images of one sample: [(start, end, grid)] in token order, from the runs of
        image tokens [(start, end)] of that sample and the language model's kwargs."""
        raise NotImplementedError

    def check_images(self, spans: list, outer: dict) -> None:
        """Cross-checks the images of the whole batch against what the forward was given."""

    def image_mask(self, input_ids, inputs_embeds) -> torch.Tensor:
        """bool [B, L]: the image placeholders (as transformers finds them)."""
        return self.token_mask(self.image_token_id, input_ids, inputs_embeds)

    def token_mask(self, token_id: int, input_ids, inputs_embeds) -> torch.Tensor:
        """bool [B, L]: the placeholders of `token_id`, from input_ids, else (as transformers
        finds them) the positions of inputs_embeds equal to that token's embedding."""
        if input_ids is not None:
            return input_ids == token_id
        embed = self.outer.get_input_embeddings()
        token = embed(torch.tensor(token_id, device=inputs_embeds.device))
        return (inputs_embeds == token.to(inputs_embeds.dtype)).all(-1)

    # Optional, where="llm" (families whose placeholders or decoder need more; Qwen video,
    # Qwen3-VL's DeepStack):

    def prefill_inputs(self, input_ids, inputs_embeds, kwargs: dict) -> dict:
        """What the outer forward of a prefill knows that images() needs (merged into its
        `outer` dict), read from the outer forward's kwargs."""
        return {}

    def install_llm(self, layer: int, handles: list) -> None:
        """Puts the family's own hooks on (appending their handles: remove() takes them
        off), e.g. on decoder layers >= layer."""

    def pruned(self, idx: torch.Tensor, slot: torch.Tensor) -> None:
        """A prefill keeps the positions idx [B, L'] from layer K on (slot False: a filler
        slot); called at layer K's pre-hook, before layer K runs."""


DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_dtype(t: torch.Tensor, what: str) -> None:
    """The model's activations must be a dtype prune() reads (it computes in float32 from
    the input values): a model cast to float64 after apply() is refused at the call."""
    if t.dtype not in DTYPES:
        raise TypeError(f"d2pruner_kernels.hf: {what} runs in {t.dtype}; pruning reads "
                        f"float16, bfloat16 or float32 activations (cast the model, e.g. "
                        f"model.to(torch.float32))")


def get_cache(kwargs: dict):
    """The cache a forward was given: `cache` (transformers >= 5.20) or `past_key_values`."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def output_cache(output):
    for name in ("cache", "past_key_values"):
        try:
            cache = getattr(output, name, None)
        except Exception:  # a deprecated alias that raises
            cache = None
        if cache is not None:
            return cache
    return None


CACHE_ATTR = "_d2pruner_layout"


def mark_cache(cache, layout) -> None:
    """Writes on a cache what its pruned prefill left there (which positions it holds), so
    that decoding from it, or from a copy of it (deepcopy carries the mark), maps masks and
    positions onto what it holds. A prefill into the cache rewrites or clears the mark."""
    if layout is None:
        cache.__dict__.pop(CACHE_ATTR, None)
    else:
        cache.__dict__[CACHE_ATTR] = layout


def cache_layout(cache):
    """The mark `mark_cache` left on a cache, or None."""
    return None if cache is None else getattr(cache, "__dict__", {}).get(CACHE_ATTR)


def is_prefill(cache) -> bool:
    """A forward with no cache, or an empty one, is a prefill."""
    return cache is None or cache.get_seq_length() == 0


def new_tokens(length: int, length_c: int, cache, args, kwargs):
    """(args, kwargs) of a forward that continues from a cache whose prompt was shortened
    (`length` tokens given, `length_c` held: every layer holds the shorter prompt): generate()
    cuts a continued sequence by the cache's length, which is shorter than the unpruned
    positions it covers; only the tokens the cache does not hold go on."""
    mask = kwargs.get("attention_mask")
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        return args, kwargs  # no way to tell: the tokens given are the new ones
    ids = kwargs.get("input_ids", args[0] if args else None)
    emb = kwargs.get("inputs_embeds")
    given = (ids if ids is not None else emb).shape[1]
    held = cache.get_seq_length()
    if held < length_c:
        raise ValueError(f"the cache (past_key_values) holds {held} tokens, fewer than the "
                         f"{length_c} of the pruned prompt it was filled with (was it "
                         f"cropped?): start a new prefill")
    covered = length + held - length_c  # unpruned positions held
    new = mask.shape[1] - covered
    if new == given:
        return args, kwargs
    if new < 1 or given != new + length - length_c:
        raise ValueError(f"attention_mask has {mask.shape[1]} columns and {given} new tokens "
                         f"were given, but the pruned cache covers {covered} positions of the "
                         f"unpruned sequence ({held} tokens held): expected {covered} + the "
                         f"new tokens")
    kwargs = dict(kwargs)
    for name in ("input_ids", "inputs_embeds", "position_ids", "token_type_ids",
                 "mm_token_type_ids"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            dim = 1 if name == "inputs_embeds" else value.dim() - 1
            kwargs[name] = value.narrow(dim, value.shape[dim] - new, new)
    if "input_ids" not in kwargs and args:
        args = (args[0][:, -new:],) + tuple(args[1:])
    return args, kwargs


def runs(mask_row: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)] of the runs of True in a 1-D bool tensor (one host copy)."""
    m = torch.nn.functional.pad(mask_row.to(torch.int8), (1, 1))
    edges = torch.nonzero(m[1:] != m[:-1]).flatten().tolist()
    return list(zip(edges[0::2], edges[1::2]))


def gather_seq(t: torch.Tensor | None, idx: torch.Tensor, seq_dim: int):
    """t [..., B or 1, L, (d)] gathered along its sequence dim (-1 or -2) at idx [B, L'],
    per batch row; a batch dim of 1 is broadcast first."""
    if t is None:
        return None
    b, n = idx.shape
    lead = t.dim() + seq_dim  # position of the sequence dim
    batch_dim = lead - 1
    shape = list(t.shape)
    shape[batch_dim] = b
    t = t.expand(shape)
    view = [1] * t.dim()
    view[batch_dim], view[lead] = b, n
    index = idx.view(view)
    target = list(t.shape)
    target[lead] = n
    return t.gather(lead, index.expand(target))


def left_packed(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keep bool [B, L] -> (idx int64 [B, L'], slot bool [B, L']) with L' = max kept per row:
    each row's kept positions in order, right-aligned, after L' - n_b filler slots (slot =
    False there; their idx points at a dropped position and must be masked)."""
    counts = keep.sum(1)
    width = int(counts.max())
    order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)  # dropped first, in order
    idx = order[:, keep.shape[1] - width:]
    return idx, keep.gather(1, idx)


class Hooks:
    """The forward hooks and the attention tap of one pruning mode: `install()` puts them on
    (all or none: a failure takes off what was put on), `remove()` takes them all off.

    Labels: a forward given `labels=` that prunes returns logits for the kept sequence only,
    so the top model's pre-hook takes the labels out of its call and its post-hook computes
    the loss with the model's own `loss_function` on the labels gathered at the kept
    positions (`self._gather = (idx [B, L'], slot [B, L'])`, set by the mode when it prunes;
    filler slots get -100), the way the model would have on an unpruned sequence."""

    adapter = None

    def __init__(self):
        self._handles = []
        self._tap = None
        self._labels = None
        self._gather = None

    def _install_labels(self, h: list) -> None:
        model = self.adapter.model
        h.append(model.register_forward_pre_hook(self._labels_pre, with_kwargs=True))
        h.append(model.register_forward_hook(self._labels_post, with_kwargs=True,
                                             always_call=True))

    def _labels_pre(self, module, args, kwargs):
        self._labels = self._gather = None
        labels = kwargs.get("labels")
        if labels is None:
            return None
        if kwargs.get("shift_labels") is not None:
            raise ValueError("a pruned forward gathers labels= at the kept positions; pass "
                             "labels=, not shift_labels=")
        extra = {key: kwargs[key] for key in ("num_items_in_batch", "ignore_index")
                 if kwargs.get(key) is not None}
        self._labels = (labels, extra)
        return args, dict(kwargs, labels=None)

    def _labels_post(self, module, args, kwargs, output):
        pending, self._labels = self._labels, None
        gather, self._gather = self._gather, None
        if pending is None or output is None:
            return None
        labels, extra = pending
        logits = output["logits"] if isinstance(output, dict) else output[0]
        if gather is not None:
            idx, slot = gather
            labels = labels.to(idx.device).gather(1, idx).masked_fill(
                ~slot, extra.get("ignore_index", -100))
        if tuple(labels.shape) != tuple(logits.shape[:2]):
            raise ValueError(f"labels {list(labels.shape)} do not cover the logits "
                             f"{list(logits.shape[:2])} of this forward (a pruned forward "
                             f"gathers them in a prefill; logits_to_keep or a forward that "
                             f"continues from a cache cannot be given labels)")
        text = getattr(module.config, "text_config", module.config)
        loss = module.loss_function(logits=logits, labels=labels.to(logits.device),
                                    vocab_size=text.vocab_size, **extra)
        if isinstance(output, dict):  # a ModelOutput: loss is its first field
            return type(output)(loss=loss, **{k: v for k, v in output.items() if k != "loss"})
        return (loss,) + tuple(output)

    def install(self) -> None:
        try:
            self._install(self._handles)
        except BaseException:
            self.remove()
            raise

    def _install(self, handles: list) -> None:  # a mode puts its tap and hooks on here
        raise NotImplementedError

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._tap is not None:
            self._tap.remove()
        self._labels = self._gather = None
        self._forget()

    def _forget(self) -> None:  # a mode drops its per-forward state here
        pass
