"""What one client may send, against a real server (issue 14, items 1 and 4 to 8): an oversized
body or prompt is refused within a second while /health keeps answering within 100 ms, prompts
are tokenized off the event loop, streamed choices finish once each, lone surrogates are 400s,
slow bodies and idle connections are cut off (but a kept-alive one only at the header
timeout), and the metrics count aborts and hang-ups right.
The limits and their defaults are in docs/server.md."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time

import httpx
import pytest
from server_helpers import (
    BODY_TIMEOUT,
    HEADER_TIMEOUT,
    ServerProcess,
    Stream,
    start_server,
    wait_idle,
)


def _head(path: str, server: ServerProcess, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def _connect(server: ServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.settimeout(30)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """What the server sends until it closes (a reset, when it left part of a body unread)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


# ------------------------------------------------------------------- item 1: size and time


_POLL_HEALTH = """
import sys, time, httpx
with httpx.Client(timeout=30) as client:
    while True:
        start = time.monotonic()
        assert client.get(sys.argv[1]).status_code == 200
        print(time.monotonic() - start, flush=True)
        time.sleep(0.02)
"""


class HealthWatch:
    """Polls /health from a process of its own (this one is busy sending bodies) while a block
    runs; `times` are the answers' latencies in seconds."""

    def __init__(self, server: ServerProcess) -> None:
        self.url = f"{server.base_url}/health"
        self.times: list[float] = []

    def __enter__(self) -> HealthWatch:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _POLL_HEALTH, self.url], stdout=subprocess.PIPE, text=True
        )
        time.sleep(1.0)  # started and polling
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.1)
        self._proc.terminate()
        out, _ = self._proc.communicate(timeout=30)
        self.times = [float(line) for line in out.split()]

    @property
    def worst(self) -> float:
        return max(self.times)


def timed_post(server: ServerProcess, path: str, content: bytes) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    r = httpx.post(
        server.base_url + path,
        content=content,
        headers={**server.headers, "content-type": "application/json"},
        timeout=60,
    )
    return r, time.monotonic() - start


def test_an_oversized_body_gets_413_within_a_second(server):
    """200 MB announced by Content-Length: refused unread, within a second of the headers. The
    same body sent by httpx, which writes it whole before it reads, still gets its 413, and so
    does 16 MB without a Content-Length (chunked), refused once the bytes read pass the limit."""
    limit = 4 << 20  # the default
    body = b'{"prompt": "' + b"x" * (200 << 20) + b'"}'
    with HealthWatch(server) as health:
        sock = _connect(server)
        start = time.monotonic()
        sock.sendall(_head("/v1/completions", server, len(body)) + body[: 1 << 16])
        answer = _read_until_closed(sock)
        took = time.monotonic() - start
        sock.close()
        r, _ = timed_post(server, "/v1/completions", body)

        def chunks():  # no Content-Length: found out while reading
            for i in range(0, 16 << 20, 1 << 20):
                yield body[i : i + (1 << 20)]

        chunked = httpx.post(
            server.base_url + "/v1/chat/completions",
            content=chunks(),
            headers=server.headers,
            timeout=60,
        )
    assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer, answer[:300]
    assert took < 1.0, took
    for response in (r, chunked):
        assert response.status_code == 413, response.text
        err = response.json()["error"]
        assert err["code"] == "request_too_large" and str(limit) in err["message"]
    assert health.worst < 0.1, f"/health took {health.worst:.3f} s"
    assert server.metric("nucleus_requests_rejected_total", 'reason="body_too_large"') >= 3


