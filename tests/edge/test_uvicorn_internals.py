"""What the gateway's protocol (gateway/edge/protocol.py) and cycle (gateway/edge/cycle.py) take from
uvicorn's internals, which no release promises to keep: pyproject.toml pins the versions
this was read against, and this fails, naming what moved, when an upgrade changes any of it."""

from __future__ import annotations

import inspect
from importlib.metadata import version

from uvicorn.protocols.http.flow_control import FlowControl, service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

# The cycle is built positionally, as uvicorn's protocol builds it.
CYCLE_PARAMETERS = [
    "self",
    "scope",
    "transport",
    "flow",
    "logger",
    "access_logger",
    "access_log",
    "default_headers",
    "message_event",
    "expect_100_continue",
    "keep_alive",
    "on_response",
]
# Methods the protocol overrides, extends (super()) or calls.
PROTOCOL_METHODS = [
    "connection_made",
    "connection_lost",
    "data_received",
    "pause_writing",
    "resume_writing",
    "send_400_response",
    "on_response_complete",
    "on_message_begin",
    "on_url",
    "on_header",
    "on_headers_complete",
    "on_body",
    "on_message_complete",
    "timeout_keep_alive_handler",
    "_unset_keepalive_if_required",
    "_should_upgrade",
    "_start_asgi_task",
]
# State the protocol reads or sets on uvicorn's objects once they are made.
PROTOCOL_STATE = [
    "app",
    "app_state",
    "asgi_version",
    "access_log",
    "access_logger",
    "client",
    "connections",
    "cycle",
    "flow",
    "headers",
    "limit_concurrency",
    "logger",
    "parser",
    "pipeline",
    "root_path",
    "scheme",
    "scope",
    "server",
    "server_state",
    "tasks",
    "timeout_keep_alive",
    "transport",
    "url",
    "expect_100_continue",
]
CYCLE_STATE = [
    "body",
    "more_body",
    "disconnected",
    "keep_alive",
    "waiting_for_100_continue",
    "response_started",
    "response_complete",
    "chunked_encoding",
    "expected_content_length",
    "message_event",
    "transport",
    "flow",
    "scope",
    "on_response",
    "default_headers",
    "access_log",
]


def test_uvicorn_is_a_version_the_protocol_was_read_against() -> None:
    major, minor = (int(part) for part in version("uvicorn").split(".")[:2])
    assert (major, minor) == (0, 55), (
        "read gateway/edge/protocol.py and cycle.py against it, then move the pin"
    )


def test_the_cycle_is_built_as_the_protocol_builds_it() -> None:
    assert list(inspect.signature(RequestResponseCycle.__init__).parameters) == CYCLE_PARAMETERS
    assert inspect.iscoroutinefunction(RequestResponseCycle.send)
    assert inspect.iscoroutinefunction(RequestResponseCycle.receive)


def test_the_servers_shutdown_is_there() -> None:
    """gateway/edge/server.py's Server extends it: the drain refuses waiting requests first."""
    import uvicorn

    assert inspect.iscoroutinefunction(uvicorn.Server.shutdown)
    assert list(inspect.signature(uvicorn.Server.shutdown).parameters) == ["self", "sockets"]


def test_the_protocols_methods_are_there() -> None:
    missing = [name for name in PROTOCOL_METHODS if not callable(getattr(HttpToolsProtocol, name, None))]
    assert missing == []
    assert callable(service_unavailable)
    assert {"drain", "pause_reading", "resume_reading"} <= set(dir(FlowControl))


def _assigned(cls: type) -> set[str]:
    """Attributes the class's own methods assign on self."""
    source = inspect.getsource(cls)
    return {line.split("self.", 1)[1].split("=")[0].split(":")[0].strip() for line in source.splitlines()
            if line.strip().startswith("self.") and "=" in line}  # fmt: skip


def test_the_state_the_protocol_reads_is_uvicorns() -> None:
    assert sorted(set(PROTOCOL_STATE) - _assigned(HttpToolsProtocol)) == []
    assert sorted(set(CYCLE_STATE) - _assigned(RequestResponseCycle)) == []
