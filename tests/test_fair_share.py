"""The fair-share policy (:mod:`farm.fair_share`) on its own, no database: property tests over
random waiting jobs, weights, usages, caps and windows, then a few examples that read as its
documentation.

Each property test replays the picks against its own bookkeeping (rooms, shards in flight per
project and user, shards left per job) and checks every pick against it:

- (a) no bulk shard goes while interactive work may go (room for it, under the caps, shards left);
- (b) the caps of shards in flight per project and per user hold, from the counts given;
- (c) the rooms hold (an interactive shard fills the bulk window too: ``ShareState.charge``);
- (d) one user's jobs of one class in one project go by priority, then age, each to its end;
- (e) with every project backlogged at equal cost, each project's share of N picks stays
  within one pick above and ``P * w_p / sum(w)`` picks below ``N * w_p / sum(w)``
  (P projects; see :func:`test_weighted_shares_stay_within_a_pick_of_their_due`);
- (f) the same input gives the same picks, in whatever order the jobs are listed.
"""

from __future__ import annotations

import copy
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from farm.fair_share import CLASS_ORDER, Pick, ShareState, WaitingJob, WaitingShard, next_job, pick_shards
from storage.status import ServiceClass

INTERACTIVE, BULK = ServiceClass.INTERACTIVE, ServiceClass.BULK
T0 = datetime(2026, 1, 1, tzinfo=UTC)
PROPERTIES = settings(max_examples=200, deadline=None)


def _id(kind: int, n: int) -> uuid.UUID:
    """Readable, ordered ids: project 1 is ``00000001-...-000000000001``."""
    return uuid.UUID(int=(kind << 96) | n)


@dataclass
class Case:
    """One input to :func:`pick_shards`: the jobs, each job's shard sizes, the state, the limit."""

    jobs: list[WaitingJob]
    shards: dict[uuid.UUID, list[int]]  # job id -> items of each waiting shard, in index order
    state: ShareState
    limit: int

    def run(self, jobs: list[WaitingJob] | None = None) -> list[Pick]:
        """The picks, on copies (the policy marks jobs exhausted and charges the state)."""
        jobs = copy.deepcopy(self.jobs if jobs is None else jobs)
        left = {job_id: iter(list(enumerate(items))) for job_id, items in self.shards.items()}

        def next_shard(job: WaitingJob) -> WaitingShard | None:
            index, items = next(left[job.job_id], (None, 0))
            return None if index is None else WaitingShard(_shard_id(job.job_id, index), items)

        return pick_shards(jobs, copy.deepcopy(self.state), next_shard, self.limit)


def _shard_id(job_id: uuid.UUID, index: int) -> uuid.UUID:
    return uuid.UUID(int=job_id.int ^ (index + 1) << 64)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    projects = [_id(1, n) for n in range(draw(st.integers(1, 4)))]
    users = [_id(2, n) for n in range(draw(st.integers(1, 4)))]
    jobs, shards = [], {}
    for n in range(draw(st.integers(1, 12))):
        job = WaitingJob(
            job_id=_id(3, n),
            project_id=draw(st.sampled_from(projects)),
            user_id=draw(st.sampled_from(users)),
            service_class=draw(st.sampled_from(CLASS_ORDER)),
            priority=draw(st.integers(0, 2)),
            created_at=T0 + timedelta(seconds=draw(st.integers(0, 5))),  # ties on purpose
        )
        jobs.append(job)
        shards[job.job_id] = draw(st.lists(st.integers(1, 5), max_size=5))
    optional_cap = st.none() | st.integers(1, 5)
    state = ShareState(
        room={INTERACTIVE: draw(st.integers(-1, 8)), BULK: draw(st.integers(-1, 8))},
        weights={p: draw(st.sampled_from([0.5, 1.0, 2.0, 3.0])) for p in projects},
        usage_project={p: float(draw(st.integers(0, 50))) for p in projects},
        usage_user={(p, u): float(draw(st.integers(0, 20))) for p in projects for u in users},
        in_flight_project={p: draw(st.integers(0, 3)) for p in projects},
        in_flight_user={u: draw(st.integers(0, 3)) for u in users},
        seconds_per_item=draw(st.sampled_from([0.5, 1.0, 7.0])),
    )
    for owners, caps in ((projects, state.cap_project), (users, state.cap_user)):
        for owner in owners:
            if (cap := draw(optional_cap)) is not None:
                caps[owner] = cap
    limit = draw(st.sampled_from([max(state.room.values()), draw(st.integers(0, 10))]))
    return Case(jobs, shards, state, limit)


