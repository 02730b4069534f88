"""The fast state path's pure parts (engine/kv.py), and mutate's ``fresh`` on the in-memory store."""

from __future__ import annotations

import asyncio
import base64
import binascii

import orjson
import pytest
from nats.js.kv import _is_key_valid

from engine.kv import parse_headers, read_msg_get, valid_key
from engine.state import MemoryState, Value


def test_parse_headers_reads_a_stored_message_a_status_and_blanks() -> None:
    stored = (b"NATS/1.0\r\nNats-Stream: KV_b\r\nNats-Subject: $KV.b.k\r\nNats-Sequence: 17\r\n"
              b"Nats-Time-Stamp: 2026-12-03T12:13:30.128Z\r\nKV-Operation:  DEL \r\n\r\n")
    assert parse_headers(stored) == (0, {"Nats-Stream": "KV_b", "Nats-Subject": "$KV.b.k", "Nats-Sequence": "17",
                                         "Nats-Time-Stamp": "2026-12-03T12:13:30.128Z", "KV-Operation": "DEL"})
    assert parse_headers(b"NATS/1.0 404 Message Not Found\r\n\r\n") == (404, {})
    assert parse_headers(b"NATS/1.0 503\r\n\r\n") == (503, {})
    assert parse_headers(b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 3\r\n\r\n") == (
        408, {"Nats-Pending-Messages": "3"})


def test_a_leader_read_answer_reads_as_a_direct_get_would() -> None:
    """STREAM.MSG.GET answers in JSON, headers and body in base64: the same Reply a direct get gives."""
    hdrs = base64.b64encode(b"NATS/1.0\r\nKV-Operation: DEL\r\n\r\n").decode()
    stored = {"message": {"subject": "$KV.b.k", "seq": 7, "data": base64.b64encode(b'{"n":1}').decode(),
                          "time": "2026-12-03T00:00:00Z"}}
    deleted = {"message": {"subject": "$KV.b.k", "seq": 8, "hdrs": hdrs, "time": "2026-12-03T00:00:00Z"}}
    assert read_msg_get(orjson.dumps(stored)) == (0, {"Nats-Sequence": "7"}, b'{"n":1}')
    assert read_msg_get(orjson.dumps(deleted)) == (0, {"KV-Operation": "DEL", "Nats-Sequence": "8"}, b"")
    missing = {"error": {"code": 404, "err_code": 10037, "description": "no message found"}}
    assert read_msg_get(orjson.dumps(missing)) == (404, {}, b"")
    electing = {"error": {"code": 503, "err_code": 10008, "description": "JetStream system temporarily unavailable"}}
    assert read_msg_get(orjson.dumps(electing))[0] == 503


@pytest.mark.parametrize("body", [b"[]", b'{"type": "x"}', b'{"error": {"code": "404"}}', b'{"message": {"seq": "7"}}',
                                  b'{"message": {"seq": 7, "data": 5}}', b"not json"])
def test_a_leader_read_answer_of_another_shape_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError):
        read_msg_get(body)


def test_a_leader_read_answer_that_is_not_base64_is_refused() -> None:
    with pytest.raises(binascii.Error):
        read_msg_get(b'{"message": {"seq": 7, "data": "not base64!"}}')



@pytest.mark.parametrize("key", ["k", "sku.widget-1", "a/b_c=d", "x.y.z", "", ".a", "a.", "a b", "a.*", "a.>",
                                 "ключ", "a\r\nPUB", "tab\tkey"])
def test_valid_key_is_nats_pys_rule(key: str) -> None:
    assert valid_key(key) == _is_key_valid(key)


def _increment(current: Value | None) -> Value:
    return {"n": (current or {"n": 0})["n"] + 1}


def test_memory_state_mutate_fresh_has_the_same_answers() -> None:
    async def main() -> None:
        store = MemoryState()
        assert await store.mutate("new", _increment, fresh=True) == {"n": 1}
        await store.put("old", {"n": 41})
        assert await store.mutate("old", _increment, fresh=True) == {"n": 42}  # the create fails, then it reads
        assert await store.mutate("old", lambda v: None, fresh=True) == {"n": 42}  # confirmed on fresh data
        assert await store.mutate("absent", lambda v: None, fresh=True) is None
        assert "absent" not in store.data

    asyncio.run(main())
