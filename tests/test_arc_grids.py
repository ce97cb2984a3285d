"""ARC grids in the official HRM / TRM layout (runtime/artifacts/arc_grids.py): augmentations and their
inverses, placement in the 30 x 30 canvas, the evaluator's crop, the grid hash and the Kaggle JSON check.

The references here are written out cell by cell from the official semantics, not in terms of the module."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hrmspec.runtime.artifacts.arc_grids import (
    DIHEDRAL_INVERSE,
    EOS,
    IDENTITY,
    MAX_SIDE,
    PAD,
    VOCAB,
    Augmentation,
    check_grid,
    crop,
    dihedral,
    grid_hash,
    inverse_dihedral,
    parse_name,
    place,
    random_offset,
)
from hrmspec.runtime.artifacts.data import DataError

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def grids(draw, max_side: int = MAX_SIDE) -> np.ndarray:
    rows = draw(st.integers(1, max_side))
    cols = draw(st.integers(1, max_side))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).integers(0, 10, size=(rows, cols)).astype(np.uint8)


@st.composite
def augmentations(draw) -> Augmentation:
    tid = draw(st.integers(0, 7))
    perm = draw(st.permutations(list(range(1, 10))))
    return Augmentation(tid, (0, *perm))


def asymmetric() -> np.ndarray:
    """A 3 x 4 grid no non-trivial symmetry maps to itself (every cell distinct)."""
    return np.arange(12, dtype=np.uint8).reshape(3, 4)


# --- the dihedral group ---------------------------------------------------------------------------------

def test_constants():
    assert (MAX_SIDE, PAD, EOS, VOCAB) == (30, 0, 1, 12)


def test_the_official_transform_ids():
    g = asymmetric()
    expected = [g, np.rot90(g, 1), np.rot90(g, 2), np.rot90(g, 3), g[:, ::-1], g[::-1, :], g.T,
                np.rot90(g, 1)[:, ::-1]]
    for tid, want in enumerate(expected):
        np.testing.assert_array_equal(dihedral(g, tid), want)


def test_four_quarter_turns_are_the_identity_and_each_reflection_undoes_itself():
    g = asymmetric()
    x = g
    for _ in range(4):
        x = dihedral(x, 1)
    np.testing.assert_array_equal(x, g)
    np.testing.assert_array_equal(dihedral(dihedral(g, 1), 1), dihedral(g, 2))
    np.testing.assert_array_equal(dihedral(dihedral(g, 1), 3), g)
    for tid in (2, 4, 5, 6, 7):
        np.testing.assert_array_equal(dihedral(dihedral(g, tid), tid), g)


def test_the_eight_transforms_are_distinct_and_closed_under_composition():
    g = asymmetric()
    images = [dihedral(g, t) for t in range(8)]

    def which(x: np.ndarray) -> int:
        found = [t for t, im in enumerate(images) if im.shape == x.shape and np.array_equal(im, x)]
        assert len(found) == 1
        return found[0]

    assert sorted(which(im) for im in images) == list(range(8))
    for a, b in itertools.product(range(8), repeat=2):
        which(dihedral(dihedral(g, a), b))  # the composition is one of the eight


def test_the_inverse_table_is_the_only_transform_that_undoes_each():
    g = asymmetric()
    for t in range(8):
        undo = [u for u in range(8) if dihedral(dihedral(g, t), u).shape == g.shape
                and np.array_equal(dihedral(dihedral(g, t), u), g)]
        assert undo == [DIHEDRAL_INVERSE[t]]
        np.testing.assert_array_equal(inverse_dihedral(dihedral(g, t), t), g)


def test_a_transform_id_outside_0_7_is_refused():
    for bad in (8, -1):
        with pytest.raises(ValueError):
            dihedral(asymmetric(), bad)
        with pytest.raises(ValueError):
            inverse_dihedral(asymmetric(), bad)


# --- augmentations ----------------------------------------------------------------------------------------

@SETTINGS
@given(grids(), augmentations())
def test_invert_undoes_apply(g, aug):
    out = aug.apply(g)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(aug.invert(out), g)
    np.testing.assert_array_equal(aug.apply(aug.invert(g)), g)


@SETTINGS
@given(grids(max_side=6), augmentations())
def test_apply_maps_colours_then_transforms(g, aug):
    # cell by cell: colour c becomes colours[c]; then the official transform
    mapped = np.array([[aug.colours[v] for v in row] for row in g.tolist()], dtype=np.uint8)
    np.testing.assert_array_equal(aug.apply(g), dihedral(mapped, aug.tid))
    assert aug.apply(np.zeros_like(g)).max() == 0  # the background stays


@SETTINGS
@given(augmentations(), st.text(st.characters(blacklist_characters="|"), min_size=1, max_size=12))
def test_a_name_parses_back_to_its_base_and_augmentation(aug, base):
    name = aug.name(base)
    assert name == f"{base}|||t{aug.tid}|||" + "".join(map(str, aug.colours))
    assert parse_name(name) == (base, aug)


def test_a_name_without_an_augmentation():
    assert parse_name("007bbfb7") == ("007bbfb7", None)
    assert parse_name("<blank>") == ("<blank>", None)
    assert parse_name(IDENTITY.name("a")) == ("a", IDENTITY)
    assert Augmentation.IDENTITY is IDENTITY


@pytest.mark.parametrize("name", [
    "a|||t8|||0123456789",     # no such transform
    "a|||t1|||012345678",      # nine colours
    "a|||t1|||01234567890",    # eleven
    "a|||t1|||1023456789",     # moves the background
    "a|||t1|||0123456788",     # not a permutation
    "a|||1|||0123456789",      # no t
    "a|||tx|||0123456789",
    "a|||t1",
    "a|||b|||t1|||0123456789",
    "|||t1|||0123456789",      # no base
    "a|||t1|||01234 6789",
])
def test_a_malformed_augmentation_suffix_is_a_data_error(name):
    with pytest.raises(DataError):
        parse_name(name)


def test_an_augmentation_checks_its_fields():
    for tid, colours in [(8, tuple(range(10))), (True, tuple(range(10))), (0, tuple(range(9))),
                         (0, (1, 0, 2, 3, 4, 5, 6, 7, 8, 9)), (0, (0, 1, 1, 3, 4, 5, 6, 7, 8, 9)),
                         (0, (0, 1, 2, 3, 4, 5, 6, 7, 8, 9.0))]:
        with pytest.raises(DataError):
            Augmentation(tid, colours)
    a = Augmentation(np.int64(3), [0, 2, 1, 3, 4, 5, 6, 7, 8, 9])
    assert a.tid == 3 and a.colours == (0, 2, 1, 3, 4, 5, 6, 7, 8, 9) and isinstance(a.colours, tuple)
    hash(a)  # frozen: usable as a key


def test_random_augmentations_are_valid_and_vary():
    rng = np.random.default_rng(0)
    seen = {Augmentation.random(rng) for _ in range(200)}
    assert len(seen) > 150
    assert {a.tid for a in seen} == set(range(8))


# --- placement and crop -----------------------------------------------------------------------------------

def reference_place(g: np.ndarray, r0: int, c0: int) -> np.ndarray:
    """The official np_grid_to_seq_translational_augment for one grid, cell by cell."""
    n, m = g.shape
    canvas = [[PAD] * 30 for _ in range(30)]
    for i in range(n):
        for j in range(m):
            canvas[r0 + i][c0 + j] = int(g[i, j]) + 2
    if r0 + n < 30:
        for j in range(c0, c0 + m):
            canvas[r0 + n][j] = EOS
    if c0 + m < 30:
        for i in range(r0, r0 + n):
            canvas[i][c0 + m] = EOS
    return np.array(canvas, dtype=np.uint8).reshape(-1)


def reference_crop(row) -> np.ndarray:
    """The official evaluator's _crop, as its loops read."""
    grid = np.asarray(row).reshape(30, 30)
    max_area, size, num_c = 0, (0, 0), 30
    for num_r in range(1, 31):
        for c in range(1, num_c + 1):
            x = grid[num_r - 1, c - 1]
            if x < 2 or x > 11:
                num_c = c - 1
                break
        if num_r * num_c > max_area:
            max_area, size = num_r * num_c, (num_r, num_c)
    return (grid[:size[0], :size[1]] - 2).astype(np.uint8)