class Replay:
    """The bookkeeping the properties are checked against, advanced pick by pick."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.room = dict(case.state.room)
        self.project = Counter(case.state.in_flight_project)
        self.user = Counter(case.state.in_flight_user)
        self.left = {job_id: len(items) for job_id, items in case.shards.items()}

    def under_caps(self, job: WaitingJob) -> bool:
        project_cap = self.case.state.cap_project.get(job.project_id)
        user_cap = self.case.state.cap_user.get(job.user_id)
        return (project_cap is None or self.project[job.project_id] < project_cap) and (
            user_cap is None or self.user[job.user_id] < user_cap
        )

    def may_go(self, service_class: ServiceClass) -> bool:
        """Some job of the class could send a shard now."""
        return self.room.get(service_class, 0) > 0 and any(
            j.service_class == service_class and self.left[j.job_id] > 0 and self.under_caps(j) for j in self.case.jobs
        )

    def advance(self, job: WaitingJob) -> None:
        self.project[job.project_id] += 1
        self.user[job.user_id] += 1
        self.left[job.job_id] -= 1
        for service_class in CLASS_ORDER[CLASS_ORDER.index(job.service_class) :]:
            self.room[service_class] = self.room.get(service_class, 0) - 1


@PROPERTIES
@given(cases())
def test_interactive_first_caps_and_rooms_hold_at_every_pick(case: Case) -> None:
    """(a), (b), (c), and every pick is a real, not yet sent shard of its job."""
    picks = case.run()
    replay = Replay(case)
    assert len(picks) <= max(0, case.limit)
    assert len({p.shard_id for p in picks}) == len(picks)
    for pick in picks:
        job = pick.job
        assert replay.left[job.job_id] > 0, "a shard that is not there"
        assert pick.shard_id == _shard_id(job.job_id, len(case.shards[job.job_id]) - replay.left[job.job_id])
        if job.service_class == BULK:
            assert not replay.may_go(INTERACTIVE), "a bulk shard went while interactive work could go"
        assert replay.room[job.service_class] > 0, f"no room for {job.service_class}"
        assert replay.under_caps(job), "a cap was exceeded"
        replay.advance(job)
    if len(picks) < case.limit:  # it stopped early: nothing more could go
        assert not any(replay.may_go(c) for c in CLASS_ORDER)


@PROPERTIES
@given(cases())
def test_one_users_jobs_go_by_priority_then_age(case: Case) -> None:
    """(d): per project, user and class, the picks are the jobs in ``(-priority, created_at, id)``
    order, each shard of one before the next one's, cut where the picks stop."""
    picks = case.run()
    sent: dict[tuple, list[uuid.UUID]] = defaultdict(list)
    for pick in picks:
        sent[(pick.job.project_id, pick.job.user_id, pick.job.service_class)].append(pick.job.job_id)
    for key, job_ids in sent.items():
        mine = sorted((j for j in case.jobs if (j.project_id, j.user_id, j.service_class) == key), key=WaitingJob.order)
        due = [j.job_id for j in mine for _ in case.shards[j.job_id]]
        assert job_ids == due[: len(job_ids)]


@PROPERTIES
@given(cases())
def test_the_grouped_picks_are_the_reference_policys(case: Case) -> None:
    """pick_shards groups the jobs once per call; next_job, called for every pick, is the policy
    as written in the module docstring: both choose the same shards in the same order."""
    jobs, state = copy.deepcopy(case.jobs), copy.deepcopy(case.state)
    left = {job_id: iter(list(enumerate(items))) for job_id, items in case.shards.items()}
    reference = []
    while len(reference) < case.limit and (job := next_job(jobs, state)) is not None:
        index, items = next(left[job.job_id], (None, 0))
        if index is None:
            job.exhausted = True
            continue
        state.charge(job, items)
        reference.append((_shard_id(job.job_id, index), job.job_id))
    assert [(p.shard_id, p.job.job_id) for p in case.run()] == reference


