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


def _raised(engine, sql: str, **params) -> Exception:
    from sqlalchemy import bindparam, text

    statement = text(sql)
    if "ids" in params:
        statement = statement.bindparams(bindparam("ids", expanding=True))
    try:
        with engine.connect() as conn:
            conn.execute(statement, params)
    except Exception as exc:
        return exc
    raise AssertionError(f"{sql} did not fail")


@pytest.mark.integration
def test_errors_about_the_statement_are_not_outages(pg_url: str) -> None:
    """psycopg raises an OperationalError (no SQLSTATE) for a statement with more than 65,535
    parameters: it is the statement's fault, so it is raised at once, never waited out. The same
    for bad SQL and bad data."""
    from sqlalchemy import create_engine
    from sqlalchemy import exc as sa

    engine = create_engine(pg_url)
    try:
        too_many = _raised(engine, "select 1 where 1 in :ids", ids=list(range(70_000)))
        assert isinstance(too_many, sa.OperationalError) and "65535" in str(too_many.orig)
        bad_sql = _raised(engine, "selec 1")
        bad_data = _raised(engine, "select 1 / 0")
        for exc in (too_many, bad_sql, bad_data):
            assert unavailable_service(exc) is None, exc

            def step(exc: Exception = exc) -> None:
                raise exc

            slept: list[float] = []
            with pytest.raises(type(exc)):
                ride_out(step, what="schedule", wait_s=60, sleep=slept.append)
            assert slept == []  # not a single retry
        with engine.connect() as conn:  # the connection that refused the statement is fine
            assert conn.exec_driver_sql("select 2").scalar() == 2
    finally:
        engine.dispose()


@pytest.mark.integration
def test_connection_failures_are_outages(private_postgres) -> None:
    """A backend terminated by an administrator (57P01), a server stopped under an open
    connection, and a refused connection are all database outages."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(private_postgres.url(), pool_pre_ping=True)
    admin = create_engine(private_postgres.url(), poolclass=NullPool)
    seen: dict[str, Exception] = {}
    try:
        with engine.connect() as conn:
            pid = conn.execute(text("select pg_backend_pid()")).scalar()
            with admin.connect() as other:
                other.execute(text(f"select pg_terminate_backend({pid})"))
            seen["terminated"] = _failing(conn)
        with engine.connect() as conn:
            conn.execute(text("select 1"))
            private_postgres.stop()
            seen["stopped"] = _failing(conn)
        seen["refused"] = _raised(engine, "select 1")
    finally:
        engine.dispose()
        admin.dispose()
    for what, exc in seen.items():
        assert unavailable_service(exc) == "database", (what, exc)
    assert getattr(seen["terminated"].orig, "sqlstate", None) == "57P01"


def _failing(conn) -> Exception:
    from sqlalchemy import text

    try:
        conn.execute(text("select 1"))
    except Exception as exc:
        return exc
    raise AssertionError("the connection still works")


def test_a_locked_sqlite_file_is_waited_for(tmp_path) -> None:
    """Another process holding the SQLite file's write lock is waited out like a restart."""
    from sqlalchemy import create_engine, text

    url = f"sqlite:///{tmp_path / 'locked.db'}"
    holder = create_engine(url)
    waiter = create_engine(url, connect_args={"timeout": 0})
    try:
        with holder.connect() as conn:
            conn.execute(text("create table t (x integer)"))
            conn.commit()
            conn.exec_driver_sql("begin immediate")
            conn.execute(text("insert into t values (1)"))
            locked = _raised(waiter, "insert into t values (2)")
        assert "locked" in str(locked) and unavailable_service(locked) == "database"
        assert unavailable_service(_raised(waiter, "insert into missing values (1)")) is None
    finally:
        holder.dispose()
        waiter.dispose()


@pytest.mark.integration
def test_a_lost_deadlock_is_tried_again(pg_url: str) -> None:
    """Two transactions lock two rows in opposite orders: Postgres aborts one (40P01). That step
    is repeated whole, as for a restart, instead of failing the shard or control task."""
    import threading

    from sqlalchemy import create_engine, text

    engine = create_engine(pg_url)
    table = f"deadlock_{free_port()}"
    try:
        with engine.begin() as conn:
            conn.execute(text(f"create table {table} (id int primary key, n int)"))
            conn.execute(text(f"insert into {table} values (1, 0), (2, 0)"))
        both_hold_one = threading.Barrier(2)
        errors: list[Exception] = []

        def lock(first: int, second: int) -> None:
            try:
                with engine.begin() as conn:
                    conn.execute(text(f"update {table} set n = n + 1 where id = {first}"))
                    both_hold_one.wait(timeout=10)
                    conn.execute(text(f"update {table} set n = n + 1 where id = {second}"))
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=lock, args=pair) for pair in ((1, 2), (2, 1))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        (deadlock,) = errors
        assert deadlock.orig.sqlstate == "40P01"
        assert unavailable_service(deadlock) == "database"
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"drop table if exists {table}"))
        engine.dispose()
