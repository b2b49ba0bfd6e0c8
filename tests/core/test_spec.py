"""Grid files: valid ones expand as specified; invalid ones give one line naming the key path."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.cli import main
from orchestrator.expand import expand, flatten
from orchestrator.spec import SpecError, load_spec, parse_spec
from tests.core.helpers import TOY_KIND, write_grid
from tests.support.kinds import ToyKind


def _expand_file(path: Path):
    return expand(load_spec(path), ToyKind(), str(path))


def test_grid_zip_and_repeats_expand_to_product(tmp_path: Path) -> None:
    path = write_grid(
        tmp_path,
        base={"steps": 2, "seed": 7},
        grid={"x": [1, 2, 3], "y": [0, 1]},
        zip={"sleep_s": [0.0, 0.01], "fail": [False, True]},
        repeats=2,
    )
    trials = _expand_file(path)
    assert len(trials) == 3 * 2 * 2 * 2
    combos = {(t.params["x"], t.params["y"], t.params["sleep_s"], t.params["fail"], t.repeat) for t in trials}
    assert len(combos) == len(trials)
    # zip keys vary together, never crossed
    assert {(t.params["sleep_s"], t.params["fail"]) for t in trials} == {(0.0, False), (0.01, True)}
    assert all(t.params["steps"] == 2 and t.params["seed"] == 7 for t in trials)
    assert len({t.trial_id for t in trials}) == len(trials)


def test_trial_ids_are_stable_and_depend_on_params_only(tmp_path: Path) -> None:
    a = _expand_file(write_grid(tmp_path, "a.yaml", grid={"x": [1, 2], "y": [3]}, base={"steps": 5}))
    b = _expand_file(write_grid(tmp_path, "b.yaml", grid={"y": [3], "x": [1, 2]}, base={"steps": 5}))
    assert sorted(t.trial_id for t in a) == sorted(t.trial_id for t in b)
    c = _expand_file(write_grid(tmp_path, "c.yaml", grid={"x": [1, 2], "y": [3]}, base={"steps": 6}))
    assert not {t.trial_id for t in a} & {t.trial_id for t in c}
    repeated = _expand_file(write_grid(tmp_path, "d.yaml", grid={"x": [1]}, repeats=3))
    assert [t.trial_id.rsplit("-", 1)[1] for t in repeated] == ["0", "1", "2"]
    assert len({t.trial_id.rsplit("-", 1)[0] for t in repeated}) == 1


def test_dotted_keys_merge_into_nested_params(tmp_path: Path) -> None:
    spec = parse_spec(
        {"experiment": "e", "kind": TOY_KIND, "base": {"a.b": 1, "a": {"c": 2}}, "grid": {"a.d": [3, 4]}}
    )
    from orchestrator.expand import _base_params

    assert _base_params(spec.base) == {"a": {"b": 1, "c": 2}}
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": [1]}) == {"a.b": 1, "a.c.d": 2, "e": [1]}


def test_engine_groups_ignore_load_keys(tmp_path: Path) -> None:
    trials = _expand_file(write_grid(tmp_path, grid={"x": [1, 2], "y": [0, 1, 2]}))
    groups = {}
    for t in trials:
        groups.setdefault(t.group_key, set()).add(t.params["x"])
    # y is a load key: one group per x value
    assert sorted(map(sorted, groups.values())) == [[1], [2]]


INVALID = [
    ({"kind": TOY_KIND}, "experiment: required key is missing"),
    ({"experiment": "e", "kind": TOY_KIND, "bogus": 1}, "bogus: unknown key (allowed: experiment, kind"),
    ({"experiment": "../x", "kind": TOY_KIND}, "experiment: must match [A-Za-z0-9._-]+"),
    ({"experiment": "abc\n", "kind": TOY_KIND}, "experiment: must match [A-Za-z0-9._-]+"),
    ({"experiment": "a" * 101, "kind": TOY_KIND}, "experiment: must match [A-Za-z0-9._-]+, at most 100 characters"),
    ({"experiment": "..", "kind": TOY_KIND}, "experiment: must match"),
    ({"experiment": "e", "kind": TOY_KIND, "grid": {"x": []}}, "grid: axis 'x' is empty"),
    ({"experiment": "e", "kind": TOY_KIND, "grid": {"x": 3}}, "grid.x: Input should be a valid list"),
    ({"experiment": "e", "kind": TOY_KIND, "zip": {"x": [1, 2], "y": [1]}}, "zip: zip lists must have equal lengths"),
    ({"experiment": "e", "kind": TOY_KIND, "repeats": 0}, "repeats: Input should be greater than or equal to 1"),
    ({"experiment": "e", "kind": TOY_KIND, "repeats": "two"}, "repeats: Input should be a valid integer"),
    ({"experiment": "e", "kind": TOY_KIND, "timeout_s": -1}, "timeout_s: Input should be greater than 0"),
    ({"experiment": "e", "kind": TOY_KIND, "resources": {"gpu_a": "x"}}, "custom resource 'gpu_a' must be a non-negative number"),
]


@pytest.mark.parametrize(("data", "message"), INVALID)
def test_invalid_specs_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(data, "g.yaml")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


KIND_ERRORS = [
    ({"grid": {"x": ["abc"]}}, "grid.x: Input should be a valid number"),
    ({"base": {"nope": 1}}, "base.nope: unknown key"),
    ({"zip": {"steps": [-1]}}, "zip.steps: Input should be greater than or equal to 0"),
    ({"base": {"x": 1, "x.y": 2}}, "base.x.y: conflicts with 'x'"),
]


def test_a_check_across_keys_names_the_axis_values_of_the_trial_it_refuses(tmp_path: Path) -> None:
    from workloads.serving.kind import ServingKind

    path = tmp_path / "g.yaml"
    path.write_text("experiment: e\nkind: serving\ngrid:\n  backend: [full, h2o]\n"
                    "  policy.kv_budget: [0.5]\n  policy.recent_ratio: [0.1]\n")
    with pytest.raises(SpecError) as err:
        expand(load_spec(path), ServingKind(), str(path))
    # full takes kv_budget alone; h2o would ignore it beside recent_ratio
    assert str(err.value) == (f"{path}: trial (with backend=h2o, policy.kv_budget=0.5, policy.recent_ratio=0.1): "
                              "policy 'h2o': give kv_budget (split evenly into heavy and recent) or recent_ratio, "
                              "not both")


SERVING_KEYS = "backend, device, dtype, engine, load, model, percentiles, policy, quality, seed, slo, transport, weights"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("base: {load: {rate: 3}}\n", "base.load.rate: unknown key 'rate' (allowed: arrival, burstiness, ignore_eos,"),
        ("grid:\n  foo.bar: [1]\n", f"grid.foo.bar: unknown key 'foo' (allowed: {SERVING_KEYS})"),
        ("grid:\n  load.request_rate: [1, 1.0]\n",
         "two trials have identical parameters (load.request_rate=1; load.request_rate=1.0): make the axis values "
         "distinct"),
        ("base: {load: 3}\ngrid:\n  load.seed: [1]\n",
         "grid.load.seed: conflicts with 'load', which is a value, not a mapping"),
    ],
)
def test_section_errors_name_the_file_the_key_and_what_is_allowed(tmp_path: Path, text: str, message: str) -> None:
    from workloads.serving.kind import ServingKind

    path = tmp_path / "g.yaml"
    path.write_text("experiment: e\nkind: serving\n" + text)
    with pytest.raises(SpecError) as err:
        expand(load_spec(path), ServingKind(), str(path))
    assert str(err.value).startswith(f"{path}: {message}")


@pytest.mark.parametrize(("fields", "message"), KIND_ERRORS)
def test_kind_parameter_errors_name_the_grid_section(tmp_path: Path, fields: dict, message: str) -> None:
    path = write_grid(tmp_path, **({"grid": {"y": [0]}} | fields))
    with pytest.raises(SpecError) as err:
        _expand_file(path)
    assert message in str(err.value)


YAML_ATTACKS = {
    "tag": "experiment: !!python/object/apply:os.system ['true']\nkind: toy\n",
    "custom tag": "experiment: !x e\nkind: toy\n",
    "alias bomb": "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nexperiment: e\nkind: toy\n",
    "date": "experiment: e\nkind: " + TOY_KIND + "\nbase: {when: 2024-01-01}\n",
    "two documents": "experiment: e\n---\nexperiment: f\n",
    "not a mapping": "- 1\n- 2\n",
    "broken": "experiment: [e\n",
    "nan": "experiment: e\nkind: " + TOY_KIND + "\nbase: {x: .nan}\n",
}


@pytest.mark.parametrize("name", sorted(YAML_ATTACKS))
def test_hostile_yaml_is_rejected_by_the_cli_with_exit_2(tmp_path: Path, name: str) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(YAML_ATTACKS[name])
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0]
    assert "Traceback" not in result.output


def test_unknown_kind_lists_allowed_kinds(tmp_path: Path) -> None:
    path = write_grid(tmp_path, kind="nosuchkind")
    result = CliRunner().invoke(main, ["submit", "--dry-run", str(path)])
    assert result.exit_code == 2
    assert "unknown kind 'nosuchkind'; allowed:" in result.output
    assert "serving" in result.output and "training" in result.output


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        (".foo:Bar", "kind '.foo:Bar': expected 'package.module:Class' (an absolute module path and a class)"),
        ("orchestrator.nosuch:X", "cannot import 'orchestrator.nosuch:X' (ModuleNotFoundError: No module named"),
        ("workloads.kind:TrialKind", "cannot create 'workloads.kind:TrialKind' (TypeError: Can't instantiate abstract"),
        ("orchestrator.spec:SpecError", "'orchestrator.spec:SpecError' is not a TrialKind subclass"),
    ],
)
def test_a_kind_path_that_does_not_give_a_kind_is_one_line(tmp_path: Path, kind: str, message: str) -> None:
    result = CliRunner().invoke(main, ["validate", str(write_grid(tmp_path, kind=kind))])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1, \
        result.output


def test_dry_run_prints_every_trial_and_starts_nothing(tmp_path: Path) -> None:
    path = write_grid(tmp_path, grid={"x": [1, 2, 3]}, repeats=2, resources={"num_cpus": 2, "node_a": 1})
    result = CliRunner().invoke(main, ["submit", "--dry-run", "--results", str(tmp_path / "r"), str(path)])
    assert result.exit_code == 0, result.output
    for trial in _expand_file(path):
        assert trial.trial_id in result.output
    assert "num_cpus=2" in result.output and "node_a=1" in result.output
    assert not (tmp_path / "r").exists()


yaml_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5)
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(string.ascii_letters + "._", max_size=6), inner, max_size=3),
    max_leaves=12,
)
top_keys = st.sampled_from(["experiment", "kind", "base", "grid", "zip", "repeats", "resources", "retries", "timeout_s", "other"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.dictionaries(top_keys, yaml_values, max_size=6))
def test_fuzzed_structures_never_escape_as_other_exceptions(tmp_path: Path, data: dict) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        spec = load_spec(path)
        expand(spec, ToyKind(), str(path))
    except SpecError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=string.printable + "&*!|>%@`", max_size=120))
def test_fuzzed_text_never_escapes_as_other_exceptions(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    try:
        load_spec(path)
    except SpecError as exc:
        assert "\n" not in str(exc)


def test_relative_path_parameters_resolve_against_the_submit_directory(tmp_path: Path) -> None:
    from orchestrator.expand import resolve_paths

    params = {"load": {"trace": "traces/a.jsonl", "rate": 2}, "backend": {"python": "/abs/python"}, "other": "x.txt"}
    out = resolve_paths(params, frozenset({"load.trace", "backend.python", "missing.key"}), tmp_path)
    assert out["load"]["trace"] == str(tmp_path / "traces" / "a.jsonl")
    assert out["backend"]["python"] == "/abs/python" and out["other"] == "x.txt" and out["load"]["rate"] == 2
    assert params["load"]["trace"] == "traces/a.jsonl"  # the trial's own params (and id) are untouched
    # symlinks are kept: a venv's bin/python must not become the interpreter it links to
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").symlink_to("/usr/bin/env")
    linked = resolve_paths({"backend": {"python": "venv/bin/python"}}, frozenset({"backend.python"}), tmp_path)
    assert linked["backend"]["python"] == str(tmp_path / "venv" / "bin" / "python")


def test_trial_ids_hash_validated_params_defaults_and_number_forms_included(tmp_path: Path) -> None:
    implicit = _expand_file(write_grid(tmp_path, "a.yaml", grid={"x": [20]}, base={"y": 1}))
    # the default steps=3 written out, 20.0 for 20, keys in another order: the same trial
    explicit = _expand_file(write_grid(tmp_path, "b.yaml", grid={"x": [20.0]}, base={"steps": 3, "fail": False, "y": 1}))
    assert [t.trial_id for t in implicit] == [t.trial_id for t in explicit]
    assert implicit[0].group_key == explicit[0].group_key
    other = _expand_file(write_grid(tmp_path, "c.yaml", grid={"x": [20]}, base={"y": 1, "steps": 4}))
    assert other[0].trial_id != implicit[0].trial_id


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("experiment: a\nkind: k\nexperiment: b\n", "duplicate key 'experiment' at line 3 (first at line 1)"),
        ("experiment: a\nkind: k\nbase:\n  steps: 2\n  x: 1\n  steps: 3\n", "duplicate key 'steps' at line 6 (first at line 4)"),
    ],
)
def test_duplicate_yaml_keys_are_errors_with_their_lines(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and result.output.strip() == f"error: {path}: {message}; give each key once"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"base": {"steps": True}}, "base.steps: Input should be a valid integer (got bool True)"),
        ({"grid": {"y": ["2"]}}, "grid.y: Input should be a valid integer (got str '2')"),
        ({"grid": {"x": ["1.5"]}}, "grid.x: Input should be a valid number (got str '1.5')"),
        ({"repeats": "2"}, "repeats: Input should be a valid integer (got str '2')"),
        ({"resources": {"num_cpus": "1"}}, "resources.num_cpus: Input should be a valid number (got str '1')"),
    ],
)
def test_values_of_the_wrong_type_are_errors_not_coerced(tmp_path: Path, fields: dict, message: str) -> None:
    path = write_grid(tmp_path, **fields)
    with pytest.raises(SpecError) as err:
        _expand_file(path)
    assert str(err.value) == f"{path}: {message}"
