"""``python -m server``: parse settings from the CLI and environment, then serve: one process with the
engines on threads, or a supervisor over engine-core and API-server processes (server/processes.py)."""

from __future__ import annotations

import logging
import sys

import uvicorn

from server.app import create_app
from server.config import Settings
from server.draining import DrainingServer
from server.hardware import engines_in_process
from server.logs import configure_logging
from server.processes import Supervisor

log = logging.getLogger("server")


def main(argv: list[str] | None = None) -> None:
    settings = Settings.from_cli(sys.argv[1:] if argv is None else argv)
    configure_logging(settings.log_level)
    if not engines_in_process(settings):
        sys.exit(Supervisor(settings).run())
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