def test_a_prompt_too_long_for_the_context_gets_400_before_it_is_tokenized(server):
    """3 MB of text cannot fit 8,192 tokens, whatever the tokens: refused on its length alone."""
    huge = json.dumps({"prompt": "hello world " * 250_000, "max_tokens": 1}).encode()
    messages = [{"role": "user", "content": "hello world " * 250_000}]
    huge_chat = json.dumps({"messages": messages, "max_tokens": 1}).encode()
    with HealthWatch(server) as health:
        r, took = timed_post(server, "/v1/completions", huge)
        chat, took_chat = timed_post(server, "/v1/chat/completions", huge_chat)
    assert r.status_code == 400 and chat.status_code == 400, (r.text, chat.text)
    assert r.json()["error"]["code"] == chat.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "prompt" and chat.json()["error"]["param"] == "messages"
    assert took < 1.0 and took_chat < 1.0, (took, took_chat)
    assert health.worst < 0.1, f"/health took {health.worst:.3f} s"


def test_long_prompts_are_tokenized_off_the_event_loop(server):
    """Text short enough to be tokenized (about a second of work) but too long in tokens: the
    server tokenizes it in a worker thread, and /health answers meanwhile."""
    text = "hello world, this is some text. " * 20_000  # 640,000 characters, 140,000 tokens
    body = json.dumps({"prompt": text, "max_tokens": 1}).encode()
    chat = json.dumps({"messages": [{"role": "user", "content": text}]}).encode()
    with HealthWatch(server) as health:
        r, _ = timed_post(server, "/v1/completions", body)
        c, _ = timed_post(server, "/v1/chat/completions", chat)
    for response in (r, c):
        assert response.status_code == 400, response.text
        err = response.json()["error"]
        assert err["code"] == "context_length_exceeded" and "tokens" in err["message"]
    assert len(health.times) >= 5 and health.worst < 0.1, f"/health took {health.worst:.3f} s"


# ------------------------------------------------------------ item 4: streamed n > 1 finishes


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streamed_n_3_gives_each_choice_one_finishing_chunk(server, path):
    """The choices end at different steps (a stop string each meets in its own time); each ends
    with exactly one chunk carrying its finish_reason, and nothing of it comes after."""
    body = {"n": 3, "max_tokens": 40, "temperature": 1.0, "seed": 3, "stop": ["e"]}
    if path == "/v1/completions":
        body["prompt"] = "Tell me a story:"
    else:
        body["messages"] = [{"role": "user", "content": "Tell me a story."}]
    stream = Stream(server, path, body)
    stream.run()  # in this thread
    chunks = [json.loads(line[len("data: ") :]) for line in stream.lines]
    finishes: dict[int, list[int]] = {0: [], 1: [], 2: []}
    last: dict[int, int] = {}
    for at, chunk in enumerate(chunks):
        for choice in chunk["choices"]:
            last[choice["index"]] = at
            if choice["finish_reason"] is not None:
                finishes[choice["index"]].append(at)
    assert all(len(f) == 1 for f in finishes.values()), finishes
    assert all(last[i] == finishes[i][0] for i in finishes), (last, finishes)
    assert len({f[0] for f in finishes.values()}) > 1, "all ended at once: the case is not met"


# ------------------------------------------------------------------------ item 5: surrogates


@pytest.mark.parametrize(
    ("path", "field", "param"),
    [
        ("/v1/completions", '"prompt": "a\\ud800b"', "prompt"),
        ("/v1/completions", '"prompt": ["ok", "\\udfff"]', "prompt"),
        ("/v1/completions", '"prompt": "x", "model": "\\ud800"', "model"),
        ("/v1/completions", '"prompt": "x", "stop": ["\\ud83d"]', "stop"),
        ("/v1/completions", '"prompt": "x", "user": "\\udc00"', "user"),
        ("/v1/chat/completions", '"messages": [{"role": "user", "content": "\\ud800"}]', None),
        (
            "/v1/chat/completions",
            '"messages": [{"role": "user", "content": "x"}], "model": "\\ud800"',
            "model",
        ),
    ],
)
def test_lone_surrogates_are_400(server, path, field, param):
    r, _ = timed_post(server, path, ("{" + field + ', "max_tokens": 1}').encode())
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "surrogate" in err["message"]
    if param is not None:
        assert err["param"] == param
    # a valid pair (an emoji) is text
    ok, _ = timed_post(server, "/v1/completions", b'{"prompt": "\\ud83d\\ude00", "max_tokens": 1}')
    assert ok.status_code == 200


