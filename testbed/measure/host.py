"""What measure needs from a place that runs commands: a pod, a node or a bare namespace.

The Protocols are netlab's (testbed/netlab/host.py), the one statement of how a command runs
in a namespace; netlab's `Netns` and cluster's `Pod` satisfy `Host`, netlab's
`ManagedProcess` satisfies `Process`.
"""

from testbed.netlab.host import Host, Process

__all__ = ["Host", "Process"]
