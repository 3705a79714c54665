"""Redirection modes: how pod traffic reaches the mesh proxies, and the control plane.

Every mode builds on testbed.redirect.base and is listed once, in testbed.redirect.registry.
"""

from testbed.cluster.mode import ModeError
from testbed.redirect.registry import MODES, available_modes, create_mode, mode_class

__all__ = ["MODES", "ModeError", "available_modes", "create_mode", "mode_class"]
