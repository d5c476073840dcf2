"""Strict YAML reading and atomic writing.

PyYAML's safe_load silently keeps the last of two duplicate keys and reads ``1e-3`` as a string;
both are errors or surprises for a config file, so we use a SafeLoader subclass that fixes them.
"""
from __future__ import annotations

import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

import yaml

from automl.errors import ConfigError


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads 1e-3 / 1E+5 / .5e2 as floats."""


# YAML 1.1's float pattern needs a dot and a signed exponent; accept the forms people write.
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
# YAML 1.1 also reads `no`/`on` as booleans, `010` as 8 and `12:30` as 750; config files mean none
# of that. Booleans are true/false only, integers are decimal (or 0x hex); the rest stay strings.
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT = re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+)$")
_REPLACED = ("tag:yaml.org,2002:float", "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int")
StrictLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in _REPLACED]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, list("tTfF"))
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))


def _construct_mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False):
    own = sum(1 for key_node, _ in node.value if key_node.tag != "tag:yaml.org,2002:merge")
    loader.flatten_mapping(node)
    merged = len(node.value) - own  # flatten_mapping puts '<<' entries first; own keys override them
    mapping, own_keys = {}, set()
    for index, (key_node, value_node) in enumerate(node.value):
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise ConfigError(
                "a mapping key must be a scalar",
                file=loader.name,
                key=f"line {key_node.start_mark.line + 1}",
                fix="use a plain string as the key",
            ) from None
        if index >= merged and key in own_keys:
            raise ConfigError(
                f"duplicate key '{key}' (line {key_node.start_mark.line + 1})",
                file=loader.name,
                key=key,
                fix="keep one of the two entries; YAML would silently keep only the last",
            )
        if index >= merged:
            own_keys.add(key)
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


MAX_NODES = 200_000  # far beyond any space, recipe or profile; an alias bomb expands to billions


def _expanded_size(node, memo) -> int:
    """Nodes ``node`` stands for once every alias and merge key is expanded (linear in the file: each
    node is counted once and its count reused where an alias repeats it)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive anchor counts once
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[id(node)] = size
    return size


def _check_size(node, source: str):
    try:
        size = _expanded_size(node, {})
    except RecursionError:
        raise ConfigError("the YAML is nested too deeply", file=source, fix="flatten the file") from None
    if size > MAX_NODES:
        raise ConfigError(f"the YAML expands to {size:.3g} nodes through its aliases (at most {MAX_NODES:,})",
                          file=source, fix="write the values out instead of nesting aliases (&name / *name / <<)")


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML text strictly; syntax errors become ConfigError naming ``source``, and a file whose
    aliases expand beyond MAX_NODES is refused before anything is built from it."""
    loader = StrictLoader(text)
    loader.name = source
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node, source)
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError("the YAML is nested too deeply", file=source, fix="flatten the file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}" if mark else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            f"invalid YAML: {problem}", file=source, key=line, fix="correct the YAML syntax"
        ) from None
    finally:
        loader.dispose()


def load_yaml(path) -> Any:
    """Read and strictly parse a YAML file; a missing file is a ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", file=path, fix="check the path") from None
    except IsADirectoryError:
        raise ConfigError("expected a YAML file, got a directory", file=path, fix="give the file inside it") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})", file=path,
                          fix="save the file as UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}", file=path,
                          fix="check its permissions and that it is a regular file") from None
    return parse_yaml(text, str(path))


class StrictDumper(yaml.SafeDumper):
    """SafeDumper that quotes every string StrictLoader would read as a float (e.g. '1e10')."""


StrictDumper.yaml_implicit_resolvers = {k: list(v) for k, v in StrictLoader.yaml_implicit_resolvers.items()}


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=StrictDumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_NEW_FILE_MODE = 0o666 & ~_umask()  # what open(path, "w") would give; mkstemp alone gives 0600


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write via a temp file in the same directory and rename, so readers never see half a file.

    The file gets the permissions a plain write would give: the existing file's, else umask's; a
    symbolic link is written through, as a plain write would (its target is replaced, not the link).
    """
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = _NEW_FILE_MODE
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_yaml(path, data: Any) -> Path:
    return atomic_write_text(path, dump_yaml(data))


def write_json(path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
