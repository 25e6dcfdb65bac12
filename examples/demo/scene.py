"""The demo's example, drawn and computed here, seeded, nothing downloaded:

* a 336x336 picture (sky gradient, clouds, sun, house, tree, textured grass, a path), cut
  into the 24x24 grid of 14-px patches of a LLaVA-1.5 vision tower (N = 576 tokens);
* patch features: colour mean / spread and edge statistics of every patch, lifted to D=256
  by a fixed random projection with a tanh, so that look-alike patches (two bits of sky,
  two bits of grass) have cosine near 1 and different things do not;
* an 8-head attention map over the patches: content saliency (objects and their outlines)
  times a LLaVA-like positional bias that grows along the raster order towards the bottom
  rows, with head-wise noise;
* the positional prior that debiasing divides by;

and what the demo compares on it (REDUCTIONS, METHODS). None of this is part of the library:
a model gives the tokens and the attention (see `d2pruner_kernels.hf`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from d2pruner_kernels.checks import resolve_k

PATCH = 14                    # pixels per patch side (CLIP ViT-L/14 at 336 px)
GRID = (24, 24)               # patch grid (rows, columns)
IMG = PATCH * GRID[0]         # 336
N = GRID[0] * GRID[1]         # 576 visual tokens
D = 256                       # feature width
HEADS = 8
BIAS_STRENGTH = 3.5           # log of the bias ratio last token / first token
CONTENT_FLOOR = 0.12          # attention every patch gets whatever its content
REGIONS = ("sky", "cloud", "sun", "house", "roof", "tree", "grass", "path")

# what the demo compares
REDUCTIONS = (0.75, 0.90)     # share of the tokens pruned
METHODS = ("raw top-k", "debiased top-k", "D2Pruner")
BOTTOM_ROWS = 4               # "bottom rows" in the printed summary: rows 20..23
EPS = 1e-7                    # prune()'s default eps, in the debiased score


def kept_count(reduction: float, n: int = N) -> int:
    """Tokens kept at a given reduction, as prune() reads a ratio k (75% -> 144, 90% -> 58)."""
    return resolve_k(1.0 - reduction, n)


def row_counts(kept: np.ndarray) -> np.ndarray:
    return np.bincount(kept // GRID[1], minlength=GRID[0])


# --------------------------------------------------------------------------- the picture

def draw_scene(seed: int = 0):
    """The example picture, uint8 [336, 336, 3], and the region label of every pixel."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    h = w = IMG
    horizon = 16 * PATCH                                      # grass from patch row 16 on
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    # sky: deep blue at the top to pale blue at the horizon
    t = (yy / horizon)[..., None]
    top, low = np.array([30, 80, 185], np.float32), np.array([190, 220, 248], np.float32)
    img = (1 - t) * top + t * low
    label = np.zeros((h, w), np.uint8)                        # 0 = sky

    # grass: green with per-pixel grain and darker/lighter blades
    grass = yy >= horizon
    shade = 0.85 + 0.3 * ((yy - horizon) / (h - horizon))     # a bit lighter towards the viewer
    base = np.stack([60 * shade, 140 * shade, 45 * shade], -1)
    img[grass] = base[grass]
    label[grass] = REGIONS.index("grass")

    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    lab = Image.fromarray(label)
    d, dl = ImageDraw.Draw(im), ImageDraw.Draw(lab)

    def shape(kind, xy, fill, region, **kw):
        getattr(d, kind)(xy, fill=fill, **kw)
        getattr(dl, kind)(xy, fill=REGIONS.index(region), **kw)

    for _ in range(900):                                      # grass blades
        x0, y0 = rng.integers(0, w), rng.integers(horizon + 4, h)
        ln = rng.integers(4, 10)
        c = tuple(int(v) for v in rng.choice([[35, 95, 30], [95, 175, 60]]))
        d.line([(x0, y0), (x0 + rng.integers(-2, 3), y0 - ln)], fill=c, width=1)

    # clouds
    for cx, cy, s in ((70, 52, 1.0), (150, 88, 0.7)):
        for dx, dy, r in ((-22, 4, 16), (0, -6, 22), (24, 4, 17), (8, 10, 16)):
            r = r * s
            shape("ellipse", (cx + dx * s - r, cy + dy * s - r * 0.8,
                              cx + dx * s + r, cy + dy * s + r * 0.8), (246, 248, 252), "cloud")
    # sun with rays
    sx, sy, sr = 272, 58, 28
    for a in range(0, 360, 30):
        ca, sa = math.cos(math.radians(a)), math.sin(math.radians(a))
        shape("line", ((sx + ca * (sr + 5), sy + sa * (sr + 5)),
                       (sx + ca * (sr + 16), sy + sa * (sr + 16))), (255, 200, 40), "sun", width=4)
    shape("ellipse", (sx - sr, sy - sr, sx + sr, sy + sr), (255, 215, 60), "sun")

    # path from the door to the bottom edge
    shape("polygon", ((166, 252), (188, 252), (236, h), (122, h)), (196, 170, 120), "path")
    # house: walls, roof, door, windows, chimney
    shape("rectangle", (214, 104, 228, 140), (120, 60, 50), "roof")
    shape("rectangle", (120, 152, 234, 252), (226, 206, 170), "house")
    shape("polygon", ((108, 154), (246, 154), (177, 92)), (175, 58, 40), "roof")
    shape("rectangle", (164, 196, 190, 252), (110, 65, 35), "house")
    for x0 in (132, 204):
        shape("rectangle", (x0 - 2, 168, x0 + 20, 190), (250, 250, 250), "house")
        shape("rectangle", (x0, 170, x0 + 18, 188), (95, 150, 210), "house")
        d.line(((x0 + 9, 170), (x0 + 9, 188)), fill=(250, 250, 250), width=2)
        d.line(((x0, 179), (x0 + 18, 179)), fill=(250, 250, 250), width=2)
    # tree: trunk and a leafy crown
    shape("rectangle", (50, 185, 66, 262), (105, 70, 40), "tree")
    for dx, dy, r in ((0, -10, 36), (-22, 8, 24), (22, 8, 24), (0, -36, 22)):
        shape("ellipse", (58 + dx - r, 168 + dy - r, 58 + dx + r, 168 + dy + r), (40, 115, 45), "tree")

    img = np.asarray(im).astype(np.float32)
    tree = np.asarray(lab) == REGIONS.index("tree")
    leaves = tree & (yy < 185)                                # texture on the crown
    img[leaves] += rng.normal(0, 18, (int(leaves.sum()), 1)) * np.array([0.6, 1.0, 0.5])
    img += rng.normal(0, 3.0, img.shape)                      # sensor noise everywhere
    return np.clip(img, 0, 255).astype(np.uint8), np.asarray(lab)


