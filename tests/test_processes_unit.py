"""Process layout decisions that need no processes: GPU per data-parallel core, API-server count."""

from __future__ import annotations

import pytest

from server.config import Settings
from server.hardware import api_servers
from server.processes import core_device

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
