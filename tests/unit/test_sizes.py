"""Human byte sizes."""

from __future__ import annotations

import pytest

from tensorcache.sizes import format_size, parse_size

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4GiB", 4 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5GB", 1_500_000_000),
        ("4096", 4096),
        ("0", 0),
        ("1KiB", 1024),
        ("1k", 1000),
        ("2kb", 2000),
        ("3KB", 3000),
        ("1Ki", 1024),
        ("2m", 2_000_000),
        ("1Mi", 2**20),
        ("1g", 10**9),
        ("1Gi", 2**30),
        ("1T", 10**12),
        ("2TiB", 2 * 2**40),
        ("1tb", 10**12),
        ("10B", 10),
        ("10b", 10),
        ("0.5KiB", 512),
        ("  8 MiB  ", 8 * 2**20),
        ("1.5GiB", 3 * 2**29),
        ("64gib", 64 * 2**30),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text) == size
    assert isinstance(parse_size(text), int)


@pytest.mark.parametrize("value", [0, 1, 4096, 2**40])
def test_parse_size_int_passthrough(value):
    assert parse_size(value) == value


def test_parse_size_negative_int_rejected():
    with pytest.raises(ValueError, match=">= 0"):
        parse_size(-1)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "GiB",
        "4 GiBs",
        "4PiB",
        "-4GiB",
        "1e9",
        "1,000",
        "4 G i B",
        "0x10",
        ".5GiB",
        "1.GiB",
        "4GiB4",
        "four",
    ],
)
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (512 * 2**20, "512.0 MiB"),
        (3 * 2**29, "1.5 GiB"),
        (4 * 2**30, "4.0 GiB"),
        (2**40, "1.0 TiB"),
        (2**50, "1024.0 TiB"),
        (-2048, "-2.0 KiB"),
    ],
)
def test_format_size(n, text):
    assert format_size(n) == text


@pytest.mark.parametrize("text", ["4GiB", "512MiB", "1KiB", "3TiB"])
def test_format_parses_back(text):
    number, unit = format_size(parse_size(text)).split()
    assert parse_size(number + unit) == parse_size(text)