@PROPERTIES
@given(cases(), st.randoms(use_true_random=False))
def test_same_input_same_picks_in_any_listing_order(case: Case, rng) -> None:
    """(f)."""
    first = [(p.shard_id, p.job.job_id) for p in case.run()]
    assert [(p.shard_id, p.job.job_id) for p in case.run()] == first
    shuffled = list(case.jobs)
    rng.shuffle(shuffled)
    assert [(p.shard_id, p.job.job_id) for p in case.run(shuffled)] == first


def _backlogged(weights: list[float], picks: int, *, per_user: int = 1) -> list[Pick]:
    """Every project with more bulk shards than ``picks`` (one item each), no usage yet, room for
    all: the picks in order."""
    jobs, shards = [], {}
    for p, _ in enumerate(weights):
        for u in range(per_user):
            job = WaitingJob(_id(3, p * per_user + u), _id(1, p), _id(2, p * per_user + u), BULK, 0, T0)
            jobs.append(job)
            shards[job.job_id] = [1] * picks
    state = ShareState(room={INTERACTIVE: picks, BULK: picks}, weights={_id(1, p): w for p, w in enumerate(weights)})
    return Case(jobs, shards, state, picks).run()


@PROPERTIES
@given(st.lists(st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0]), min_size=1, max_size=6))
def test_weighted_shares_stay_within_a_pick_of_their_due(weights: list[float]) -> None:
    """(e). The least normalized usage (picks / weight) goes next, so after any n picks each
    project's count c_p against its due share d_p = n * w_p / W (W = sum of weights) is

        d_p - P * w_p / W  <=  c_p  <=  d_p + 1      (P = number of projects)

    Above: a project is picked only while c_p / w_p is the least, so c_p / w_p never runs more
    than 1 / w_p past the least, which is at most n / W. Below: every project is within its own
    1 / w_q of the least, so n / W (their weighted mean) is at most P / W past it. With equal
    weights both bounds are one pick; a project with most of the weight may lag by up to P - 1
    picks right after the others had their turn. Checked after every pick."""
    total = sum(weights)
    picks = _backlogged(weights, 150)
    counts: Counter = Counter()
    for n, pick in enumerate(picks, start=1):
        counts[pick.job.project_id] += 1
        for p, w in enumerate(weights):
            due = n * w / total
            assert counts[_id(1, p)] <= due + 1 + 1e-9
            assert counts[_id(1, p)] >= due - len(weights) * w / total - 1e-9


# -- examples -------------------------------------------------------------------------------------


def test_a_small_job_goes_at_once_beside_a_big_backlog() -> None:
    """Project A has 500 shards waiting, project B (submitted later) 5: B's first shard is the
    second pick, and B's 5 are done within the first 10, not after A's 500."""
    a, b = _id(3, 1), _id(3, 2)
    jobs = [
        WaitingJob(a, _id(1, 1), _id(2, 1), BULK, 0, T0),
        WaitingJob(b, _id(1, 2), _id(2, 2), BULK, 0, T0 + timedelta(minutes=5)),
    ]
    case = Case(jobs, {a: [1] * 500, b: [1] * 5}, ShareState(room={INTERACTIVE: 505, BULK: 505}), 505)
    order = [p.job.job_id for p in case.run()]
    assert order[:2] == [a, b]
    assert order[:10].count(b) == 5
    assert order[10:] == [a] * 495


