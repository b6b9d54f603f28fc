"""Reading scenario files safely: bounded regular files, a bounded YAML composer (depth, values,
alias expansion measured before anything is built) and ``extends:`` chains merged by :func:`deep_merge`."""

from __future__ import annotations

import os
import stat
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from recloop.errors import RecloopInputError, clip, echo
from recloop.limits import MAX_EXTENDS, MAX_FILE_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES


def _is_file(p: Path) -> bool:
    """``p.is_file()`` that treats unusable names (too long, NUL bytes) as absent instead of raising."""
    try:
        return p.is_file()
    except (OSError, ValueError):
        return False


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except (OSError, ValueError):
        return False


def shipped_scenario(name: str) -> Path | None:
    """Path of a scenario shipped in ``recloop.scenarios`` (``quickstart`` or ``quickstart.yaml``)."""
    if not name or len(name) > 255 or any(ch in name for ch in "/\\\0"):
        return None
    fname = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    try:
        p = Path(str(resources.files("recloop.scenarios").joinpath(fname)))
    except (ModuleNotFoundError, OSError, ValueError):
        return None
    return p if _is_file(p) else None


def deep_merge(base: dict, over: dict) -> dict:
    """The mapping of a child file (``over``) laid over the file it extends (``base``).

    * mappings merge recursively, key by key: the child adds keys and overrides the parent's values;
      this includes ``policies:`` (the child adds or overrides policies by name) and ``users:``;
    * a component block whose ``type`` changes (``world: {type: gaussian_clusters}`` over a ``chaney``
      world) replaces the parent block instead of merging with it, so no parameter of the old type leaks in;
    * lists (``users.dynamics``, ``metrics.include``) and scalars replace the parent's value whole;
    * ``key: null`` drops the inherited key, so the default applies (``policies: {mf: null}`` removes
      the inherited policy ``mf``; ``creators: null`` removes creators; ``policy: null`` lets a child use
      ``policies:`` instead). A null for a key the parent does not have is kept as written.

    Neither argument is modified.
    """
    out = dict(base)
    for key, val in over.items():
        old = out.get(key)
        if val is None and key in out:
            del out[key]
        elif isinstance(val, dict) and isinstance(old, dict) and val.get("type", old.get("type")) == old.get("type"):
            out[key] = deep_merge(old, val)
        else:
            out[key] = val
    return out


class _Unreadable(Exception):
    """A scenario file that cannot be read; the message says why (completes '<file> ...')."""


