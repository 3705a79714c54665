"""The interactive shell of `testbed up`, in the spirit of Mininet's CLI."""

from __future__ import annotations

import cmd
import shlex
import subprocess
from urllib.parse import urlsplit, urlunsplit

from rich.console import Console

from testbed.cluster.cluster import Cluster, in_pod
from testbed.cluster.model import TopologyError
from testbed.inventory import inventory_tables
from testbed.netlab.process import NetlabError, nsenter_argv


class ClusterShell(cmd.Cmd):
    intro = (
        "testbed shell: nodes, pods, services, ping A B, pingall, iperf A B, rules POD,\n"
        "trace SRC DST[:PORT], curl POD URL, apps,\n"
        "exec POD CMD... (pod names become their IPs), help, exit (tears the testbed down)"
    )

    def __init__(self, cluster: Cluster, console: Console) -> None:
        super().__init__()
        self.cluster = cluster
        self.console = console
        self.prompt = f"testbed:{cluster.run}> "

    def _tables(self, which: str) -> None:
        for title, table in inventory_tables(self.cluster.inventory()):
            if title == which:
                self.console.print(table)

    def do_nodes(self, _: str) -> None:
        """nodes: the nodes with their underlay address and pod CIDR"""
        self._tables("nodes")

    def do_pods(self, _: str) -> None:
        """pods: every pod with node, namespace, service account and IP"""
        self._tables("pods")

    def do_services(self, _: str) -> None:
        """services: every service with VIP, ports and endpoints"""
        self._tables("services")

    def do_ping(self, line: str) -> None:
        """ping A B: ping pod (or IP) B from pod A, three times"""
        args = line.split()
        if len(args) != 2:
            self.console.print("usage: ping A B")
            return
        self._exec(args[0], ["ping", "-c", "3", "-i", "0.2", args[1]])

    def do_apps(self, _: str) -> None:
        """apps: the apps the topology declared, running or exited (with code and output)"""
        self._tables("apps")

    def do_curl(self, line: str) -> None:
        """curl POD [CURL-OPTIONS] URL: an HTTP request from pod POD, printing the status
        line, headers and body; pod and service names in the URL become their IPs"""
        words = shlex.split(line)
        if len(words) < 2:
            self.console.print("usage: curl POD [CURL-OPTIONS] URL")
            return
        argv = ["curl", "-sS", "-i", "--max-time", "10", *map(self._resolve_url, words[1:])]
        self._exec(words[0], argv)

    def _resolve_url(self, word: str) -> str:
        """The host of a URL (or of a bare HOST[:PORT][/PATH]) with a pod or service name
        resolved; options and any other word are kept."""
        scheme = "" if "://" in word else "http://"
        parts = urlsplit(scheme + word)
        host = parts.hostname
        if word.startswith("-") or not host or self.cluster.resolve_host(host) == host:
            return word
        resolved = self.cluster.resolve_host(host)
        netloc = resolved if parts.port is None else f"{resolved}:{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc)).removeprefix(scheme)

    def do_pingall(self, _: str) -> None:
        """pingall: ping every pod from every pod and report failures"""
        failed = self.cluster.ping_all()
        total = len(self.cluster.pods) * (len(self.cluster.pods) - 1)
        self.console.print(f"{total - len(failed)}/{total} pairs reachable")
        for src, dst in failed:
            self.console.print(f"  {src} -> {dst} failed")

    def do_iperf(self, line: str) -> None:
        """iperf A B: 5 s of single-stream iperf3 from pod A to pod B"""
        from testbed.measure.iperf import run_throughput

        args = line.split()
        if len(args) != 2:
            self.console.print("usage: iperf A B")
            return
        try:
            client, server = self.cluster.pod(args[0]), self.cluster.pod(args[1])
            rows = run_throughput(client, server, server.ip, duration=5)
        except (TopologyError, NetlabError, RuntimeError) as exc:
            self.console.print(f"[red]{exc}[/red]")
            return
        for row in rows:
            self.console.print(f"{row.metric}: {row.value:,.0f} {row.unit}")

    def do_rules(self, line: str) -> None:
        """rules POD: what the redirection mode installed in the pod"""
        try:
            rules = self.cluster.mode.describe_pod(self.cluster.pod(line.strip()))
            self.console.print(rules, soft_wrap=True, highlight=False, markup=False)
        except TopologyError as exc:
            self.console.print(f"[red]{exc}[/red]")

    def do_trace(self, line: str) -> None:
        """trace SRC DST[:PORT] [FILE.svg|FILE.png]: walk one connection through the data plane"""
        from pathlib import Path

        from testbed.trace import TraceError, trace
        from testbed.trace.diagram import DiagramError

        args = line.split()
        if len(args) not in (2, 3):
            self.console.print("usage: trace SRC DST[:PORT] [FILE.svg|FILE.png]")
            return
        try:
            result = trace(self.cluster, args[0], args[1])
            if len(args) == 3:
                result.write_diagram(Path(args[2]))
        except (TraceError, DiagramError, NetlabError) as exc:
            self.console.print(f"[red]{exc}[/red]")
            return
        self.console.print(result.text(), soft_wrap=True, highlight=False, markup=False)

    def do_exec(self, line: str) -> None:
        """exec POD CMD...: run a command inside a pod (pod names become IPs)"""
        words = shlex.split(line)
        if len(words) < 2:
            self.console.print("usage: exec POD CMD...")
            return
        self._exec(words[0], words[1:])

    def default(self, line: str) -> None:
        words = shlex.split(line)
        if words and (words[0] in self.cluster.pods or words[0] in self.cluster.system_pods):
            if words[1:2] == ["curl"]:  # `productpage curl http://reviews:9080/`
                self.do_curl(shlex.join([words[0], *words[2:]]))
                return
            self._exec(words[0], words[1:])  # Mininet style: `client ping server2`
        else:
            self.console.print(f"unknown command: {line} (try help)")

    def _exec(self, pod_name: str, argv: list[str]) -> None:
        try:
            pod = self.cluster.pod(pod_name)
        except TopologyError as exc:
            self.console.print(f"[red]{exc}[/red]")
            return
        resolved = [self.cluster.resolve(word) for word in argv]
        subprocess.run(nsenter_argv(pod.netns.path, in_pod(pod.netns.name, resolved)), check=False)

    def do_exit(self, _: str) -> bool:
        """exit: leave the shell and tear the testbed down"""
        return True

    do_quit = do_exit
    do_EOF = do_exit

    def emptyline(self) -> bool:
        return False
