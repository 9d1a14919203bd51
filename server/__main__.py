"""``python -m server``: parse settings from the CLI and environment, then serve: one process with the
engines on threads, or a supervisor over engine-core and API-server processes (server/processes.py)."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# Set before torch loads GNU OpenMP, which reads them once. The engine steps on a thread of its own and other
# threads (model loading, the classifier) keep OpenMP thread pools too; with more pool threads than cores
# OpenMP stops spinning between parallel regions and wakes its workers through the kernel for each one,
# which on a 2-vCPU machine made every decode step taken from the engine thread several times slower than the
# same step on the main thread (load_tests/results/cpu_vs_llamacpp/background_compile/). Spinning a while
# (not forever: idle pools must give their cores back) keeps the engine thread's regions fast.
# Explicit values in the environment win.
OPENMP_WAIT = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "1000000"}


def openmp_defaults(environ: MutableMapping[str, str]) -> None:
    """OPENMP_WAIT into ``environ`` where it does not name them already."""
    for name, value in OPENMP_WAIT.items():
        environ.setdefault(name, value)


openmp_defaults(os.environ)

import logging  # noqa: E402
import sys  # noqa: E402

from server.config import Settings  # noqa: E402
from server.hardware import engines_in_process  # noqa: E402
from server.logs import configure_logging  # noqa: E402

log = logging.getLogger("server")


def main(argv: list[str] | None = None) -> None:
    """The supervisor imports neither torch nor the app: its processes do, all at once, as soon as it starts
    them. (Deciding the layout needs torch in one case only: ``engine_core=auto`` with one API server and one
    engine, where CUDA's presence decides between one process and a supervisor.)"""
    settings = Settings.from_cli(sys.argv[1:] if argv is None else argv)
    configure_logging(settings.log_level)
    if not engines_in_process(settings):
        from server.processes import Supervisor

        sys.exit(Supervisor(settings).run())
    import uvicorn

    from server.app import create_app
    from server.draining import DrainingServer

    app = create_app(settings)
    # access_log=False: server.access (server/request_id.py) writes the access lines, with request ids.
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    DrainingServer(config, app.state.admission, settings.shutdown_grace_s, settings.header_read_timeout_s).run()


if __name__ == "__main__":
    main()
