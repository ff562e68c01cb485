"""Bring runtimes' answers to the shapes OpenAI clients expect, where they differ.

Pure functions over small bodies the proxy has already read: errors (the backend's status
is kept, its message preserved, the envelope made one for every runtime) and model lists
(``None`` means "already right: send the original bytes").
"""

from __future__ import annotations

import re
from typing import Any

import orjson

ERROR_TYPES = {
    400: "invalid_request",
    401: "authentication_error",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "request_too_large",
    422: "invalid_request",
    429: "rate_limit_exceeded",
    501: "unsupported",
    503: "backend_unavailable",
    504: "backend_timeout",
}
TITLE = re.compile(rb"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
MAX_TEXT = 300
ENVELOPE_FIELDS = frozenset({"type", "message", "param", "code", "backend_type"})
# What runtimes say when a prompt does not fit (vLLM, SGLang, TGI, llama.cpp, Ollama, LocalAI).
CONTEXT_LENGTH = re.compile(
    r"maximum context length|context length|context window|exceed_context_size|max_model_len|"
    r"must be <= \d+|longer than the model",
    re.IGNORECASE,
)
MODEL_MISSING = re.compile(r"\bmodel\b", re.IGNORECASE)
# An unregistered route as web frameworks answer it: FastAPI/Starlette (vLLM, SGLang,
# llama-cpp-python, LocalAI's Python backends), Go's net/http and gin (Ollama), axum (TGI: empty).
NO_ROUTE_BODIES = frozenset({b"404 page not found", b""})
NO_ROUTE_DETAILS = ({"detail": "Not Found"}, {"detail": "Method Not Allowed"})


# Anthropic's error types by status (its SDKs choose the exception class by status, as
# OpenAI's do); 529 is its "overloaded".
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_type(status: int) -> str:
    return ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "backend_error" if status >= 500 else "invalid_request")


def route_missing(status: int, body: bytes) -> bool:
    """Whether an answer says the runtime has no such route (as opposed to no such model or
    object): the framework's own 404/405, not one the runtime's code wrote."""
    if status not in {404, 405}:
        return False
    body = body.strip()
    if body in NO_ROUTE_BODIES:
        return True
    try:
        return body.startswith(b"{") and orjson.loads(body) in NO_ROUTE_DETAILS
    except orjson.JSONDecodeError:
        return False


def error_body(status: int, body: bytes, *, model: str | None = None) -> bytes:
    """A backend's error in the gateway's one envelope, whatever the runtime's shape.

    ``type`` comes from the status (the vocabulary of the gateway's own errors), ``message``
    and ``param`` are kept, ``code`` is a string or null (the runtime's own where it is a
    string; ``context_length_exceeded`` and ``model_not_found`` where the message says so),
    the runtime's own type stays in ``backend_type``, and any other field of the runtime's
    error object is kept. ``model`` is the model the request named, if any.
    """
    fields: dict[str, Any] = {}
    runtime_type: Any = None
    code: Any = None
    param: Any = None
    try:
        data: Any = orjson.loads(body) if body.strip() else None
    except orjson.JSONDecodeError:
        data = None
        text = _text_of(body)
        message = f"the backend answered {status} with a body that is not JSON" + (
            f": {text}" if text else ""
        )
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            fields = {k: v for k, v in error.items() if k not in ENVELOPE_FIELDS}
            message, runtime_type = error["message"], error.get("type")
            code, param = error.get("code"), error.get("param")
        elif data.get("object") == "error" and "message" in data:
            # SGLang's flat error.
            message, runtime_type = str(data["message"]), data.get("type")
            code, param = data.get("code"), data.get("param")
        elif isinstance(error, str):
            # TGI: {"error": "...", "error_type": "validation"}
            message, runtime_type = error, data.get("error_type")
        elif "detail" in data:
            message = _detail_message(data["detail"])
        elif isinstance(data.get("message"), str):
            message, runtime_type = data["message"], data.get("type")
        else:
            message = f"the backend answered {status}: {orjson.dumps(data).decode()[:MAX_TEXT]}"
    elif data is not None:
        message = f"the backend answered {status}: {orjson.dumps(data).decode()[:MAX_TEXT]}"
    elif not body.strip():
        message = f"the backend answered {status} with an empty body"
    if not isinstance(code, str) or not code:
        code = _code_for(status, message, runtime_type, model)
    envelope: dict[str, Any] = {
        "type": error_type(status),
        "message": message,
        "param": param if isinstance(param, str) else None,
        "code": code,
    }
    if isinstance(runtime_type, str) and runtime_type:
        envelope["backend_type"] = runtime_type
    return orjson.dumps({"error": {**envelope, **fields}})


def anthropic_error_body(status: int, body: bytes) -> bytes:
    """A backend's error on Anthropic's routes in Anthropic's envelope, with Anthropic's type
    for the status (vLLM puts its exception names there, as on its OpenAI routes)."""
    try:
        data: Any = orjson.loads(body) if body.strip() else None
    except orjson.JSONDecodeError:
        data = None
    error = data.get("error") if isinstance(data, dict) and data.get("type") == "error" else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        message = error["message"]
    else:
        message = orjson.loads(error_body(status, body))["error"]["message"]
    return orjson.dumps({"type": "error", "error": {"type": anthropic_type(status), "message": message}})


def _code_for(status: int, message: str, runtime_type: Any, model: str | None) -> str | None:
    if status in {400, 413, 422} and (
        CONTEXT_LENGTH.search(message) or runtime_type == "exceed_context_size_error"
    ):
        return "context_length_exceeded"
    if status == 404 and model and (model in message or MODEL_MISSING.search(message)):
        return "model_not_found"
    return None


def _detail_message(detail: Any) -> str:
    """FastAPI's ``detail``: a string, or a list of validation errors."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                where = ".".join(str(part) for part in item.get("loc", ()))
                parts.append(f"{where}: {item.get('msg', '')}" if where else str(item.get("msg", "")))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return orjson.dumps(detail).decode()


def _text_of(body: bytes) -> str:
    title = TITLE.search(body)
    raw = title.group(1) if title else body
    text = " ".join(raw.decode("utf-8", errors="replace").split())
    return text[:MAX_TEXT]


def model_list(body: bytes, owned_by: str) -> bytes | None:
    """The OpenAI list shape (``object``, ``data[]`` of ``id``, ``object``, ``created``,
    ``owned_by``), extra fields kept; None when nothing was missing."""
    data = _json_object(body)
    if data is None or not isinstance(data.get("data"), list):
        return None
    changed = data.get("object") != "list"
    data["object"] = "list"
    for entry in data["data"]:
        if isinstance(entry, dict):
            changed |= _complete_entry(entry, owned_by)
    return orjson.dumps(data) if changed else None


def find_model(body: bytes, model_id: str, owned_by: str) -> dict[str, Any] | None:
    data = _json_object(body)
    if data is None or not isinstance(data.get("data"), list):
        return None
    for entry in data["data"]:
        if isinstance(entry, dict) and entry.get("id") == model_id:
            _complete_entry(entry, owned_by)
            return entry
    return None


def _complete_entry(entry: dict[str, Any], owned_by: str) -> bool:
    before = len(entry), entry.get("object")
    entry["object"] = "model"
    entry.setdefault("created", 0)
    entry.setdefault("owned_by", owned_by)
    return (len(entry), entry.get("object")) != before


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None
