"""What ``jetpool dlq replay`` checks before it publishes: the entry's service, stream, sequence and
subject against the config (``handlers/shop.yaml``), the original against the entry, and which headers
may be sent again. Pure functions: no broker."""

from __future__ import annotations

from email.parser import BytesParser
from types import SimpleNamespace
from typing import Any

import pytest

from engine.config import Config, load_config
from engine.deadletter import H
from engine.dlq import (
    TRUNCATED_HEADER,
    Entry,
    Original,
    Refusal,
    Refused,
    Report,
    check_service,
    check_subject,
    choose,
    json_or_text,
    locate,
    read_entry,
    safe_headers,
)
from engine.events import MSG_ID_HEADER
from tests.support import REPO_ROOT

SHOP: Config = load_config(REPO_ROOT / "handlers" / "shop.yaml", env={})
BODY = b'{"id": "e-1", "type": "OrderConfirmed", "data": {"order_id": "o-1"}}'


def entry(service: str = "notifications", dlq_subject: str | None = None, body: bytes = BODY,
          original_headers: dict[str, str] | None = None, **headers: str | None) -> Entry:
    """An entry as the writer stores it for a notifications failure, with ``Jetpool-Dlq-<headers>`` changed
    (None: removed) and ``original_headers`` added."""
    h: dict[str, Any] = {
        MSG_ID_HEADER: "dlq.notifications.SHOP.7", H + "Service": service, H + "Route": "OrderConfirmed",
        H + "Error-Type": "Reject", H + "Error": "no address", H + "Attempts": "1",
        H + "Subject": "shop.OrderConfirmed", H + "Stream": "SHOP", H + "Stream-Seq": "7",
        H + "First-Failure": "2026-12-03T08:00:00.000Z", H + "Last-Failure": "2026-12-03T08:00:00.000Z",
        H + "Original-Msg-Id": "e-1", "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }
    for name, value in headers.items():
        key = H + name.replace("_", "-")
        if value is None:
            h.pop(key, None)
        else:
            h[key] = value
    h.update(original_headers or {})
    raw = SimpleNamespace(seq=41, subject=dlq_subject or f"dlq.{service}", headers=h, data=body)
    return read_entry(raw)


def original(subject: str = "shop.OrderConfirmed", body: bytes = BODY, **headers: Any) -> Original:
    return Original(subject, body, {MSG_ID_HEADER: "e-1", **headers})


def refusal(work: Any) -> str:
    with pytest.raises(Refused) as refused:
        work()
    return str(refused.value)


# ---- the entry's service against the subject it was stored on ---------------------------------------


def test_a_genuine_entry_is_located_in_its_services_stream() -> None:
    assert check_service(SHOP, entry()) == "notifications"
    assert locate(SHOP, entry()) == ("SHOP", 7)


def test_an_entry_naming_another_service_than_its_dead_letter_subject_is_refused() -> None:
    # notifications may publish on dlq.notifications only; it cannot make its entry pass for orders'.
    forged = entry(service="orders", dlq_subject="dlq.notifications")
    assert refusal(lambda: locate(SHOP, forged)) == (
        "was stored on 'dlq.notifications' but names service 'orders', whose entries go on 'dlq.orders'")


def test_an_entry_of_a_service_not_in_the_config_or_of_no_service_is_refused() -> None:
    assert refusal(lambda: check_service(SHOP, entry(service="billing"))) == (
        f"names service 'billing', which is not in {SHOP.source}")
    assert refusal(lambda: check_service(SHOP, entry(Service=None))) == f"names no service (no {H}Service header)"


# ---- its subject, stream and sequence ---------------------------------------------------------------


@pytest.mark.parametrize("subject", ["$JS.API.STREAM.PURGE.SHOP", "shop.OrderPlaced", "shop.OrderConfirmed.x",
                                     "shop.*", "shop.>", "shop. OrderConfirmed", "shop..OrderConfirmed", ""])
def test_a_subject_the_service_does_not_consume_is_refused(subject: str) -> None:
    reason = refusal(lambda: locate(SHOP, entry(Subject=subject)))
    assert reason == (f"names subject {subject!r}, which notifications does not consume "
                      "(shop.OrderConfirmed, shop.OrderCancelled)")


def test_every_subject_a_service_consumes_may_be_replayed() -> None:
    for service in SHOP.services:
        for subject in SHOP.filter_subjects(service):
            check_subject(SHOP, service, subject)


def test_an_original_in_another_stream_is_refused() -> None:
    assert refusal(lambda: locate(SHOP, entry(Stream="KV_orders"))) == (
        "names stream 'KV_orders', but notifications consumes stream 'SHOP'")


@pytest.mark.parametrize("seq", ["x7", "-7", "0", "7.0", " 7", "1_0", "\u0667", "", None])
def test_a_sequence_that_is_not_one_is_refused(seq: str | None) -> None:
    shown = "'(missing)'" if seq is None else repr(seq)
    assert refusal(lambda: locate(SHOP, entry(Stream_Seq=seq))) == (
        f"names no valid original sequence ({H}Stream-Seq: {shown})")


def test_reading_an_entry_never_fails_on_its_headers() -> None:
    odd = read_entry(SimpleNamespace(seq=3, subject="dlq.x", headers={H + "Attempts": "many"}, data=None))
    assert (odd.attempts, odd.stream_seq, odd.service, odd.body) == (0, None, "", b"")
    assert read_entry(SimpleNamespace(seq=4, subject="dlq.x", headers=None, data=b"")).headers == {}


# ---- the original, or the entry's body --------------------------------------------------------------


def test_the_original_is_published_with_its_safe_headers_not_the_entrys_body() -> None:
    stored = original(body=b'{"the": "original"}', **{
        "Nats-Expected-Stream": "SHOP", "Nats-Rollup": "all", "Nats-TTL": "1s", "Nats-Expected-Last-Sequence": "9",
        H + "Service": "orders", "traceparent": "00-abc-def-01", "X-Tenant": "t-1"})
    publication = choose(entry(body=b"forged"), stored, from_entry=False)
    assert (publication.subject, publication.body, publication.source) == (
        "shop.OrderConfirmed", b'{"the": "original"}', "stream")
    assert publication.headers == {"traceparent": "00-abc-def-01", "X-Tenant": "t-1"}


def test_an_original_on_another_subject_than_the_entry_says_is_refused() -> None:
    assert refusal(lambda: choose(entry(), original(subject="shop.OrderPlaced"), from_entry=True)) == (
        "SHOP #7 is a message on 'shop.OrderPlaced', not on 'shop.OrderConfirmed' as the entry says")


def test_an_original_with_another_message_id_is_refused() -> None:
    # The stream was deleted and created again: sequence 7 is now another event of the same type.
    reused = Original("shop.OrderConfirmed", BODY, {MSG_ID_HEADER: "e-other"})
    assert refusal(lambda: choose(entry(), reused, from_entry=False)) == (
        "SHOP #7 has message id 'e-other', not 'e-1' as the entry says")
    # An original that had no id is recorded as "-": nothing to compare.
    assert choose(entry(Original_Msg_Id="-"), Original("shop.OrderConfirmed", BODY, {}), False).source == "stream"


def test_an_entry_whose_original_is_gone_is_refused_unless_asked_to_use_its_body() -> None:
    assert refusal(lambda: choose(entry(), None, from_entry=False)) == (
        "its original (SHOP #7) is gone from the stream; --from-entry replays the body the entry stored instead")
    stored = entry(body=b"as stored", original_headers={"Nats-Expected-Stream": "SHOP", "Nats-TTL": "1s"})
    publication = choose(stored, None, from_entry=True)
    assert (publication.subject, publication.body, publication.source) == ("shop.OrderConfirmed", b"as stored",
                                                                           "entry")
    assert publication.headers == {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}


def test_a_truncated_entry_is_never_replayed_from_its_body() -> None:
    cut = entry(body=b"{", Body_Truncated="1048320")
    assert cut.truncated and TRUNCATED_HEADER == H + "Body-Truncated"
    assert refusal(lambda: choose(cut, None, from_entry=True)) == (
        "its original (SHOP #7) is gone and the entry keeps only part of the body ('1048320' bytes originally): "
        "it cannot be replayed")
    assert choose(cut, original(), from_entry=False).body == BODY  # the original is whole


def test_refusals_quote_sender_values_escaped_and_cut_short() -> None:
    reason = refusal(lambda: locate(SHOP, entry(Subject="shop.\x1b[2J" + "x" * 5000)))
    assert "\x1b" not in reason and "\\x1b[2J" in reason and len(reason) < 400


# ---- headers ----------------------------------------------------------------------------------------


def test_safe_headers_drop_control_headers_and_what_the_client_cannot_send() -> None:
    parsed = BytesParser().parsebytes(b"X-Utf8: caf\xc3\xa9\r\nX-Binary: \xff\xfe\r\n\r\n")
    headers: dict[str, Any] = {
        "Nats-Msg-Id": "e-1", "nats-expected-stream": "SHOP", "Nats-Rollup": "sub", "Nats-TTL": "1s",
        "Jetpool-Dlq-Service": "orders", "jetpool-dlq-subject": "x", "X/Trace": "1", "X-Crlf": "a\r\nNats-Rollup: all",
        "X-Surrogate": "a\udcff", "traceparent": "00-abc-def-01", **dict(parsed.items()),
    }
    assert safe_headers(headers) == {"traceparent": "00-abc-def-01", "X-Utf8": "café"}


# ---- showing entries --------------------------------------------------------------------------------


def test_bodies_orjson_cannot_write_back_are_shown_as_text() -> None:
    deep = b"[" * 600 + b"]" * 600  # orjson reads up to 1024 levels and writes up to 255
    assert json_or_text(deep) == deep.decode()
    assert json_or_text(b"\xff\xfe{") == "\ufffd\ufffd{"
    assert json_or_text(b'{"a": [1]}') == {"a": [1]}
    assert entry(body=deep).to_json()["body"] == deep.decode()


def test_the_report_counts_and_names_each_refusal() -> None:
    report = Report(replayed=[3, 4], refused=[Refusal(5, "names subject '$JS.API.STREAM.PURGE.SHOP', ...")])
    assert report.to_json() == {"replayed": 2, "refused": 1, "refusals": [
        {"id": 5, "reason": "names subject '$JS.API.STREAM.PURGE.SHOP', ..."}]}
