"""Job specs: limits with exact field paths, file loading, JSON round trips, registries, fuzzing."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import Field

from farm.errors import UserError
from farm.job_spec import MAX_ITEMS, MAX_SEED, SCHEDULERS, JobSpec, SchedulerName, SpecError
from farm.kinds import KINDS, JobKind, register_kind, unregister_kind
from farm.kinds.text_to_image import TextToImageSpec, prompt_major_items
from farm.patch_specs import PATCH_TYPES, PatchSpec, known_patch_types, register_patch_type
from farm.spec_files import MAX_SPEC_FILE_BYTES, load_spec_file
from farm.specs import LATER_FIELDS, parse_spec, spec_fingerprint


def minimal(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": "org/name", "family": "sd15", "prompts": ["a red cube"], "seeds": [1]}
    spec.update(overrides)
    return spec


def without(*names: str) -> dict[str, Any]:
    return {k: v for k, v in minimal().items() if k not in names}


def problems_of(data: Any) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return info.value.problems


# -- valid specs ---------------------------------------------------------------------------------
def test_minimal_spec_gets_defaults() -> None:
    spec = parse_spec(minimal())
    assert isinstance(spec, TextToImageSpec) and isinstance(spec, JobSpec)
    assert spec.kind == "text_to_image"
    assert (spec.steps, spec.guidance, spec.width, spec.height) == (30, 7.0, 512, 512)
    assert (spec.scheduler, spec.shard_size, spec.priority) == ("euler", 4, 0)
    assert spec.output_prefix == "renders" and spec.idempotency_key is None and spec.patches == []
    assert spec.resolved_seeds() == [1]


def test_seed_forms_resolve() -> None:
    assert parse_spec(minimal(seeds=[9, 3, 7])).resolved_seeds() == [9, 3, 7]
    ranged = parse_spec(without("seeds") | {"base_seed": 100, "count": 3})
    assert ranged.resolved_seeds() == [100, 101, 102]
    top = parse_spec(without("seeds") | {"base_seed": MAX_SEED - 1, "count": 2})
    assert top.resolved_seeds() == [MAX_SEED - 1, MAX_SEED]


@pytest.mark.parametrize(
    "model", ["org/name", "stabilityai/stable-diffusion-xl-base-1.0", "/srv/models/sd15", "./tiny", "../m", "~/m"]
)
def test_model_references_accepted(model: str) -> None:
    assert parse_spec(minimal(model=model)).model == model


def test_explicit_kind_and_nulls_accepted() -> None:
    spec = parse_spec(minimal(kind="text_to_image", idempotency_key=None, base_seed=None, count=None))
    assert spec == parse_spec(minimal())


def test_output_prefix_is_normalised() -> None:
    assert parse_spec(minimal(output_prefix="team-a/renders/")).output_prefix == "team-a/renders"
    assert parse_spec(minimal(output_prefix="")).output_prefix == ""


@pytest.mark.parametrize("prefix", ["inputs-2024", "my/inputs", "team/models/sd15", "input", "modelsx", "renders"])
def test_prefixes_near_the_reserved_folders_are_fine(prefix: str) -> None:
    """Only the first segment ``inputs`` or ``models`` is the farm's own."""
    assert parse_spec(minimal(output_prefix=prefix)).output_prefix == prefix


def test_scheduler_names_match_the_diffusers_map() -> None:
    assert set(get_args(SchedulerName)) == set(SCHEDULERS)
    assert all(name.endswith("Scheduler") for name in SCHEDULERS.values())
    for name in SCHEDULERS:
        assert parse_spec(minimal(scheduler=name)).scheduler == name


