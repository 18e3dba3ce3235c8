"""benchmarks/chart_bits_ppl.py: the bits per weight it gives rows recorded without them
are the packer's own count, the Pareto front is right, and the chart is drawn from the
recorded results alone."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_chart():
    spec = importlib.util.spec_from_file_location("chart_bits_ppl",
                                                  ROOT / "benchmarks" / "chart_bits_ppl.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_the_pareto_front_keeps_the_points_nothing_beats() -> None:
    chart = load_chart()
    pts = [chart.Point("m", name, bits, ppl) for name, bits, ppl in (
        ("a", 2.0, 30.0), ("b", 3.0, 20.0), ("c", 3.5, 25.0), ("d", 4.0, 15.0),
        ("e", 4.0, 16.0), ("f", 2.0, 31.0))]
    assert [p.setting for p in chart.pareto(pts)] == ["a", "b", "d"]
    # Rows with 4-bit activations are plotted but never on the weight-only front.
    pts.append(chart.Point(chart.W4A4, "w4a4", 1.0, 10.0))
    assert [p.setting for p in chart.pareto(pts)] == ["a", "b", "d"]


@pytest.mark.embedded
def test_scheme_bits_equal_what_the_runs_recorded() -> None:
    """Rows that recorded their bits per weight (as qcore inspect counts them) get the
    same figure from their scheme: so the rows recorded before that get the right one."""
    chart = load_chart()
    rows = json.loads((ROOT / "benchmarks" / "results" / "gptq_smollm2.json").read_text())
    checked = 0
    for row in rows:
        if ("bits_per_weight" in row and chart.SCHEME.search(row["setting"])
                and not row["setting"].startswith("peer:")):
            recorded = row.pop("bits_per_weight")
            assert chart.bits_of("gptq", row) == pytest.approx(recorded, abs=1e-12), row
            checked += 1
    assert checked >= 6


@pytest.mark.embedded
def test_the_chart_is_drawn_from_the_recorded_results(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    chart = load_chart()
    pts, fp32 = chart.points()
    assert len(pts) >= 30 and fp32 == pytest.approx(14.934, abs=1e-3)
    assert {"RTN", "GPTQ", "AWQ", "VPTQ", "+ finetune"} <= {p.method for p in pts}
    out = tmp_path / "chart.png"
    chart.draw(pts, fp32, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
