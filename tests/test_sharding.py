"""Sharding is a pure, deterministic function: every item in exactly one bounded shard, stable keys."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import Field

from farm.errors import UserError
from farm.families import gpu_queue
from farm.job_spec import MAX_SEED, JobSpec
from farm.kinds import KINDS, ItemSource, JobKind, item_name, register_kind, unregister_kind
from farm.sharding import (
    QUEUES,
    RenderItem,
    ShardPlan,
    iter_shards,
    plan_shards,
    route,
    shard_count,
)
from farm.specs import parse_spec

JOB = uuid.UUID("00000000-0000-0000-0000-0000000000aa")


def spec_dicts() -> st.SearchStrategy[dict[str, Any]]:
    """Valid text-to-image spec dicts with small prompt and seed counts."""
    base = st.fixed_dictionaries(
        {
            "model": st.just("org/name"),
            "family": st.sampled_from(["sd15", "sdxl"]),
            "prompts": st.integers(1, 8).map(lambda n: [f"prompt {i}" for i in range(n)]),
            "shard_size": st.integers(1, 10),
            "priority": st.integers(0, 9),
            "output_prefix": st.sampled_from(["renders", "team-a/nightly", ""]),
        }
    )
    seeds = st.one_of(
        st.lists(st.integers(0, MAX_SEED), min_size=1, max_size=12, unique=True).map(lambda s: {"seeds": s}),
        st.tuples(st.integers(0, MAX_SEED - 100), st.integers(1, 12)).map(lambda t: {"base_seed": t[0], "count": t[1]}),
    )
    return st.tuples(base, seeds).map(lambda pair: {**pair[0], **pair[1]})


job_ids = st.uuids() | st.just(JOB)


def _flatten(plans: list[ShardPlan]) -> list[RenderItem]:
    return [item for plan in plans for item in plan.items]


@settings(max_examples=200, deadline=None)
@given(spec_dicts(), job_ids)
def test_every_item_in_exactly_one_bounded_shard(data: dict[str, Any], job_id: uuid.UUID) -> None:
    spec = parse_spec(data)
    plans = plan_shards(spec, job_id)
    items = _flatten(plans)
    seeds = spec.resolved_seeds()
    expected = [(p, s) for p in range(len(spec.prompts)) for s in seeds]  # prompt-major
    assert [(i.prompt_index, i.seed) for i in items] == expected
    assert [i.index for i in items] == list(range(len(expected)))
    assert [p.index for p in plans] == list(range(len(plans))) == list(range(shard_count(spec)))
    assert all(1 <= len(p.items) <= spec.shard_size for p in plans)
    assert all(len(p.items) == spec.shard_size for p in plans[:-1])  # only the last shard may be short
    assert len({i.key for i in items}) == len(items)
    assert {(p.queue, p.priority) for p in plans} == {(f"farm.gpu.{spec.family}", spec.priority)}
    assert route(spec) == (gpu_queue(spec.family), spec.priority)


@settings(max_examples=100, deadline=None)
@given(spec_dicts(), job_ids)
def test_keys_follow_the_layout(data: dict[str, Any], job_id: uuid.UUID) -> None:
    spec = parse_spec(data)
    prefix = f"{spec.output_prefix}/{job_id}" if spec.output_prefix else str(job_id)
    for plan in plan_shards(spec, job_id):
        for item in plan.items:
            assert item.key == f"{prefix}/{plan.index:05d}/{item.index:06d}-s{item.seed}.png"


@settings(max_examples=100, deadline=None)
@given(spec_dicts(), job_ids)
def test_deterministic_across_calls_and_json_round_trip(data: dict[str, Any], job_id: uuid.UUID) -> None:
    spec = parse_spec(data)
    first = plan_shards(spec, job_id)
    assert plan_shards(spec, job_id) == first
    assert plan_shards(spec, str(job_id)) == first
    assert list(iter_shards(spec, job_id)) == first
    stored = json.loads(json.dumps(spec.model_dump(mode="json")))  # what the job row holds
    assert plan_shards(parse_spec(stored), job_id) == first


@settings(max_examples=50, deadline=None)
@given(spec_dicts())
def test_params_are_json_and_carry_the_items(data: dict[str, Any]) -> None:
    spec = parse_spec(data)
    for plan in plan_shards(spec, JOB):
        params = plan.to_params()
        assert json.loads(json.dumps(params)) == params
        assert params["items"] == [
            {"index": i.index, "prompt_index": i.prompt_index, "seed": i.seed, "key": i.key} for i in plan.items
        ]


def test_concrete_prompt_major_layout() -> None:
    spec = parse_spec(
        {
            "model": "org/name",
            "family": "sdxl",
            "prompts": ["a", "b"],
            "seeds": [5, 9, 11],
            "shard_size": 4,
            "priority": 3,
        }
    )
    plans = plan_shards(spec, "job-1")
    assert [(p.index, p.queue, p.priority) for p in plans] == [(0, "farm.gpu.sdxl", 3), (1, "farm.gpu.sdxl", 3)]
    assert plans[0].items == (
        RenderItem(0, 0, 5, "renders/job-1/00000/000000-s5.png"),
        RenderItem(1, 0, 9, "renders/job-1/00000/000001-s9.png"),
        RenderItem(2, 0, 11, "renders/job-1/00000/000002-s11.png"),
        RenderItem(3, 1, 5, "renders/job-1/00000/000003-s5.png"),
    )
    assert plans[1].items == (
        RenderItem(4, 1, 9, "renders/job-1/00001/000004-s9.png"),
        RenderItem(5, 1, 11, "renders/job-1/00001/000005-s11.png"),
    )


def test_concrete_ranged_seeds_with_uuid_job() -> None:
    spec = parse_spec(
        {
            "model": "/srv/models/sd15",
            "family": "sd15",
            "prompts": ["a red cube", "a blue sphere", "a green cone"],
            "base_seed": 7,
            "count": 2,
            "shard_size": 2,
            "output_prefix": "tests",
        }
    )
    plans = plan_shards(spec, JOB)
    assert [[i.key for i in p.items] for p in plans] == [
        [f"tests/{JOB}/00000/000000-s7.png", f"tests/{JOB}/00000/000001-s8.png"],
        [f"tests/{JOB}/00001/000002-s7.png", f"tests/{JOB}/00001/000003-s8.png"],
        [f"tests/{JOB}/00002/000004-s7.png", f"tests/{JOB}/00002/000005-s8.png"],
    ]
    assert plans[1].to_params() == {
        "items": [
            {"index": 2, "prompt_index": 1, "seed": 7, "key": f"tests/{JOB}/00001/000002-s7.png"},
            {"index": 3, "prompt_index": 1, "seed": 8, "key": f"tests/{JOB}/00001/000003-s8.png"},
        ]
    }


def test_item_name_is_readable() -> None:
    assert item_name(12, 1234) == "000012-s1234"
    assert item_name(99_999, MAX_SEED) == f"099999-s{MAX_SEED}"


def test_queues() -> None:
    assert QUEUES == {"sd15": "farm.gpu.sd15", "sdxl": "farm.gpu.sdxl", "svd": "farm.gpu.svd"}
    assert gpu_queue("svd") == "farm.gpu.svd"
    with pytest.raises(UserError, match="unknown model family"):
        gpu_queue("sd3")


def test_bad_job_id_is_refused() -> None:
    spec = parse_spec({"model": "org/name", "family": "sd15", "prompts": ["a"], "seeds": [1]})
    with pytest.raises(UserError):
        plan_shards(spec, "../escape")


def test_largest_job_fits_the_key_layout() -> None:
    spec = parse_spec(
        {"model": "org/name", "family": "sd15", "prompts": ["p"] * 10, "base_seed": 0, "count": 10_000, "shard_size": 1}
    )
    assert shard_count(spec) == 100_000
    last = None
    for last in iter_shards(spec, JOB):  # noqa: B007
        pass
    assert last is not None and last.index == 99_999
    assert last.items[0].key == f"renders/{JOB}/99999/099999-s9999.png"


def test_a_later_kind_adds_an_axis() -> None:
    class FramesSpec(JobSpec):
        families: ClassVar[tuple[str, ...]] = ("svd",)
        kind: Literal["frames_test"]
        frames: int = Field(default=2, ge=1, le=4)

        def item_axes(self) -> dict[str, int]:
            return {**super().item_axes(), "frames": self.frames}

    def frames_items(spec: FramesSpec) -> Iterator[ItemSource]:
        for p in range(len(spec.prompts)):
            for s in spec.resolved_seeds():
                for f in range(spec.frames):
                    yield ItemSource(p, s, (("frame_index", f),))

    register_kind(JobKind(spec=FramesSpec, items=frames_items, runner=KINDS["text_to_image"].runner, ext="webp"))
    try:
        spec = parse_spec(
            {
                "kind": "frames_test",
                "model": "org/svd",
                "family": "svd",
                "prompts": ["a"],
                "seeds": [3],
                "shard_size": 3,
            }
        )
        plans = plan_shards(spec, "j")
        assert shard_count(spec) == len(plans) == 1 and plans[0].queue == "farm.gpu.svd"
        assert plans[0].to_params()["items"] == [
            {"frame_index": 0, "index": 0, "prompt_index": 0, "seed": 3, "key": "renders/j/00000/000000-s3.webp"},
            {"frame_index": 1, "index": 1, "prompt_index": 0, "seed": 3, "key": "renders/j/00000/000001-s3.webp"},
        ]
    finally:
        unregister_kind("frames_test")