def patchify(img: np.ndarray) -> np.ndarray:
    """[336, 336, C] -> [576, 14, 14, C] patches in row-major grid order."""
    gh, gw = GRID
    c = img.shape[-1]
    return img.reshape(gh, PATCH, gw, PATCH, c).transpose(0, 2, 1, 3, 4).reshape(N, PATCH, PATCH, c)


def patch_regions(label: np.ndarray) -> np.ndarray:
    """Majority region of every patch, int [576]."""
    p = patchify(label[..., None])[..., 0].reshape(N, -1)
    return np.array([np.bincount(row, minlength=len(REGIONS)).argmax() for row in p])


# --------------------------------------------------------------------------- features

def patch_features(img: np.ndarray, seed: int = 0) -> torch.Tensor:
    """[576, 256] float32 features: per-patch statistics lifted by a seeded random map.

    Statistics (14 per patch): mean RGB, RGB std, mean |d/dx|, mean |d/dy| and a 4-bin
    gradient-orientation histogram of the luminance, plus brightness and saturation. They
    are z-scored over the patches and weighted (colour counts most), then x = tanh(z W)
    with a fixed Gaussian W [14, 256]: a smooth nonlinear lift that keeps the geometry, so
    look-alike patches get cosine near 1 and different ones much less.
    """
    x = img.astype(np.float32) / 255.0
    lum = x @ np.array([0.299, 0.587, 0.114], np.float32)
    gy, gx = np.gradient(lum)
    p = patchify(x).reshape(N, -1, 3)
    pgx = patchify(gx[..., None]).reshape(N, -1)
    pgy = patchify(gy[..., None]).reshape(N, -1)
    mag = np.hypot(pgx, pgy)
    ang = np.mod(np.arctan2(pgy, pgx), np.pi)                 # orientation in [0, pi)
    bins = np.minimum((ang / (np.pi / 4)).astype(int), 3)
    hist = np.stack([(mag * (bins == b)).mean(1) for b in range(4)], 1)
    mean, std = p.mean(1), p.std(1)
    bright, sat = mean.max(1), mean.max(1) - mean.min(1)
    stats = np.concatenate([mean, std, np.abs(pgx).mean(1, keepdims=True),
                            np.abs(pgy).mean(1, keepdims=True), hist,
                            bright[:, None], sat[:, None]], 1)
    weights = np.array([1.0] * 3 + [0.3] * 3 + [0.3] * 2 + [0.2] * 4 + [0.6, 0.6], np.float32)
    z = (stats - stats.mean(0)) / (stats.std(0) + 1e-6) * weights
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(z.shape[1], D, generator=g) / math.sqrt(z.shape[1])
    return torch.tanh(torch.from_numpy(z).float() @ w * 1.2).contiguous()


