"""The HBONE drivers on loopback: PING keepalive, Istio's stream limits in the pool and the
release of idle pooled connections (short timers; Istio's defaults are in `timers`)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest
from hbone_support import Identities, echo_until_eof, run, tunnel, upstream

from testbed.mesh.hbone import frames as fr
from testbed.mesh.hbone.server import ServerConnection
from testbed.mesh.hbone.testcerts import TestPki
from testbed.mesh.hbone.timers import (
    ENV_PING_INTERVAL,
    ENV_PING_TIMEOUT,
    ENV_POOL_IDLE_TIMEOUT,
    HboneTimers,
    TimerError,
)
from testbed.mesh.proxy import shell
from testbed.mesh.proxy.shell import ProxyProcess

# Short, yet a PING's ACK may be late by a loaded machine's scheduling delay without harm.
FAST = HboneTimers(ping_interval=0.2, ping_timeout=1.0)


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> Identities:
    pki = TestPki(Path(tmp_path_factory.mktemp("pki")))
    return Identities(pki, pki.identity("ns-b", "sa-b"), pki.identity("ns-a", "sa-a"))


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"hello")
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(5), 5)


def only_server_connection(connections: set[ServerConnection]) -> ServerConnection:
    (conn,) = connections
    assert conn.transport is not None
    return conn


# -- keepalive -----------------------------------------------------------------------------
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_silent_server_is_detected_its_streams_reset_and_the_pool_drops_it(
    ids: Identities, loop: str
) -> None:
    async def main() -> None:
        async with upstream(echo_until_eof) as authority, tunnel(ids, timers=FAST) as t:
            reader, writer, relay = await t.open(authority)
            assert await echo(reader, writer) == b"hello"
            (client_conn,) = t.client.connections()
            server_conn = only_server_connection(t.server.connections)
            assert server_conn.transport is not None
            server_conn.transport.pause_reading()  # alive for TCP, silent for HTTP/2
            started = asyncio.get_running_loop().time()
            await asyncio.wait_for(client_conn.closed, 5)
            assert asyncio.get_running_loop().time() - started < 0.2 + 1.0 + 3.0
            assert "no PING ACK within 1 s" in (client_conn.close_reason or "")
            stats = await asyncio.wait_for(relay, 5)
            assert stats.reset and "no PING ACK" in (stats.error or "")  # the app side: reset
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert t.client.connections() == []
            reader, writer, _ = await t.open(authority)  # a fresh connection serves again
            assert await echo(reader, writer) == b"hello"
            assert t.client.connections()[0] is not client_conn
            writer.close()

    run(main(), loop)


def test_a_silent_client_is_detected_by_the_server(ids: Identities) -> None:
    async def main() -> None:
        async with (
            upstream(echo_until_eof) as authority,
            tunnel(ids, server_options={"timers": FAST}) as t,
        ):
            reader, writer, _ = await t.open(authority)
            assert await echo(reader, writer) == b"hello"
            server_conn = only_server_connection(t.server.connections)
            (client_conn,) = t.client.connections()
            assert client_conn.transport is not None
            client_conn.transport.pause_reading()
            await asyncio.wait_for(server_conn.closed, 5)
            assert "no PING ACK" in (server_conn.close_reason or "")
            stats = await asyncio.wait_for(t.closed.get(), 5)  # the upstream side ended
            assert stats.reset
            writer.close()

    run(main())


def test_an_answering_peer_keeps_the_connection_through_many_pings(ids: Identities) -> None:
    async def main() -> None:
        async with (
            upstream(echo_until_eof) as authority,
            tunnel(ids, server_options={"timers": FAST}, timers=FAST) as t,
        ):
            reader, writer, _ = await t.open(authority)
            (client_conn,) = t.client.connections()
            await asyncio.sleep(2.5)  # a dozen intervals, idle
            assert not client_conn.closed.done() and client_conn.close_reason is None
            assert await echo(reader, writer) == b"hello"
            assert t.client.connections() == [client_conn]
            writer.close()

    run(main())


# -- the server's stream limit, honoured by the pool ---------------------------------------
def test_the_pool_opens_a_new_connection_when_the_server_allows_no_more_streams(
    ids: Identities,
) -> None:
    async def main() -> None:
        async with (
            upstream(echo_until_eof) as authority,
            tunnel(ids, server_options={"max_streams": 2}) as t,
        ):
            opened = [await t.open(authority) for _ in range(5)]
            for reader, writer, _ in opened:
                assert await echo(reader, writer) == b"hello"
            conns = t.client.connections()
            assert [len(c.streams) for c in conns] == [2, 2, 1]
            assert all(c.proto.peer_max_streams == 2 for c in conns)
            for _, writer, _ in opened:
                writer.close()

    run(main())


def test_the_pool_keeps_to_its_own_100_under_the_servers_200(ids: Identities) -> None:
    async def main() -> None:
        async with upstream(echo_until_eof) as authority, tunnel(ids) as t:
            opened = [await t.open(authority) for _ in range(101)]
            conns = t.client.connections()
            assert [len(c.streams) for c in conns] == [100, 1]
            assert conns[0].proto.peer_max_streams == 200
            for _, writer, _ in opened:
                writer.close()

    run(main())


# -- idle release --------------------------------------------------------------------------
IDLE = HboneTimers(pool_idle_timeout=0.3)


def test_an_unused_connection_is_released_with_goaway_and_a_new_request_opens_another(
    ids: Identities,
) -> None:
    async def main() -> None:
        async with upstream(echo_until_eof) as authority, tunnel(ids, timers=IDLE) as t:
            reader, writer, relay = await t.open(authority)
            assert await echo(reader, writer) == b"hello"
            writer.write_eof()
            await asyncio.wait_for(relay, 5)
            writer.close()
            (first,) = t.client.connections()
            server_side = only_server_connection(t.server.connections)
            await asyncio.sleep(0.15)
            assert not first.closed.done()  # not unused for long enough yet
            await asyncio.wait_for(first.closed, 2)
            await asyncio.wait_for(server_side.closed, 2)
            assert server_side.proto.goaway_code == fr.NO_ERROR
            assert t.client.connections() == []
            reader, writer, _ = await t.open(authority)
            assert await echo(reader, writer) == b"hello"
            (second,) = t.client.connections()
            assert second is not first
            writer.close()

    run(main())


def test_a_released_connection_finishes_its_streams_before_closing(ids: Identities) -> None:
    async def main() -> None:
        async with upstream(echo_until_eof) as authority, tunnel(ids, timers=IDLE) as t:
            reader, writer, relay = await t.open(authority)
            (first,) = t.client.connections()
            await asyncio.sleep(0.5)  # past the idle timeout, the stream still open
            assert first.released and not first.closed.done()
            assert await echo(reader, writer) == b"hello"  # the stream still works
            other_reader, other_writer, _ = await t.open(authority)  # but gets no new ones
            second = next(c for c in t.client.connections() if c is not first)
            assert len(second.streams) == 1
            writer.write_eof()
            await asyncio.wait_for(relay, 5)
            await asyncio.wait_for(first.closed, 2)  # its last stream ended: GOAWAY, close
            assert await echo(other_reader, other_writer) == b"hello"
            writer.close()
            other_writer.close()

    run(main())


def test_a_connection_in_use_is_not_released(ids: Identities) -> None:
    async def main() -> None:
        async with upstream(echo_until_eof) as authority, tunnel(ids, timers=IDLE) as t:
            opened = []
            for _ in range(6):  # a new stream every 0.1 s: never 0.3 s unused
                opened.append(await t.open(authority))
                await asyncio.sleep(0.1)
            (conn,) = t.client.connections()
            assert not conn.released
            for _, writer, _ in opened:
                writer.close()

    run(main())


# -- the timers and their environment overrides --------------------------------------------
def test_the_defaults_are_istios() -> None:
    assert HboneTimers.from_env({}) == HboneTimers(10.0, 20.0, 300.0)


def test_the_environment_overrides_the_timers() -> None:
    env = {ENV_PING_INTERVAL: "500ms", ENV_PING_TIMEOUT: "1.5", ENV_POOL_IDLE_TIMEOUT: "2m"}
    assert HboneTimers.from_env(env) == HboneTimers(0.5, 1.5, 120.0)


@pytest.mark.parametrize("value", ["", "abc", "0", "-1s", "5h"])
def test_a_bad_timer_value_names_the_variable(value: str) -> None:
    with pytest.raises(TimerError, match=f"{ENV_POOL_IDLE_TIMEOUT}=.*positive duration"):
        HboneTimers.from_env({ENV_POOL_IDLE_TIMEOUT: value})


def test_a_proxy_with_a_bad_timer_variable_exits_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def never(args: argparse.Namespace) -> ProxyProcess:
        raise AssertionError("the proxy must not be built")

    monkeypatch.setenv(ENV_PING_TIMEOUT, "soon")
    with pytest.raises(SystemExit) as exited:
        shell.main(argparse.ArgumentParser(prog="ztunnel"), [], never, lambda args: "test")
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        f"ztunnel: {ENV_PING_TIMEOUT}='soon': expected a positive duration such as 1.5, "
        "500ms, 10s or 5m\n"
    )
