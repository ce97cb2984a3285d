"""YAML with positions: every value and key of a spec remembers file:line:col.

PyYAML's composer already knows where each node starts; we construct the document as usual and
walk the node tree beside it to record a `Location` per path (a tuple of keys and indices).
`extends:` merges a base file under the child, and `--set` overrides are applied on top, each
keeping the location it came from, so an error always points at the text the user wrote.

Every YAML or JSON document hrmspec reads (a spec, a `--set` value, a checkpoint's config, compare's
`--data`) goes through the readers here (`load_yaml_text`, `read_yaml`, `load_json_text`,
`read_json`), under one set of limits: size (a file is read no further), values counting what aliases
and merge keys repeat (counted before anything is built), and nesting (checked without recursion).
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hrmspec.errors import Location, SpecError, close_match
from hrmspec.spec.shipped import shipped_specs_dir

PathT = tuple  # a path into the document: ("model", "modules", "L", "layers")


def dotted(path: PathT) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


@dataclass
class Source:
    """A parsed spec document: plain Python data plus where each piece came from."""

    data: dict
    file: str
    values: dict[PathT, Location] = field(default_factory=dict)  # location of each value
    keys: dict[PathT, Location] = field(default_factory=dict)  # location of each mapping key

    def loc(self, path: PathT) -> Location:
        """The closest known location of `path` (walking up to its parents)."""
        path = tuple(path)
        while path:
            if path in self.values:
                return self.values[path]
            path = path[:-1]
        return self.values.get((), Location(self.file, 1, 1))

    def key_loc(self, path: PathT) -> Location:
        return self.keys.get(tuple(path)) or self.loc(path)


def _mark(file: str, mark: yaml.Mark) -> Location:
    return Location(file, mark.line + 1, mark.column + 1)


# The limits of every YAML or JSON document hrmspec reads: a spec, a --set value, a checkpoint's
# config (all_config.yaml, config.json), compare's --data. Each is a few kilobytes.
MAX_BYTES = 1 << 20  # a file or text
MAX_VALUES = 20_000  # values in a document, aliases expanded: an alias bomb stops here
MAX_DEPTH = 40  # nesting of mappings and lists
_DEEP_HINT = "a spec or config nests a few levels: model, modules, a module, its norm"


def _too_many(loc: Location, path: str = "", limit: int = MAX_VALUES, yaml_aliases: bool = True) -> SpecError:
    if yaml_aliases:
        return SpecError(f"more than {limit:,} values (counting what YAML aliases repeat)", loc, path,
                         "a spec or config is a few hundred values; write it out without chains of aliases")
    return SpecError(f"more than {limit:,} values", loc, path)


def _too_deep(loc: Location) -> SpecError:
    return SpecError(f"values nested more than {MAX_DEPTH} levels deep", loc, "", _DEEP_HINT)


def _check_nodes(root: yaml.Node, file: str) -> None:
    """Count the nodes of a composed document as constructing it would expand them (an alias, or a
    merge key `<<`, repeats what it names), without recursion: a bomb stops before it is built."""
    count, stack = 0, [(root, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise _too_many(_mark(file, node.start_mark))
        if depth > MAX_DEPTH:
            raise _too_deep(_mark(file, node.start_mark))
        if isinstance(node, yaml.MappingNode):
            stack.extend((child, depth + 1) for pair in node.value for child in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in node.value)


def _walk(node: yaml.Node, path: PathT, file: str, src: Source, loader: yaml.SafeLoader) -> None:
    if len(src.values) >= MAX_VALUES:
        raise _too_many(_mark(file, node.start_mark), dotted(path))
    if len(path) > MAX_DEPTH:
        raise _too_deep(_mark(file, node.start_mark))
    loc = _mark(file, node.start_mark)
    if isinstance(node, yaml.ScalarNode) and node.style in ('"', "'"):
        loc = Location(file, loc.line, loc.col + 1)  # point at the text, not at the quote
    src.values[path] = loc
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, Location] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            here = _mark(file, key_node.start_mark)
            if key in seen:
                raise SpecError(
                    f"duplicate key '{key}' (first defined at {seen[key]})",
                    here,
                    dotted(path + (key,)),
                    "YAML keeps only the last one; remove one of them",
                )
            seen[key] = here
            src.keys[path + (key,)] = here
            _walk(value_node, path + (key,), file, src, loader)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, path + (i,), file, src, loader)


def _yaml_error(e: yaml.MarkedYAMLError, file: str, text: str | None = None) -> SpecError:
    """A PyYAML error as a SpecError: the problem, where it was noticed, and what it was inside of."""
    mark = e.problem_mark or e.context_mark
    loc = _mark(file, mark) if mark is not None else Location(file)
    problem = _one_line(e.problem or e.context or "cannot parse")  # an alias's name may be long
    message = f"invalid YAML: {problem}"
    if e.problem and e.context and e.context_mark is not None and e.context_mark != mark:
        message += f" ({e.context} at {e.context_mark.line + 1}:{e.context_mark.column + 1})"
    hint = ""
    misplaced = _misplaced_key(e, text, file) if text is not None else None
    if misplaced is not None:
        return misplaced
    if "'\\t'" in problem:
        hint = "indent with spaces: YAML does not allow tabs"
    elif "mapping values are not allowed" in problem:
        lines = (text or "").splitlines()
        under = _key_under_a_value(lines, mark) if mark is not None and mark.line < len(lines) else ""
        hint = under or "check the indentation of this line, or quote a value that contains ': '"
    elif "another document" in problem:
        hint = "a spec is one YAML document: remove the second '---'"
    return SpecError(message, loc, "", hint)


def _misplaced_key(e: yaml.MarkedYAMLError, text: str, file: str) -> SpecError | None:
    """An indentation mistake the parser reports as "expected <block end>": a key at a column where no
    mapping or list item above it is open. Said with the key, its column and where it belongs."""
    mark, context = e.problem_mark, e.context_mark
    lines = text.splitlines()
    if mark is None or mark.line >= len(lines):
        return None
    if context is None or not (e.problem or "").startswith("expected <block end>") or context.line >= len(lines):
        return None
    line = lines[mark.line]
    key = line[mark.column:].split(":", 1)[0].strip()
    if not key or ":" not in line[mark.column:] or len(key) > 40:
        return None
    col = mark.column + 1
    where = _mark(file, mark)
    previous = next((i for i in range(mark.line - 1, -1, -1) if lines[i].strip()
                     and not lines[i].strip().startswith("#")), None)
    after_item = previous is not None and lines[previous].lstrip().startswith("- ") and ":" in lines[previous]
    if "block collection" in (e.context or "") or (after_item and _indent(lines[previous]) + 2 > mark.column):
        # inside a list: the key left the item it follows
        dash = context.column if "block collection" in (e.context or "") else _indent(lines[previous])
        item = next((i for i in range(mark.line - 1, -1, -1)
                     if len(lines[i]) > dash and lines[i][dash] == "-" and not lines[i][:dash].strip()), None)
        if item is None:
            return None
        body = lines[item][dash + 1:]
        first = _one_line(body.lstrip().split(":", 1)[0], 40)
        key_col = dash + 2 + len(body) - len(body.lstrip())
        return SpecError(f"`{key}:` at column {col} is outside the list item at line {item + 1} "
                         f"(`- {_one_line(body.strip(), 40)}`); it belongs under the list item", where, "",
                         f"indent it to column {key_col}, beside `{first}:`")
    if "block mapping" in (e.context or ""):  # between two levels: lines up with no mapping above it
        key_col = context.column + 1
        above = _line_above(lines, mark.line, mark.column)
        if (above is not None and above != context.line and _indent(lines[above]) == context.column
                and any(_indent(lines[i]) == mark.column and lines[i].strip() for i in range(context.line, above))):
            # a key further up went left, out of its mapping, and closed it: that is the mistake
            closer = _one_line(lines[above].strip().split(":", 1)[0], 40)
            return SpecError(f"`{closer}:` at column {context.column + 1} closes the mapping it follows, so "
                             f"`{key}:` at line {mark.line + 1}, column {col} lines up with no mapping",
                             Location(file, above + 1, context.column + 1), "",
                             f"indent `{closer}:` to the column of the keys it belongs with")
        return SpecError(f"`{key}:` at column {col} lines up with no mapping above it (the mapping at line "
                         f"{context.line + 1} has its keys at column {key_col})", where, "",
                         f"indent it to column {key_col} to add it to that mapping, or further to nest it "
                         "under the key above")
    return None


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _line_above(lines: list[str], line: int, column: int) -> int | None:
    """The nearest line above `line` with content indented less than `column` (comments skipped)."""
    for i in range(line - 1, -1, -1):
        text = lines[i].strip()
        if text and not text.startswith("#") and _indent(lines[i]) < column:
            return i
    return None


def _key_under_a_value(lines: list[str], mark: yaml.Mark) -> str:
    """The hint for `key:` indented under a `key: value` line above it (YAML reads it as more of that
    value, and finds a colon where none may be), or '' when the line is not that."""
    key = _one_line(lines[mark.line][: mark.column], 40)
    above = mark.line - 1
    while above >= 0 and (not lines[above].strip() or lines[above].strip().startswith("#")):
        above -= 1
    if not key.isidentifier() or above < 0:
        return ""
    prev = lines[above]
    body = prev.lstrip(" ")
    start = _indent(prev) + (2 if body.startswith("- ") else 0)
    body = prev[start:]
    name, colon, value = body.partition(":")
    name, col = _one_line(name, 40), _indent(lines[mark.line]) + 1
    if not colon or not name.isidentifier() or not value.strip() or col <= start + 1:
        return ""
    return (f"check the indentation of this line: `{key}:` at column {col} is indented under `{name}: "
            f"{_one_line(value, 30)}` (line {above + 1}), a value that cannot hold keys; indent it to column "
            f"{start + 1}, beside `{name}:`")


def _parse(text: str, file: str) -> Source | None:
    """One YAML document within the limits, with the location of every value; None when it is empty."""
    if len(text) > MAX_BYTES:
        raise SpecError(f"the text is {len(text):,} characters, over the limit of {MAX_BYTES:,}", Location(file))
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # its reader checks the characters at once
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, file)
        data = loader.construct_document(node)
        src = Source(data=data, file=file)
        _walk(node, (), file, src, loader)
    except yaml.MarkedYAMLError as e:
        raise _yaml_error(e, file, text) from None
    except yaml.YAMLError as e:  # the reader's: a character YAML does not allow (control characters)
        raise SpecError(f"invalid YAML: {_one_line(str(e))}", Location(file), "",
                        "remove control characters from the file") from None
    except RecursionError:
        raise _too_deep(Location(file)) from None
    except ValueError as e:  # a value YAML's types cannot hold: an integer of 5,000 digits, a 13th month
        raise SpecError(f"invalid YAML: {_one_line(str(e), 80)}", Location(file)) from None
    finally:
        if loader is not None:
            loader.dispose()
    return src


def parse_yaml(text: str, file: str, quote: bool = True) -> Source:
    """Parse one spec document; syntax errors become SpecErrors with the position. `quote=False`: a
    file that is no spec is described, never quoted (a base named by `extends:` may be any file)."""
    src = _parse(text, file)
    if src is None:
        message = "the file is empty; expected a mapping of sections with at least 'model:'"
        raise SpecError(message, Location(file, 1, 1))
    if not isinstance(src.data, dict):
        found = _kind(src.data) if quote else _kind_unquoted(src.data)
        raise SpecError(
            f"expected a mapping of sections (name, model, ...), found {found}",
            src.loc(()),
            "",
            "a spec starts with keys such as 'name:' and 'model:' at column 1",
        )
    return src


def load_yaml_text(text: str, where: str) -> Any:
    """The data of one YAML document (None when empty), within the limits of a spec: at most MAX_BYTES
    characters, MAX_VALUES values counting what aliases repeat, MAX_DEPTH levels. Every YAML text
    hrmspec reads goes through here; a SpecError located at `where` names what is wrong."""
    src = _parse(text, where)
    return None if src is None else src.data


def read_limited(path: str | Path, where: str | None = None, max_bytes: int = MAX_BYTES) -> str:
    """The UTF-8 text of a file of at most `max_bytes`; a larger file is refused after reading no more."""
    where = str(path) if where is None else where
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise SpecError(f"cannot read the file: {e.strerror or type(e).__name__}", Location(where)) from None
    if len(raw) > max_bytes:
        raise SpecError(f"the file is over the limit of {max_bytes:,} bytes", Location(where))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        message = f"expected UTF-8 text, found the byte {e.object[e.start]:#04x} at offset {e.start}"
        raise SpecError(message, Location(where)) from None


def read_yaml(path: str | Path, where: str | None = None) -> Any:
    """The data of a YAML file, read with the limits of `load_yaml_text`."""
    return load_yaml_text(read_limited(path, where), str(path) if where is None else where)


def load_json_text(text: str, where: str, max_bytes: int = MAX_BYTES, max_values: int = MAX_VALUES) -> Any:
    """The data of a JSON text within the limits of a YAML document (by default; a file hrmspec writes
    itself, such as a comparison's results, may allow more), the depth checked without recursion; a
    SpecError located at `where` names what is wrong."""
    if len(text) > max_bytes:
        raise SpecError(f"the text is {len(text):,} characters, over the limit of {max_bytes:,}", Location(where))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"invalid JSON: {e.msg}", Location(where, e.lineno, e.colno)) from None
    except RecursionError:  # the decoder's own guard, long before a stack runs out
        raise _too_deep(Location(where)) from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise SpecError(f"invalid JSON: {_one_line(str(e), 80)}", Location(where)) from None
    values, stack = 0, [(data, 0)]
    while stack:  # an explicit stack: no recursion, however deep
        value, depth = stack.pop()
        values += 1
        if values > max_values:
            raise _too_many(Location(where), limit=max_values, yaml_aliases=False)
        if depth > MAX_DEPTH:
            raise _too_deep(Location(where))
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return data


def read_json(path: str | Path, where: str | None = None, max_bytes: int = MAX_BYTES,
              max_values: int = MAX_VALUES) -> Any:
    """The data of a JSON file, read with the limits of `load_json_text`."""
    where = str(path) if where is None else where
    return load_json_text(read_limited(path, where, max_bytes), where, max_bytes, max_values)


def _one_line(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):  # quoted (escapes control characters) and cut: never a whole file
        return f"the text {value[:40]!r}" + (f" ({len(value):,} characters)" if len(value) > 40 else "")
    return quoted(value)


def _kind_unquoted(value: Any) -> str:
    """What a value is, without a word of it."""
    if isinstance(value, str):
        return f"text of {len(value):,} characters"
    kinds = {list: "a list", bool: "a boolean", int: "a number", float: "a number", type(None): "null"}
    return kinds.get(type(value), "a value")


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 6
_SHORT.maxlevel = 3


def quoted(value: Any, limit: int = 80) -> str:
    """`repr(value)` of at most `limit` characters, control characters escaped: an error message
    never echoes a whole input back (a 5 MB string, a huge list, an integer of a million digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an integer of about {math.floor(value.bit_length() * math.log10(2)) + 1:,} digits"
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# One-of forms. A mapping that holds one of several alternatives: written over a base that holds
# another, the child's choice replaces the base's (with what belongs to it, such as depth's priority).
_CREDIT_MODES = {"depth": ("depth", "priority"), "last": ("last",), "per_cycle": ("per_cycle",),
                 "truncate": ("truncate",)}
# Mappings told apart by one key: when it changes, the whole mapping is the child's (the parameters of
# one halting rule or sampler are not those of another).
_DISCRIMINATORS = {("model", "halting"): "type", ("supervision", "halting"): "type"}
# Keys whose null is a value of its own, not "remove": rotary embeddings off, no exit norm, no EMA.
_NULL_VALUES = ("rope_theta", "exit_norm")


def _discriminator(path: PathT) -> str | None:
    if path in _DISCRIMINATORS:
        return _DISCRIMINATORS[path]
    if path[:2] == ("model", "schedule") and path[-1:] == ("repeat",):
        return "sample"  # a sampled repeat count: {sample: uniform, low, high} or {sample: lognormal_poisson, ...}
    return None


def replaced_keys(path: PathT, base: dict, child: dict) -> list:
    """The keys of `base` (the mapping at `path`) that `child`, written over it, replaces: the other
    alternatives of a one-of form, or every key when the mapping's discriminator changes."""
    if path == ("model", "credit"):
        chosen = [m for m in _CREDIT_MODES if m in child and child[m] is not None]
        keep = {k for m in chosen for k in _CREDIT_MODES[m]}
        if not chosen:
            return []
        return [k for m in _CREDIT_MODES if m not in chosen for k in _CREDIT_MODES[m] if k in base and k not in keep]
    key = _discriminator(path)
    if key is not None and key in child and child[key] != base.get(key):
        return [k for k in base if k not in child]
    return []


def deletes(path: PathT, value: Any) -> bool:
    """Whether `value`, written at `path` by an `extends:` child or a `--set`, removes the key."""
    if value is not None or not path:
        return False
    return not (path[-1] in _NULL_VALUES or path == ("train", "ema"))


def _drop(tables: tuple[dict, ...], prefix: PathT, itself: bool = False) -> None:
    """Forget the locations under `prefix` (and of `prefix` itself with `itself`)."""
    for table in tables:
        for p in [p for p in table if p[: len(prefix)] == prefix and (itself or len(p) > len(prefix))]:
            del table[p]


def _merge(base: Source, child: Source) -> Source:
    """Deep-merge `child` over `base`: mappings merge key by key, anything else is replaced. A child's
    null removes the key; a child's choice in a one-of form replaces the base's (`replaced_keys`)."""
    out = Source(data=copy.deepcopy(base.data), file=child.file)
    out.values, out.keys = dict(base.values), dict(base.keys)
    tables = (out.values, out.keys)

    def rec(dst: dict, src: dict, path: PathT) -> None:
        for k in replaced_keys(path, dst, src):
            del dst[k]
            _drop(tables, path + (k,), itself=True)
        for k, v in src.items():
            p = path + (k,)
            if deletes(p, v):
                dst.pop(k, None)
                _drop(tables, p, itself=True)
                continue
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                rec(dst[k], v, p)
            else:
                dst[k] = copy.deepcopy(v)
                _drop(tables, p)
                out.values.update({q: loc for q, loc in child.values.items() if q[: len(p)] == p})
                out.keys.update({q: loc for q, loc in child.keys.items() if q[: len(p)] == p})
            out.keys[p] = child.keys.get(p, out.keys.get(p))
            out.values.setdefault(p, child.values.get(p))

    rec(out.data, child.data, ())
    out.values[()] = child.values.get((), Location(child.file, 1, 1))
    return out


def read_source(path: str | Path, _chain: tuple[str, ...] = ()) -> Source:
    """Read a spec file, following `extends:` recursively: a file relative to this one, else a shipped
    spec by its name."""
    path = Path(path)
    shown = str(path)
    if not path.is_file():
        raise SpecError(f"spec file not found: {shown}", None, "", _missing_file_hint(path))
    # a base named by `extends:` may be any file: it is named, never quoted
    src = parse_yaml(read_limited(path, shown), shown, quote=not _chain)
    if "extends" not in src.data:
        return src
    base_name = src.data.pop("extends")
    where = src.loc(("extends",))
    if not isinstance(base_name, str) or not base_name:
        hint = "e.g. extends: hrm-text-1b.yaml"
        raise SpecError(f"expected a file name, found {_kind(base_name)}", where, "extends", hint)
    base_path = path.parent / base_name
    if not base_path.is_file() and not base_path.suffix and base_path.with_suffix(".yaml").is_file():
        base_path = base_path.with_suffix(".yaml")
    shipped = shipped_specs_dir() / f"{Path(base_name).stem}.yaml"
    if not base_path.is_file() and "/" not in base_name and shipped.is_file():
        base_path = shipped  # a shipped spec by its name, from anywhere: extends: hrm-text-1b
    if not base_path.is_file():
        hint = _near_file(base_path) or "the path is relative to the file that extends it, or a shipped spec's name"
        raise SpecError(f"base spec not found: {base_path}", where, "extends", hint)
    chain = _chain + (str(path.resolve()),)
    if str(base_path.resolve()) in chain:
        cycle = " -> ".join(Path(p).name for p in chain + (str(base_path.resolve()),))
        raise SpecError(f"'extends' forms a cycle: {cycle}", where, "extends", "a spec cannot extend itself")
    base = read_source(base_path, chain)
    return _merge(base, src)


def _missing_file_hint(path: Path) -> str:
    shipped = sorted(p.stem for p in shipped_specs_dir().glob("*.yaml"))
    return (
        _near_file(path)
        or close_match(path.stem, shipped)
        or f"check the path; shipped specs: {', '.join(shipped)}"
    )


def _near_file(path: Path) -> str:
    """'did you mean' a spec file beside `path` whose name is close to it."""
    near = {p.stem: p.name for p in path.parent.glob("*.y*ml")} if path.parent.is_dir() else {}
    match = difflib.get_close_matches(path.stem, list(near), n=1, cutoff=0.6)
    return f"did you mean '{near[match[0]]}'?" if match else ""


_INDEX = re.compile(r"\[(-?\d+)\]")
_PART = re.compile(r"([^.\[\]]+)((?:\[-?\d+\])*)")


def override_path(key: str) -> PathT:
    """The path of a dotted override key, list indices included: `model.schedule[0].do[1].repeat` ->
    ('model', 'schedule', 0, 'do', 1, 'repeat'); a key of any other shape is an error naming it."""
    path: list = []
    for part in str(key).split("."):
        m = _PART.fullmatch(part.strip())
        if m is None:
            hint = "use dotted keys with list indices: model.d_model=256, model.schedule[0].repeat=3"
            raise SpecError(f"bad override key {_one_line(repr(str(key)), 60)}", Location("--set"), "", hint)
        path.append(m.group(1))
        path.extend(int(i) for i in _INDEX.findall(m.group(2)))
    return tuple(path)


def apply_overrides(src: Source, overrides: dict[str, Any] | None) -> Source:
    """Apply dotted-key overrides (`model.d_model=256`, `model.schedule[0].repeat=3`) on top of a source,
    creating mappings as needed. As in an `extends:` child, null removes the key and a choice in a
    one-of form replaces the base's (`replaced_keys`).

    Each overridden value (and every mapping the override creates) is located at `--set KEY`, so an
    error in it names the override rather than the file.
    """
    if not overrides:
        return src
    data = copy.deepcopy(src.data)
    values, keys = dict(src.values), dict(src.keys)
    for key, value in overrides.items():
        parts = override_path(key)
        shown = _one_line(str(key), 60)
        loc = Location(f"--set {shown}")
        node: Any = data
        for i, part in enumerate(parts):
            here, last = parts[: i + 1], i == len(parts) - 1
            if isinstance(part, int):
                if not isinstance(node, list):
                    found = "a mapping" if isinstance(node, dict) else _kind_unquoted(node)
                    raise SpecError(f"cannot index '{dotted(parts[:i])}': it is not a list (found {found})", loc,
                                    "", "an index [N] selects an item of a list, such as model.schedule[0]")
                if not -len(node) <= part < len(node):
                    raise SpecError(f"index {part} is out of range: '{dotted(parts[:i])}' has {len(node)} "
                                    f"item{'s' if len(node) != 1 else ''}", loc, "",
                                    f"indices run from 0 to {len(node) - 1}" if node else "")
                part = part % len(node)
                parts = parts[:i] + (part,) + parts[i + 1:]
                here = parts[: i + 1]
            elif not isinstance(node, dict):
                raise SpecError(f"cannot set '{dotted(parts[:i + 1])}': '{dotted(parts[:i])}' is not a mapping "
                                f"(found {_kind(node)})", loc)
            if last:
                break
            child = node[part] if isinstance(node, list) else node.get(part)
            if child is None and isinstance(parts[i + 1], int):
                raise SpecError(f"cannot index '{dotted(here)}': there is no such list", loc)
            if child is None:
                child = node[part] = {}
                values[here] = keys[here] = loc
            node = child
        part = parts[-1]
        if isinstance(node, dict):
            for k in replaced_keys(parts[:-1], node, {part: value}):
                del node[k]
                _drop((values, keys), parts[:-1] + (k,), itself=True)
            if deletes(parts, value):
                node.pop(part, None)
                _drop((values, keys), parts, itself=True)
                continue
        node[part] = copy.deepcopy(value)
        _drop((values, keys), parts, itself=True)
        values[parts] = keys[parts] = loc
    return Source(data=data, file=src.file, values=values, keys=keys)


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` from the command line; the value is YAML (`--set 'data.tasks=[gcd, lcm]'`)."""
    if "=" not in text:
        raise SpecError(
            f"bad --set {_one_line(repr(text), 60)}: expected key=value", Location("--set"), "",
            "e.g. --set model.d_model=256"
        )
    key, _, raw = text.partition("=")
    where = f"--set {_one_line(key.strip(), 60)}"
    try:
        value = load_yaml_text(raw, where) if raw.strip() else ""
    except SpecError as e:
        raise SpecError(f"bad --set value {_one_line(repr(raw), 60)}: {e.message}", Location(where), "",
                        e.hint) from None
    return key.strip(), value