def read_text_bounded(path: Path, limit: int = MAX_FILE_BYTES) -> str:
    """The UTF-8 text of ``path`` if it is a regular file of at most ``limit`` bytes.

    Devices (``/dev/zero``), pipes, sockets and directories are refused before anything is read, so a
    hostile ``extends:`` can neither hang the loader nor fill memory.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _Unreadable("does not exist") from None
    except (OSError, ValueError) as exc:
        raise _Unreadable(f"cannot be read ({clip(getattr(exc, 'strerror', None) or exc)})") from None
    _check_regular(st, limit)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise _Unreadable(f"cannot be read ({clip(exc.strerror or exc)})") from None
    with os.fdopen(fd, "rb") as fh:
        _check_regular(os.fstat(fd), limit)  # the file may have been swapped since the stat
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise _Unreadable(f"is larger than {limit} bytes, the limit for a scenario file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _Unreadable(f"is not UTF-8 text (invalid byte at offset {exc.start})") from None


def _check_regular(st: os.stat_result, limit: int) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise _Unreadable("is a directory, not a scenario YAML file")
    if not stat.S_ISREG(st.st_mode):
        raise _Unreadable("is not a regular file (a device, a pipe or a socket); give a scenario YAML file")
    if st.st_size > limit:
        raise _Unreadable(f"is {st.st_size} bytes; a scenario file may be at most {limit} bytes")


class _TooBig(Exception):
    """A YAML document beyond the nesting or size limits (the message completes the sentence)."""


class _Recursive(Exception):
    """A YAML alias used inside its own anchor (``&a [*a]``): the data would be infinite."""


class _Bounded:
    """``compose_node`` with limits on nesting and on distinct nodes, mixed in before PyYAML's Composer.

    The Composer recurses once per level, so a document nested 1,000 deep would end in a RecursionError;
    the limits stop it first, before any Python object is built.
    """

    _depth = 0
    _nodes = 0

    def compose_node(self, parent, index):
        if self._depth >= MAX_YAML_DEPTH:
            mark = self.peek_event().start_mark
            raise _TooBig(f"nesting deeper than {MAX_YAML_DEPTH} levels (at line {mark.line + 1})")
        if not self.check_event(yaml.AliasEvent):
            self._nodes += 1
            if self._nodes > MAX_YAML_NODES:
                raise _TooBig(f"more than {MAX_YAML_NODES} values")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


if getattr(yaml, "__with_libyaml__", False):  # libyaml's event parser (fast), PyYAML's composer (bounded)

    from yaml._yaml import CParser as _CParser

    class _BoundedLoader(_Bounded, yaml.composer.Composer, _CParser, yaml.constructor.SafeConstructor,
                         yaml.resolver.Resolver):
        """A safe loader: libyaml events, a depth- and size-bounded composer, safe construction."""

        def __init__(self, stream: str):
            _CParser.__init__(self, stream)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)
            yaml.composer.Composer.__init__(self)

else:  # pragma: no cover - PyYAML without libyaml

    class _BoundedLoader(_Bounded, yaml.SafeLoader):
        """A safe loader with a depth- and size-bounded composer."""


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def check_node_graph(root: yaml.Node, max_nodes: int = MAX_YAML_NODES, max_depth: int = MAX_YAML_DEPTH) -> None:
    """Refuse a composed YAML graph whose alias expansion is cyclic, too deep or too large.

    Aliases make the graph a DAG (or, for ``&a [*a]``, a cycle); the expanded size is computed per
    distinct node (memoised, iterative), so a "billion laughs" document is measured without expanding it.
    """
    done: dict[int, tuple[int, int]] = {}  # id -> (expanded nodes, expanded depth)
    active = {id(root)}
    stack = [(root, iter(_children(root)))]
    while stack:
        node, todo = stack[-1]
        child = next(todo, None)
        if child is not None:
            if id(child) in done:
                continue
            if id(child) in active:
                raise _Recursive(f"line {child.start_mark.line + 1}")
            active.add(id(child))
            stack.append((child, iter(_children(child))))
            continue
        stack.pop()
        active.discard(id(node))
        kids = [done[id(c)] for c in _children(node)]
        size = 1 + sum(k[0] for k in kids)
        depth = 1 + max((k[1] for k in kids), default=0)
        if size > max_nodes:
            raise _TooBig(f"more than {max_nodes} values once its aliases (*name) are expanded")
        if depth > max_depth:
            raise _TooBig(f"nesting deeper than {max_depth} levels once its aliases (*name) are expanded")
        done[id(node)] = (size, depth)


def parse_yaml(text: str, file: str) -> Any:
    """Parse one YAML document safely: bounded nesting and alias expansion, checked before any object is built."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        check_node_graph(node)
        return loader.construct_document(node)
    except _Recursive as exc:
        raise RecloopInputError(f"an alias refers to the anchor that contains it ({exc}), which would make the data "
                                "infinite; scenario files cannot contain recursive aliases.", file=file) from None
    except _TooBig as exc:
        raise RecloopInputError(
            f"the YAML document has {exc}; scenario files are limited to {MAX_YAML_DEPTH} levels of nesting "
            f"and {MAX_YAML_NODES} values after alias expansion.",
            file=file,
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if "nesting depth" in problem:  # newer libyaml stops deep documents itself, before our composer
            raise RecloopInputError(f"the YAML document is nested too deep{where}; scenario files are limited to "
                                    f"{MAX_YAML_DEPTH} levels of nesting.", file=file) from None
        raise RecloopInputError(f"YAML syntax error{where}: {clip(problem)}.", file=file) from None
    except (ValueError, OverflowError, RecursionError) as exc:  # e.g. an int with more than 4300 digits
        raise RecloopInputError(f"a YAML value cannot be read ({clip(exc)}).", file=file) from None
    finally:
        loader.dispose()


def read_yaml(path: Path, via: Path | None = None) -> dict:
    """A scenario file as a mapping (bounded size, nesting and alias expansion; see :mod:`recloop.limits`).

    ``via``: the file whose ``extends:`` names ``path`` (a file that cannot be read is reported there).
    """
    try:
        text = read_text_bounded(path)
    except _Unreadable as exc:
        if via is not None:
            raise RecloopInputError(f"the scenario it extends, {clip(path, 300)}, {exc}.", file=str(via),
                                    key="extends") from None
        what = "file not found. Give the path of a scenario YAML file or the name of a shipped scenario" \
            if str(exc) == "does not exist" else str(exc)
        raise RecloopInputError(f"{what}.", file=str(path)) from None
    if not text.strip():
        raise RecloopInputError(
            "the file is empty. A scenario needs at least 'world:' and 'policy:' (or 'policies:'); "
            "see scenarios/quickstart.yaml or run `recloop schema`.",
            file=str(path),
        )
    data = parse_yaml(text, str(path))
    if not isinstance(data, dict):
        raise RecloopInputError(
            f"the top level must be a mapping of keys (world:, policy:, ...), not {type(data).__name__}.",
            file=str(path),
        )
    return data


def _extends_target(path: Path, parent: str) -> Path:
    """The file that ``extends: parent`` in ``path`` names: relative to ``path``, absolute, or shipped."""
    target = Path(parent)
    if not target.is_absolute():
        target = path.parent / target
    if _exists(target):
        return target
    shipped = shipped_scenario(parent)
    if shipped is None:
        raise RecloopInputError(
            f"the scenario it extends, {echo(parent)}, does not exist (looked for {echo(str(target), 300)} and for a "
            "shipped scenario of that name). Give a path relative to this file.",
            file=str(path),
            key="extends",
        )
    return shipped


def load_raw(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a scenario file and resolve its ``extends:`` chain into one mapping (see :func:`deep_merge`)."""
    path = Path(path)
    if not _seen and not _exists(path) and shipped_scenario(str(path)) is not None:
        path = shipped_scenario(str(path))
    path = path.resolve() if _exists(path) else path
    if path in _seen:
        chain = " -> ".join(clip(p, 300) for p in (*_seen, path))
        raise RecloopInputError(f"'extends' forms a cycle: {chain}.", file=str(_seen[0]), key="extends")
    data = read_yaml(path, _seen[-1] if _seen else None)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecloopInputError("'extends' must be a file path (string).", file=str(path), key="extends")
    if len(_seen) + 1 >= MAX_EXTENDS:
        raise RecloopInputError(f"the 'extends' chain is longer than {MAX_EXTENDS} files.", file=str(path),
                                key="extends")
    return deep_merge(load_raw(_extends_target(path, parent), (*_seen, path)), data)


