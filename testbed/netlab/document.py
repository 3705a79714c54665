"""Reading a user's YAML or JSON document with bounds, so that no input costs unbounded time
or memory and every failure is one DocumentError saying what is wrong.

PyYAML and json parse recursively (deep nesting ends in RecursionError) and YAML aliases
share one value between many places: a few hundred bytes of anchors can stand for 9^9
values, which a validator walking the document then visits one by one (found by fuzzing,
tests/fuzz/test_fuzz_loaders.py). The loaded document is walked once, alias by alias,
up to a budget of values.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from testbed.netlab.errors import TestbedError

MAX_VALUES = 200_000  # every testbed document is far smaller; 9^9 alias bombs are not
# libyaml's parser when PyYAML has it: the pure-Python scanner takes seconds on a few KiB
# of "[[[[..." (quadratic in the nesting), libyaml milliseconds.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class DocumentError(TestbedError, ValueError):
    """The text is not a document the testbed reads; the message says why."""


def load_document(
    text: bytes | str,
    *,
    as_json: bool = False,
    kind: str | None = None,
    max_values: int = MAX_VALUES,
    loader: type[yaml.SafeLoader] | None = None,
) -> Any:
    """The document in `text` (YAML, or JSON with `as_json`); `kind` names it in errors.
    `loader` reads YAML with constructors of its own (serde_yaml's tags, say)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DocumentError(f"not UTF-8 text (byte {exc.start})") from None
    kind = kind or ("JSON" if as_json else "YAML")
    try:
        data = json.loads(text) if as_json else yaml.load(text, Loader=loader or _LOADER)
    except RecursionError:
        raise DocumentError(f"not valid {kind}: nested too deeply") from None
    except (ValueError, yaml.YAMLError) as exc:
        one_line = " ".join(str(exc).split())  # PyYAML's messages span lines
        raise DocumentError(f"not valid {kind}: {one_line}") from None
    _check_size(data, max_values)
    return data


def _check_size(data: Any, max_values: int) -> None:
    """Count values as a reader of the document meets them (an alias once per use)."""
    pending = [data]
    seen = 0
    while pending:
        value = pending.pop()
        seen += 1
        if seen > max_values:
            raise DocumentError(
                f"holds more than {max_values} values once its aliases are expanded"
            )
        if isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
