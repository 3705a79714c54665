"""The one error type of the measure package."""


class MeasureError(RuntimeError):
    """A measurement could not be taken: the tool failed, or its output made no sense."""