# -- refusals ------------------------------------------------------------------------------------
REJECTED: list[tuple[str, dict[str, Any], str]] = [
    ("missing model", without("model"), "model: required field is missing"),
    ("missing family", without("family"), "family: required field is missing"),
    ("missing prompts", without("prompts"), "prompts: required field is missing"),
    ("unknown field", minimal(colour="red"), "colour: unknown field"),
    ("odd unknown field", minimal(**{"a b": 1}), "['a b']: unknown field"),
    (
        "unknown kind",
        minimal(kind="face_swap"),
        "kind: unknown job kind 'face_swap'; known kinds: contact_sheet, encode, face_identity, package, "
        "temporal_video, text_to_image, upscale",
    ),
    ("kind not a string", minimal(kind=3), "kind: must be a string naming a job kind"),
    ("empty model", minimal(model=""), "model: String should have at least 1 character"),
    ("long model", minimal(model="o/" + "m" * 511), "model: String should have at most 512 characters"),
    ("bare model name", minimal(model="sd15"), "model: must be a hub id 'org/name' or a local folder path"),
    ("model url", minimal(model="https://x.org/m"), "model: URLs are not supported"),
    ("model control char", minimal(model="/m\nx"), "model: must not contain control characters"),
    ("model whitespace", minimal(model=" org/name"), "model: must not start or end with whitespace"),
    ("unknown family", minimal(family="sd3"), "family: Input should be 'sd15', 'sdxl' or 'svd'"),
    ("svd for text", minimal(family="svd"), "family: text_to_image jobs run on sd15 or sdxl models, not svd"),
    ("prompts not a list", minimal(prompts="a cat"), "prompts: Input should be a valid list"),
    ("no prompts", minimal(prompts=[]), "prompts: List should have at least 1 item"),
    ("too many prompts", minimal(prompts=["p"] * 10_000), "prompts: List should have at most 1000 items"),
    ("empty prompt", minimal(prompts=["a", ""]), "prompts[1]: String should have at least 1 character"),
    ("blank prompt", minimal(prompts=["a", "  "]), "prompts[1]: must not be blank"),
    ("long prompt", minimal(prompts=["a", "b", "c", "x" * 2001]), "prompts[3]: String should have at most 2000"),
    ("prompt not text", minimal(prompts=["a", 5]), "prompts[1]: Input should be a valid string"),
    ("NUL in prompt", minimal(prompts=["a\x00b"]), "prompts[0]: must not contain control characters"),
    ("surrogate", minimal(prompts=["a\ud800"]), "prompts[0]: Input should be a valid string, unable to parse raw data"),
    ("long negative", minimal(negative_prompt="n" * 2001), "negative_prompt: String should have at most 2000"),
    ("both seed forms", minimal(base_seed=1, count=2), "seeds: give either 'seeds' or 'base_seed' + 'count'"),
    ("no seed form", without("seeds"), "seeds: missing: give 'seeds' (a list) or 'base_seed' + 'count'"),
    ("base_seed alone", without("seeds") | {"base_seed": 1}, "count: required with base_seed"),
    ("count alone", without("seeds") | {"count": 3}, "base_seed: required with count"),
    ("empty seeds", minimal(seeds=[]), "seeds: List should have at least 1 item"),
    ("negative seed", minimal(seeds=[1, -1]), "seeds[1]: Input should be greater than or equal to 0"),
    ("huge seed", minimal(seeds=[2**63]), "seeds[0]: Input should be less than or equal to 9223372036854775807"),
    ("duplicate seed", minimal(seeds=[4, 5, 4]), "seeds[2]: duplicate of seeds[0] (4); seeds must be unique"),
    ("too many seeds", minimal(seeds=list(range(10_001))), "seeds: List should have at most 10000 items"),
    ("bool seed", minimal(seeds=[True]), "seeds[0]: Input should be a valid integer"),
    ("string seed", minimal(seeds=["1"]), "seeds[0]: Input should be a valid integer"),
    (
        "count zero",
        without("seeds") | {"base_seed": 0, "count": 0},
        "count: Input should be greater than or equal to 1",
    ),
    ("count huge", without("seeds") | {"base_seed": 0, "count": 10_001}, "count: Input should be less than or equal"),
    ("seed overflow", without("seeds") | {"base_seed": MAX_SEED, "count": 2}, "count: base_seed + count - 1 exceeds"),
    ("steps zero", minimal(steps=0), "steps: Input should be greater than or equal to 1"),
    ("steps huge", minimal(steps=151), "steps: Input should be less than or equal to 150"),
    ("steps float", minimal(steps=20.0), "steps: Input should be a valid integer"),
    ("guidance negative", minimal(guidance=-1), "guidance: Input should be greater than or equal to 0"),
    ("guidance huge", minimal(guidance=30.5), "guidance: Input should be less than or equal to 30"),
    ("guidance nan", minimal(guidance=float("nan")), "guidance: Input should be a finite number"),
    ("guidance string", minimal(guidance="7"), "guidance: Input should be a valid number"),
    ("width not multiple", minimal(width=65), "width: must be a multiple of 8"),
    ("height not multiple", minimal(height=100), "height: must be a multiple of 8"),
    ("width negative", minimal(width=-8), "width: Input should be greater than or equal to 64"),
    ("height huge", minimal(height=4096), "height: Input should be less than or equal to 2048"),
    ("unknown scheduler", minimal(scheduler="karras"), "scheduler: Input should be 'ddim', 'pndm'"),
    ("shard_size zero", minimal(shard_size=0), "shard_size: Input should be greater than or equal to 1"),
    ("shard_size huge", minimal(shard_size=257), "shard_size: Input should be less than or equal to 256"),
    ("priority high", minimal(priority=10), "priority: Input should be less than or equal to 9"),
    ("priority negative", minimal(priority=-1), "priority: Input should be greater than or equal to 0"),
    ("prefix traversal", minimal(output_prefix="../x"), "output_prefix: segment 1: '..' is not allowed"),
    ("prefix inner dots", minimal(output_prefix="a/../b"), "output_prefix: segment 2: '..' is not allowed"),
    ("prefix absolute", minimal(output_prefix="/abs"), "output_prefix: must be relative"),
    ("prefix backslash", minimal(output_prefix="a\\b"), "output_prefix: segment 1: 'a\\\\b' is not allowed"),
    ("prefix long", minimal(output_prefix="a/" * 200), "output_prefix: String should have at most 256"),
    ("prefix inputs", minimal(output_prefix="inputs"), "output_prefix: 'inputs' would put outputs in 'inputs/'"),
    (
        "prefix input digests",
        minimal(output_prefix="inputs/sha256/"),
        "output_prefix: 'inputs/sha256' would put outputs in 'inputs/', which the farm keeps for uploaded inputs",
    ),
    ("prefix models", minimal(output_prefix="models/x"), "output_prefix: 'models/x' would put outputs in 'models/'"),
    ("prefix INPUTS", minimal(output_prefix="INPUTS/a"), "output_prefix: 'INPUTS/a' would put outputs in 'INPUTS/'"),
    ("idempotency space", minimal(idempotency_key="a b"), "idempotency_key: must be 1-128 characters of"),
    ("idempotency slash", minimal(idempotency_key="a/b"), "idempotency_key: must be 1-128 characters of"),
    ("idempotency empty", minimal(idempotency_key=""), "idempotency_key: must be 1-128 characters of"),
    ("idempotency long", minimal(idempotency_key="k" * 129), "idempotency_key: must be 1-128 characters of"),
    ("patches not list", minimal(patches={"type": "sag"}), "patches: Input should be a valid list"),
    (
        "unknown patch",
        minimal(patches=[{"type": "sag"}]),
        "patches[0].type: unknown patch type 'sag'; known types: clip_attention_multiply, unet_cross_attention",
    ),
    (
        "patch no type",
        minimal(patches=[{"scale": 1}]),
        "patches[0].type: missing; known types: clip_attention_multiply",
    ),
    ("patch not object", minimal(patches=["sag"]), "patches[0]: a patch must be an object with a 'type' field"),
    (
        "too many items",
        minimal(prompts=["p"] * 1000, seeds=list(range(101))),
        "spec: 1000 prompts x 101 seeds = 101000",
    ),
    ("non-string key", {**minimal(), 5: 1}, "[5]: field names must be strings"),
]


