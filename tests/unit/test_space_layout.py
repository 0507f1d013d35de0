"""Space layout validation: region alignment, bounds, overlap and 64-bit overflow."""

from __future__ import annotations

import pytest

from membrokerd.errors import BadRequest
from membrokerd.spaces import Region, check_regions

PS = 4096
SIZE = 16 * PS
TOP = 1 << 64


@pytest.mark.parametrize(
    "regions",
    [
        [Region(0, 0, SIZE)],
        [Region(0x1_0000_0000, 0, 4 * PS), Region(0, 4 * PS, 4 * PS)],
        [Region(TOP - SIZE, 0, SIZE)],  # ends exactly at 2**64: the last byte is 2**64 - 1
    ],
    ids=["whole", "two", "ends-at-top"],
)
def test_good_layouts(regions: list[Region]) -> None:
    check_regions(regions, SIZE, PS)


@pytest.mark.parametrize(
    ("regions", "message"),
    [
        (
            [Region(TOP - PS, 0, 2 * PS)],
            r"region gpa=0xfffffffffffff000 size=0x2000 ends at 0x10000000000001000, beyond "
            r"the 64-bit guest-physical address space",
        ),
        ([Region(TOP, 0, PS)], "beyond the 64-bit guest-physical address space"),
        ([Region(TOP - PS, 0, SIZE)], "beyond the 64-bit guest-physical address space"),
        ([Region(0, 0, 0)], "is empty or not aligned"),
        ([Region(PS + 1, 0, PS)], "is empty or not aligned"),
        ([Region(0, 8 * PS, 16 * PS)], "beyond the space size"),
        ([Region(0, 0, 4 * PS), Region(2 * PS, 4 * PS, 4 * PS)], "regions overlap"),
        ([Region(-PS, 0, PS)], "has a negative field"),
    ],
    ids=[
        "overflow-by-a-page",
        "starts-at-2**64",
        "wraps-to-low-gpa",
        "empty",
        "unaligned",
        "past-backing",
        "overlap",
        "negative",
    ],
)
def test_bad_layouts(regions: list[Region], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        check_regions(regions, SIZE, PS)


def test_a_wrapping_region_cannot_hide_an_overlap() -> None:
    # Modulo 2**64, [2**64 - PS, 2**64 + PS) would wrap over [0, PS): refused before any overlap
    # test could be fooled by the wrap.
    with pytest.raises(BadRequest, match="beyond the 64-bit"):
        check_regions([Region(0, 0, PS), Region(TOP - PS, PS, 2 * PS)], SIZE, PS)
