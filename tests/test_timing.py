import pytest

from shared.timing import SectionClock


def test_each_section_lasts_until_the_next_one_starts():
    ticks = iter([0.0, 12.0, 70.0, 71.5])
    clock = SectionClock(clock=lambda: next(ticks))
    clock.start("1. Data")
    clock.start("2. Model")
    clock.start("3. Training")
    assert clock.seconds() == {"1. Data": 12.0, "2. Model": 58.0, "3. Training": 1.5}


def test_the_table_has_a_line_per_section_and_a_total():
    ticks = iter([0.0, 30.0, 90.0])
    clock = SectionClock(clock=lambda: next(ticks))
    clock.start("setup")
    clock.start("the long section")
    lines = clock.table().splitlines()
    assert lines[0].split() == ["setup", "30", "s"] and lines[-1].split() == ["total", "90", "s"]


def test_a_section_cannot_start_twice():
    clock = SectionClock(clock=lambda: 0.0)
    clock.start("setup")
    with pytest.raises(ValueError, match="started already"):
        clock.start("setup")