@st.composite
def pairs_and_offset(draw):
    a, b = draw(grids()), draw(grids())
    rows, cols = max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1])
    return a, b, (draw(st.integers(0, 30 - rows)), draw(st.integers(0, 30 - cols)))


@SETTINGS
@given(pairs_and_offset())
def test_place_matches_the_official_layout(case):
    a, b, (r0, c0) = case
    row_in, row_out = place(a, b, (r0, c0))
    assert row_in.shape == row_out.shape == (900,) and row_in.dtype == row_out.dtype == np.uint8
    np.testing.assert_array_equal(row_in, reference_place(a, r0, c0))
    np.testing.assert_array_equal(row_out, reference_place(b, r0, c0))


@SETTINGS
@given(grids(), grids())
def test_crop_recovers_a_grid_placed_at_the_corner(a, b):
    row_in, row_out = place(a, b)
    np.testing.assert_array_equal(crop(row_in), a)
    np.testing.assert_array_equal(crop(row_out), b)
    for dtype in (np.int64, np.int32, np.uint8, np.int16):
        assert crop(row_in.astype(dtype)).dtype == np.uint8
        np.testing.assert_array_equal(crop(row_in.astype(dtype)), a)
    np.testing.assert_array_equal(crop(row_in.reshape(30, 30)), a)


@SETTINGS
@given(pairs_and_offset())
def test_crop_of_a_grid_away_from_the_corner_is_empty(case):
    """The official crop is anchored at the top-left cell: any non-zero offset leaves PAD there, so the
    grid is lost. This is why the official builder never translates the rows it evaluates."""
    a, b, offset = case
    row_in, _ = place(a, b, offset)
    got = crop(row_in)
    if offset == (0, 0):
        np.testing.assert_array_equal(got, a)
    else:
        assert got.shape == (0, 0)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["noise", "grid_then_noise", "wide"]))
