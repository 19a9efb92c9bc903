"""Telling service outages from other errors, and waiting them out with backoff."""

from __future__ import annotations

import pytest

from farm.errors import LeaseLost, StorageUnavailable, UserError
from farm.outages import MAX_DELAY_S, ServiceUnavailable, ride_out, unavailable_service
from tests.fixtures.services import free_port


def _refused_database() -> Exception:
    from sqlalchemy import create_engine, text

    engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x?connect_timeout=2")
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
    except Exception as exc:
        return exc
    finally:
        engine.dispose()
    raise AssertionError("nothing listens on a free port")


def _refused_broker() -> Exception:
    from kombu import Connection

    with Connection(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=1) as conn:
        try:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=2)
        except Exception as exc:
            return exc
    raise AssertionError("nothing listens on a free port")


def test_outages_are_told_from_other_errors() -> None:
    assert unavailable_service(_refused_database()) == "database"
    assert unavailable_service(_refused_broker()) == "broker"
    assert unavailable_service(StorageUnavailable("put x: cannot reach the store")) == "object store"
    for other in (ValueError("bad"), UserError("steps: too many"), LeaseLost("fenced"), KeyError("k")):
        assert unavailable_service(other) is None


def test_ride_out_backs_off_until_the_service_is_back() -> None:
    slept: list[float] = []
    calls = iter([StorageUnavailable("down"), StorageUnavailable("down"), _refused_database(), "done"])

    def step() -> str:
        value = next(calls)
        if isinstance(value, Exception):
            raise value
        return value

    assert ride_out(step, what="put", wait_s=60, sleep=slept.append) == "done"
    assert slept == [0.5, 1.0, 2.0]


def test_ride_out_gives_up_with_a_retryable_error_and_passes_other_errors_on() -> None:
    def down() -> None:
        raise StorageUnavailable("cannot reach the store")

    slept: list[float] = []
    with pytest.raises(ServiceUnavailable, match="the object store was unavailable") as info:
        ride_out(down, what="put x", wait_s=5, sleep=slept.append)
    assert info.value.retryable and slept and max(slept) <= MAX_DELAY_S

    def broken() -> None:
        raise UserError("steps: must be <= 150")

    with pytest.raises(UserError):
        ride_out(broken, what="x", wait_s=60, sleep=slept.append)


def test_ride_out_stops_waiting_when_the_check_says_so() -> None:
    def down() -> None:
        raise StorageUnavailable("down")

    def lease_gone() -> None:
        raise LeaseLost("lease lost while waiting")

    with pytest.raises(LeaseLost):
        ride_out(down, what="put", wait_s=60, check=lease_gone, sleep=lambda _: None)


def test_a_write_that_landed_before_the_outage_is_not_repeated() -> None:
    writes: list[str] = []

    def write() -> None:
        writes.append("row")
        raise StorageUnavailable("the answer to the commit was lost")

    assert ride_out(write, what="row", wait_s=60, landed=lambda: bool(writes), sleep=lambda _: None) is None
    assert writes == ["row"]  # checked before the retry, not before the first try
