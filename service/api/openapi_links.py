"""OpenAPI links: which answer's job id feeds which operation.

Clients and stateful test tools (schemathesis) follow them to chain calls: a job made by
``POST /generate`` (or a video made by ``POST /v1/videos``, or a cancel answer) is read,
streamed, fetched and cancelled by its id.
"""

from __future__ import annotations

from typing import Any

# (producer method, path, statuses) -> consumers (method, path, the id parameter's name).
_JOBS = [("get", "/jobs/{job_id}", "job_id"), ("post", "/jobs/{job_id}/cancel", "job_id"),
         ("get", "/jobs/{job_id}/events", "job_id"), ("get", "/jobs/{job_id}/images/{index}", "job_id")]
_VIDEOS = [("get", "/v1/videos/{video_id}", "video_id"), ("get", "/v1/videos/{video_id}/content", "video_id"),
           ("delete", "/v1/videos/{video_id}", "video_id")]
LINKS: dict[tuple[str, str], tuple[tuple[str, ...], list[tuple[str, str, str]]]] = {
    ("post", "/generate"): (("200", "202"), _JOBS),
    ("get", "/jobs/{job_id}"): (("200",), _JOBS),
    ("post", "/jobs/{job_id}/cancel"): (("200", "202"), _JOBS),
    ("post", "/v1/videos"): (("200",), _VIDEOS),
    ("get", "/v1/videos/{video_id}"): (("200",), _VIDEOS),
}


def add_links(schema: dict[str, Any]) -> None:
    """Write the links into ``schema`` (operations missing from it are skipped)."""
    paths = schema.get("paths", {})
    for (method, path), (statuses, consumers) in LINKS.items():
        producer = paths.get(path, {}).get(method)
        if producer is None:
            continue
        links = {}
        for c_method, c_path, param in consumers:
            target = paths.get(c_path, {}).get(c_method)
            if target is None or "operationId" not in target:
                continue
            parameters: dict[str, Any] = {param: "$response.body#/id"}
            if c_path.endswith("/images/{index}"):
                parameters["index"] = 0
            links[target["operationId"]] = {"operationId": target["operationId"], "parameters": parameters}
        for status in statuses:
            response = producer.get("responses", {}).get(status)
            if response is not None and links:
                response["links"] = dict(links)