@pytest.mark.parametrize(("data", "expected"), [(d, e) for _, d, e in REJECTED], ids=[n for n, _, _ in REJECTED])
def test_rejected_with_field_path(data: dict[str, Any], expected: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert expected in str(info.value)
    path, _, reason = expected.partition(": ")
    assert any(p == path and r.startswith(reason[:30]) for p, r in info.value.problems), info.value.problems


def test_item_limit_names_the_numbers() -> None:
    (problem,) = problems_of(without("seeds") | {"prompts": ["p"] * 20, "base_seed": 0, "count": 5001})
    assert problem == ("spec", f"20 prompts x 5001 seeds = 100020 items; a job may have at most {MAX_ITEMS}")
    assert (
        parse_spec(without("seeds") | {"prompts": ["p"] * 10, "base_seed": 0, "count": 10_000}).item_count()
        == MAX_ITEMS
    )


def test_every_problem_is_listed_and_structured() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(minimal(width=65, colour="red", steps=0, idempotency_key=None))
    err = info.value
    assert isinstance(err, UserError) and isinstance(err, ValueError)
    assert err.problems == [
        ("steps", "Input should be greater than or equal to 1"),
        ("width", "must be a multiple of 8"),
        ("colour", "unknown field"),
    ]
    assert str(err) == (
        "invalid job spec: steps: Input should be greater than or equal to 1; width: must be a multiple of 8; "
        "colour: unknown field"
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (minimal(guidence=3.0), ("guidence", "unknown field; did you mean guidance?")),
        (minimal(Steps=20), ("Steps", "unknown field; did you mean steps?")),
        (minimal(sag={"scal": 1.0}), ("sag.scal", "unknown field; did you mean scale?")),
        (
            minimal(patches=[{"type": "unet_self_attention_multiply", "out_": 1.0}]),
            ("patches[0].out_", "unknown field; did you mean out?"),
        ),
        (
            minimal(
                kind="face_identity",
                family="sdxl",
                identity={
                    "method": "instantid",
                    "checkpoint": "/m/c.bin",
                    "references": [{"key": "inputs/a.png"}],
                    "strat_at": 0.1,
                },
            ),
            ("identity.strat_at", "unknown field; did you mean start_at?"),
        ),
        (
            minimal(kind="temporal_video", family="svd", prompts=[], images=[{"key": "inputs/a.png", "sha265": "x"}]),
            ("images[0].sha265", "unknown field; did you mean sha256?"),
        ),
        (minimal(colour="red"), ("colour", "unknown field")),  # nothing close: no guess
    ],
    ids=["top-level", "case", "nested", "patch", "identity-union", "image-ref", "no-guess"],
)
def test_unknown_fields_suggest_the_closest_known_one(data: dict[str, Any], expected: tuple[str, str]) -> None:
    assert expected in problems_of(data)


