"""Prompt tokens of an image, by each provider's published formula (for ``llmap estimate``).

**Anthropic** (Claude vision docs): an image whose long edge is over 1,568 px,
or that would cost more than about 1,600 tokens, is scaled down (aspect kept)
until it fits; it then costs ``width x height / 750`` tokens.

**OpenAI** (the vision guide's "calculating costs"), at ``detail = "high"``
(what ``auto`` picks for a large image; llmap sends no ``detail``):

- tile models (GPT-4o, GPT-4.1, GPT-4.5, GPT-5, o1, o3): the image is scaled
  to fit 2048 x 2048, then so its short side is at most 768 px; it costs a base
  plus a per-tile figure for each 512 px tile. Base / tile: 85 / 170 for
  GPT-4o, GPT-4.1 and GPT-4.5; 70 / 140 for GPT-5; 75 / 150 for o1 and o3;
  2,833 / 5,667 for GPT-4o mini (its tokens are priced lower).
- patch models (GPT-4.1 mini and nano, GPT-5 mini and nano, o4-mini): 32 px
  patches, at most 1,536 (a larger image is scaled down until it fits), times
  a multiplier: 1.62 for the minis, 2.46 for the nanos, 1.72 for o4-mini.

Other OpenAI-compatible models are counted with GPT-4o's figures (a guess
the estimate says it makes).
"""

from __future__ import annotations

import math
import re

from llmap.spec import ModelSpec

__all__ = ["anthropic_image_tokens", "image_tokens", "openai_image_tokens"]

#: (name pattern, base tokens, tokens per 512 px tile), first match wins.
_TILES = ((r"^gpt-4o-mini", 2833, 5667), (r"^gpt-5(?!-mini|-nano)", 70, 140), (r"^(o1|o3)(?!-mini)", 75, 150),
          (r"^(gpt-4o|chatgpt-4o|gpt-4\.1|gpt-4\.5)", 85, 170))
#: (name pattern, multiplier) of the patch models.
_PATCHES = ((r"^(gpt-4\.1|gpt-5)-nano", 2.46), (r"^(gpt-4\.1|gpt-5)-mini", 1.62), (r"^o4-mini", 1.72))


def anthropic_image_tokens(width: int, height: int) -> int:
    """Claude's tokens for a ``width`` x ``height`` px image (scaled down first when too large)."""
    w, h = float(width), float(height)
    scale = min(1.0, 1568 / max(w, h, 1.0), math.sqrt(1600 * 750 / max(w * h, 1.0)))
    return max(1, math.ceil(w * scale * h * scale / 750))


def _patches(width: int, height: int) -> int:
    w, h = float(width), float(height)
    patches = math.ceil(w / 32) * math.ceil(h / 32)
    if patches <= 1536:
        return patches
    r = math.sqrt(32 * 32 * 1536 / (w * h))
    r *= min(math.floor(w * r / 32) / (w * r / 32), math.floor(h * r / 32) / (h * r / 32))
    return math.ceil(w * r / 32) * math.ceil(h * r / 32)


def openai_image_tokens(model: str, width: int, height: int) -> int:
    """OpenAI's tokens for a ``width`` x ``height`` px image on ``model`` at high detail."""
    name = model.lower()
    for pattern, multiplier in _PATCHES:
        if re.search(pattern, name):
            return math.ceil(_patches(width, height) * multiplier)
    base, tile = next(((b, t) for p, b, t in _TILES if re.search(p, name)), (85, 170))
    w, h = float(width), float(height)
    fit = min(1.0, 2048 / max(w, h, 1.0))
    w, h = w * fit, h * fit
    short = min(w, h)
    if short > 768:
        w, h = w * 768 / short, h * 768 / short
    return base + tile * math.ceil(w / 512) * math.ceil(h / 512)


def image_tokens(model: ModelSpec, width: int, height: int) -> int:
    """The prompt tokens ``model`` counts for one image (0 for the embedded model, which reads images by OCR)."""
    if model.provider == "anthropic":
        return anthropic_image_tokens(width, height)
    if model.provider == "openai":
        return openai_image_tokens(model.name, width, height)
    return 0
