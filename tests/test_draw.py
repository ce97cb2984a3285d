"""The schedule drawing: a valid PNG whose colours follow the credit plan."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from hrmspec.graph import build_graph, grad_flags
from hrmspec.graph.draw import GRAD_COLOR, NO_GRAD_COLOR, credit_label, draw_schedule, node_colors
from hrmspec.spec.load import load_spec

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def count_color(path: Path, color: str, tol: float = 0.02) -> int:
    """Pixels within `tol` (per channel, 0..1) of `color`."""
    rgb = imread(path)[..., :3]
    return int((np.abs(rgb - np.array(to_rgb(color))) < tol).all(axis=-1).sum())


@pytest.fixture(scope="module")
def tiny():
    return load_spec("hrm-text-tiny")


@pytest.fixture(scope="module")
def drawings(tiny, tmp_path_factory) -> dict[float, Path]:
    out = tmp_path_factory.mktemp("draw")
    return {p: draw_schedule(build_graph(tiny, p), out / f"tiny-{p}.png") for p in (0.0, 1.0)}


def test_png_is_valid_and_sensibly_sized(drawings):
    for path in drawings.values():
        w, h = png_size(path)
        assert 900 <= w <= 2500 and 350 <= h <= 1200, (w, h)
        assert 10_000 < path.stat().st_size < 1_000_000


def test_colors_follow_the_credit_plan(tiny):
    for progress in (0.0, 0.5, 1.0):
        G = build_graph(tiny, progress)
        colors = node_colors(G)
        flags = grad_flags(G.graph["calls"], tiny.model.credit, progress)
        assert [colors[f"call:{i}"] for i in range(len(flags))] == [GRAD_COLOR if f else NO_GRAD_COLOR for f in flags]
    assert node_colors(build_graph(tiny, 0.0)) != node_colors(build_graph(tiny, 1.0))


def test_more_grad_colour_at_full_credit_depth(drawings):
    # depth 2 at progress 0 (2 grad calls), depth 5 at progress 1 (5 grad calls)
    at_start, at_end = (count_color(drawings[p], GRAD_COLOR) for p in (0.0, 1.0))
    assert 0 < at_start < at_end
    assert at_end / at_start == pytest.approx(5 / 2, rel=0.25)
    assert count_color(drawings[0.0], NO_GRAD_COLOR) > count_color(drawings[1.0], NO_GRAD_COLOR)


def test_title_names_the_credit_plan(tiny):
    assert credit_label(build_graph(tiny, 0.0)).startswith("credit depth 2 (2/8")
    last = load_spec("hrm-text-tiny", {"model.credit": {"last": 3}})
    assert credit_label(build_graph(last)) == "credit: last 3 (3/8 calls carry gradient)"


def test_long_schedule_stays_bounded(tmp_path):
    schedule = [{"repeat": 4, "do": [{"repeat": 6, "do": ["z_L = L(z_L + z_H)"]}, "z_H = H(z_H + z_L)"]}]
    spec = load_spec("hrm-text-tiny", {"model.schedule": schedule, "model.credit": {"last": 3}})
    G = build_graph(spec)
    path = draw_schedule(G, tmp_path / "sub" / "long.png")
    w, h = png_size(path)
    assert len(G.graph["calls"]) == 28
    assert 2000 <= w <= 4000 and h <= 1200, (w, h)
    assert count_color(path, GRAD_COLOR) > 0
