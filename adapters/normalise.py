"""Bring runtimes' answers to the shapes OpenAI clients expect, where they differ.

Pure functions over small bodies the proxy has already read: errors (the backend's status
is kept, its message preserved) and model lists. ``None`` means "already right: send the
original bytes".
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
    409: "conflict",
    413: "request_too_large",
    422: "invalid_request",
    429: "rate_limit_exceeded",
}
TITLE = re.compile(rb"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
MAX_TEXT = 300


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "backend_error" if status >= 500 else "invalid_request")


def error_body(status: int, body: bytes) -> bytes | None:
    """The OpenAI envelope for a backend error body, or None when it already is one."""
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
            return None
        if data.get("object") == "error" and "message" in data:
            # SGLang's flat error: nest it, fields as they are.
            flat = {k: data.get(k) for k in ("message", "type", "param", "code")}
            return orjson.dumps({"error": flat})
        if isinstance(error, str):
            # TGI: {"error": "...", "error_type": "validation"}
            code = data.get("error_type")
            return _envelope(status, error, str(code) if code is not None else None)
        if "detail" in data:
            return _envelope(status, _detail_message(data["detail"]), None)
        if isinstance(data.get("message"), str):
            return _envelope(status, data["message"], None)
        message = f"the backend answered {status}: {orjson.dumps(data).decode()[:MAX_TEXT]}"
    elif data is not None:
        message = f"the backend answered {status}: {orjson.dumps(data).decode()[:MAX_TEXT]}"
    elif not body.strip():
        message = f"the backend answered {status} with an empty body"
    return _envelope(status, message, None)


def _envelope(status: int, message: str, code: str | None) -> bytes:
    return orjson.dumps(
        {"error": {"type": error_type(status), "message": message, "code": code, "param": None}}
    )


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
