"""tc's units with tc's meaning."""

from __future__ import annotations

import pytest

from shapekit.config.units import (
    PercentError,
    UnitError,
    format_rate,
    is_percent,
    parse_percent,
    parse_rate,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "bits"),
    [
        ("100mbit", 100_000_000),
        ("512kbit", 512_000),
        ("1Gbit", 1_000_000_000),
        ("8bit", 8),
        ("1kbps", 8_000),  # kilobytes/s
        ("2mbps", 16_000_000),
        ("1kibit", 1024),
        ("1mibps", 8 * 1024 * 1024),
        ("1.5mbit", 1_500_000),
        (" 10 mbit ", 10_000_000),
    ],
)
def test_parse_rate(text, bits):
    assert parse_rate(text) == bits


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10kb", "ambiguous: write '10kbit' (kbits/s) or '10kbps' (kbytes/s)"),
        ("10k", "ambiguous"),
        ("10mb", "ambiguous"),
        ("10m", "ambiguous"),
        ("10gb", "ambiguous"),
        ("10b", "ambiguous: write '10bit' (bits/s) or '10bps' (bytes/s)"),
        ("10", "ambiguous"),
        (10, "ambiguous"),
        ("10furlongs", "unknown rate unit"),
        ("0mbit", "above 0"),
        ("-1mbit", "is not a rate"),
        ("1.0001bit", "whole number"),
        (True, "must be a string"),
        (1.5, "must be a string"),
    ],
)
def test_parse_rate_refuses(text, message):
    with pytest.raises(UnitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_rate(text)


@pytest.mark.parametrize(
    ("bits", "text"),
    [(100_000_000, "100mbit"), (2_048_000, "2048kbit"), (8_000, "8kbit"), (1_000_000_000, "1gbit"), (1500, "1500bit")],
)
def test_format_rate(bits, text):
    assert format_rate(bits) == text
    assert parse_rate(text) == bits


@pytest.mark.parametrize(
    ("text", "size"),
    [("5k", 5120), ("5kb", 5120), ("1600b", 1600), (1514, 1514), ("1m", 1048576), ("8kbit", 1024)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["5kbps", "0b", "big"])
def test_parse_size_refuses(text):
    with pytest.raises(UnitError):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "whole", "bits"),
    [
        ("40%", 100_000_000, 40_000_000),
        ("100%", 2_000_000, 2_000_000),
        ("12.5 %", 1_000_000, 125_000),  # a space before the sign, as before a unit
        (" 0.1% ", 10_000_000, 10_000),
        ("33.3333333%", 1_000_000, 333_333),  # rounded down: never above the parent's ceil
        ("99.99999999%", 1_000_000, 999_999),
    ],
)
def test_parse_percent(text, whole, bits):
    assert parse_percent(text, whole) == bits


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0%", "out of range"),
        ("0.0%", "out of range"),
        ("100.01%", "out of range"),
        ("150%", "out of range"),
        ("%", "is not a percentage"),
        ("-5%", "is not a percentage"),
        ("40%%", "is not a percentage"),
        ("1e2%", "is not a percentage"),
        ("0.0001%", "below 8bit"),
    ],
)
def test_parse_percent_refuses(text, message):
    with pytest.raises(UnitError, match=message):
        parse_percent(text, 1_000_000)


@pytest.mark.parametrize("text", ["40%", " 40 % ", "%"])
def test_a_plain_rate_is_never_a_percentage(text):
    assert is_percent(text)
    with pytest.raises(PercentError, match="only a class's rate and ceil take"):
        parse_rate(text)