def test_a_typo_in_a_spec_file_is_named_with_its_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("model: org/name\nfamily: sd15\nprompts: [a cat]\nseeds: [1]\nguidence: 5\n")
    with pytest.raises(SpecError, match=r"guidence: unknown field; did you mean guidance\?"):
        load_spec_file(path)


def test_long_problem_lists_are_cut_in_the_message() -> None:
    err_problems = problems_of(minimal(prompts=[""] * 30))
    assert len(err_problems) == 30
    with pytest.raises(SpecError, match=r"and 10 more problems$"):
        parse_spec(minimal(prompts=[""] * 30))


@pytest.mark.parametrize("data", [None, [], "spec", 5])
def test_non_mapping_refused(data: Any) -> None:
    assert problems_of(data)[0][0] == "spec"


def test_base_class_is_not_a_kind() -> None:
    with pytest.raises(TypeError):
        JobSpec.model_validate(minimal())


def test_specs_are_frozen() -> None:
    spec = parse_spec(minimal())
    with pytest.raises(ValueError, match="frozen"):
        spec.steps = 3  # type: ignore[misc]


# -- files ---------------------------------------------------------------------------------------
YAML_SPEC = """
model: stabilityai/stable-diffusion-xl-base-1.0
family: sdxl
prompts:
  - a lighthouse at dusk
  - "a fox, watercolor"
base_seed: 1000
count: 4
width: 1024
height: 768
scheduler: dpmpp_2m
"""


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".YAML"])
def test_load_yaml(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"job{suffix}"
    path.write_text(YAML_SPEC)
    spec = load_spec_file(path)
    assert spec.family == "sdxl" and spec.prompts[1] == "a fox, watercolor"
    assert spec.resolved_seeds() == [1000, 1001, 1002, 1003] and (spec.width, spec.height) == (1024, 768)


def test_load_json_equals_yaml(tmp_path: Path) -> None:
    yaml_path = tmp_path / "job.yaml"
    yaml_path.write_text(YAML_SPEC)
    json_path = tmp_path / "job.json"
    json_path.write_text(json.dumps(load_spec_file(yaml_path).model_dump(mode="json")))
    assert load_spec_file(str(json_path)) == load_spec_file(yaml_path)


def test_yaml_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("<<: {model: org/name, family: sd15, steps: 10}\nprompts: [a]\nseeds: [1]\nsteps: 12\n")
    spec = load_spec_file(path)
    assert (spec.model, spec.steps) == ("org/name", 12)


def _file_problems(path: Path) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as info:
        load_spec_file(path)
    return info.value.problems


def test_huge_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(minimal(negative_prompt="x" * MAX_SPEC_FILE_BYTES)))
    assert _file_problems(path) == [("file", f"huge.json is larger than {MAX_SPEC_FILE_BYTES} bytes")]


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("job.txt", "model: x", "job.txt: use a .yaml, .yml or .json file"),
        ("bad.yaml", "prompts: [unclosed", "bad.yaml is not valid YAML"),
        ("bad.json", "{", "bad.json is not valid JSON"),
        (
            "dup.yaml",
            "model: org/a\nmodel: org/b\n",
            "dup.yaml is not valid YAML: duplicate key 'model' (line 2, column 1)",
        ),
        ("dup.json", '{"steps": 1, "steps": 2}', "dup.json is not valid JSON: duplicate key 'steps'"),
        ("tag.yaml", "!!python/object:os.system {}", "tag.yaml is not valid YAML: could not determine a constructor"),
        (
            "indent.yaml",
            "model: org/a\n  family: sd15\n",
            "indent.yaml is not valid YAML: mapping values are not allowed here (line 2, column 9)",
        ),
        (
            "comma.json",
            '{"steps": 1,\n "seeds": }',
            "comma.json is not valid JSON: Expecting value (line 2, column 11)",
        ),
        ("deep.json", "[" * 200_000, "deep.json is not valid JSON: nested too deeply"),
        ("latin1.yaml", b"steps: 1\nmodel: caf\xe9", "latin1.yaml is not UTF-8 text (line 2, column 11)"),
    ],
)
def test_bad_files_refused(tmp_path: Path, name: str, content: str | bytes, reason: str) -> None:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    ((where, message),) = _file_problems(path)
    assert where == "file" and message.startswith(reason)


