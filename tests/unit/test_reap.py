"""The reaper's ownership check: only processes in the given namespaces are signalled."""

import signal
import subprocess

from testbed.netlab.reap import _signal_if_still_in, end_processes_in, netns_id_of_pid, pids_in


def test_a_process_outside_the_namespaces_is_never_signalled() -> None:
    outsider = subprocess.Popen(["sleep", "30"])
    try:
        mine = netns_id_of_pid(outsider.pid)
        assert mine is not None
        other = {(0, 0)}  # no namespace has device 0: nothing on the machine may match
        assert outsider.pid not in pids_in(other)
        assert not _signal_if_still_in(outsider.pid, other, signal.SIGKILL)
        reaped = end_processes_in({(0, 0): "/run/netns/none"}, grace=0.1)
        assert reaped.ended == [] and reaped.survivors == []
        assert outsider.poll() is None
    finally:
        outsider.kill()
        outsider.wait()


def test_an_exited_process_has_no_namespace() -> None:
    done = subprocess.Popen(["true"])
    done.wait()
    assert netns_id_of_pid(done.pid) is None
