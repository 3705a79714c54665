"""The DNS answer function (testbed.mesh.dns) and the resolv.conf a pod gets."""

from __future__ import annotations

import asyncio
import socket
import struct

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from testbed.cluster.kubeproxy import render_service_rules
from testbed.mesh.dns import Zone, answer, bind_sockets, candidates, resolv_conf, search_list, serve

FQDN = "reviews.default.svc.cluster.local"
RECORDS = {FQDN: "10.96.0.12"}
PROXY = Zone(RECORDS, search_list("default"), ndots=5)  # ztunnel's view of a default pod
CLUSTER = Zone(RECORDS)  # the cluster DNS service: fully qualified names only


def ask(zone: Zone, name: str, rdtype: str = "A") -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    wire = answer(query.to_wire(), zone)
    assert wire is not None
    reply = dns.message.from_wire(wire)
    assert reply.id == query.id
    return reply


def addresses(reply: dns.message.Message) -> list[str]:
    return [rd.address for rrset in reply.answer for rd in rrset]


def test_resolv_conf_is_what_kubelet_writes() -> None:
    assert resolv_conf("10.96.0.2", "bookinfo") == (
        "search bookinfo.svc.cluster.local svc.cluster.local cluster.local\n"
        "nameserver 10.96.0.2\n"
        "options ndots:5\n"
    )


def test_candidates_follow_ndots() -> None:
    search = search_list("default")
    assert candidates("reviews", search, 5)[0] == "reviews.default.svc.cluster.local"
    assert candidates("reviews", search, 5)[-1] == "reviews"
    assert candidates("a.b.c.d.e.f", search, 5)[0] == "a.b.c.d.e.f"  # enough dots: as is first


def test_proxy_expands_short_names_through_the_search_list() -> None:
    for name in ("reviews.", "reviews.default.", "reviews.default.svc.", FQDN + "."):
        reply = ask(PROXY, name)
        assert reply.rcode() == dns.rcode.NOERROR, name
        assert addresses(reply) == ["10.96.0.12"], name
        assert reply.answer[0].name.to_text() == name  # answered under the name asked


def test_cluster_service_answers_fqdn_only() -> None:
    assert addresses(ask(CLUSTER, "reviews.default.svc.cluster.local.")) == ["10.96.0.12"]
    assert ask(CLUSTER, "reviews.").rcode() == dns.rcode.NXDOMAIN


def test_unknown_name_is_nxdomain() -> None:
    reply = ask(PROXY, "example.com.")
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert not reply.answer
    assert not reply.flags & dns.flags.RA  # nothing is forwarded


def test_aaaa_of_an_a_only_name_is_nodata() -> None:
    reply = ask(PROXY, "reviews.default.svc.cluster.local.", "AAAA")
    assert reply.rcode() == dns.rcode.NOERROR
    assert not reply.answer


def test_malformed_query_gets_formerr_with_its_id() -> None:
    garbage = b"\x12\x34" + b"\xff" * 9
    wire = answer(garbage, PROXY)
    assert wire is not None
    assert struct.unpack("!H", wire[:2])[0] == 0x1234
    assert dns.message.from_wire(wire).rcode() == dns.rcode.FORMERR
    assert answer(b"\x01", PROXY) is None  # no id to answer with: dropped


def test_a_response_is_never_answered() -> None:
    reply = ask(PROXY, "reviews.")
    assert answer(reply.to_wire(), PROXY) is None


def test_server_keeps_serving_after_garbage() -> None:
    """UDP garbage gets FORMERR, TCP garbage closes that connection; then a query works."""

    async def scenario() -> tuple[int, int, list[str], bytes]:
        udp, tcp = bind_sockets("127.0.0.1", 0)
        port_udp, port_tcp = udp.getsockname()[1], tcp.getsockname()[1]
        task = asyncio.create_task(serve(lambda _peer: PROXY, udp, tcp))
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.setblocking(False)
        await loop.sock_connect(client, ("127.0.0.1", port_udp))
        await loop.sock_sendall(client, b"\xab\xcd\x00")
        bad = dns.message.from_wire(await loop.sock_recv(client, 512)).rcode()
        reader, writer = await asyncio.open_connection("127.0.0.1", port_tcp)
        writer.write(b"\x00\x05hello")  # a 5-byte "message": FORMERR, then a cut-short one
        await writer.drain()
        length = struct.unpack("!H", await reader.readexactly(2))[0]
        tcp_bad = dns.message.from_wire(await reader.readexactly(length)).rcode()
        writer.close()
        query = dns.message.make_query("reviews", "A").to_wire()
        await loop.sock_sendall(client, query)
        good = dns.message.from_wire(await loop.sock_recv(client, 512))
        reader, writer = await asyncio.open_connection("127.0.0.1", port_tcp)
        writer.write(struct.pack("!H", len(query)) + query)
        length = struct.unpack("!H", await reader.readexactly(2))[0]
        tcp_good = await reader.readexactly(length)
        writer.close()
        client.close()
        task.cancel()
        return bad, tcp_bad, addresses(good), tcp_good

    bad, tcp_bad, good, tcp_good = asyncio.run(scenario())
    assert bad == dns.rcode.FORMERR
    assert tcp_bad == dns.rcode.FORMERR
    assert good == ["10.96.0.12"]
    assert addresses(dns.message.from_wire(tcp_good)) == ["10.96.0.12"]


def test_kube_proxy_sends_port_53_to_the_dns_pod() -> None:
    rules = render_service_rules([], dns=("10.96.0.2", "10.244.1.9"))
    for proto in ("udp", "tcp"):
        assert (
            f"-A KUBE-SERVICES -d 10.96.0.2/32 -p {proto} -m {proto} --dport 53"
            " -j DNAT --to-destination 10.244.1.9:53"
        ) in rules
