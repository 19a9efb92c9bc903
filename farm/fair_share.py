"""The order in which waiting shards go to a queue: the policy, as a pure function.

:func:`pick_shards` chooses the next shards for one queue from the jobs that have shards waiting,
one at a time:

1. **class**: interactive jobs before bulk ones. A class may be fed while the shards in flight
   (queued or running) of that class and the more urgent ones are below the window, so a window
   full of bulk shards never holds interactive work back;
2. **between projects**: weighted fair share. The project with the least *normalized usage*
   (decayed GPU seconds used, plus an estimate for its shards in flight, divided by its weight)
   goes next; each pick adds its shard's estimated cost, so one call spreads its picks the way
   a long run spreads GPU time;
3. **within the project, between users**: the same, with equal weights;
4. **within the user's jobs**: higher job priority, then the older job; a job's shards go in
   index order.

Caps: a project or user at its cap of shards in flight gets nothing more (its jobs wait);
a job past the caps is simply skipped, never refused. Ties fall to the older work, then to ids,
so the order is deterministic. :mod:`farm.feeder` reads the database into these structures and
publishes what comes out; ``tests/test_fair_share.py`` checks the properties above.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from storage.status import ServiceClass

CLASS_ORDER = (ServiceClass.INTERACTIVE, ServiceClass.BULK)  # most urgent first
DEFAULT_SECONDS_PER_ITEM = 1.0  # the cost estimate before any shard has been measured


@dataclass(frozen=True)
class Charge:
    """A shard attempt's render time, charged to its job's project and owner."""

    project_id: uuid.UUID
    user_id: uuid.UUID
    seconds: float
    items: int


@dataclass(slots=True)
class WaitingJob:
    """A job with shards waiting for this queue."""

    job_id: uuid.UUID
    project_id: uuid.UUID
    user_id: uuid.UUID
    service_class: ServiceClass
    priority: int
    created_at: datetime
    exhausted: bool = False  # no shard left to give

    def order(self) -> tuple:
        return (-self.priority, self.created_at, str(self.job_id))


@dataclass(frozen=True)
class WaitingShard:
    shard_id: uuid.UUID
    items: int


@dataclass(frozen=True)
class Pick:
    """One shard to send: which, of which job and class."""

    shard_id: uuid.UUID
    job: WaitingJob


@dataclass
class ShareState:
    """What the policy weighs, as read from the database and updated by every pick.

    ``usage_*`` are GPU seconds: the decayed ledger plus an estimate for the shards in flight
    (queued or running, not in the ledger until they end); ``in_flight_*`` count those shards
    (for the caps); ``room`` is how many more shards of each class the queue's window takes
    (counting that class and the more urgent ones)."""

    room: dict[ServiceClass, int]
    weights: dict[uuid.UUID, float] = field(default_factory=dict)
    usage_project: dict[uuid.UUID, float] = field(default_factory=dict)
    usage_user: dict[tuple[uuid.UUID, uuid.UUID], float] = field(default_factory=dict)
    in_flight_project: dict[uuid.UUID, int] = field(default_factory=dict)
    in_flight_user: dict[uuid.UUID, int] = field(default_factory=dict)
    cap_project: dict[uuid.UUID, int] = field(default_factory=dict)  # absent: no cap
    cap_user: dict[uuid.UUID, int] = field(default_factory=dict)
    seconds_per_item: float = DEFAULT_SECONDS_PER_ITEM

    def weight(self, project_id: uuid.UUID) -> float:
        return self.weights.get(project_id, 1.0)

    def project_usage(self, project_id: uuid.UUID) -> float:
        """Normalized: GPU seconds over the project's weight."""
        return self.usage_project.get(project_id, 0.0) / self.weight(project_id)

    def user_usage(self, project_id: uuid.UUID, user_id: uuid.UUID) -> float:
        return self.usage_user.get((project_id, user_id), 0.0)

    def under_caps(self, job: WaitingJob) -> bool:
        project_cap, user_cap = self.cap_project.get(job.project_id), self.cap_user.get(job.user_id)
        if project_cap is not None and self.in_flight_project.get(job.project_id, 0) >= project_cap:
            return False
        return user_cap is None or self.in_flight_user.get(job.user_id, 0) < user_cap

    def charge(self, job: WaitingJob, items: int) -> None:
        """Count one more shard of ``job`` in flight, at its estimated cost."""
        cost = max(1, items) * self.seconds_per_item
        self.usage_project[job.project_id] = self.usage_project.get(job.project_id, 0.0) + cost
        key = (job.project_id, job.user_id)
        self.usage_user[key] = self.usage_user.get(key, 0.0) + cost
        self.in_flight_project[job.project_id] = self.in_flight_project.get(job.project_id, 0) + 1
        self.in_flight_user[job.user_id] = self.in_flight_user.get(job.user_id, 0) + 1
        rank = CLASS_ORDER.index(job.service_class)
        for other in CLASS_ORDER[rank:]:  # a shard of this class fills the windows of the classes after it
            self.room[other] = self.room.get(other, 0) - 1


