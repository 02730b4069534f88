"""Planted dead-letter entries, under the shipped least-privilege configuration: a service user may publish
on its own ``dlq.<service>`` subject, so it can write entries naming any subject. ``jetpool dlq replay``,
run by an operator with admin rights, must refuse them all, one clear line each, and touch no stream.

The server is this module's own (the ``shop`` fixture of tests/shop/least_privilege_support.py: the shipped
configuration, handlers/shop.yaml provisioned by the admin, passwords in its environment, killed by PID in
teardown).
"""

from __future__ import annotations

import json
from typing import Any

from engine.deadletter import H
from engine.events import MSG_ID_HEADER, Event
from tests.shop import least_privilege_support
from tests.shop.least_privilege_support import Shop, as_user, counts, order
from tests.support import run_cli

shop = least_privilege_support.shop  # this module gets its own server from the same fixture

FORGED = Event(type="OrderConfirmed", data={"order_id": "never-paid"}, aggregate_id="never-paid")


def entry_headers(msg_id: str, subject: str, seq: str, service: str = "notifications") -> dict[str, str]:
    """What the writer would put on an entry of ``service`` for the message ``SHOP #seq`` on ``subject``."""
    return {MSG_ID_HEADER: msg_id, H + "Service": service, H + "Route": "OrderConfirmed", H + "Error-Type": "Reject",
            H + "Error": "planted", H + "Attempts": "1", H + "Subject": subject, H + "Stream": "SHOP",
            H + "Stream-Seq": seq, H + "Original-Msg-Id": "-"}


def shop_messages(shop: Shop) -> int:
    async def work(nc: Any, _: list[str]) -> int:
        return int((await nc.jetstream().stream_info("SHOP")).state.messages)

    result: int = as_user(shop, "admin", work)
    return result


def test_planted_entries_are_refused_and_no_stream_is_touched(shop: Shop) -> None:
    placed = order("lp-replay")

    async def place(nc: Any, _: list[str]) -> int:
        ack = await nc.jetstream().publish("shop.OrderPlaced", placed.encode(), headers={MSG_ID_HEADER: placed.id})
        return int(ack.seq)

    placed_seq = as_user(shop, "storefront", place)
    planted = [  # (body, headers) as the notifications user can write them
        (FORGED.encode(), entry_headers("p-absent", "shop.OrderConfirmed", "999999")),  # original never existed
        (FORGED.encode(), entry_headers("p-other", "shop.OrderConfirmed", str(placed_seq))),  # another subject
        (b"{}", entry_headers("p-purge", "$JS.API.STREAM.PURGE.SHOP", "1")),  # not an event subject at all
        (placed.encode(), entry_headers("p-orders", "shop.OrderPlaced", str(placed_seq), service="orders")),
        (b"\xff\xfe", {MSG_ID_HEADER: "p-junk", H + "Service": "notifications", H + "Stream-Seq": "NaN"}),
    ]

    async def plant(nc: Any, _: list[str]) -> list[int]:
        js = nc.jetstream()
        return [int((await js.publish("dlq.notifications", body, headers=headers)).seq) for body, headers in planted]

    ids = as_user(shop, "notifications", plant)
    before, messages_before = counts(shop), shop_messages(shop)
    assert messages_before >= 1

    replay = run_cli(["dlq", "replay", "--all", "-c", str(shop.app.path)], env=shop.env("admin"))
    assert replay.returncode == 1, replay.stderr
    assert "Traceback" not in replay.stderr, replay.stderr
    refusals = [line for line in replay.stderr.splitlines() if line.startswith("jetpool: dlq replay: ")]
    filters = "(shop.OrderConfirmed, shop.OrderCancelled)"
    assert refusals == [f"jetpool: dlq replay: entry {entry_id} refused: {reason}" for entry_id, reason in zip(ids, [
        "its original (SHOP #999999) is gone from the stream; --from-entry replays the body the entry stored instead",
        f"SHOP #{placed_seq} is a message on 'shop.OrderPlaced', not on 'shop.OrderConfirmed' as the entry says",
        f"names subject '$JS.API.STREAM.PURGE.SHOP', which notifications does not consume {filters}",
        "was stored on 'dlq.notifications' but names service 'orders', whose entries go on 'dlq.orders'",
        "names stream '', but notifications consumes stream 'SHOP'",
    ], strict=True)]
    assert replay.stdout == f"replayed 0, refused {len(ids)}\n"

    as_json = run_cli(["dlq", "replay", "--all", "--json", "-c", str(shop.app.path)], env=shop.env("admin"))
    assert as_json.returncode == 1, as_json.stderr
    report = json.loads(as_json.stdout)
    assert (report["replayed"], report["refused"]) == (0, len(ids))
    assert [r["id"] for r in report["refusals"]] == ids

    # Nothing was published or purged, and every planted entry is still there to be looked at.
    assert counts(shop) == before and shop_messages(shop) == messages_before
    listed = run_cli(["dlq", "list", "--json", "--service", "notifications", "-c", str(shop.app.path)],
                     env=shop.env("admin"))
    assert listed.returncode == 0, listed.stderr
    assert [e["id"] for e in json.loads(listed.stdout)] == ids