@pytest.mark.parametrize(("content", "kind"), [("", "NoneType"), ("- a\n- b\n", "list"), ("just text", "str")])
def test_yaml_that_is_not_a_mapping(tmp_path: Path, content: str, kind: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(content)
    assert _file_problems(path) == [("spec", f"must be a mapping of fields, not {kind}")]


def test_missing_file_and_directory_refused(tmp_path: Path) -> None:
    assert _file_problems(tmp_path / "nope.yaml")[0][0] == "file"
    (tmp_path / "dir.json").mkdir()
    assert _file_problems(tmp_path / "dir.json")[0][0] == "file"


# -- JSON round trip and fingerprint -------------------------------------------------------------
def test_json_round_trip_and_fingerprint() -> None:
    spec = parse_spec(
        minimal(prompts=["ünïcode ✓", "b"], negative_prompt="blurry", guidance=7, idempotency_key="nightly:2024-01-01")
    )
    stored = json.loads(json.dumps(spec.model_dump(mode="json")))
    again = parse_spec(stored)
    assert again == spec and spec_fingerprint(again) == spec_fingerprint(spec)
    assert len(spec_fingerprint(spec)) == 64
    assert spec_fingerprint(parse_spec(minimal(steps=31))) != spec_fingerprint(parse_spec(minimal()))


def test_fields_added_later_leave_an_older_specs_fingerprint_alone() -> None:
    """A spec stored before the LATER_FIELDS existed fingerprints the same now (an idempotent
    resubmission after an upgrade is the same spec); a value given for one of them counts."""
    spec = parse_spec(minimal(idempotency_key="k-1"))
    stored_before = {k: v for k, v in spec.model_dump(mode="json").items() if k not in LATER_FIELDS}
    canonical = json.dumps(stored_before, sort_keys=True, separators=(",", ":"))
    assert spec_fingerprint(spec) == hashlib.sha256(canonical.encode("ascii")).hexdigest()
    assert spec_fingerprint(parse_spec(minimal(only_items=[0]))) != spec_fingerprint(parse_spec(minimal()))


valid_specs = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["org/name", "/srv/models/sdxl", "./m"]),
        "family": st.sampled_from(["sd15", "sdxl"]),
        "prompts": st.lists(st.text(min_size=1, max_size=40).filter(str.strip), min_size=1, max_size=5),
        "steps": st.integers(1, 150),
        "guidance": st.floats(0, 30, allow_nan=False),
        "width": st.integers(8, 256).map(lambda n: n * 8),
        "scheduler": st.sampled_from(sorted(SCHEDULERS)),
        "priority": st.integers(0, 9),
    }
).flatmap(
    lambda base: st.one_of(
        st.lists(st.integers(0, MAX_SEED), min_size=1, max_size=20, unique=True).map(lambda s: {**base, "seeds": s}),
        st.tuples(st.integers(0, MAX_SEED - 10_000), st.integers(1, 50)).map(
            lambda t: {**base, "base_seed": t[0], "count": t[1]}
        ),
    )
)