def test_a_project_that_used_the_farm_waits_for_one_that_did_not() -> None:
    """A rendered for an hour, B not at all: B's shards go first until they have caught up."""
    a, b = _id(3, 1), _id(3, 2)
    jobs = [WaitingJob(a, _id(1, 1), _id(2, 1), BULK, 0, T0), WaitingJob(b, _id(1, 2), _id(2, 2), BULK, 0, T0)]
    state = ShareState(room={INTERACTIVE: 8, BULK: 8}, usage_project={_id(1, 1): 5.0})
    order = [p.job.job_id for p in Case(jobs, {a: [1] * 8, b: [1] * 8}, state, 8).run()]
    assert order == [b] * 5 + [a, b, a]  # 5 s of catching up, then turns (A, older by id, first)


def test_weights_three_to_one_give_three_to_one() -> None:
    picks = _backlogged([3.0, 1.0], 400)
    counts = Counter(p.job.project_id for p in picks)
    assert abs(counts[_id(1, 0)] - 300) <= 30 and abs(counts[_id(1, 1)] - 100) <= 10


def test_users_of_one_project_share_it_evenly() -> None:
    picks = _backlogged([1.0], 90, per_user=3)
    assert sorted(Counter(p.job.user_id for p in picks).values()) == [30, 30, 30]


def test_interactive_work_goes_before_a_bulk_backlog_and_fills_the_window_too() -> None:
    """The bulk job is older and its project has used nothing, but the interactive shards go first;
    each one takes room from the bulk window as well."""
    bulk, interactive = _id(3, 1), _id(3, 2)
    jobs = [
        WaitingJob(bulk, _id(1, 1), _id(2, 1), BULK, 0, T0),
        WaitingJob(interactive, _id(1, 2), _id(2, 2), INTERACTIVE, 0, T0 + timedelta(hours=1)),
    ]
    state = ShareState(room={INTERACTIVE: 4, BULK: 4}, usage_project={_id(1, 2): 1000.0})
    order = [p.job.job_id for p in Case(jobs, {bulk: [1] * 10, interactive: [1] * 3}, state, 4).run()]
    assert order == [interactive] * 3 + [bulk]


def test_a_capped_user_waits_while_others_go() -> None:
    capped, free = _id(2, 1), _id(2, 2)
    jobs = [
        WaitingJob(_id(3, 1), _id(1, 1), capped, BULK, 5, T0),
        WaitingJob(_id(3, 2), _id(1, 1), free, BULK, 0, T0 + timedelta(hours=1)),
    ]
    state = ShareState(room={INTERACTIVE: 6, BULK: 6}, cap_user={capped: 2}, in_flight_user={capped: 1})
    order = [p.job.user_id for p in Case(jobs, {_id(3, 1): [1] * 6, _id(3, 2): [1] * 6}, state, 6).run()]
    assert order.count(capped) == 1 and order.count(free) == 5


def test_higher_priority_first_then_the_older_job() -> None:
    user, project = _id(2, 1), _id(1, 1)
    old, new_urgent, newer = _id(3, 1), _id(3, 2), _id(3, 3)
    jobs = [
        WaitingJob(newer, project, user, BULK, 0, T0 + timedelta(hours=2)),
        WaitingJob(old, project, user, BULK, 0, T0),
        WaitingJob(new_urgent, project, user, BULK, 1, T0 + timedelta(hours=1)),
    ]
    order = [p.job.job_id for p in Case(jobs, {j.job_id: [1] * 2 for j in jobs}, ShareState(room={BULK: 6}), 6).run()]
    assert order == [new_urgent] * 2 + [old] * 2 + [newer] * 2


def test_largest_lag_found_is_what_the_bound_allows() -> None:
    """The lower bound of (e) is needed, one pick is not enough: weights 10, 1, 1 (P = 3, W = 12).
    Nothing used yet, so the three go in turn first: after 3 picks the heavy project has 1 where
    2.5 were due, 1.5 behind (the bound allows 2.5)."""
    weights = [10.0, 1.0, 1.0]
    counts: Counter = Counter()
    lags = []
    for n, pick in enumerate(_backlogged(weights, 24), start=1):
        counts[pick.job.project_id] += 1
        lags.append(n * weights[0] / sum(weights) - counts[_id(1, 0)])
    assert max(lags) > 1  # more than one pick behind at some point...
    assert max(lags) <= len(weights) * weights[0] / sum(weights)  # ...but within P * w / W
