"""``python -m server``: parse settings from the CLI and environment, then serve with uvicorn."""

from __future__ import annotations

import logging
import sys

import uvicorn

from server.app import create_app
from server.config import Settings
from server.request_id import RequestIdFilter


def main(argv: list[str] | None = None) -> None:
    settings = Settings(_cli_parse_args=sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
    # access_log=False: server.access (server/request_id.py) writes the access lines, with request ids.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
    )


if __name__ == "__main__":
    main()
