"""The OpenAI SDK's images, videos and models calls, as the SDK sends them, against a real API.

The requests are written here the way the ``openai`` Python package builds them (its
``images.generate``, ``videos.create/retrieve/list/download_content/delete`` and
``models.list/retrieve``): ``base_url`` ending in ``/v1``, a bearer key, JSON for images,
and for ``videos.create`` a multipart form with one text part per parameter, ``extra_body``
objects flattened as ``name[key]``; ``videos.list`` pages by ``after=<last_id>`` while
``has_more``.
"""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image

from tests.support import wait_until

SDK_HEADERS = {"Accept": "application/json", "User-Agent": "OpenAI/Python 2.8.0", "X-Stainless-Lang": "python",
               "X-Stainless-Package-Version": "2.8.0"}


class _ForceMultipart(dict):
    """What the SDK hands httpx as ``files`` when a multipart call has none: empty, yet multipart."""

    def __bool__(self) -> bool:
        return True


def sdk_form(params: dict) -> dict[str, str | list[str]]:
    """``params`` flattened as the SDK's form encoder does: nested objects as ``a[b]``, lists as
    ``a[]``, booleans as ``true``/``false``, absent (None) parameters left out."""
    out: dict[str, str | list[str]] = {}

    def put(key: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                put(f"{key}[{k}]", v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                put(f"{key}[]", v)
        elif value is not None:
            text = str(value).lower() if isinstance(value, bool) else str(value)
            prev = out.get(key)
            out[key] = text if prev is None else [*([prev] if isinstance(prev, str) else prev), text]

    for k, v in params.items():
        put(k, v)
    return out


def sdk_client(url: str, key: str = "sk-unused") -> httpx.Client:
    return httpx.Client(base_url=url + "/v1", timeout=30, headers={**SDK_HEADERS, "Authorization": f"Bearer {key}"})


def videos_create(c: httpx.Client, prompt: str, extra_body: dict | None = None, **params) -> httpx.Response:
    """``client.videos.create(prompt=..., model=..., seconds=..., size=..., extra_body=...)``."""
    return c.post("/videos", data=sdk_form({"prompt": prompt, **params, **(extra_body or {})}),
                  files=_ForceMultipart())


def videos_list_all(c: httpx.Client, **params) -> list[dict]:
    """``list(client.videos.list(...))``: the SDK's auto-pagination."""
    seen, query = [], {k: v for k, v in params.items() if v is not None}
    while True:
        page = c.get("/videos", params=query)
        assert page.status_code == 200, page.text
        body = page.json()
        assert body["object"] == "list"
        seen += body["data"]
        if not body["data"] or body["has_more"] is False or not body.get("last_id"):
            return seen
        query["after"] = body["last_id"]


def _finished(c: httpx.Client, video_id: str) -> dict:
    return wait_until(lambda: (v := c.get(f"/videos/{video_id}").json())["status"] in
                      ("completed", "failed", "cancelled") and v, timeout=30, what=f"video {video_id}")


def test_videos_create_as_the_sdk_sends_it_makes_the_video(service):
    with sdk_client(service.base_url) as c:
        r = videos_create(c, "a paper boat", model="noopvideo", seconds="1", size="16x16",
                          extra_body={"steps": 2, "seed": 7, "output_format": "gif", "cache": {"preset": "off"}})
        assert r.status_code == 200, r.text
        assert r.request.headers["content-type"].startswith("multipart/form-data; boundary=")
        video = r.json()
        assert video["object"] == "video" and video["status"] == "queued" and video["id"].startswith("video_")
        assert (video["model"], video["size"], video["seed"], video["output_format"]) == ("noopvideo", "16x16", 7, "gif")
        assert video["num_frames"] == 9 and video["seconds"] == "1.125"  # 1 s at 8 fps, as the model makes frames
        done = _finished(c, video["id"])
        assert done["status"] == "completed" and done["progress"] == 100, done
        content = c.get(f"/videos/{video['id']}/content", params={"variant": "video"})
        assert content.status_code == 200 and content.content[:6] in (b"GIF89a", b"GIF87a")
        assert c.delete(f"/videos/{video['id']}").json() == {"id": video["id"], "object": "video.deleted",
                                                               "deleted": True}


def test_a_form_value_the_model_refuses_is_a_422_naming_the_field(service):
    with sdk_client(service.base_url) as c:
        r = videos_create(c, "x", model="noopvideo", extra_body={"steps": "many"})
        assert r.status_code == 422 and r.json()["error"]["param"] == "steps", r.text
        r = videos_create(c, "x", model="noopvideo", size="99x")
        assert r.status_code == 422 and r.json()["error"]["param"] == "size", r.text
        r = c.post("/videos", data={"model": "noopvideo"}, files=_ForceMultipart())
        assert r.status_code == 422 and r.json()["error"]["param"] == "prompt", r.text


def test_an_input_reference_image_is_refused_by_name(service):
    with sdk_client(service.base_url) as c:
        r = c.post("/videos", data={"prompt": "x", "model": "noopvideo"},
                   files={"input_reference": ("start.png", b"\x89PNG\r\n\x1a\n", "image/png")})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "validation_error" and err["param"] == "input_reference" and "text" in err["message"]


def test_a_malformed_multipart_body_is_a_422_not_a_5xx(service):
    with service.client() as c:
        r = c.post("/v1/videos", content=b"--x\r\nno headers\r\n", headers={"Content-Type": "multipart/form-data"})
        assert r.status_code == 422 and r.json()["error"]["param"] == "body", r.text
        r = c.post("/v1/videos", content=b'--b\r\nContent-Disposition: form-data; name="a]["\r\n\r\nv\r\n--b--\r\n',
                   headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert r.status_code == 422 and r.json()["error"]["param"] == "a][", r.text


def test_the_json_body_still_works(service):
    with service.client() as c:
        r = c.post("/v1/videos", json={"prompt": "x", "model": "noopvideo", "steps": 1})
    assert r.status_code == 200 and r.json()["status"] == "queued", r.text


def test_openapi_documents_the_form_the_sdk_sends(service):
    with service.client() as c:
        body = c.get("/openapi.json").json()["paths"]["/v1/videos"]["post"]["requestBody"]["content"]
    ref = {"$ref": "#/components/schemas/OpenAIVideoRequest"}
    assert body == {"application/json": {"schema": ref}, "multipart/form-data": {"schema": ref},
                    "application/x-www-form-urlencoded": {"schema": ref}}


@pytest.fixture(scope="module")
def keyed_api(service):
    with service.api({"CLUSCA_API_KEYS": "key-one,key-two"}) as url:
        yield url


def test_videos_list_pages_each_keys_own_videos_newest_first(keyed_api):
    with sdk_client(keyed_api, "key-one") as one, sdk_client(keyed_api, "key-two") as two:
        made = [videos_create(one, f"video {i}", model="noopvideo", extra_body={"steps": 1}).json()["id"]
                for i in range(3)]
        theirs = videos_create(two, "another caller's", model="noopvideo").json()["id"]
        first = one.get("/videos", params={"limit": 2}).json()
        assert [v["id"] for v in first["data"]] == made[:0:-1] and first["has_more"] is True
        assert first["first_id"] == made[2] and first["last_id"] == made[1]
        rest = one.get("/videos", params={"limit": 2, "after": first["last_id"]}).json()
        assert [v["id"] for v in rest["data"]] == [made[0]] and rest["has_more"] is False
        assert [v["id"] for v in videos_list_all(one, limit=1)] == made[::-1]
        assert [v["id"] for v in videos_list_all(one, order="asc")] == made
        assert [v["id"] for v in videos_list_all(two)] == [theirs]
        assert all(v["object"] == "video" for v in first["data"])

        _finished(one, made[1])
        assert one.delete(f"/videos/{made[1]}").status_code == 200
        assert [v["id"] for v in videos_list_all(one, limit=1)] == [made[2], made[0]]

        gone = one.get("/videos", params={"after": made[1]})
        assert gone.status_code == 404 and gone.json()["error"]["param"] == "after"
        assert one.get("/videos", params={"after": "nope"}).status_code == 422
        assert one.get("/videos", params={"limit": 0}).status_code == 422
        assert httpx.get(keyed_api + "/v1/videos").status_code == 401


def test_models_list_and_retrieve_are_openai_model_objects(service):
    with sdk_client(service.base_url) as c:
        listed = c.get("/models")
        one = c.get("/models/noopvideo")
        missing = c.get("/models/nope")
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert "noop" in ids and "noopvideo" in ids and "shapes" in ids
    for m in body["data"]:
        assert m["object"] == "model" and isinstance(m["created"], int) and m["owned_by"]
    assert one.status_code == 200 and one.json()["id"] == "noopvideo" and one.json()["output"] == "video"
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_images_generate_as_the_sdk_sends_it(service):
    with sdk_client(service.base_url) as c:
        r = c.post("/images/generations", json={"prompt": "a red circle", "model": "noop", "n": 1, "size": "16x16",
                                                "response_format": "b64_json", "moderation": "auto"})
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    assert image.size == (16, 16)


def test_form_fields_keep_text_exactly_and_nest_as_the_sdk_flattens():
    from service.api.form_body import FormError, as_object, form_fields

    prompt = "un bateau en papier \u2014 \u00fcn\u00efcode \u65e5\u672c\r\nline 2\n--not-a-boundary"
    req = httpx.Request("POST", "http://api/v1/videos", files=_ForceMultipart(),
                        data=sdk_form({"prompt": prompt, "cache": {"preset": "off", "interval": 3},
                                       "tags": ["a", "b"], "flag": True, "absent": None}))
    fields = form_fields(req.headers["content-type"], req.read())
    assert as_object((n, v) for n, v, _ in fields) == {
        "prompt": prompt, "cache": {"preset": "off", "interval": "3"}, "tags": ["a", "b"], "flag": "true"}
    assert as_object([("a", "1"), ("b", "")]) == {"a": "1"}  # an empty value is an absent field
    with pytest.raises(FormError) as err:
        as_object([("cache", "off"), ("cache[preset]", "off")])
    assert err.value.field == "cache[preset]"
