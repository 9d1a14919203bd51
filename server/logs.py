"""Log format and filters shared by every process of the server."""

from __future__ import annotations

import logging

from server.request_id import RequestIdFilter


def configure_logging(level: str) -> None:
    """Every line carries the request id it was written for (``-`` outside a request)."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
