"""The ebpf mode's options and the tcx syscall layouts, without BPF or root."""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import pytest

from testbed.redirect import ModeError, create_mode, tcx
from testbed.redirect.ebpf import EbpfMode


def test_defaults_are_tc_filters_and_cluster_local() -> None:
    mode = create_mode("ebpf")
    assert isinstance(mode, EbpfMode)
    assert mode.facts() == {
        "ebpf_hook": "tc",
        "same_node_fast_path": "True",
        "trust_domain": "cluster.local",
    }
    assert mode.proxy_pids() == {}


def test_options_are_taken() -> None:
    options = {"ebpf_hook": "tcx", "trust_domain": "example.org", "same_node_fast_path": False}
    mode = create_mode("ebpf", options)
    assert mode.facts() == {
        "ebpf_hook": "tcx",
        "same_node_fast_path": "False",
        "trust_domain": "example.org",
    }


@pytest.mark.parametrize(
    ("options", "message"),
    [({"ebpf_hook": "xdp"}, "ebpf_hook 'xdp'"), ({"tunnel": "vxlan"}, "unknown option")],
)
def test_bad_options_are_refused(options: dict[str, str], message: str) -> None:
    with pytest.raises(ModeError, match=message):
        create_mode("ebpf", options)


def test_link_create_attr_layout() -> None:
    # prog_fd, target_ifindex, attach_type (BPF_TCX_EGRESS = 47), flags
    assert tcx.link_create_attr(5, 9, "egress") == struct.pack("=IIII", 5, 9, 47, 0)
    assert tcx.link_create_attr(5, 9, "ingress")[8:12] == struct.pack("=I", 46)


def test_obj_attr_points_at_the_path() -> None:
    attr, keep = tcx.obj_attr(Path("/run/x/bpf/pin"), 7)
    address, fd, flags = struct.unpack("=QII", attr)
    assert (fd, flags) == (7, 0)
    assert address == ctypes.addressof(keep)
    assert ctypes.string_at(address) == b"/run/x/bpf/pin"


def test_query_attr_layout() -> None:
    attr = tcx.query_attr(3, "ingress", 0x1000, 64)
    # target_ifindex, attach_type, query_flags, attach_flags, prog_ids, prog_cnt
    assert struct.unpack("=IIIIQI", attr) == (3, 46, 0, 0, 0x1000, 64)
    assert len(attr) == 28  # prog_cnt sits at offset 24, where attached_ids reads it back
