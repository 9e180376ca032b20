"""The ClusCa knob table is the one source of every cache setting: the library validates with
it, the HTTP schema (and so OpenAPI) is generated from it, and a bad knob is a 422 naming it."""

from __future__ import annotations

import dataclasses

import pytest

from clusca.config import KNOB, KNOBS, MAX_SEED, ClusCaConfig, ClusCaConfigError
from service.api.schemas import CACHE_FIELDS, CacheSettings


def _bad_values(knob) -> list:
    """Values just outside the knob's range, or outside its choices."""
    if knob.choices is not None:
        return ["not-a-choice"]
    if knob.type is bool:
        return [{"not": "a bool"}]
    out = []
    if knob.lo is not None:
        out.append(knob.lo if knob.lo_open else knob.lo - 1)
    if knob.hi is not None:
        out.append(knob.hi + 1)
    return out


def _good_values(knob) -> list:
    if knob.choices is not None:
        return list(knob.choices)
    if knob.type is bool:
        return [True, False]
    lo = knob.lo + (0.001 if knob.lo_open else 0)
    return [knob.type(lo), knob.type(knob.hi)]


def test_the_table_is_every_scalar_field_of_the_config_with_its_default():
    fields = {f.name: f for f in dataclasses.fields(ClusCaConfig)}
    assert set(fields) - {"modules"} == set(KNOB)
    for knob in KNOBS:
        assert fields[knob.name].default == knob.default and fields[knob.name].type == knob.type.__name__
        assert knob.doc and "\n" not in knob.doc
        knob.check(knob.default)


def test_every_knob_is_in_openapi_with_its_range_choices_and_doc(service):
    with service.client() as c:
        spec = c.get("/openapi.json").json()
    schema = spec["components"]["schemas"]["CacheSettings"]
    assert schema["additionalProperties"] is False
    props = schema["properties"]
    assert set(props) == {"preset", *KNOB} and set(CACHE_FIELDS) == set(props)
    assert {"capture", "kmeans_fit_per_cluster"} <= set(props)
    for knob in KNOBS:
        prop = props[knob.name]
        typed = next(p for p in prop["anyOf"] if p.get("type") != "null")
        assert typed["type"] == {int: "integer", float: "number", bool: "boolean", str: "string"}[knob.type]
        assert prop["description"] == knob.doc
        if knob.choices is not None:
            assert typed["enum"] == list(knob.choices)
        if knob.lo is not None:
            assert typed["exclusiveMinimum" if knob.lo_open else "minimum"] == knob.lo
        if knob.hi is not None:
            assert typed["maximum"] == knob.hi
    assert props["seed"]["anyOf"][0]["maximum"] == MAX_SEED == 2**53 - 1


@pytest.mark.parametrize("knob", KNOBS, ids=[k.name for k in KNOBS])
def test_api_and_library_agree_on_every_range(knob):
    for value in _good_values(knob):
        CacheSettings(**{knob.name: value})
        ClusCaConfig.from_dict({knob.name: value, **({"refresh_text": True} if knob.name == "propagate_text" else {})})
    for value in _bad_values(knob):
        with pytest.raises(ValueError):
            CacheSettings(**{knob.name: value})
        with pytest.raises(ClusCaConfigError) as exc:
            ClusCaConfig.from_dict({knob.name: value})
        assert exc.value.field == knob.name and exc.value.reason


@pytest.mark.parametrize("knob", KNOBS, ids=[k.name for k in KNOBS])
def test_a_bad_knob_is_a_422_naming_it(service, knob):
    with service.client() as c:
        for value in _bad_values(knob):
            r = c.post("/generate", json={"prompt": "x", "cache": {knob.name: value}})
            assert r.status_code == 422, (value, r.text)
            err = r.json()["error"]
            assert err["param"] == f"cache.{knob.name}" and err["fields"][0]["field"] == f"cache.{knob.name}", err


def test_a_knob_combination_the_library_refuses_names_the_knob(service):
    with service.client() as c:
        r = c.post("/generate", json={"prompt": "x", "cache": {"propagate_text": True}})
    assert r.status_code == 422 and r.json()["error"]["param"] == "cache.propagate_text", r.text
    assert "refresh_text" in r.json()["error"]["message"]


def test_library_errors_carry_their_field():
    with pytest.raises(ClusCaConfigError) as exc:
        ClusCaConfig.from_dict({"modules": {"attention": ["("]}})
    assert exc.value.field == "modules" and "regular expression" in exc.value.reason
    assert str(exc.value) == f"modules: {exc.value.reason}"
    with pytest.raises(ClusCaConfigError) as exc:
        ClusCaConfig.preset("turbo")
    assert exc.value.field == "preset"
    with pytest.raises(ClusCaConfigError) as exc:
        ClusCaConfig.from_dict({"intervall": 3})
    assert exc.value.field == "intervall" and "unknown setting" in exc.value.reason
