"""YAML as infantry's config files are read: the YAML 1.2 core schema, with no alias of a collection.

Imported only when a config file is read, so a run configured by flags and variables loads no YAML.
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml


class YamlError(ValueError):
    """A document that is not valid YAML; the message says where, then what."""


def load_yaml12(text: str) -> Any:
    """The document in ``text``, read by the YAML 1.2 core schema; YamlError if it cannot be read."""
    try:
        return yaml.load(text, Loader=Yaml12Loader)  # noqa: S506  (a safe loader)
    except yaml.YAMLError as exc:
        raise YamlError(_problem(exc, text)) from None


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader reading plain scalars by the YAML 1.2 core schema.

    YAML 1.1 reads ``1:5`` as the base-60 number 65, ``0644`` as octal and ``yes``/``on`` as true;
    YAML 1.2 (and every other modern reader) keeps the first and last as strings and ``0644`` as
    decimal. Aliases of lists or mappings are refused, so a small file cannot expand into a huge one.
    """

    yaml_implicit_resolvers: dict[Any, list[tuple[str, re.Pattern[str]]]] = {}  # noqa: RUF012

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        """Refuse an alias of a collection before it is shared."""
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            node = self.anchors.get(str(getattr(event, "anchor", "")))
            if node is not None and not isinstance(node, yaml.ScalarNode):
                raise yaml.composer.ComposerError(
                    None, None, "aliases of lists or mappings are not accepted here", event.start_mark
                )
        return super().compose_node(parent, index)


def _yaml12_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = str(loader.construct_scalar(node))  # type: ignore[arg-type]
    try:
        if text.startswith("0o"):
            return int(text[2:], 8)
        if text.startswith("0x"):
            return int(text[2:], 16)
        return int(text, 10)
    except ValueError:
        raise yaml.constructor.ConstructorError(None, None, "the number is too long", node.start_mark) from None


def _yaml12_float(loader: yaml.SafeLoader, node: yaml.Node) -> float:
    text = str(loader.construct_scalar(node)).lower()  # type: ignore[arg-type]
    if text.endswith(".inf"):
        return -math.inf if text.startswith("-") else math.inf
    if text == ".nan":
        return math.nan
    return float(text)


for _tag, _pattern, _first in (
    ("tag:yaml.org,2002:null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:bool", r"true|True|TRUE|false|False|FALSE", list("tTfF")),
    ("tag:yaml.org,2002:int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", list("-+0123456789")),
    (
        "tag:yaml.org,2002:float",
        r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
        list("-+0123456789."),
    ),
):
    Yaml12Loader.add_implicit_resolver(_tag, re.compile(rf"^(?:{_pattern})$"), _first)
Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _yaml12_int)
Yaml12Loader.add_constructor("tag:yaml.org,2002:float", _yaml12_float)


def _problem(exc: yaml.YAMLError, text: str) -> str:
    """A YAML error as one line: where, then what."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        what = exc.problem or exc.context or "cannot be read"
        return f"line {mark.line + 1}, column {mark.column + 1}: {' '.join(what.split())}"
    if isinstance(exc, yaml.reader.ReaderError):
        before = text[: exc.position]
        line, column = before.count("\n") + 1, len(before) - before.rfind("\n")
        return f"line {line}, column {column}: character {exc.character!r} is not allowed in YAML"
    return " ".join(str(exc).split())
