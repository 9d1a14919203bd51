"""Process layout decisions that need no processes: GPU per data-parallel core, API-server count, the
API servers' listening sockets."""

from __future__ import annotations

import contextlib
import socket

import pytest

from server.config import Settings
from server.hardware import api_servers
from server.processes import core_device, listening_sockets

pytestmark = pytest.mark.unit


def test_each_data_parallel_core_gets_its_own_gpu() -> None:
    assert [core_device(i, None) for i in range(2)] == ["0", "1"]
    assert [core_device(i, "3, 5") for i in range(2)] == ["3", "5"]  # within the devices the server may use
    with pytest.raises(ValueError, match="no GPU"):
        core_device(2, "3,5")


def test_tensor_parallel_cores_take_consecutive_gpus() -> None:
    assert [core_device(i, None, per_core=2) for i in range(2)] == ["0,1", "2,3"]
    assert [core_device(i, "4,5,6,7", per_core=2) for i in range(2)] == ["4,5", "6,7"]
    with pytest.raises(ValueError, match="no GPU"):
        core_device(1, "4,5,6", per_core=2)


def test_api_server_count() -> None:
    assert api_servers(Settings(api_servers=3)) == 3
    assert api_servers(Settings(engine_core="thread")) == 1
    with pytest.raises(ValueError, match="one API server"):
        Settings(engine_core="thread", api_servers=2)


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="the kernel balances only with SO_REUSEPORT")
def test_each_api_server_listens_on_a_socket_of_its_own() -> None:
    socks = listening_sockets("127.0.0.1", 0, 3)
    try:
        assert len({id(s) for s in socks}) == 3
        assert len({s.getsockname()[1] for s in socks}) == 1  # one port
        for sock in socks:
            sock.listen()
        clients = [socket.create_connection(socks[0].getsockname()) for _ in range(32)]
        accepted = 0
        for sock in socks:  # every connection queued on exactly one of the sockets
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:
                    sock.accept()[0].close()
                    accepted += 1
        assert accepted == len(clients)
        for client in clients:
            client.close()
        with pytest.raises(SystemExit):  # the port is taken, even for sockets that would join a group
            listening_sockets("127.0.0.1", socks[0].getsockname()[1], 2)
    finally:
        for sock in socks:
            sock.close()


def test_one_api_server_keeps_one_socket() -> None:
    socks = listening_sockets("127.0.0.1", 0, 1)
    socks[0].close()
    assert len(socks) == 1
