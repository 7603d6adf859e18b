"""Credentials in URLs are masked wherever StreamVG prints a URL."""

from __future__ import annotations

import doctest

import pytest

import streamvg.redaction as redaction
from streamvg.redaction import mask_text, mask_url


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("rtsp://admin:pa:ss@10.0.0.5/s", "rtsp://admin:***@10.0.0.5/s"),
        ("rtsps://u:p@[::1]:8554/x?y=1", "rtsps://u:***@[::1]:8554/x?y=1"),
        ("redis://default:pw@h:6379/0", "redis://default:***@h:6379/0"),
        ("redis://pw@h:6379", "redis://***@h:6379"),
        ("http://user@host/a", "http://user@host/a"),
        ("/dev/video0", "/dev/video0"),
        ("0", "0"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_mask_text_in_sentences() -> None:
    text = "failed rtsp://a:b1@h/1 and redis://:zz@r:1/0 then http://x/y"
    out = mask_text(text)
    assert "b1" not in out and "zz" not in out
    assert "http://x/y" in out


def test_doctests() -> None:
    assert doctest.testmod(redaction).failed == 0
