"""Image parts in a prompt: how an image document travels from its row to a request.

A row whose image document goes to the model as an image (``[input.documents]``,
models that take images) carries, after resolution
(:mod:`llmap.io.documents`), a marker where the template puts the column and
the image itself under :data:`IMAGES_KEY`. :func:`with_images` turns the
rendered user message into OpenAI's content parts: text parts around
``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``.
That is llmap's one shape for an image in a message; the Anthropic provider
turns it into an image block.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["IMAGES_KEY", "IMAGE_PART_CHARS", "content_chars", "content_text", "image_marker", "image_part",
           "split_data_uri", "with_images"]

#: The row key that holds a resolved row's images: column -> ``{"media_type", "data" (base64), "width", "height"}``.
IMAGES_KEY = "_llmap_images"
#: What one image counts as in a prompt's character count (1,600 tokens x 4 characters: Anthropic's most per
#: image at the size it keeps; the estimate counts each provider's formula, :mod:`llmap.observe.estimate.images`).
IMAGE_PART_CHARS = 6400
_MARK = re.compile("\ue000image:([^\ue001]+)\ue001")


def image_marker(column: str) -> str:
    """The text that stands for ``column``'s image in a rendered template."""
    return f"\ue000image:{column}\ue001"


def image_part(media_type: str, data_b64: str) -> dict[str, Any]:
    """An OpenAI ``image_url`` content part holding the image as a data URI."""
    return {"type": "image_url", "image_url": {"url": f"data:{media_type};base64,{data_b64}"}}


def split_data_uri(url: str) -> tuple[str, str] | None:
    """``(media_type, base64 data)`` of a ``data:...;base64,...`` URI, or None for any other URL."""
    m = re.match(r"data:([\w.+/-]+);base64,(.*)\Z", url, re.S)
    return (m.group(1), m.group(2)) if m else None


def with_images(content: str, images: Mapping[str, Mapping[str, Any]]) -> str | list[dict[str, Any]]:
    """``content`` with each image marker replaced by its image: a list of content parts, or ``content``
    unchanged when it holds no marker. A marker whose column has no image becomes ``[image]``."""
    if "\ue000" not in content:
        return content
    parts: list[dict[str, Any]] = []
    at = 0
    for m in _MARK.finditer(content):
        if m.start() > at:
            parts.append({"type": "text", "text": content[at:m.start()]})
        img = images.get(m.group(1))
        if img is None:
            parts.append({"type": "text", "text": "[image]"})
        else:
            parts.append(image_part(img["media_type"], img["data"]))
        at = m.end()
    if at < len(content):
        parts.append({"type": "text", "text": content[at:]})
    return parts


def content_text(content: Any) -> str:
    """The text of a message's content: the string, or its text parts joined (images left out)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "" if content is None else str(content)


def content_chars(content: Any) -> int:
    """A message content's length in characters, each image counted as :data:`IMAGE_PART_CHARS`."""
    if isinstance(content, list):
        images = sum(1 for p in content if isinstance(p, dict) and p.get("type") == "image_url")
        return len(content_text(content)) + images * IMAGE_PART_CHARS
    return len(content_text(content))
