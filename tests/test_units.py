"""Tests for memguard.units: parse_bytes and format_bytes."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memguard import format_bytes, parse_bytes
from memguard.errors import ConfigError, MemguardError
from memguard.units import MAX_BYTES

GIB = 2**30


@pytest.mark.parametrize(("value", "expected"), [
    ("24GiB", 24 * GIB),
    ("24GB", 24 * 10**9),
    ("24 gib", 24 * GIB),
    ("24Gi", 24 * GIB),
    ("24G", 24 * 10**9),
    ("1.5GiB", 3 * GIB // 2),
    (" 512 MiB ", 512 * 2**20),
    ("512MB", 512 * 10**6),
    ("12KiB", 12288),
    ("12kB", 12000),
    ("2TiB", 2 * 2**40),
    ("1PB", 10**15),
    ("4096B", 4096),
    ("4096", 4096),
    (".5KiB", 512),
    ("1e3", 1000),
    ("1e3MiB", 1000 * 2**20),
    (4096, 4096),
    (0, 0),
    (2.9, 2),
])
def test_parse_bytes(value, expected):
    assert parse_bytes(value) == expected
    assert isinstance(parse_bytes(value), int)


@pytest.mark.parametrize(("value", "total", "expected"), [
    ("90%", 80 * GIB, int(80 * GIB * 0.9)),
    ("100%", 1000, 1000),
    ("0%", 1000, 0),
    ("12.5%", 800, 100),
    (" 50 %", 1001, 500),
])
def test_parse_percentages_of_a_device(value, total, expected):
    assert parse_bytes(value, total=total) == expected


def test_the_largest_size_is_int64s():
    assert MAX_BYTES == 2**63 - 1
    assert parse_bytes(MAX_BYTES) == MAX_BYTES
    assert parse_bytes("8191PiB") == 8191 * 2**50


@pytest.mark.parametrize(("value", "message"), [
    ("abc", r"cannot read 'abc' as a memory size; expected .*'24GiB'.*'24GB'.*'90%'"),
    ("24 parsecs", r"cannot read '24 parsecs'"),
    ("-5", r"cannot read '-5'"),
    ("", r"cannot read ''"),
    ("GiB", r"cannot read 'GiB'"),
    (-5, "must not be negative"),
    (-1.0, "non-negative"),
    (math.inf, "finite"),
    (math.nan, "finite"),
    (True, r"cannot read True"),
    (None, r"cannot read None"),
    ([1], r"cannot read \[1\]"),
    ("90%", r"'90%' is a percentage.*no device total.*'12GiB'"),
    ("x%", r"cannot read 'x%' as a percentage"),
    ("150%", "between 0% and 100%"),
    ("-1%", "between 0% and 100%"),
    ("1e400", "'1e400' is larger than any memory"),  # float('1e400') is inf
    ("1e400GiB", "larger than any memory"),
    ("1e300GiB", "larger than any memory"),  # finite, but times 2**30 it is not
    ("8192PiB", "larger than any memory"),
    (2**63, "larger than any memory"),
    (1e19, "larger than any memory"),
])
def test_parse_errors_name_the_value_and_the_forms(value, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_bytes(value)
    assert isinstance(info.value, MemguardError)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"),
    (1023, "1023 B"),
    (1024, "1.00 KiB"),
    (1536, "1.50 KiB"),
    (5 * 2**20, "5.00 MiB"),
    (GIB, "1.00 GiB"),
    (80 * GIB, "80.00 GiB"),
    (3 * 2**40, "3.00 TiB"),
    (2**50, "1024.00 TiB"),
    (-1536, "-1.50 KiB"),
])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_format_bytes_digits():
    assert format_bytes(1536, digits=0) == "2 KiB"
    assert format_bytes(GIB + 1, digits=4) == "1.0000 GiB"


@given(st.integers(min_value=0, max_value=2**53))
def test_plain_byte_counts_round_trip(n):
    # Strings are read through float, exact up to 2**53 bytes (8 PiB).
    assert parse_bytes(n) == n
    assert parse_bytes(str(n)) == n
    assert parse_bytes(f"{n}B") == n


@given(st.integers(min_value=0, max_value=2**50))
def test_formatted_sizes_parse_back_closely(n):
    back = parse_bytes(format_bytes(n))
    # two decimals of the unit: off by at most half a hundredth of it
    unit = 1 if n < 1024 else 1024 ** min(int(math.log(n, 1024)), 4)
    assert abs(back - n) <= unit * 0.005 + 1


def test_decimal_sizes_say_how_they_are_read():
    from memguard.units import decimal_reading

    assert decimal_reading("24GB") == ("24GB is read as 24,000,000,000 bytes (SI: 1 GB = 10^9 bytes), 22.35 GiB; "
                                       "write 24GiB for 24 x 2^30 bytes (binary, as nvidia-smi counts)")
    assert decimal_reading(" 1.5 TB ").startswith("1.5 TB is read as 1,500,000,000,000 bytes (SI: 1 TB = 10^12 "
                                                  "bytes), 1.36 TiB; write 1.5TiB for 1.5 x 2^40 bytes")
    for binary_or_plain in ("24GiB", "24 GiB", "4096", "4096B", "80%", "lots"):
        assert decimal_reading(binary_or_plain) is None
