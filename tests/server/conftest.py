"""Fixtures: a real `nucleus` server process on a free 127.0.0.1 port, serving the default model.

See server_helpers.py. Only test_server_protocol_unit.py uses the FAKE engine (in-process unit
tests of the protocol and error mapping); everything else talks to a real server process.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from server_helpers import (
    BODY_TIMEOUT,
    HEADER_TIMEOUT,
    MAX_WAITING,
    SHUTDOWN_TIMEOUT,
    ServerProcess,
    start_server,
)


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    srv = start_server(
        *("--max-waiting", str(MAX_WAITING), "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)),
        *("--body-timeout", str(BODY_TIMEOUT), "--header-timeout", str(HEADER_TIMEOUT)),
    )
    try:
        yield srv
    finally:
        code = srv.stop()  # (test_sigterm_graceful_shutdown, run last, may have stopped it)
        assert code == 0, f"server exited with {code}:\n{srv.log()[-4000:]}"


@pytest.fixture(scope="session")
def client(server: ServerProcess):
    import openai

    with openai.OpenAI(
        api_key=server.api_key, base_url=f"{server.base_url}/v1", max_retries=0, timeout=120
    ) as c:
        yield c


def pytest_collection_modifyitems(config, items):
    """Tests marked `server_last` (they stop the shared server) run after all the others."""
    items.sort(key=lambda item: item.get_closest_marker("server_last") is not None)


def pytest_configure(config):
    config.addinivalue_line("markers", "server_last: stops the shared server; runs last")
