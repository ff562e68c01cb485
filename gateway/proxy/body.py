"""Reading a client's request body: whole and checked for JSON routes, streamed for uploads."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from gateway.core.asgi import Receive
from gateway.core.errors import GatewayError, InvalidRequest, RequestTooLarge
from gateway.core.jsonbody import JsonBody


class ClientGone(Exception):
    """The client disconnected while its request body was being read."""


def check_declared_length(content_length: bytes | None, limit: int) -> None:
    if content_length is None:
        return
    try:
        declared = int(content_length)
    except ValueError:
        raise InvalidRequest("Content-Length is not a number") from None
    if declared > limit:
        raise too_large(limit)


async def read_json_object(receive: Receive, limit: int) -> JsonBody:
    """The body as received, and the fields of the object it holds that the gateway reads."""
    return JsonBody(await read_body(receive, limit))


async def read_body(receive: Receive, limit: int) -> bytes:
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise too_large(limit)
        return body
    chunks = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class StreamedBody:
    """A request body passed on chunk by chunk as the client sends it.

    If the client goes away or sends too much, iteration stops with an error that the
    upstream request surfaces as a connection failure; ``failure`` says what really happened.
    """

    def __init__(self, receive: Receive, limit: int) -> None:
        self.receive = receive
        self.limit = limit
        self.failure: GatewayError | ClientGone | None = None
        self.head = b""
        """Bytes read ahead by ``peek_form_field``; sent first."""
        self.ended = False
        self.fields: FormFields | None = None
        """Counts a form field's parts as the body passes (``watch_form_field``)."""

    def watch_form_field(self, content_type: bytes | None, name: str) -> None:
        """Fail the body, and so the request, if it holds the form field ``name`` more than once
        or a part whose head cannot be read: runtimes differ in which of two they take."""
        delimiter = _delimiter(content_type)
        if delimiter is not None:
            self.fields = FormFields(delimiter, name.encode())

    def _check(self, chunk: bytes) -> None:
        fields = self.fields
        if fields is None:
            return
        fields.feed(chunk)
        if fields.count > 1 or fields.unreadable:
            what = "more than once" if fields.count > 1 else "in a part whose head is not readable"
            self.failure = InvalidRequest(
                f"the form names {fields.name.decode()!r} {what}: send it once", code="ambiguous_form"
            )
            raise self.failure

    async def peek_form_field(self, content_type: bytes | None, name: str) -> str | None:
        """The value of the multipart form field ``name`` when it comes before any file part
        and within the first ``PEEK_BYTES``; None otherwise. Nothing is lost: what is read
        here is the start of what iteration yields."""
        delimiter = _delimiter(content_type)
        if delimiter is None:
            return None
        wanted = name.encode()
        while True:
            value, decided = _form_field(self.head, delimiter, wanted)
            if decided or self.ended or len(self.head) >= PEEK_BYTES:
                return value
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.failure = ClientGone()
                raise self.failure
            self.head += message.get("body", b"")
            if len(self.head) > self.limit:
                self.failure = too_large(self.limit)
                raise self.failure
            self.ended = not message.get("more_body", False)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        size = len(self.head)
        if self.head:
            self._check(self.head)
            yield self.head
        if self.ended:
            return
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.failure = ClientGone()
                raise self.failure
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                self.failure = too_large(self.limit)
                raise self.failure
            if chunk:
                self._check(chunk)
                yield chunk
            if not message.get("more_body", False):
                return


class FormFields:
    """Counts the parts of a multipart body named ``name``, as the body passes, holding no more
    than a part's head (``PART_HEAD``) of it."""

    def __init__(self, delimiter: bytes, name: bytes) -> None:
        self.delimiter = delimiter
        self.name = name
        self.count = 0
        self.unreadable = False
        self.ended = False
        self._pending = b""

    def feed(self, chunk: bytes) -> None:
        if self.ended or self.unreadable:
            return
        data = self._pending + chunk if self._pending else chunk
        delimiter = self.delimiter
        at = 0
        while True:
            found = data.find(delimiter, at)
            if found < 0:
                self._pending = data[max(len(data) - len(delimiter) + 1, at) :]
                return
            start = found + len(delimiter)
            if data[start : start + 2] == b"--":
                self.ended = True  # the closing delimiter: what follows is no part
                return
            head_end = data.find(b"\r\n\r\n", start)
            if head_end < 0:
                if len(data) - start > PART_HEAD:
                    self.unreadable = True
                self._pending = data[found:]
                return
            if part_name(data[start:head_end]) == self.name:
                self.count += 1
            at = head_end + 4


PEEK_BYTES = 64 * 1024
PART_HEAD = 8 * 1024
BOUNDARY = re.compile(rb'boundary="?([^";,\s]+)"?', re.IGNORECASE)
# Quoted as RFC 7578 has it, or bare, as form parsers (python-multipart's) also read it.
FIELD_NAME = re.compile(rb'(?:^|[;\s])name\s*=\s*(?:"([^"]*)"|([^";\s]+))', re.IGNORECASE)


def _delimiter(content_type: bytes | None) -> bytes | None:
    match = BOUNDARY.search(content_type or b"")
    if match is None or not (content_type or b"").lower().startswith(b"multipart/form-data"):
        return None
    return b"--" + match.group(1)


def part_name(head: bytes) -> bytes | None:
    """The form field a part's head names (its Content-Disposition's ``name``), or None."""
    found = FIELD_NAME.search(head)
    if found is None:
        return None
    return found.group(1) if found.group(1) is not None else found.group(2)


def _form_field(data: bytes, delimiter: bytes, name: bytes) -> tuple[str | None, bool]:
    """(the field's value, whether that is final) from the start of a multipart body.

    Final: the field was found, or a file part or the end came first. Not final: more
    bytes are needed to tell.
    """
    position = data.find(delimiter)
    while position != -1:
        start = position + len(delimiter)
        if data[start : start + 2] == b"--":
            return None, True  # the closing delimiter
        head_end = data.find(b"\r\n\r\n", start)
        if head_end == -1:
            return None, False
        head = data[start:head_end]
        if b"filename=" in head.lower():
            return None, True  # a file comes first: it is not held back to look further
        value_end = data.find(b"\r\n" + delimiter, head_end + 4)
        if value_end == -1:
            return None, False
        if part_name(head) == name:
            return data[head_end + 4 : value_end].decode("utf-8", "replace"), True
        position = value_end + 2
    return None, False


def too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"request body is larger than {limit} bytes", code="request_too_large")
