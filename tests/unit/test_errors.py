"""Every error class the package defines reaches a user as one line and exit status 2
(interruptions, KeyboardInterrupt and its subclasses, are not errors: they exit 130).

The classes are found by importing every module of `testbed` and collecting the exception
classes defined there, so a new error that forgets the base fails this test. Private
classes (a leading underscore) are control flow inside one module and never escape it.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil

import pytest

import testbed
from testbed import cli
from testbed.netlab.errors import TestbedError


def _error_classes() -> list[type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(testbed.__path__, "testbed."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, Exception)
                and value.__module__ == module.__name__
                and not name.startswith("_")
            ):
                found[f"{value.__module__}.{name}"] = value
    return [found[key] for key in sorted(found)]


ERRORS = _error_classes()


def test_the_package_defines_errors() -> None:
    assert len(ERRORS) > 20  # the walk found the modules


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: f"{e.__module__}.{e.__name__}")
def test_every_error_derives_from_the_base(error: type[BaseException]) -> None:
    assert issubclass(error, TestbedError), f"{error.__name__} must derive from TestbedError"


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: f"{e.__module__}.{e.__name__}")
def test_the_cli_prints_it_as_one_line(
    error: type[BaseException],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    instance = error.__new__(error)
    Exception.__init__(instance, "something the user should read")

    def fail(args: argparse.Namespace) -> int:
        raise instance

    parser = cli.build_parser()
    args = parser.parse_args(["ls"])
    args.func = fail
    monkeypatch.setattr(cli, "build_parser", lambda: _Fixed(args))
    assert cli.main(["ls"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["testbed: error: something the user should read"]


class _Fixed:
    """A parser that returns the prepared arguments."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def parse_args(self, argv: list[str] | None = None) -> argparse.Namespace:
        return self.args
