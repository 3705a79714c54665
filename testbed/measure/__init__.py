"""Measurements (throughput, latency, connection rate, resources) as typed rows.

Tool modules: iperf, sockperf, rr, ping, resources. They run tools through `Host`
(host.py), which netlab's Netns and cluster's Pod satisfy.
"""

from testbed.measure.errors import MeasureError
from testbed.measure.host import Host, Process
from testbed.measure.rows import Measurement, Summary, with_labels

__all__ = ["Host", "MeasureError", "Measurement", "Process", "Summary", "with_labels"]