@settings(deadline=None)
@given(valid_specs)
def test_valid_specs_round_trip(data: dict[str, Any]) -> None:
    try:
        spec = parse_spec(data)
    except SpecError as exc:  # generated text may hold control characters
        assert all(p.startswith("prompts[") for p, _ in exc.problems), exc.problems
        return
    again = parse_spec(json.loads(json.dumps(spec.model_dump(mode="json"))))
    assert again == spec
    assert spec_fingerprint(again) == spec_fingerprint(spec)


# -- fuzzing -------------------------------------------------------------------------------------
FIELDS = sorted(TextToImageSpec.model_fields)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
keys = st.sampled_from(FIELDS) | st.text(max_size=10) | st.integers(-3, 3)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, json_values, max_size=12))
def test_fuzz_arbitrary_dicts(data: dict[Any, Any]) -> None:
    try:
        spec = parse_spec(data)
    except SpecError as exc:
        assert exc.problems and all(isinstance(p, str) and isinstance(r, str) for p, r in exc.problems)
        return
    assert parse_spec(spec.model_dump(mode="json")) == spec


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(FIELDS), json_values)
def test_fuzz_one_field_of_a_valid_spec(field: str, value: Any) -> None:
    data = minimal(**{field: value})
    try:
        spec = parse_spec(data)
    except SpecError as exc:
        assert exc.problems
        return
    assert parse_spec(spec.model_dump(mode="json")) == spec
    spec_fingerprint(spec)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode), st.sampled_from([".json", ".yaml"]))
