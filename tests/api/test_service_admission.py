"""Admission: a request the model cannot serve well or in reasonable time is a 422 at the door.

Each model declares the work one request may ask for (``max_cost``, in pixel-steps) and the
sizes it draws well (``sizes``); the API names the limit and queues nothing.
"""

from __future__ import annotations

import pytest

from service.broker.keys import stream_key
from service.registry import ModelLimits, builtin_entry


def _err(r, field: str) -> dict:
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == field, err
    return err


def test_builtin_model_admits_only_what_it_draws_and_about_30_s_of_work():
    lim = builtin_entry().limits
    assert lim.sizes == ["32x32"]
    # 24 images of the default 40 steps at 32x32: about 30 s uncached on one CPU core (docs/service.md).
    assert lim.max_cost == 32 * 32 * 40 * 24


def test_cost_problem_names_the_field_and_the_limit():
    lim = ModelLimits(max_cost=1000)
    assert lim.cost_problem(1000, "steps") is None
    field, message = lim.cost_problem(1001, "num_images")
    assert field == "num_images" and "1001 pixel-steps" in message and "limit of 1000" in message
    assert ModelLimits().cost_problem(10**18, "steps") is None


@pytest.mark.parametrize("bad", ["32", "32x", "x32", "32X32", "a x b"])
def test_listed_sizes_must_be_sizes(bad):
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        ModelLimits(sizes=[bad])


def test_a_request_costing_more_than_the_model_allows_is_refused_by_name(service):
    r = service.redis_client()
    before = r.xlen(stream_key("costly"))
    with service.client() as c:
        # 16 x 16 x 10 steps x 4 images = 10240 pixel-steps; the model takes at most 10000.
        err = _err(c.post("/generate", json={"model": "costly", "prompt": "x", "steps": 10, "num_images": 4,
                                             "async": True}), "num_images")
        assert "10240 pixel-steps" in err["message"] and "10000" in err["message"] and "'costly'" in err["message"]
        err = _err(c.post("/generate", json={"model": "costly", "prompt": "x", "steps": 40, "async": True}), "steps")
        assert "10240" in err["message"]
        # The OpenAI route names its own count field.
        assert _err(c.post("/v1/images/generations", json={"model": "costly", "prompt": "x", "n": 4, "steps": 10}),
                    "n")
        assert r.xlen(stream_key("costly")) == before
        ok = c.post("/generate", json={"model": "costly", "prompt": "x", "steps": 9, "num_images": 4, "async": True})
        assert ok.status_code == 202, ok.text


def test_sizes_outside_a_models_list_are_refused_listing_the_list(service):
    with service.client() as c:
        err = _err(c.post("/generate", json={"model": "costly", "prompt": "x", "width": 16, "height": 24,
                                             "async": True}), "width")
        assert "16x24" in err["message"] and "the sizes it draws well: 16x16, 24x16" in err["message"]
        err = _err(c.post("/v1/images/generations", json={"model": "costly", "prompt": "x", "size": "32x32"}), "size")
        assert err["supported_sizes"] == ["auto", "16x16", "24x16"]
        shapes = _err(c.post("/generate", json={"model": "shapes", "prompt": "x", "width": 64, "height": 64,
                                                "async": True}), "width")
        assert "the sizes it draws well: 32x32" in shapes["message"]
        limits = {m["name"]: m["limits"] for m in c.get("/models").json()["models"]}
    assert limits["shapes"]["sizes"] == ["32x32"] and limits["shapes"]["max_cost"] == builtin_entry().limits.max_cost
    assert limits["costly"]["sizes"] == ["16x16", "24x16"]


def test_timeout_beyond_the_server_maximum_is_refused(service):
    with service.client() as c:
        err = _err(c.post("/generate", json={"prompt": "x", "timeout_s": 10**6, "async": True}), "timeout_s")
        assert "CLUSCA_MAX_JOB_S" in err["message"]
        for bad in (0, -1, "soon"):
            assert c.post("/generate", json={"prompt": "x", "timeout_s": bad}).status_code == 422
        ok = c.post("/generate", json={"prompt": "x", "timeout_s": 60, "async": True}).json()
    assert ok["timeout_s"] == 60


def test_an_edit_costs_only_the_steps_it_denoises(service):
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    # 16 x 16 x 10 steps x 4 images = 10240 pixel-steps, over the model's 10000.
    body = {"model": "costly", "prompt": "x", "steps": 10, "num_images": 4, "async": True}
    with service.client() as c:
        _err(c.post("/generate", json=body), "num_images")
        # Strength 0.5 denoises 5 of the 10 steps: 5120 pixel-steps, admitted.
        ok = c.post("/generate", json={**body, "image": image, "strength": 0.5})
        assert ok.status_code == 202, ok.text
        c.post(f"/jobs/{ok.json()['id']}/cancel")
        err = _err(c.post("/generate", json={**body, "image": image, "strength": 1.0}), "num_images")
        assert "10240 pixel-steps" in err["message"]
