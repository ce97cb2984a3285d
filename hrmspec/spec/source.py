"""YAML with positions: every value and key of a spec remembers file:line:col.

PyYAML's composer already knows where each node starts; we construct the document as usual and
walk the node tree beside it to record a `Location` per path (a tuple of keys and indices).
`extends:` merges a base file under the child, and `--set` overrides are applied on top, each
keeping the location it came from, so an error always points at the text the user wrote.
"""

from __future__ import annotations

import copy
import difflib
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


MAX_BYTES = 1 << 20  # a spec file
MAX_VALUES = 20_000  # values in a spec, aliases expanded: an alias bomb stops here
MAX_DEPTH = 40  # nesting of mappings and lists


def _walk(node: yaml.Node, path: PathT, file: str, src: Source, loader: yaml.SafeLoader) -> None:
    if len(src.values) >= MAX_VALUES:
        raise SpecError(f"the spec holds more than {MAX_VALUES:,} values (counting what YAML aliases repeat)",
                        _mark(file, node.start_mark), dotted(path), "a spec is a few hundred values; "
                        "write it out without chains of aliases")
    if len(path) > MAX_DEPTH:
        raise SpecError(f"values nested more than {MAX_DEPTH} levels deep", _mark(file, node.start_mark),
                        "", "a spec nests a few levels: model, modules, a module, its norm")
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


def _yaml_error(e: yaml.MarkedYAMLError, file: str) -> SpecError:
    """A PyYAML error as a SpecError: the problem, where it was noticed, and what it was inside of."""
    mark = e.problem_mark or e.context_mark
    loc = _mark(file, mark) if mark is not None else Location(file)
    problem = e.problem or e.context or "cannot parse"
    message = f"invalid YAML: {problem}"
    if e.problem and e.context and e.context_mark is not None and e.context_mark != mark:
        message += f" ({e.context} at {e.context_mark.line + 1}:{e.context_mark.column + 1})"
    hint = ""
    if "'\\t'" in problem:
        hint = "indent with spaces: YAML does not allow tabs"
    elif "mapping values are not allowed" in problem:
        hint = "check the indentation of this line, or quote a value that contains ': '"
    elif "another document" in problem:
        hint = "a spec is one YAML document: remove the second '---'"
    return SpecError(message, loc, "", hint)


def parse_yaml(text: str, file: str) -> Source:
    """Parse one YAML document; syntax errors become SpecErrors with the position."""
    if len(text) > MAX_BYTES:
        raise SpecError(f"the file is {len(text):,} characters; a spec is at most {MAX_BYTES:,}", Location(file))
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # its reader checks the characters at once
        node = loader.get_single_node()
        if node is None:
            message = "the file is empty; expected a mapping of sections with at least 'model:'"
            raise SpecError(message, Location(file, 1, 1))
        data = loader.construct_document(node)
        src = Source(data=data, file=file)
        _walk(node, (), file, src, loader)
    except yaml.MarkedYAMLError as e:
        raise _yaml_error(e, file) from None
    except yaml.YAMLError as e:  # the reader's: a character YAML does not allow (control characters)
        raise SpecError(f"invalid YAML: {_one_line(str(e))}", Location(file), "",
                        "remove control characters from the file") from None
    except RecursionError:
        raise SpecError(f"values nested more than {MAX_DEPTH} levels deep", Location(file), "",
                        "a spec nests a few levels: model, modules, a module, its norm") from None
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(data, dict):
        raise SpecError(
            f"expected a mapping of sections (name, model, ...), found {_kind(data)}",
            src.loc(()),
            "",
            "a spec starts with keys such as 'name:' and 'model:' at column 1",
        )
    return src


def _one_line(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):  # quoted (escapes control characters) and cut: never a whole file
        return f"the text {value[:40]!r}" + (f" ({len(value):,} characters)" if len(value) > 40 else "")
    return repr(value)


def _merge(base: Source, child: Source) -> Source:
    """Deep-merge `child` over `base`: mappings merge key by key, anything else is replaced."""
    out = Source(data=copy.deepcopy(base.data), file=child.file)
    out.values, out.keys = dict(base.values), dict(base.keys)

    def drop(prefix: PathT) -> None:
        for table in (out.values, out.keys):
            for p in [p for p in table if p[: len(prefix)] == prefix and len(p) > len(prefix)]:
                del table[p]

    def rec(dst: dict, src: dict, path: PathT) -> None:
        for k, v in src.items():
            p = path + (k,)
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                rec(dst[k], v, p)
            else:
                dst[k] = copy.deepcopy(v)
                drop(p)
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
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        message = f"expected UTF-8 text, found the byte {e.object[e.start]:#04x} at offset {e.start}"
        raise SpecError(message, Location(shown)) from None
    src = parse_yaml(text, shown)
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


def apply_overrides(src: Source, overrides: dict[str, Any] | None) -> Source:
    """Apply dotted-key overrides (`model.d_model=256`) on top of a source, creating mappings as needed.

    Each overridden value (and every mapping the override creates) is located at `--set KEY`, so an
    error in it names the override rather than the file.
    """
    if not overrides:
        return src
    data = copy.deepcopy(src.data)
    values, keys = dict(src.values), dict(src.keys)
    for dotted_key, value in overrides.items():
        parts = tuple(str(dotted_key).split("."))
        if not all(p.strip() for p in parts):
            hint = "use dotted keys: model.d_model=256"
            raise SpecError(f"bad override key '{dotted_key}'", Location("--set"), "", hint)
        loc = Location(f"--set {dotted_key}")
        node = data
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part, {}), dict):
                raise SpecError(
                    f"cannot set '{dotted_key}': '{'.'.join(parts[: i + 1])}' is not a mapping "
                    f"(found {_kind(node[part])})",
                    loc,
                    dotted_key,
                )
            if node.get(part) is None:
                node[part] = {}
                values[parts[: i + 1]] = keys[parts[: i + 1]] = loc
            node = node[part]
        node[parts[-1]] = copy.deepcopy(value)
        for table in (values, keys):
            for p in [p for p in table if p[: len(parts)] == parts]:
                del table[p]
        values[parts] = keys[parts] = loc
    return Source(data=data, file=src.file, values=values, keys=keys)


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` from the command line; the value is YAML (`--set 'data.tasks=[gcd, lcm]'`)."""
    if "=" not in text:
        raise SpecError(
            f"bad --set '{text}': expected key=value", Location("--set"), "", "e.g. --set model.d_model=256"
        )
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(f"bad --set value '{raw}': {problem}", Location(f"--set {key.strip()}")) from None
    return key.strip(), value
