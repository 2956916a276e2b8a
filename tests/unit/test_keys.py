"""User keys and stripe keys."""

from __future__ import annotations

import pytest

from tensorcache.errors import InvalidArgument, TensorCacheError
from tensorcache.keys import (
    MAX_KEY_BYTES,
    MAX_SHARD_KEY_BYTES,
    check_key_bytes,
    encode_key,
    shard_key,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "key",
    [
        "a",
        "model/layer0.weight",
        "é" * 512,
        "€" * 341 + "a",
        "😀" * 256,
        "a" * MAX_KEY_BYTES,
        "with space",
        "nul\0inside",
        "ключ/тензор",
    ],
    ids=[
        "one-byte",
        "path",
        "2-byte-x512",
        "3-byte-x341+1",
        "4-byte-x256",
        "ascii-max",
        "space",
        "nul",
        "cyrillic",
    ],
)
def test_encode_key_accepts_1_to_1024_utf8_bytes(key):
    raw = encode_key(key)
    assert raw == key.encode("utf-8")
    assert 1 <= len(raw) <= MAX_KEY_BYTES
    assert check_key_bytes(raw, limit=MAX_KEY_BYTES) == key


def test_limit_counts_bytes_not_characters():
    assert len(encode_key("é" * 512)) == 1024
    with pytest.raises(InvalidArgument, match="1025 bytes"):
        encode_key("é" * 512 + "a")  # 513 characters, 1025 bytes
    with pytest.raises(InvalidArgument, match="1026 bytes"):
        encode_key("€" * 342)  # 342 characters, 1026 bytes


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("", "empty"),
        ("a" * (MAX_KEY_BYTES + 1), "1025 bytes"),
        ("\ud800", "UTF-8"),
        ("ok\udfffok", "UTF-8"),
        (b"bytes-key", "must be a str"),
        (42, "must be a str"),
        (None, "must be a str"),
    ],
    ids=["empty", "1025-bytes", "lone-surrogate", "surrogate-inside", "bytes", "int", "none"],
)
def test_encode_key_rejects(key, problem):
    with pytest.raises(InvalidArgument, match=problem) as info:
        encode_key(key)
    assert str(info.value).startswith("key ")
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, TensorCacheError)


def test_error_names_the_given_field():
    with pytest.raises(InvalidArgument, match=r"^keys\[3\] is empty"):
        encode_key("", field="keys[3]")
    with pytest.raises(InvalidArgument, match=r"^prefix must be a str, got int"):
        encode_key(1, field="prefix")


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"\xff", "not valid UTF-8"),
        (b"ab\xc3", "not valid UTF-8 \\(byte 2\\)"),
        (b"\xed\xa0\x80", "not valid UTF-8"),
        (b"", "empty"),
        (b"x" * 1025, "1025 bytes"),
    ],
    ids=["ff", "truncated", "encoded-surrogate", "empty", "too-long"],
)
def test_check_key_bytes_rejects(raw, problem):
    with pytest.raises(InvalidArgument, match=problem):
        check_key_bytes(raw, limit=MAX_KEY_BYTES)


def test_check_key_bytes_uses_the_given_limit():
    assert check_key_bytes(b"abcd", limit=4) == "abcd"
    with pytest.raises(InvalidArgument, match="5 bytes, more than the limit of 4"):
        check_key_bytes(b"abcde", limit=4)


def test_shard_key_format_and_determinism():
    assert shard_key("w", 255, 3) == "w\x00" + "00000000000000ff" + "\x003"
    assert shard_key("w", 255, 3) == shard_key("w", 255, 3)
    assert shard_key("w", 255, 3) != shard_key("w", 255, 4)
    assert shard_key("w", 255, 3) != shard_key("w", 256, 3)


def test_shard_keys_do_not_collide_across_user_keys():
    # the NUL separators keep ("a", put 1) and ("a\0...", ...) apart
    seen = {
        shard_key(k, p, i) for k in ("a", "a\x00", "ab") for p in (1, 2**64 - 1) for i in range(12)
    }
    assert len(seen) == 3 * 2 * 12


def test_longest_shard_key_fits_its_limit():
    longest = shard_key("k" * MAX_KEY_BYTES, 2**64 - 1, 10**9)
    raw = longest.encode("utf-8")
    assert len(raw) <= MAX_SHARD_KEY_BYTES
    assert check_key_bytes(raw, limit=MAX_SHARD_KEY_BYTES) == longest