# --------------------------------------------------------------- item 7: slow and idle clients


def test_slow_bodies_get_408_and_idle_connections_are_closed(server):
    head = _head("/v1/completions", server, 100)
    start = time.monotonic()
    slow_bodies = [_connect(server) for _ in range(20)]
    for sock in slow_bodies:
        sock.sendall(head + b'{"prompt": "x"')  # 14 bytes of 100, and then nothing
    idle = [_connect(server) for _ in range(5)]  # nothing at all
    trickling = _connect(server)  # a head that never ends, a byte a second
    trickling.sendall(b"GET /health HTTP/1.1\r\n")
    trickled_until = time.monotonic()
    trickling.settimeout(1.0)
    while time.monotonic() - start < HEADER_TIMEOUT + 5:
        try:
            if trickling.recv(1) == b"":
                break
        except TimeoutError:
            try:
                trickling.sendall(b"X")
                trickled_until = time.monotonic()
            except OSError:
                break
        except OSError:
            break
    for sock in slow_bodies:
        answer = _read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"request_timeout" in answer
    for sock in idle:
        assert _read_until_closed(sock) == b""
    took = time.monotonic() - start
    for sock in (*slow_bodies, *idle, trickling):
        sock.close()
    assert took < max(BODY_TIMEOUT, HEADER_TIMEOUT) + 5, took
    assert trickled_until - start < HEADER_TIMEOUT + 2, "the trickling connection stayed open"
    assert server.metric("nucleus_requests_rejected_total", 'reason="body_timeout"') >= 20


@pytest.mark.slow
def test_an_idle_kept_alive_connection_stays_open_until_the_header_timeout():
    """Clients reuse an idle connection for up to 5 s (httpx and the openai client): a server that
    closed it at 5 s (uvicorn's keep-alive default) would reset a request sent at that moment
    (httpx.ReadError). Oracle: the connection, idle past 5 s, answers on the same socket."""
    server = start_server("--header-timeout", "12")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("GET", "/health")
        assert conn.getresponse().read()
        local = conn.sock.getsockname()
        time.sleep(6.5)
        conn.request("GET", "/health")  # http.client reopens only a socket it closed itself
        response = conn.getresponse()
        assert response.status == 200 and response.read()
        assert conn.sock.getsockname() == local
        conn.close()
    finally:
        assert server.stop() == 0, server.log()[-4000:]


# -------------------------------------------------------------------------------- item 8: metrics


def test_aborts_and_hang_ups_mid_upload_are_counted_as_such(server):
    before_abort = server.metric("nucleus_request_finish_total", 'finish_reason="abort"')
    route = 'route="/v1/completions",status="{}"'
    before_400 = server.metric("nucleus_requests_total", route.format(400))
    before_499 = server.metric("nucleus_requests_total", route.format(499))

    stream = Stream(
        server,
        "/v1/completions",
        {"prompt": "Tell me", "n": 2, "max_tokens": 500, "ignore_eos": True},
    )
    stream.start()
    assert stream.first.wait(60)
    stream.close()  # the client hangs up mid-stream: its 2 sequences are aborted

    sock = _connect(server)
    sock.sendall(_head("/v1/completions", server, 1000) + b'{"prompt": ')
    time.sleep(0.5)
    sock.close()  # hung up while sending the body

    assert wait_idle(server) == (0, 0, 0)
    deadline = time.monotonic() + 10
    while server.metric("nucleus_requests_total", route.format(499)) < before_499 + 1:
        assert time.monotonic() < deadline, server.metrics()
        time.sleep(0.1)
    assert (
        server.metric("nucleus_request_finish_total", 'finish_reason="abort"') == before_abort + 2
    )
    assert server.metric("nucleus_requests_total", route.format(400)) == before_400
