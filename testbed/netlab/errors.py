"""The one base of every error the testbed raises on purpose.

It lives in the lowest layer so that every layer can derive from it. The CLI prints any
TestbedError as one line and exits 2; a traceback means a bug of ours, never a user's
mistake or a missing kernel feature.
"""


class TestbedError(Exception):
    """An error the testbed explains in its message: bad input, a missing feature, a failed
    step. Subclasses may also derive from the builtin that describes them best
    (ValueError, OSError, ConnectionError...), so existing handlers keep catching them."""

    __test__ = False  # not a pytest test class, despite its name
