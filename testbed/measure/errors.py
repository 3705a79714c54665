"""The one error type of the measure package."""

from testbed.netlab.errors import TestbedError


class MeasureError(TestbedError, RuntimeError):
    """A measurement could not be taken: the tool failed, or its output made no sense."""
