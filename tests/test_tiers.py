"""The tier check in tests/conftest.py, on throwaway test files run by pytest in this process."""

from __future__ import annotations

import asyncio
import time

import pytest

pytestmark = pytest.mark.unit

REAL_SLEEP, REAL_ASYNC_SLEEP = time.sleep, asyncio.sleep  # as imported, before any test patches them

CONFTEST = """
import pytest

from tests.conftest import _unit_tests_do_not_sleep, pytest_collection_modifyitems  # under test


@pytest.fixture
def client():
    return "stands in for the ASGI client on the real models"


def pytest_configure(config):
    for tier in ("unit", "integration", "live"):
        config.addinivalue_line("markers", tier)
"""


@pytest.fixture
def run(pytester: pytest.Pytester):
    """Writes ``source`` as a test module next to a conftest with the hook, runs pytest on it."""

    def go(source: str, *args: str) -> pytest.RunResult:
        pytester.makeconftest(CONFTEST)
        pytester.makepyfile(test_sample=source)
        with pytest.MonkeyPatch.context() as mp:  # this test's own no-sleep guard off for the inner run
            mp.setattr(time, "sleep", REAL_SLEEP)
            mp.setattr(asyncio, "sleep", REAL_ASYNC_SLEEP)
            return pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:asyncio", "-v", *args)

    return go


def test_an_unmarked_test_stops_the_run_and_says_how_to_mark_it(run) -> None:
    result = run("def test_plain():\n    assert True\n")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*1 test(s) without exactly one valid tier*pytestmark = pytest.mark.unit*"])
    result.stderr.fnmatch_lines(["*test_sample.py::test_plain: tiers none"])


def test_an_unmarked_test_stops_a_run_of_one_tier_too(run) -> None:
    source = "import pytest\n\n@pytest.mark.unit\ndef test_a():\n    pass\n\ndef test_plain():\n    pass\n"
    result = run(source, "-m", "unit")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_sample.py::test_plain: tiers none"])


def test_two_tiers_are_refused(run) -> None:
    source = "import pytest\n\npytestmark = pytest.mark.integration\n\n@pytest.mark.live\ndef test_both():\n    pass\n"
    result = run(source)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_sample.py::test_both: tiers ?'integration', 'live'?"])


def test_a_unit_test_on_the_real_models_is_refused(run) -> None:
    source = "import pytest\n\n@pytest.mark.unit\ndef test_api(client):\n    assert client\n"
    result = run(source)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_sample.py::test_api: a unit test using client"])


def test_marked_tests_run_unit_first(run) -> None:
    source = (
        "import pytest\n\n"
        "@pytest.mark.live\ndef test_live():\n    pass\n\n"
        "@pytest.mark.integration\ndef test_integration(client):\n    assert client\n\n"
        "@pytest.mark.unit\ndef test_unit():\n    pass\n"
    )
    result = run(source)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*::test_unit PASSED*", "*::test_integration PASSED*", "*::test_live PASSED*"])


def test_a_unit_test_that_sleeps_fails_unless_on_the_virtual_clock(run) -> None:
    source = (
        "import asyncio, time\n\nimport pytest\n\nfrom tests.virtual_clock import run_virtual\n\n"
        "@pytest.mark.unit\ndef test_sleeps():\n    time.sleep(0.01)\n\n"
        "@pytest.mark.unit\ndef test_sleeps_on_a_real_loop():\n    asyncio.run(asyncio.sleep(0.01))\n\n"
        "@pytest.mark.unit\ndef test_sleeps_on_the_virtual_clock():\n    run_virtual(asyncio.sleep(3600))\n\n"
        "@pytest.mark.integration\ndef test_integration_may_sleep():\n    time.sleep(0.01)\n"
    )
    result = run(source)
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(["*::test_sleeps FAILED*", "*::test_sleeps_on_a_real_loop FAILED*"])
    result.stdout.fnmatch_lines(["*a unit test slept 0.01 s: use tests/virtual_clock.py or events*"])
