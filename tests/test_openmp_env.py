"""``python -m server`` sets OpenMP's wait policy before torch loads it (server/__main__.py), keeping values
the environment gives."""

from __future__ import annotations

import pytest

from server.__main__ import OPENMP_WAIT, openmp_defaults

pytestmark = pytest.mark.unit


def test_openmp_waits_actively_unless_the_environment_says_otherwise() -> None:
    environ: dict[str, str] = {}
    openmp_defaults(environ)
    assert environ == {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "1000000"} == OPENMP_WAIT
    environ = {"OMP_WAIT_POLICY": "PASSIVE"}
    openmp_defaults(environ)
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000000"}
