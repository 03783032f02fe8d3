"""``shoptune.serve.testing.app_in_thread``: the in-process uvicorn the HTTP tests stand on."""
import socket

import httpx
import pytest
from fastapi import FastAPI

from shoptune.serve.testing import app_in_thread


def _app():
    app = FastAPI()

    @app.get("/ping")
    def ping():
        return {"ok": True}

    return app


def test_serves_and_stops():
    with app_in_thread(_app()) as url:
        assert httpx.get(f"{url}/ping").json() == {"ok": True}
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/ping", timeout=2)


def test_a_server_that_cannot_start_is_an_error_not_a_hang():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"did not start on 127.0.0.1:{port}"):
            with app_in_thread(_app(), port=port, start_timeout=10):
                pass
