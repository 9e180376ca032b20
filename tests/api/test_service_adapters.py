"""LoRA adapters through the service, on the no-op models: the store, GET /models, the admin routes,
the request field on every route, bad input (each a 4xx naming the problem), removal while queued,
and the metrics. The built-in model's real adapters: tests/worker/test_service_adapters_builtin.py."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import httpx
import pytest

from service.broker.embedded import free_port
from tests.support import Service, wait_until, write_lora

LAYERS = {"blocks.0.attn.to_q": (16, 16), "blocks.0.attn.to_v": (16, 16)}
KEY = "adapter-admin-key"


@pytest.fixture(scope="module")
def adapters(service: Service, tmp_path_factory):
    """An API and a worker of the adapter test models over one adapters folder; yields
    ``(client factory, folder, worker metrics URL)``."""
    root = tmp_path_factory.mktemp("adapters")
    write_lora(root / "adapted" / "outline.safetensors", LAYERS, seed=1)
    write_lora(root / "adapted" / "pastel", LAYERS, seed=2, peft=True)
    (root / "adapted" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json, nope}")
    whole = write_lora(root / "spare" / "whole.safetensors", LAYERS, seed=3).read_bytes()
    (root / "adapted" / "truncated.safetensors").write_bytes(whole[: len(whole) - 100])
    outside = write_lora(root / "outside.safetensors", LAYERS, seed=4)
    (root / "adapted" / "escape.safetensors").symlink_to(outside)
    write_lora(root / "adaptedvideo" / "outline.safetensors", LAYERS, seed=1)
    env = {"CLUSCA_ADAPTERS_DIR": str(root), "CLUSCA_ADAPTER_MAX_BYTES": str(len(whole) + 4096)}
    port = free_port()
    worker = service.start_worker("adapted,adaptedvideo,noadapters", env, metrics_port=port)
    try:
        with service.api({**env, "CLUSCA_API_KEYS": KEY}) as url:
            def client() -> httpx.Client:
                return httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {KEY}"})

            yield client, root, f"http://127.0.0.1:{port}/metrics"
    finally:
        Service.stop(worker)


def _model(c: httpx.Client, name: str) -> dict:
    (m,) = [m for m in c.get("/models").json()["models"] if m["name"] == name]
    return m


def _error(r: httpx.Response, status: int = 422) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def _gen(c: httpx.Client, **body) -> httpx.Response:
    return c.post("/generate", json={"model": "adapted", "prompt": "p", "seed": 1, **body})


def test_models_list_each_adapter_with_what_it_declares_and_why_one_does_not_load(adapters):
    client, _, _ = adapters
    with client() as c:
        m = _model(c, "adapted")
    by = {a["name"]: a for a in m["adapters"]}
    assert m["max_adapters"] == 2 and set(by) == {"outline", "pastel", "broken", "truncated", "escape"}
    for name in ("outline", "pastel"):
        a = by[name]
        assert a["loads"] and a["problem"] is None and a["source"] == "operator", a
        assert a["rank"] == 4 and a["target_modules"] == ["to_q", "to_v"] and a["layers"] == 2 and a["size_bytes"] > 0
    assert not by["broken"]["loads"] and "not JSON" in by["broken"]["problem"]
    assert not by["truncated"]["loads"] and "truncated" in by["truncated"]["problem"]
    assert not by["escape"]["loads"] and "outside the adapters folder" in by["escape"]["problem"]
    with client() as c:
        assert _model(c, "noadapters")["max_adapters"] == 0 and _model(c, "noadapters")["adapters"] == []
        listed = c.get("/v1/models").json()["data"]
    assert {"adapted", "noadapters"} <= {m["id"] for m in listed}  # the OpenAI list keeps working


def test_a_job_with_adapters_shows_them_in_its_record_and_result(adapters):
    client, _, _ = adapters
    with client() as c:
        r = _gen(c, adapters=[{"name": "outline", "scale": 0.8}, {"name": "pastel"}])
        assert r.status_code == 200, r.text
        body = r.json()
        job = c.get(f"/jobs/{body['id']}").json()
    for view in (body, job):
        assert view["adapters"] == [{"name": "outline", "scale": 0.8}, {"name": "pastel", "scale": 1.0}]
        assert view["adapter_load_s"] is not None and view["adapter_load_s"] >= 0
    with client() as c:
        plain = _gen(c).json()
    assert plain["adapters"] == [] and plain["adapter_load_s"] is None


@pytest.mark.parametrize("adapters_field,expected", [
    ([{"name": "nope"}], "has no adapter 'nope'"),
    ([{"name": "broken"}], "cannot be used"),
    ([{"name": "truncated"}], "truncated"),
    ([{"name": "escape"}], "outside the adapters folder"),
    ([{"name": "outline"}, {"name": "outline"}], "more than once"),
    ([{"name": "outline"}, {"name": "pastel"}, {"name": "broken"}], "at most 2 per request"),
])
def test_bad_adapters_are_a_422_naming_the_problem(adapters, adapters_field, expected):
    client, _, _ = adapters
    with client() as c:
        err = _error(_gen(c, adapters=adapters_field))
    assert err["param"] == "adapters" and expected in err["message"], err
    if "has no adapter" in expected:
        assert err["known_adapters"] == ["outline", "pastel"]


@pytest.mark.parametrize("field", [
    [{"name": "outline", "scale": 5}], [{"name": "outline", "scale": -4.5}], [{"name": "outline", "scale": "big"}],
    [{"name": "../../etc/passwd"}], [{"name": "a/b"}], [{"name": ""}], [{"name": "x" * 65}],
    [{"name": "outline", "extra": 1}], [{"name": f"a{i}"} for i in range(9)], {"name": "outline"}])
def test_the_schema_refuses_malformed_adapters(adapters, field):
    client, _, _ = adapters
    with client() as c:
        err = _error(_gen(c, adapters=field))
    assert err["param"].startswith("adapters"), err


def test_a_scale_that_is_not_finite_is_refused(adapters):
    client, _, _ = adapters
    with client() as c:
        for raw in ('{"prompt": "p", "model": "adapted", "adapters": [{"name": "outline", "scale": 1e400}]}',
                    '{"prompt": "p", "model": "adapted", "adapters": [{"name": "outline", "scale": NaN}]}'):
            r = c.post("/generate", content=raw, headers={"Content-Type": "application/json"})
            assert 400 <= r.status_code < 500, r.text


def test_a_model_that_serves_no_adapters_says_so(adapters):
    client, _, _ = adapters
    with client() as c:
        err = _error(c.post("/generate", json={"model": "noadapters", "prompt": "p", "adapters": [{"name": "x"}]}))
    assert "serves no adapters" in err["message"]


def test_the_openai_routes_and_videos_take_adapters(adapters):
    client, _, _ = adapters
    with client() as c:
        r = c.post("/v1/images/generations", json={"model": "adapted", "prompt": "p", "adapters": [{"name": "pastel"}]})
        assert r.status_code == 200, r.text
        job = c.get(f"/jobs/{r.json()['id']}").json()
        assert job["adapters"] == [{"name": "pastel", "scale": 1.0}]
        err = _error(c.post("/v1/images/generations", json={"model": "adapted", "prompt": "p",
                                                             "adapters": [{"name": "nope"}]}))
        assert "has no adapter 'nope'" in err["message"]
        v = c.post("/v1/videos", json={"model": "adaptedvideo", "prompt": "p", "adapters": [{"name": "outline"}]})
        assert v.status_code == 200, v.text
        vid = v.json()["id"]
        wait_until(lambda: c.get(f"/v1/videos/{vid}").json()["status"] in ("completed", "failed"), what="video")
        assert c.get(f"/v1/videos/{vid}").json()["status"] == "completed"
        # videos.create may come as a form: the adapters field is then one text field.
        form = c.post("/v1/videos", data={"model": "adaptedvideo", "prompt": "p", "adapters": "outline:0.5"})
        assert form.status_code == 200, form.text


def test_the_edit_form_spells_adapters_as_one_field():
    from service.api.schemas import OpenAIImageEditRequest

    for text in ('[{"name": "outline", "scale": 0.5}]', "outline:0.5", " outline:0.5 , "):
        body = OpenAIImageEditRequest.model_validate({"prompt": "p", "adapters": text})
        assert [(a.name, a.scale) for a in body.adapters] == [("outline", 0.5)]
    two = OpenAIImageEditRequest.model_validate({"prompt": "p", "adapters": "outline,pastel:-1"})
    assert [(a.name, a.scale) for a in two.adapters] == [("outline", 1.0), ("pastel", -1.0)]
    for bad in ("[{", "outline:big", "../x"):
        with pytest.raises(ValueError):
            OpenAIImageEditRequest.model_validate({"prompt": "p", "adapters": bad})


def test_an_operator_adds_and_removes_an_adapter_at_run_time(adapters):
    client, root, _ = adapters
    data = write_lora(root / "spare" / "ink.safetensors", LAYERS, seed=5).read_bytes()
    with client() as c:
        assert _gen(c, adapters=[{"name": "ink"}]).status_code == 422
        anonymous = httpx.put(f"{c.base_url}/admin/models/adapted/adapters/ink", content=data)
        assert anonymous.status_code == 401
        r = c.put("/admin/models/adapted/adapters/ink", content=data,
                  headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        assert r.json()["name"] == "ink" and r.json()["loads"] and r.json()["rank"] == 4
        assert (root / "adapted" / "ink.safetensors").read_bytes() == data
        # The running worker serves it at once.
        ok = _gen(c, adapters=[{"name": "ink", "scale": 0.5}])
        assert ok.status_code == 200 and ok.json()["status"] == "succeeded", ok.text
        assert c.delete("/admin/models/adapted/adapters/ink").status_code == 204
        assert not (root / "adapted" / "ink.safetensors").exists()
        assert "has no adapter 'ink'" in _error(_gen(c, adapters=[{"name": "ink"}]))["message"]
        assert _error(c.delete("/admin/models/adapted/adapters/ink"), 404)["code"] == "adapter_not_found"


@pytest.mark.parametrize("body,status,expected", [
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json, nope}", 422, "not JSON"),
    (b"short", 422, "truncated"),
    (b"\x00" * 100_000, 413, "over the limit"),
])
def test_uploads_that_are_not_whole_loras_are_refused_and_leave_nothing(adapters, body, status, expected):
    client, root, _ = adapters
    with client() as c:
        err = _error(c.put("/admin/models/adapted/adapters/bad-upload", content=body), status)
    assert expected in err["message"] and err["param"] == "body", err
    assert not [p for p in (root / "adapted").iterdir() if "bad-upload" in p.name or p.name.startswith(".upload")]


@pytest.mark.parametrize("path", ["/admin/models/adapted/adapters/..%2F..%2Fetc", "/admin/models/adapted/adapters/.hidden",
                                  "/admin/models/adapted/adapters/a%20b", "/admin/models/..%2Fx/adapters/ok"])
def test_admin_names_are_never_paths(adapters, path):
    client, root, _ = adapters
    data = (root / "spare" / "whole.safetensors").read_bytes()
    with client() as c:
        r = c.put(path, content=data)
    assert r.status_code in (404, 422), r.text
    assert sorted(p.name for p in root.iterdir()) == ["adapted", "adaptedvideo", "outside.safetensors", "spare"]


def test_an_adapter_removed_while_its_job_is_queued_fails_that_job_by_name(adapters):
    client, root, _ = adapters
    data = (root / "spare" / "whole.safetensors").read_bytes()
    with client() as c:
        assert c.put("/admin/models/adapted/adapters/brief", content=data).status_code == 201
        # A long job ahead keeps the worker busy while the others queue behind it.
        ahead = _gen(c, steps=40, **{"async": True}).json()["id"]
        time.sleep(0.3)
        doomed = _gen(c, adapters=[{"name": "brief"}], **{"async": True}).json()["id"]
        fine = _gen(c, adapters=[{"name": "outline"}], **{"async": True}).json()["id"]
        assert c.delete("/admin/models/adapted/adapters/brief").status_code == 204

        def final(job_id):
            return wait_until(lambda: (j := c.get(f"/jobs/{job_id}").json())["status"] in
                              ("succeeded", "failed") and j, what=f"job {job_id}")

        assert final(ahead)["status"] == "succeeded"
        gone = final(doomed)
        assert gone["status"] == "failed" and gone["error"].startswith("adapter unavailable: 'brief'"), gone
        assert final(fine)["status"] == "succeeded"
        # A synchronous request caught the same way answers a 4xx naming the adapter, not a 500.
        assert c.put("/admin/models/adapted/adapters/brief", content=data).status_code == 201
        _gen(c, steps=40, **{"async": True})
        time.sleep(0.3)
        import threading

        threading.Timer(0.5, lambda: httpx.delete(f"{c.base_url}/admin/models/adapted/adapters/brief",
                                                  headers={"Authorization": f"Bearer {KEY}"})).start()
        sync = _gen(c, adapters=[{"name": "brief"}])
    err = _error(sync)
    assert err["code"] == "adapter_unavailable" and err["param"] == "adapters" and "'brief'" in err["message"]


def test_metrics_count_adapter_requests_loads_and_loaded_adapters(adapters):
    client, _, worker_metrics = adapters
    with client() as c:
        assert _gen(c, adapters=[{"name": "outline"}]).status_code == 200
        api = c.get("/metrics").text
    assert 'clusca_adapter_requests_total{adapter="outline",model="adapted"}' in api
    worker = httpx.get(worker_metrics).text
    assert 'clusca_adapter_load_seconds_count{model="adapted"}' in worker
    assert 'clusca_adapters_loaded{model="adapted"' in worker


def test_adapter_request_labels_stay_bounded():
    from service import metrics

    for i in range(metrics.ADAPTER_LABELS + 5):
        metrics.adapter_requests("bounded", f"a{i}").inc()
    labels = {s.labels["adapter"] for m in metrics.ADAPTER_REQUESTS.collect() for s in m.samples
              if s.labels.get("model") == "bounded" and s.name.endswith("_total")}
    assert len(labels) == metrics.ADAPTER_LABELS + 1 and "other" in labels


def test_images_of_a_job_with_adapters_are_served(adapters):
    client, _, _ = adapters
    with client() as c:
        body = _gen(c, adapters=[{"name": "outline"}]).json()
        png = c.get(f"/jobs/{body['id']}/images/0").content
    assert png == base64.b64decode(body["images"][0])


def test_the_store_never_reads_outside_its_folders(tmp_path):
    from service.adapters.store import AdapterStore
    from service.registry import ModelEntry

    entry = ModelEntry(name="m", kind="noop")
    store = AdapterStore(tmp_path / "root", 1 << 20, shipped=tmp_path / "none")
    write_lora(tmp_path / "root" / "m" / "ok.safetensors", LAYERS)
    write_lora(tmp_path / "secret.safetensors", LAYERS)
    for name in ("../secret", "..", "m/../../secret", "/etc/passwd", ".ok", "ok.safetensors"):
        assert store.get(entry, name) is None, name
    assert store.get(entry, "ok").usable
    (tmp_path / "root" / "m" / "link").symlink_to(tmp_path)
    assert store.get(entry, "link").problem == "its path leads outside the adapters folder"
