"""examples/kvload.py's arithmetic: the longest request per window (what downtime.py
and webkv.py hold each upgrade's stall against), without a server."""

from __future__ import annotations

import pytest
from kvload import Sample, window_stalls


def test_each_window_gets_the_longest_request_touching_it():
    samples = [
        Sample("GET", 0.00, 0.01),  # 10 ms in window 0
        Sample("PUT", 0.05, 0.08),  # 30 ms in window 0
        Sample("GET", 0.15, 0.27),  # 120 ms, spans windows 1 and 2
        Sample("GET", 0.31, 0.312),  # 2 ms in window 3
    ]
    assert window_stalls(samples, 0.1) == pytest.approx([30.0, 120.0, 120.0, 2.0])


def test_a_quiet_window_counts_as_no_stall_and_empty_input_gives_nothing():
    samples = [Sample("GET", 0.0, 0.001), Sample("GET", 0.35, 0.351)]
    stalls = window_stalls(samples, 0.1)
    assert len(stalls) == 4 and stalls[1] == stalls[2] == 0.0
    assert window_stalls([], 0.1) == [] and window_stalls(samples, 0) == []