NextShards = Callable[[WaitingJob], WaitingShard | None]


def next_job(jobs: list[WaitingJob], state: ShareState) -> WaitingJob | None:
    """The job whose shard goes next, by the policy in the module docstring (``None``: nothing may
    go: no room, or every job waits for a cap)."""
    for service_class in CLASS_ORDER:
        if state.room.get(service_class, 0) <= 0:
            continue
        eligible = [j for j in jobs if j.service_class == service_class and not j.exhausted and state.under_caps(j)]
        if not eligible:
            continue
        oldest: dict[uuid.UUID, datetime] = {}
        for job in eligible:
            oldest[job.project_id] = min(oldest.get(job.project_id, job.created_at), job.created_at)
        project = min(oldest, key=lambda p: (state.project_usage(p), oldest[p], str(p)))
        in_project = [j for j in eligible if j.project_id == project]
        first: dict[uuid.UUID, datetime] = {}
        for job in in_project:
            first[job.user_id] = min(first.get(job.user_id, job.created_at), job.created_at)
        user = min(first, key=lambda u: (state.user_usage(project, u), first[u], str(u)))
        return min((j for j in in_project if j.user_id == user), key=WaitingJob.order)
    return None


def pick_shards(jobs: list[WaitingJob], state: ShareState, next_shard: NextShards, limit: int) -> list[Pick]:
    """Up to ``limit`` shards, in the order they should go. ``next_shard(job)`` gives the job's
    next waiting shard (``None`` when it has no more); ``state`` is updated with every pick.

    The same choices as calling :func:`next_job` for every pick (the reference; the tests compare
    the two), with the jobs grouped once per call by class, project and user, so a pick costs
    O(projects + users of the project) rather than O(jobs)."""
    waiting = _Waiting(jobs)
    picks: list[Pick] = []
    while len(picks) < limit:
        job = waiting.next_job(state)
        if job is None:
            break
        shard = next_shard(job)
        if shard is None:
            waiting.exhaust(job)
            continue
        state.charge(job, shard.items)
        picks.append(Pick(shard.shard_id, job))
    return picks


class _Waiting:
    """The waiting jobs grouped by class, project and user; each group's jobs in the order they go
    (priority, age, id) with its oldest job's time kept for the tie-breaks."""

    def __init__(self, jobs: list[WaitingJob]) -> None:
        self.groups: dict[ServiceClass, dict[uuid.UUID, dict[uuid.UUID, list[WaitingJob]]]] = {}
        for job in jobs:
            if not job.exhausted:
                users = self.groups.setdefault(job.service_class, {}).setdefault(job.project_id, {})
                users.setdefault(job.user_id, []).append(job)
        self.oldest: dict[tuple, datetime] = {}
        for service_class, projects in self.groups.items():
            for project_id, users in projects.items():
                for user_id, queue in users.items():
                    queue.sort(key=WaitingJob.order)
                    self.oldest[(service_class, project_id, user_id)] = min(j.created_at for j in queue)

    def exhaust(self, job: WaitingJob) -> None:
        job.exhausted = True
        projects = self.groups[job.service_class]
        queue = projects[job.project_id][job.user_id]
        queue.remove(job)
        key = (job.service_class, job.project_id, job.user_id)
        if queue:
            self.oldest[key] = min(j.created_at for j in queue)
            return
        del projects[job.project_id][job.user_id], self.oldest[key]
        if not projects[job.project_id]:
            del projects[job.project_id]

    def next_job(self, state: ShareState) -> WaitingJob | None:
        for service_class in CLASS_ORDER:
            if state.room.get(service_class, 0) <= 0:
                continue
            oldest: dict[uuid.UUID, datetime] = {}  # per project with an eligible user
            for project_id, users in self.groups.get(service_class, {}).items():
                cap = state.cap_project.get(project_id)
                if cap is not None and state.in_flight_project.get(project_id, 0) >= cap:
                    continue
                ages = [self.oldest[(service_class, project_id, u)] for u in users if _user_free(state, u)]
                if ages:
                    oldest[project_id] = min(ages)
            if not oldest:
                continue
            project = min(oldest, key=lambda p: (state.project_usage(p), oldest[p], str(p)))
            users = [u for u in self.groups[service_class][project] if _user_free(state, u)]
            first = {u: self.oldest[(service_class, project, u)] for u in users}
            user = min(first, key=lambda u: (state.user_usage(project, u), first[u], str(u)))
            return self.groups[service_class][project][user][0]
        return None


def _user_free(state: ShareState, user_id: uuid.UUID) -> bool:
    cap = state.cap_user.get(user_id)
    return cap is None or state.in_flight_user.get(user_id, 0) < cap