def test_crop_matches_the_official_loops_on_any_row(seed, kind):
    rng = np.random.default_rng(seed)
    if kind == "noise":  # mostly colours, with some PAD / EOS / out-of-vocabulary tokens
        row = np.where(rng.random(900) < 0.97, rng.integers(2, 12, 900), rng.integers(-3, 20, 900))
    elif kind == "grid_then_noise":  # a model's prediction: a grid, then junk where the border was
        n, m = rng.integers(1, 31, 2)
        row = reference_place(rng.integers(0, 10, (n, m)), 0, 0).astype(np.int64)
        junk = rng.random(900) < 0.05
        row[junk] = rng.integers(0, 12, int(junk.sum()))
    else:  # shrinking widths row by row
        grid = rng.integers(2, 12, (30, 30))
        for r in range(30):
            if rng.random() < 0.3:
                grid[r, rng.integers(0, 30)] = rng.integers(0, 2)
        row = grid.reshape(-1)
    np.testing.assert_array_equal(crop(row), reference_crop(row))


def test_crop_picks_the_largest_area_not_the_longest_run():
    g = np.full((30, 30), 5, dtype=np.int64)
    g[0, 3] = EOS      # first row: 3 columns wide
    g[2:, :] = PAD     # two rows
    assert crop(g.reshape(-1)).shape == (2, 3)
    g = np.full((30, 30), 5, dtype=np.int64)
    g[1, 0] = EOS      # the second row has no colour at all: the first row, 30 wide, wins
    assert crop(g.reshape(-1)).shape == (1, 30)
    assert crop(np.full(900, 11)).shape == (30, 30)
    assert crop(np.zeros(900, dtype=np.int64)).shape == (0, 0)


def test_crop_refuses_a_row_of_the_wrong_size_or_type():
    with pytest.raises(ValueError):
        crop(np.zeros(899, dtype=np.int64))
    with pytest.raises(ValueError):
        crop(np.zeros(900, dtype=np.float32))


def test_place_refuses_what_does_not_fit():
    g = np.zeros((30, 30), dtype=np.uint8)
    with pytest.raises(ValueError):
        place(g, g, (1, 0))
    with pytest.raises(ValueError):
        place(np.zeros((31, 1), dtype=np.uint8), g)
    with pytest.raises(ValueError):
        place(np.full((2, 2), 10), g)
    with pytest.raises(ValueError):
        place(np.zeros((0, 3), dtype=np.uint8), g)
    row, _ = place(g, g)
    assert EOS not in row and PAD not in row  # a full canvas has no border


def test_random_offsets_fit_and_cover_the_range():
    rng = np.random.default_rng(1)
    a, b = np.zeros((5, 28), dtype=np.uint8), np.zeros((27, 2), dtype=np.uint8)
    seen = set()
    for _ in range(400):
        off = random_offset(a, b, rng)
        place(a, b, off)
        seen.add(off)
    assert seen == {(r, c) for r in range(4) for c in range(3)}


# --- the grid hash ----------------------------------------------------------------------------------------

def test_grid_hash_is_the_official_digest_and_sees_the_shape():
    g = np.array([[1, 2, 3, 4]], dtype=np.uint8)
    assert grid_hash(g) == hashlib.sha256(b"\x01\x04" + b"\x01\x02\x03\x04").hexdigest()
    assert grid_hash(g) != grid_hash(g.reshape(2, 2))
    assert grid_hash(g) == grid_hash(g.copy())
    t = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert grid_hash(np.rot90(t)) == grid_hash(np.ascontiguousarray(np.rot90(t)))  # a view hashes by its cells
    assert grid_hash(np.zeros((0, 0), dtype=np.uint8)) == hashlib.sha256(b"\x00\x00").hexdigest()


def test_grid_hash_takes_only_2d_uint8():
    for bad in (np.zeros((2, 2), dtype=np.int64), np.zeros(4, dtype=np.uint8), [[1]], np.zeros((1, 256), np.uint8)):
        with pytest.raises(ValueError):
            grid_hash(bad)


# --- Kaggle JSON grids ------------------------------------------------------------------------------------

def test_check_grid_accepts_a_kaggle_grid():
    got = check_grid([[0, 1], [9, 3]], "x.json")
    assert got.dtype == np.uint8 and got.tolist() == [[0, 1], [9, 3]]
    assert check_grid([[0] * 30] * 30, "x").shape == (30, 30)


@pytest.mark.parametrize("bad", [
    [], [[]], [[1], []], [[1, 2], [3]], [[10]], [[-1]], [[True]], [[1.0]], [["1"]], [[None]],
    [[0] * 31], [[0]] * 31, "[[1]]", 3, None, {"a": 1}, [1, 2], [[[1]]],
])
def test_check_grid_refusals_name_the_place(bad):
    with pytest.raises(DataError, match="test_puzzles.json: task t"):
        check_grid(bad, "test_puzzles.json: task t")
