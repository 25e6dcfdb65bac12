"""Videos of the Qwen family (Qwen2_5_VLForConditionalGeneration here; Qwen3-VL in
qwen3_vl.py builds on it): each video is one item of the pruner, pruned with its images.

A video's LLM tokens are a (t, h / merge, w / merge) grid (t temporal patches, row-major per
frame), `k` per video (an int keeps at most k, a ratio is resolved per video), temporal
neighbours within `temporal_radius`. Where the video's tokens sit:

- Qwen2.5-VL writes each video as one run of `video_token_id` between vision start / end;
  its M-RoPE temporal positions step by `tokens_per_second * second_per_grid_t` per frame
  (not by 1), so a frame is read from the positions as a block of h * w tokens on the
  (h, w) lattice sharing one temporal position, the temporal positions non-decreasing.
- Qwen3-VL writes each frame as its own run, with the frame's timestamp text
  ("<1.0 seconds>" + vision start / end) between frames: that text is never pruned, and
  the frames of one video stay one item whose tokens are not contiguous.

Which runs make one video is never guessed from the runs: it is the per-video split of the
vision tower's outputs, the token count of each video in order over the batch, read from
`video_grid_thw` (t * h * w / merge^2) where the forward gets it, else from the encoder
outputs generate() hands the prefill (`mm_encoder_outputs["video"].pooler_output`, one
tensor per video: transformers >= 5.24 encodes before the prefill and passes no
`video_grid_thw`). A video whose tokens do not add up to its count raises ValueError.

Items are (start, end, grid, positions, kind): positions None for a contiguous item (every
image, a Qwen2.5-VL video), else the int64 token positions; kind "image" or "video"
(pruner.kinds).
"""
from __future__ import annotations

import torch

from .qwen2_vl import Qwen2VLAdapter


def frame_grid(p: torch.Tensor):
    """(t, h, w) of a block of video tokens from their M-RoPE positions p [3, n]: t frames
    of h * w tokens each on the (h, w) lattice, one temporal position per frame, temporal
    positions non-decreasing; None if the positions do not form that."""
    n = p.shape[1]
    lo = p[1:].min(dim=1).values
    h, w = (p[1:].max(dim=1).values - lo + 1).tolist()
    if n % (h * w):
        return None
    t = n // (h * w)
    lattice = torch.stack(torch.meshgrid(torch.arange(h, device=p.device) + lo[0],
                                         torch.arange(w, device=p.device) + lo[1],
                                         indexing="ij")).reshape(2, -1)
    if not torch.equal(p[1:].reshape(2, t, h * w), lattice[:, None].expand(2, t, h * w)):
        return None
    time = p[0].reshape(t, h * w)
    if not bool((time == time[:, :1]).all()) or not bool((time[1:, 0] >= time[:-1, 0]).all()):
        return None
    return t, h, w


class QwenVideoAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: images as Qwen2VLAdapter reads them, and each video one item."""

    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)

    def __init__(self, model):
        super().__init__(model)
        self.video_token_id = model.config.video_token_id

    def vision_source(self):
        """where='vision': the last full-attention block of the tower (docs/spec.md §15.5)."""
        from .qwen_vision import qwen25_rows
        return qwen25_rows(self.model.model.visual)

    # -- the placeholders and what the outer forward knows --------------------------------

    def image_mask(self, input_ids, inputs_embeds) -> torch.Tensor:
        """Images and videos: every placeholder the pruner prunes."""
        return (self.token_mask(self.image_token_id, input_ids, inputs_embeds)
                | self.token_mask(self.video_token_id, input_ids, inputs_embeds))

    def prefill_inputs(self, input_ids, inputs_embeds, kwargs: dict) -> dict:
        """The video placeholders and each video's token count (the per-video split of the
        vision tower's outputs)."""
        counts = None
        thw = kwargs.get("video_grid_thw")
        enc = (kwargs.get("mm_encoder_outputs") or {}).get("video")
        if isinstance(thw, torch.Tensor):
            counts = (thw.prod(-1) // self.merge ** 2).tolist()
        elif enc is not None and getattr(enc, "pooler_output", None) is not None:
            counts = [int(x.shape[0]) for x in enc.pooler_output]
        return {"video": self.token_mask(self.video_token_id, input_ids, inputs_embeds),
                "video_counts": counts, "video_grid_thw": thw}

    # -- the items of one sample ------------------------------------------------------------

    def images(self, sample: int, runs: list, lm_kwargs: dict, outer: dict) -> list:
        if not runs:
            return []
        video = outer.get("video")
        if video is None:
            raise ValueError("the outer forward's video placeholders are unknown")
        vrow = video[sample].to("cpu")
        pieces = []  # (start, end, is_video): runs cut where the kind changes
        for s, e in runs:
            kinds = vrow[s:e].tolist()
            a = s
            for i in range(s + 1, e + 1):
                if i == e or kinds[i - s] != kinds[a - s]:
                    pieces.append((a, i, bool(kinds[a - s])))
                    a = i
        images = super().images(sample, [(s, e) for s, e, v in pieces if not v], lm_kwargs,
                                outer)
        videos = self._videos(sample, [(s, e) for s, e, v in pieces if v], lm_kwargs, outer)
        items = [(s, e, g, None, "image") for s, e, g in images] + videos
        return sorted(items, key=lambda it: it[0])  # sequence order

    def _positions(self, sample: int, lm_kwargs: dict):
        pos = lm_kwargs.get("position_ids")
        if not (isinstance(pos, torch.Tensor) and pos.dim() == 3 and pos.shape[0] in (3, 4)):
            raise ValueError(f"sample {sample} has video tokens but the language model got no "
                             f"M-RoPE position ids [3, B, L]: pass video_grid_thw and "
                             f"mm_token_type_ids as the processor returns them")
        return pos[-3:, sample if pos.shape[1] > 1 else 0]

    def _videos(self, sample: int, video_runs: list, lm_kwargs: dict, outer: dict) -> list:
        """Each video: its runs grouped by the per-video token counts, in order."""
        if not video_runs:
            return []
        counts = outer.get("video_counts")
        if counts is None:
            raise ValueError(f"sample {sample} has video tokens but the forward got neither "
                             f"video_grid_thw nor the vision tower's video outputs "
                             f"(mm_encoder_outputs): each video's frames cannot be grouped")
        before = int(outer["video"][:sample].sum())  # video tokens of the earlier samples
        i, acc = 0, 0
        while i < len(counts) and acc < before:
            acc += counts[i]
            i += 1
        if acc != before:
            raise ValueError(f"sample {sample}: the per-video token counts {counts} do not "
                             f"split the batch's video tokens at this sample")
        pos = self._positions(sample, lm_kwargs)
        out, parts, need = [], [], None
        for s, e in video_runs:
            a = s
            while a < e:
                if need is None:
                    if i >= len(counts):
                        raise ValueError(f"sample {sample}: more video tokens than the "
                                         f"videos' token counts {counts}")
                    need, parts = counts[i], []
                    i += 1
                b = min(e, a + need)
                parts.append((a, b))
                need -= b - a
                a = b
                if need == 0:
                    out.append(self._video_item(sample, len(out), parts, pos))
                    need = None
        if need is not None:
            raise ValueError(f"sample {sample}: its last video has {need} tokens fewer than "
                             f"its count in the vision tower's outputs")
        return out

    def _video_item(self, sample: int, index: int, parts: list, pos: torch.Tensor):
        frames, hw = 0, None
        for s, e in parts:
            g = frame_grid(pos[:, s:e])
            if g is None or (hw is not None and g[1:] != hw):
                raise ValueError(f"sample {sample}, video {index}: its tokens at {s}..{e - 1} "
                                 f"do not form frames of one (h, w) grid in their M-RoPE "
                                 f"positions")
            frames += g[0]
            hw = g[1:]
        grid = (frames,) + hw
        if len(parts) == 1:
            return (parts[0][0], parts[0][1], grid, None, "video")
        positions = torch.cat([torch.arange(s, e) for s, e in parts])
        return (parts[0][0], parts[-1][1], grid, positions, "video")

    def check_images(self, spans: list, outer: dict) -> None:
        super().check_images([[it[:3] for it in sample if it[4] == "image"]
                              for sample in spans], outer)
        thw = outer.get("video_grid_thw")
        if not isinstance(thw, torch.Tensor):
            return
        want = [(t, h // self.merge, w // self.merge) for t, h, w in thw.tolist()]
        got = [it[2] for sample in spans for it in sample if it[4] == "video"]
        if got != want:
            raise ValueError(f"the video grids of the prompt's M-RoPE positions {got} disagree "
                             f"with video_grid_thw / spatial_merge_size {want}")
