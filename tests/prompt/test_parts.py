"""Image parts: a rendered template's image markers become OpenAI content parts, counted and read back."""

from __future__ import annotations

from llmap.prompt.parts import (
    IMAGE_PART_CHARS,
    IMAGES_KEY,
    content_chars,
    content_text,
    image_marker,
    image_part,
    split_data_uri,
    with_images,
)
from llmap.prompt.render import Renderer
from llmap.spec import PromptSpec

IMG = {"media_type": "image/png", "data": "iVBORw0KGgo=", "width": 10, "height": 20}


def test_text_without_markers_is_left_as_it_is() -> None:
    assert with_images("plain", {"scan": IMG}) == "plain"


def test_markers_become_image_parts_between_text_parts() -> None:
    content = f"Look: {image_marker('scan')} and {image_marker('other')}"
    assert with_images(content, {"scan": IMG}) == [
        {"type": "text", "text": "Look: "},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "text", "text": " and "},
        {"type": "text", "text": "[image]"},  # a column without an image
    ]


def test_a_row_with_images_renders_a_user_message_of_parts() -> None:
    r = Renderer.from_spec(PromptSpec(system="You read schedules.", user="School {{ name }}: {{ scan }}"))
    msgs = r.messages({"name": "Lincoln", "scan": image_marker("scan"), IMAGES_KEY: {"scan": IMG}})
    assert msgs[0] == {"role": "system", "content": "You read schedules."}
    assert msgs[1]["content"] == [{"type": "text", "text": "School Lincoln: "}, image_part("image/png", IMG["data"])]
    assert r.messages({"name": "x", "scan": "text"})[1]["content"] == "School x: text"  # no images: a string


def test_counting_and_reading_back() -> None:
    parts = with_images(f"ab {image_marker('s')}", {"s": IMG})
    assert content_text(parts) == "ab " and content_chars(parts) == 3 + IMAGE_PART_CHARS
    assert content_chars("abcd") == 4 and content_text(None) == ""
    assert split_data_uri("data:image/jpeg;base64,/9j/4AAQ") == ("image/jpeg", "/9j/4AAQ")
    assert split_data_uri("https://x.org/a.png") is None
