"""The switching bench's bookkeeping: rounds of second switches and the paired local loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusecache.bench import folios
from fusecache.bench.report import format_ideal
from fusecache.bench.run import CaseResult, Ideal, SwitchResult

pytestmark = pytest.mark.unit


def test_second_switch_is_the_median_of_its_rounds_and_bytes_add_up() -> None:
    r = SwitchResult("a.safetensors", 100)
    for seconds, lower in ((0.3, 0), (0.1, 5), (0.2, 0)):
        r.add_second(seconds, lower)
    assert r.second_s == 0.2
    assert r.second_lower_bytes == 5
    local = SwitchResult("a.safetensors", 100)
    local.add_second(0.1, None)  # no counter: stays unknown
    assert local.second_lower_bytes is None


def test_ideal_second_switches_are_the_paired_local_loads() -> None:
    cached, local = CaseResult("fusecache"), CaseResult("local")
    for case, runs in ((cached, [(0.3, 0.2), (0.6, 0.4)]), (local, [(0.2, 0.1), (0.4, 0.2)])):
        for name, (first_round, second_round) in zip("ab", runs, strict=True):
            s = SwitchResult(name, 10**9)
            s.add_second(first_round, None)
            s.add_second(second_round, None)
            case.switches.append(s)
    ideal = Ideal(plain_best_bps=1e9, local_root=Path("/nowhere"), local=local)
    assert abs(ideal.second_s - (0.15 + 0.3)) < 1e-9
    text = format_ideal([cached], ideal)
    assert "1.67x the ideal second switches" in text.splitlines()[2]
    assert "0.90 / 0.60 s, 0.60 / 0.30 s" in text


def test_steady_allocator_takes_on_glibc() -> None:
    # In a child: the thresholds would stay set for the rest of this test process.
    code = "from fusecache.bench import workload; raise SystemExit(not workload.steady_allocator())"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="page frame numbers are root's to read")
def test_folio_sizes_cover_every_page(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(3 << 20))
    sizes = folios.folio_sizes(path)
    assert sum(size * n for size, n in sizes.items()) == 3 << 20
    assert folios.main([str(path)]) == 0
