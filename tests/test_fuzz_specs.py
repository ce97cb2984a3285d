"""The spec loader under mutation: shipped specs with lines deleted, duplicated or swapped, random
bytes and characters inserted, numbers pushed to extremes, deep nesting and aliases. `validate` must
succeed or give one error line and exit 2 — never a traceback and never hang (an alarm stops a case
that would)."""

import re
import signal
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hrmspec.cli import main
from hrmspec.errors import MAX_PROBLEMS

SPECS = sorted((Path(__file__).resolve().parent.parent / "specs").glob("*.yaml"))
EXTREMES = ["0", "-1", "1e308", "nan", ".inf", "99999999999999999999999", "true", "null", "''", "[]", "{}",
            "&a [*a]", "*nowhere", '"\\ud800"', "\x00", "\x1b[2J", "!!python/object:os.system ls"]


@st.composite
def mutated(draw) -> str:
    lines = draw(st.sampled_from(SPECS)).read_text(encoding="utf-8").splitlines()
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "insert", "number", "nest", "alias"]))
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "insert":
            at = draw(st.integers(0, len(lines[i])))
            text = draw(st.text(min_size=1, max_size=8))
            lines[i] = lines[i][:at] + text + lines[i][at:]
        elif op == "number" and ":" in lines[i]:
            key = lines[i].split(":", 1)[0]
            lines[i] = f"{key}: {draw(st.sampled_from(EXTREMES))}"
        elif op == "nest":
            depth = draw(st.integers(1, 500))
            lines.insert(i, "x: " + "[" * depth + "]" * depth)
        elif op == "alias":
            lines = ["a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"] + [
                f"a{k}: &a{k} [*a{'' if k == 0 else k - 1}" + f", *a{'' if k == 0 else k - 1}" * 9 + "]"
                for k in range(draw(st.integers(1, 8)))] + lines
        if not lines:
            lines = [""]
    return "\n".join(lines) + "\n"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=mutated())
def test_validate_on_a_mutated_spec_succeeds_or_says_one_line(text, tmp_path, capsys):
    path = tmp_path / "mutant.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")

    def expire(*_):
        raise TimeoutError("the loader hung on a mutated spec")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(30)
    try:
        code = main(["validate", str(path)])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    out, err = capsys.readouterr()
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err
    if code == 2:  # one located problem (and its hint), or "N problems:" and each one located
        lines = err.strip().splitlines()
        assert lines[0].startswith("hrmspec: error: "), err
        many = re.fullmatch(r"hrmspec: error: (\d+) problems:", lines[0])
        if many is None:
            assert len(lines) <= 2, err
        else:
            located = [line for line in lines[1:] if not line.startswith("  hint: ") and not line.startswith("(and ")]
            assert 2 <= len(located) <= MAX_PROBLEMS and len(located) == min(int(many.group(1)), MAX_PROBLEMS), err
            assert all(re.match(r"\S+:\d+:\d+: |--set ", line) for line in located), err
        assert not any(c in err for c in "\x00\x1b\x07")
    else:
        assert out.strip().endswith(")") and ": ok (" in out
