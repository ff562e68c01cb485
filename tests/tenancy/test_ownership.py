"""Objects belong to the key that made them: files, batches and stored responses, through
the OpenAI SDK, on one gateway and across two gateway processes sharing a secret."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.errors import NotFound
from gateway.tenancy.ownership import BATCH, FILE, RESPONSE, Owners, Records, StreamSealer
from tests.conftest import GatewayFactory
from tests.support.object_fakes import ObjectRuntime
from tests.support.processes import serve, stop
from tests.support.redis_server import RedisServer

KEYS = ["sk-alice", "sk-bob"]
BATCH_LINE = b'{"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'


def owners() -> Owners:
    return Owners(b"s" * 32, Records())


def test_a_sealed_id_opens_only_for_its_owner_and_kind() -> None:
    sealer = owners()
    sealed = sealer.seal("alice", FILE, "file-1")
    assert sealed.startswith("file-1.")
    assert sealer.unseal("alice", FILE, sealed) == "file-1"
    for owner, kind, value in [
        ("bob", FILE, sealed),  # another key
        ("alice", BATCH, sealed),  # another kind
        ("alice", FILE, "file-1"),  # the runtime's own ID, unsealed
        ("alice", FILE, "file-2" + sealed[6:]),  # another ID under the tag
        ("alice", FILE, sealed[:-1] + ("A" if sealed[-1] != "A" else "B")),
        ("alice", FILE, 17),
    ]:
        with pytest.raises(NotFound):
            sealer.unseal(owner, kind, value)
    other_secret = Owners(b"t" * 32, Records())
    with pytest.raises(NotFound):
        other_secret.unseal("alice", FILE, sealed)


@given(st.text(min_size=1, max_size=80).filter(lambda s: "\x00" not in s), st.text(max_size=20))
def test_sealing_round_trips_any_id(raw: str, owner: str) -> None:
    sealer = owners()
    assert sealer.unseal(owner, RESPONSE, sealer.seal(owner, RESPONSE, raw)) == raw


def test_a_stream_is_sealed_however_it_is_cut() -> None:
    sealer = owners()
    created = {"type": "response.created", "response": {"id": "resp_9", "previous_response_id": "resp_1"}}
    text = b"event: response.created\ndata: " + json.dumps(created).encode() + b"\n\n"
    text += b'data: {"type":"response.completed","response":{"id":"resp_9"}}\n\n'
    sealed = sealer.seal("a", RESPONSE, "resp_9").encode()
    for cut in range(1, len(text)):
        stream = StreamSealer(sealer, "a", "resp_1", 1 << 20)
        out = stream.feed(text[:cut]) + stream.feed(text[cut:]) + stream.flush()
        assert b'"resp_9"' not in out
        assert b'"resp_1"' not in out
        assert out.count(sealed) == 2


# Through the gateway


@pytest.fixture
def client() -> Iterator[Callable[[str, str], openai.OpenAI]]:
    """OpenAI clients, closed after the test (not left with their sockets to the collector)."""
    made: list[openai.OpenAI] = []

    def make(url: str, key: str) -> openai.OpenAI:
        made.append(openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0))
        return made[-1]

    yield make
    for one in made:
        one.close()


def test_files_and_batches_belong_to_their_key(
    start_gateway: GatewayFactory,
    objects: tuple[ObjectRuntime, str],
    client: Callable[[str, str], openai.OpenAI],
) -> None:
    runtime, url = objects
    gateway = start_gateway(
        backend="openai", backend_url=url, api_keys=KEYS, object_secret="secret-1-for-the-tests"
    )
    alice, bob = client(gateway.url, "sk-alice"), client(gateway.url, "sk-bob")
    mine = alice.files.create(file=("in.jsonl", io.BytesIO(BATCH_LINE)), purpose="batch")
    assert mine.id.startswith("file-0001.")
    assert alice.files.retrieve(mine.id).filename == "in.jsonl"
    assert alice.files.content(mine.id).content == BATCH_LINE
    theirs = bob.files.create(file=("b.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
    assert [f.id for f in alice.files.list()] == [mine.id]
    assert [f.id for f in bob.files.list()] == [theirs.id]

    seen = len(runtime.requests)
    raw = mine.id.split(".")[0]
    for attempt in (
        lambda: bob.files.retrieve(mine.id),
        lambda: bob.files.content(mine.id),
        lambda: bob.files.delete(mine.id),
        lambda: bob.files.retrieve(raw),  # the runtime's own ID, guessed
        lambda: bob.batches.create(input_file_id=mine.id, endpoint="/v1/chat/completions",
                                   completion_window="24h"),
    ):  # fmt: skip
        with pytest.raises(openai.NotFoundError) as caught:
            attempt()
        assert caught.value.status_code == 404
        assert caught.value.body["type"] == "not_found"  # type: ignore[index]
    assert len(runtime.requests) == seen  # none of it reached the runtime

    batch = alice.batches.create(
        input_file_id=mine.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.input_file_id == mine.id
    assert batch.output_file_id is not None
    assert alice.files.content(batch.output_file_id).content == b'{"ok": true}\n'
    assert alice.batches.retrieve(batch.id).status == "completed"
    assert [b.id for b in alice.batches.list()] == [batch.id]
    assert list(bob.batches.list()) == []
    with pytest.raises(openai.NotFoundError):
        bob.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.cancel(batch.id)
    with pytest.raises(openai.NotFoundError):
        bob.files.content(batch.output_file_id)
    # The batch's output files are listed as the owner's.
    assert batch.output_file_id in {f.id for f in alice.files.list()}
    assert alice.batches.cancel(batch.id).status == "cancelling"

    # Pages go on from a sealed ID; a list's after naming another key's object is 404.
    after = alice.files.list(after=mine.id)
    assert mine.id not in {f.id for f in after}
    with pytest.raises(openai.NotFoundError):
        bob.files.list(after=mine.id)

    assert alice.files.delete(mine.id).deleted
    assert mine.id not in {f.id for f in alice.files.list()}
    assert [f.id for f in bob.files.list()] == [theirs.id]


def test_stored_responses_belong_to_their_key(
    start_gateway: GatewayFactory,
    objects: tuple[ObjectRuntime, str],
    client: Callable[[str, str], openai.OpenAI],
) -> None:
    runtime, url = objects
    gateway = start_gateway(
        backend="openai", backend_url=url, api_keys=KEYS, object_secret="secret-1-for-the-tests"
    )
    alice, bob = client(gateway.url, "sk-alice"), client(gateway.url, "sk-bob")
    first = alice.responses.create(model="org/model-7b", input="one")
    assert first.id.startswith("resp_0001.")
    second = alice.responses.create(model="org/model-7b", input="two", previous_response_id=first.id)
    assert second.output_text == "one | two"
    assert second.previous_response_id == first.id
    assert alice.responses.retrieve(second.id).id == second.id
    # Nothing lists stored responses, so nothing about them is kept in the gateway.
    owners = gateway.app.state.owners
    assert not any(kind == RESPONSE for _, kind in owners.records._owned)

    seen = len(runtime.requests)
    with pytest.raises(openai.NotFoundError):
        bob.responses.create(model="org/model-7b", input="steal", previous_response_id=first.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(first.id.split(".")[0])
    assert len(runtime.requests) == seen

    # Streamed: every event carries the sealed IDs, cut wherever the network cut them.
    events = list(
        alice.responses.create(
            model="org/model-7b", input="three", previous_response_id=second.id, stream=True
        )
    )
    created = next(e for e in events if e.type == "response.created")
    final = next(e for e in events if e.type == "response.completed").response
    assert created.response.id == final.id
    assert final.previous_response_id == second.id
    assert alice.responses.retrieve(final.id).output_text == "one | two | three"
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(final.id)


def test_with_one_key_ids_are_the_runtimes(
    start_gateway: GatewayFactory,
    objects: tuple[ObjectRuntime, str],
    client: Callable[[str, str], openai.OpenAI],
) -> None:
    _, url = objects
    gateway = start_gateway(backend="openai", backend_url=url, api_keys=["sk-alice"])
    alice = client(gateway.url, "sk-alice")
    made = alice.files.create(file=("in.jsonl", io.BytesIO(BATCH_LINE)), purpose="batch")
    assert made.id == "file-0001"
    assert alice.responses.create(model="org/model-7b", input="x").id == "resp_0001"


def test_ownership_holds_across_two_gateway_processes(
    objects: tuple[ObjectRuntime, str], redis: RedisServer, client: Callable[[str, str], openai.OpenAI]
) -> None:
    runtime, url = objects
    args = ("--backend", "openai", "--backend-url", url, "--api-key", KEYS[0], "--api-key", KEYS[1],
            "--no-access-log", "--rate-limit-storage", redis.url)  # fmt: skip
    env = {"GATEWAY_OBJECT_SECRET": "shared-secret-of-the-replicas"}
    first, first_url = serve(*args, env=env)
    second, second_url = serve(*args, env=env)
    stranger, stranger_url = serve(*args, env={"GATEWAY_OBJECT_SECRET": "another-secret-altogether"})
    try:
        made = client(first_url, "sk-alice").files.create(
            file=("in.jsonl", io.BytesIO(BATCH_LINE)), purpose="batch"
        )
        elsewhere = client(second_url, "sk-alice")
        assert elsewhere.files.retrieve(made.id).id == made.id
        assert [f.id for f in elsewhere.files.list()] == [made.id]  # the records are in Redis
        assert list(client(second_url, "sk-bob").files.list()) == []
        with pytest.raises(openai.NotFoundError):
            client(second_url, "sk-bob").files.content(made.id)
        # A gateway with another secret honours none of the IDs.
        with pytest.raises(openai.NotFoundError):
            client(stranger_url, "sk-alice").files.retrieve(made.id)
        assert httpx.get(first_url + "/v1/files", headers={"x-api-key": "sk-bob"}).json()["data"] == []
    finally:
        for process in (first, second, stranger):
            stop(process)
    assert runtime.requests.count(("GET", "/v1/files/file-0001/content")) == 0
