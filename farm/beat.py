"""``farm beat``: Celery beat entries for the farm, built from settings.

- ``farm.feed_bulk`` every ``scheduling.feed_interval_s``: tops every queue's window up (a safety net; each
  shard's end also feeds).
- ``farm.start_bulk`` for each of ``bulk.schedules`` at its ``at`` time in its time zone
  (:class:`DailyAt`): submits the night's manifest under the schedule's name (only new rows are
  added; unfinished ones carry on) and lets feeding run until ``window_end``.
- ``farm.package_bulk`` for each schedule with ``package`` steps, at its ``window_end``: each
  package gets new shards for the rows rendered since the last night (:func:`package_scheduled_bulk`).

Schedules are kept in memory (no shelve file: nothing is pickled); a beat started after tonight's
time waits for tomorrow's, and ``farm bulk submit`` resumes by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from celery.schedules import BaseSchedule, schedstate

from farm.bulk import submit_and_feed
from farm.celery_app import CONTROL_QUEUE
from farm.datasets.package import package_bulk
from farm.errors import ConfigError
from farm.settings import BulkSchedule, FarmSettings


def _clock(hhmm: str) -> time:
    hour, minute = (int(part) for part in hhmm.split(":"))
    return time(hour, minute)


def next_at(moment: datetime, hhmm: str, zone: str) -> datetime:
    """The first ``hhmm`` in ``zone`` strictly after ``moment`` (UTC)."""
    tz = ZoneInfo(zone)
    local = moment.astimezone(tz)
    candidate = datetime.combine(local.date(), _clock(hhmm), tzinfo=tz)
    if candidate <= local:
        candidate = datetime.combine(local.date() + timedelta(days=1), _clock(hhmm), tzinfo=tz)
    return candidate.astimezone(UTC)


class DailyAt(BaseSchedule):
    """Due once a day at ``HH:MM`` in an IANA time zone. ``nowfun`` injects the clock."""

    def __init__(self, at: str, zone: str, nowfun: Callable[[], datetime] | None = None, app: Any = None) -> None:
        ZoneInfo(zone)  # refuse an unknown zone now, not at midnight
        self.at, self.zone = at, zone
        super().__init__(nowfun=nowfun, app=app)

    def _now(self) -> datetime:
        now = self.now()
        return now if now.tzinfo else now.replace(tzinfo=UTC)

    def remaining_estimate(self, last_run_at: datetime) -> timedelta:
        last = last_run_at if last_run_at.tzinfo else last_run_at.replace(tzinfo=UTC)
        return next_at(last, self.at, self.zone) - self._now()

    def is_due(self, last_run_at: datetime) -> schedstate:
        now = self._now()
        last = last_run_at if last_run_at.tzinfo else last_run_at.replace(tzinfo=UTC)
        due_at = next_at(last, self.at, self.zone)
        if now >= due_at:
            return schedstate(True, (next_at(now, self.at, self.zone) - now).total_seconds())
        return schedstate(False, (due_at - now).total_seconds())

    def __repr__(self) -> str:
        return f"<DailyAt {self.at} {self.zone}>"

    def __reduce__(self) -> tuple:
        return (self.__class__, (self.at, self.zone))


def beat_schedule(settings: FarmSettings, nowfun: Callable[[], datetime] | None = None) -> dict[str, dict]:
    """The ``beat_schedule`` entries for these settings."""
    options = {"queue": CONTROL_QUEUE}
    entries: dict[str, dict] = {
        "farm-feed-bulk": {
            "task": "farm.feed_bulk",
            "schedule": settings.scheduling.feed_interval_s,
            "options": options,
        }
    }
    for entry in settings.bulk.schedules:
        entries[f"farm-bulk-{entry.name}"] = {
            "task": "farm.start_bulk",
            "schedule": DailyAt(entry.at, entry.timezone, nowfun=nowfun),
            "args": [entry.name],
            "options": options,
        }
        if entry.package and entry.window_end:
            entries[f"farm-bulk-{entry.name}-package"] = {
                "task": "farm.package_bulk",
                "schedule": DailyAt(entry.window_end, entry.timezone, nowfun=nowfun),
                "args": [entry.name],
                "options": options,
            }
    return entries


def find_schedule(settings: FarmSettings, name: str) -> BulkSchedule:
    for entry in settings.bulk.schedules:
        if entry.name == name:
            return entry

    raise ConfigError(f"bulk.schedules has no entry named {name!r}")


def start_scheduled_bulk(app: Any, res: Any, name: str, now: datetime | None = None) -> dict[str, Any]:
    """What ``farm.start_bulk`` does: submit tonight's run of schedule ``name``, feeding until its
    ``window_end``, with the worker's own resources (``res``: settings, session factory, store)
    and Celery ``app``. Returns the task's result."""

    entry = find_schedule(res.settings, name)
    now = now or datetime.now(UTC)
    until = next_at(now, entry.window_end, entry.timezone) if entry.window_end else None
    result = submit_and_feed(
        app,
        res.session_factory,
        res.store,
        res.settings,
        entry.name,
        entry.base,
        entry.manifest,
        feed_until=until,
        now=now,
    )
    return {**result, "feed_until": until.isoformat() if until else None}


def package_scheduled_bulk(res: Any, name: str) -> dict[str, Any]:
    """What ``farm.package_bulk`` does: extend each ``package`` step of schedule ``name`` with the
    rows rendered since (the worker's own session factory and store). Returns each step's report."""
    entry = find_schedule(res.settings, name)
    reports = [
        package_bulk(res.session_factory, res.store, entry.name, step.format, step.shard_size, step.out)
        for step in entry.package
    ]
    return {"name": entry.name, "packages": reports}
