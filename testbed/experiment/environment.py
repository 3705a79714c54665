"""What a result depends on besides its case: kernel, CPU, tool versions, commit.

Everything here only reads (/proc/config.gz or /boot/config-*, /proc/cpuinfo and `--version`
outputs); nothing is configured.
"""

from __future__ import annotations

import gzip
import os
import platform
import re
import subprocess
from pathlib import Path

# Kernel options the modes and link shaping depend on (docs/architecture.md).
KERNEL_FEATURES = {
    "geneve": "CONFIG_GENEVE",
    "vxlan": "CONFIG_VXLAN",
    "netem": "CONFIG_NET_SCH_NETEM",
    "ktls": "CONFIG_TLS",
    "tproxy": "CONFIG_NETFILTER_XT_TARGET_TPROXY",
    "nftables": "CONFIG_NF_TABLES",
    "ipset": "CONFIG_IP_SET",
    "bpf": "CONFIG_BPF_SYSCALL",
    "tc_bpf": "CONFIG_NET_CLS_BPF",
}
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _command_output(argv: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout or done.stderr).strip()


def _first_version(text: str) -> str:
    match = re.search(r"\d+\.\d+(\.\d+)?", text)
    return match.group(0) if match else "unknown"


def tool_versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "iperf3": _first_version(_command_output(["iperf3", "--version"])),
        "sockperf": _first_version(_command_output(["sockperf", "--version"])),
    }


def cpu_model() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    return match.group(1).strip() if match else "unknown"


def kernel_config(release: str | None = None) -> str:
    """The running kernel's build configuration, or "" where the kernel does not publish it."""
    try:
        return gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()
    except OSError:
        pass
    try:
        return (Path("/boot") / f"config-{release or platform.release()}").read_text()
    except OSError:
        return ""


def kernel_features(config: str | None = None) -> dict[str, str]:
    """feature -> "builtin", "module", "absent", or "unknown" without a kernel config."""
    text = kernel_config() if config is None else config
    options = dict(re.findall(r"^(CONFIG_\w+)=(\w+)$", text, re.MULTILINE))
    names = {"y": "builtin", "m": "module"}
    return {
        feature: names.get(options.get(option, ""), "absent") if text else "unknown"
        for feature, option in KERNEL_FEATURES.items()
    }


def git_commit() -> str:
    commit = _command_output(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT)
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        return "unknown"
    dirty = _command_output(["git", "status", "--porcelain", "--untracked-files=no"], PROJECT_ROOT)
    return f"{commit}-dirty" if dirty else commit


def describe_environment() -> dict[str, object]:
    return {
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count() or 0,
        "tools": tool_versions(),
        "git_commit": git_commit(),
        "kernel_features": kernel_features(),
    }
