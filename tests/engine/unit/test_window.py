"""The pull window's arithmetic, without a broker: credit, half-window re-pulls, statuses, reconnects."""

from __future__ import annotations

from engine.window import Window


def test_the_first_pulls_fill_the_window_a_batch_at_a_time() -> None:
    window = Window(max_in_flight=256, batch=64)
    sizes = []
    while size := window.next_pull(in_flight=0):
        sizes.append(size)
    assert sizes == [64, 64, 64, 64] and window.credit == 256


def test_in_flight_plus_credit_never_exceeds_the_window() -> None:
    window = Window(max_in_flight=100, batch=30)
    in_flight = 0
    for _ in range(500):
        while window.next_pull(in_flight):
            pass
        assert in_flight + window.credit <= 100
        if window.credit:
            window.delivered()
            in_flight += 1
        if in_flight and (in_flight % 3 == 0 or not window.credit):
            in_flight -= 1  # settled
    assert window.batch == 30 and window.threshold == 15


def test_it_pulls_again_only_once_half_a_batch_is_free() -> None:
    window = Window(max_in_flight=64, batch=64)
    assert window.next_pull(0) == 64
    for _ in range(64):
        window.delivered()
    assert window.credit == 0
    assert not window.room(in_flight=64 - 31)  # 31 free: less than half a batch (32)
    assert window.next_pull(64 - 31) == 0
    assert window.room(in_flight=64 - 32)
    assert window.next_pull(64 - 32) == 32


def test_a_batch_larger_than_the_window_is_cut_to_it() -> None:
    window = Window(max_in_flight=10, batch=128)
    assert (window.batch, window.threshold, window.next_pull(0)) == (10, 5, 10)


def test_an_expired_or_interrupted_pull_returns_only_its_undelivered_credit() -> None:
    window = Window(max_in_flight=64, batch=32)
    window.next_pull(0)
    window.next_pull(0)
    assert window.credit == 64
    window.ended("408", "20")  # a request expired with 20 of its messages undelivered
    assert window.credit == 44
    window.ended("409", "100")  # never below zero
    assert window.credit == 0


def test_a_status_without_a_count_drops_all_credit() -> None:
    for status, pending in (("409", None), ("400", "3"), ("503", None), ("408", "x")):
        window = Window(max_in_flight=64, batch=32)
        window.next_pull(0)
        window.ended(status, pending)
        assert window.credit == 0, (status, pending)


def test_a_reconnect_or_missed_heartbeats_write_every_request_off() -> None:
    window = Window(max_in_flight=64, batch=32)
    window.next_pull(0)
    window.lost()
    assert window.credit == 0 and window.next_pull(0) == 32


def test_late_deliveries_of_written_off_requests_do_not_block_pulling() -> None:
    window = Window(max_in_flight=64, batch=32)
    window.next_pull(0)
    window.lost()
    for _ in range(5):
        window.delivered()  # messages of the old request still arrive
    assert window.credit == -5
    assert window.next_pull(in_flight=5) == 32  # credit counts from zero again
    assert window.credit == 32


def test_a_breakers_trial_is_one_message_and_only_when_none_is_asked_for() -> None:
    window = Window(max_in_flight=64, batch=32)
    assert window.trial() == 1 and window.credit == 1
    assert window.trial() == 0
    window.delivered()
    assert window.trial() == 1
