"""The load generator's CLI over real sockets, against a tiny stdlib HTTP server on 127.0.0.1 speaking the
documented /generate wire format (whole JSON and SSE): argument plumbing, report output, exit statuses."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from load_tests.loadgen import cli

pytestmark = pytest.mark.integration


class _StubGenerate(BaseHTTPRequestHandler):
    """Minimal /generate speaking the documented wire format (whole JSON or SSE)."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for piece in ("Hello", " world"):
                self.wfile.write(f"data: {json.dumps({'text': piece})}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.005)
            final = {
                "text": "",
                "finish_reason": "stop",
                "usage": {"prompt_tokens": 3, "completion_tokens": 2},
            }
            self.wfile.write(f"data: {json.dumps(final)}\n\n".encode())
        else:
            out = json.dumps(
                {
                    "text": "Hello",
                    "finish_reason": "stop",
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1},
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stub_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubGenerate)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_cli_end_to_end_over_loopback(stub_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(
        [
            "--url",
            stub_url,
            "--scenario",
            "generate-stream",
            "--concurrency",
            "1,2",
            "--requests",
            "6",
            "--duration",
            "20",
            "--timeout",
            "5",
            "--no-progress",
            "--out",
            str(tmp_path),
            "--raw",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "| c=1 |" in out and "| c=2 |" in out
    doc = json.loads((tmp_path / "results.json").read_text())
    assert [lv["ok"] for lv in doc["levels"]] == [6, 6]
    rec = doc["levels"][0]["records"][0]
    assert rec["status"] == 200 and rec["output_tokens"] == 2 and len(rec["itl"]) == 1 and rec["ttft"] > 0
    rc = cli.main(
        [
            "--url",
            stub_url,
            "--scenario",
            "generate",
            "--rate",
            "50",
            "--requests",
            "5",
            "--duration",
            "10",
            "--no-progress",
        ]
    )
    assert rc == 0
    # nothing listening: every request is a connection error, exit status 1
    rc = cli.main(["--url", "http://127.0.0.1:9", "--requests", "2", "--duration", "5", "--no-progress"])
    assert rc == 1