def test_fuzz_files(tmp_path_factory: pytest.TempPathFactory, content: bytes, suffix: str) -> None:
    path = tmp_path_factory.mktemp("fuzz") / f"job{suffix}"
    path.write_bytes(content)
    with contextlib.suppress(SpecError):
        load_spec_file(path)


# -- registries ----------------------------------------------------------------------------------
class SelfAttentionGuidance(PatchSpec):
    type: Literal["sag_test"] = "sag_test"
    scale: float = Field(default=0.5, ge=0.0, le=5.0)
    blur_sigma: float = Field(default=2.0, gt=0.0)


@pytest.fixture
def sag_registered() -> Any:
    register_patch_type(SelfAttentionGuidance)
    try:
        yield SelfAttentionGuidance
    finally:
        PATCH_TYPES.pop("sag_test", None)


def test_registered_patch_type_is_accepted(sag_registered: type[PatchSpec]) -> None:
    assert "sag_test" in known_patch_types()
    spec = parse_spec(minimal(patches=[{"type": "sag_test", "scale": 1}]))
    assert spec.patches == [SelfAttentionGuidance(scale=1.0)]
    dumped = spec.model_dump(mode="json")
    assert dumped["patches"] == [{"type": "sag_test", "scale": 1.0, "blur_sigma": 2.0}]
    assert parse_spec(dumped) == spec


def test_registered_patch_type_errors_have_paths(sag_registered: type[PatchSpec]) -> None:
    problems = problems_of(
        minimal(patches=[{"type": "sag_test"}, {"type": "sag_test", "scale": 9, "x": 1}, {"type": "ip"}])
    )
    assert problems == [
        ("patches[1].scale", "Input should be less than or equal to 5"),
        ("patches[1].x", "unknown field"),
        ("patches[2].type", f"unknown patch type 'ip'; known types: {', '.join(known_patch_types())}"),
    ]


def test_patch_registration_checks_the_model() -> None:
    class NoLiteral(PatchSpec):
        pass

    with pytest.raises(TypeError, match="Literal"):
        register_patch_type(NoLiteral)
    with pytest.raises(TypeError):
        register_patch_type(int)  # type: ignore[arg-type]


def test_a_later_kind_plugs_in() -> None:
    class StillsFromFaces(JobSpec):
        families: ClassVar[tuple[str, ...]] = ("sdxl",)
        kind: Literal["faces_test"]
        references: list[str] = Field(min_length=1, max_length=8)

        def item_axes(self) -> dict[str, int]:
            return {**super().item_axes(), "references": len(self.references)}

    register_kind(JobKind(spec=StillsFromFaces, items=prompt_major_items, runner=KINDS["text_to_image"].runner))
    try:
        spec = parse_spec(minimal(kind="faces_test", family="sdxl", references=["a.png", "b.png"]))
        assert isinstance(spec, StillsFromFaces) and spec.item_count() == 2
        assert parse_spec(spec.model_dump(mode="json")) == spec
        assert parse_spec(minimal()).kind == "text_to_image"
        assert problems_of(minimal(kind="faces_test", family="sd15", references=["a"])) == [
            ("family", "faces_test jobs run on sdxl models, not sd15")
        ]
        big = minimal(kind="faces_test", family="sdxl", prompts=["p", "q"], references=["r"] * 8)
        assert parse_spec(big | {"seeds": list(range(6250))}).item_count() == MAX_ITEMS
        assert problems_of(big | {"seeds": list(range(6251))}) == [
            ("spec", f"2 prompts x 6251 seeds x 8 references = 100016 items; a job may have at most {MAX_ITEMS}")
        ]
        with pytest.raises(TypeError, match="already registered"):

            class Clash(TextToImageSpec):
                kind: Literal["faces_test"]  # type: ignore[assignment]

            register_kind(JobKind(spec=Clash, items=prompt_major_items, runner=KINDS["text_to_image"].runner))

    finally:
        unregister_kind("faces_test")
    assert problems_of(minimal(kind="faces_test"))[0][0] == "kind"