# --------------------------------------------------------------------------- attention

def content_saliency(img: np.ndarray) -> np.ndarray:
    """[576] in [0, 1]: how much a patch stands out (colour rarity + contrast to its
    neighbours); objects and their outlines score high, sky and grass low."""
    x = img.astype(np.float32) / 255.0
    mean = patchify(x).reshape(N, -1, 3).mean(1)              # [N, 3]
    rarity = np.linalg.norm(mean[:, None] - mean[None], axis=-1).mean(1)
    m = mean.reshape(*GRID, 3)
    pad = np.pad(m, ((1, 1), (1, 1), (0, 0)), mode="edge")
    surround = sum(pad[1 + dy:1 + dy + GRID[0], 1 + dx:1 + dx + GRID[1]]
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx) / 8
    contrast = np.linalg.norm(m - surround, axis=-1).reshape(N)
    norm = lambda v: (v - v.min()) / (v.max() - v.min() + 1e-12)  # noqa: E731
    return norm(0.5 * norm(rarity) + 0.5 * norm(contrast))


def positional_bias(strength: float = BIAS_STRENGTH) -> np.ndarray:
    """[576] LLaVA-like positional bias: the last text token attends more to the visual
    tokens near it in the sequence, i.e. later in raster order, i.e. the bottom rows."""
    pos = np.arange(N, dtype=np.float64) / (N - 1)
    return np.exp(strength * pos)


def head_attention(saliency: np.ndarray, seed: int = 0) -> torch.Tensor:
    """[8, 576] attention of the last text token over the visual tokens, per head:
    softmax(log content + log bias + head noise), each head with its own temperature."""
    rng = np.random.default_rng(seed + 2)
    content = CONTENT_FLOOR + saliency
    logits = []
    for h in range(HEADS):
        temp = rng.uniform(0.8, 1.4)                          # how peaked this head's content is
        noise = rng.normal(0.0, 0.35, N)                      # head-wise noise
        logits.append(temp * np.log(content) + np.log(positional_bias()) + noise)
    logits = np.stack(logits)
    a = np.exp(logits - logits.max(1, keepdims=True))
    return torch.from_numpy(a / a.sum(1, keepdims=True)).float()


def calibration_prior(saliency: np.ndarray) -> torch.Tensor:
    """[576] positional prior, computed analytically.

    In real use the prior is the same attention averaged offline over ~1000 calibration
    images. Over many images the content term averages out to a constant,
    so that mean is (bias x average content): the demo writes it down directly instead of
    simulating a calibration set, with the mean content of this picture as the constant.
    Normalised to mean 1 (only its shape matters to the ranking).
    """
    p = positional_bias() * (CONTENT_FLOOR + saliency).mean()
    return torch.from_numpy(p / p.mean()).float()


# --------------------------------------------------------------------------- all of it

def build_example(seed: int = 0, device="cpu"):
    """Picture, region label per patch, tokens [576, 256], attention [8, 576], prior [576]."""
    img, label = draw_scene(seed)
    sal = content_saliency(img)
    tokens = patch_features(img, seed).to(device)
    attn = head_attention(sal, seed).to(device)
    prior = calibration_prior(sal).to(device)
    return img, patch_regions(label), tokens, attn, prior
