"""Faults: killed workers, Redis outages and restarts, a restarted API, pipelines that raise.

Every test checks the job ledger in Redis, not only the HTTP answers: one terminal event,
one done marker, one set of images that belongs to the request, nothing left pending.
Sizes: ``REL_KILL_JOBS`` / ``REL_KILLS`` (kill campaign), ``REL_OUTAGE_S`` (Redis outage).
"""

from __future__ import annotations

import base64
import random
import signal
import statistics
import threading
import time

import httpx
import pytest

from tests.support import Service, wait_until
from service.broker.keys import IDEM_PATTERN, images_key, job_key, stream_key, workers_key
from tests.reliability.reliability_support import (env_float, env_int, events, ledger_problems, report, restart_redis, shapes_weights,
                                 stack, statuses, submit, wait_terminal)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _kill_campaign(tmp_path, *, model: str, jobs: int, kills: int, extra_env: dict[str, str],
                   body: dict, check_image, min_step: int = 1) -> dict:
    """Two workers; SIGKILL the one running a random job at a random step, ``kills`` times.

    A victim must be running and have reported step ``min_step`` or later; progress
    reaches Redis at most every 0.25 s, so short jobs are picked from ``min_step=0``.
    """
    rng = random.Random(env_int("REL_SEED", 7))
    max_attempts = int(extra_env.get("CLUSCA_MAX_ATTEMPTS", 3))
    with stack(tmp_path, extra_env=extra_env, shapes=model == "shapes") as svc:
        r = svc.redis_client()
        serial = iter(range(10_000))
        workers: dict[str, object] = {}

        def spawn(wait: bool) -> None:
            wid = f"w{next(serial)}"
            workers[wid] = svc.start_worker(model, worker_id=wid, wait=wait)

        spawn(True)
        spawn(True)
        _, url = svc.start_api()
        with httpx.Client(base_url=url, timeout=30) as c:
            ids = [submit(c, model=model, prompt=f"job {i}", seed=1000 + i, **body) for i in range(jobs)]
        kill_log: list[dict] = []
        deadline = time.monotonic() + 60 + jobs * 5
        while len(kill_log) < kills and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.1, 0.8))
            st = statuses(r, ids)
            if all(s["status"] in ("succeeded", "failed", "cancelled") for s in st.values()):
                break
            running = [(j, s) for j, s in st.items() if s["status"] == "running" and int(s["step"] or 0) >= min_step]
            running = [(j, s) for j, s in running if s["worker"] in workers and workers[s["worker"]].poll() is None]
            # A job survives max_attempts - 1 crashes of its worker (the bound that stops a job which
            # crashes every worker); spare the workers holding a job that is on its last attempt.
            last = {s["worker"] for s in st.values() if s["status"] == "running" and int(s["attempts"] or 0) >= max_attempts}
            running = [(j, s) for j, s in running if s["worker"] not in last]
            # One crash at a time: kill only while another worker is serving, so the takeover measured
            # is the queue's (not the time a fresh worker takes to load its model).
            serving = {m.decode() for m in r.zrangebyscore(workers_key(model), time.time() - 1.5, "+inf")}
            if len(serving & {w for w, p in workers.items() if p.poll() is None}) < 2:
                continue
            if not running:
                continue
            victim_job, s = rng.choice(running)
            wid = s["worker"]
            proc = workers.pop(wid)
            proc.send_signal(signal.SIGKILL)
            t_kill = time.time()
            proc.wait(10)
            held = [j for j, x in st.items() if x["worker"] == wid and x["status"] == "running"]
            kill_log.append({"t": t_kill, "worker": wid, "jobs": held, "step": int(s["step"] or 0),
                             "steps": int(body.get("steps", 20))})
            spawn(False)
        final = wait_terminal(r, ids, timeout=120 + jobs * 2)
        problems = {}
        for i, j in enumerate(ids):
            p = ledger_problems(r, j, f"job {i}", 1000 + i) if check_image is None else check_image(r, j, i)
            if p:
                problems[j] = p
        pending = r.xpending(stream_key(model), "workers")["pending"]
        left = r.xlen(stream_key(model))
        # Takeover delay: from the kill to the next start of each job the killed worker held.
        delays = []
        for k in kill_log:
            for j in k["jobs"]:
                starts = [e["t"] for e in events(r, j) if e["type"] == "started" and e["t"] > k["t"]]
                if starts:
                    delays.append(min(starts) - k["t"])
        # Run time from the first start to the stored result: what a takeover adds to a job it hits.
        lat = {}
        for j in ids:
            starts = [e["t"] for e in events(r, j) if e["type"] == "started"]
            finished = r.hget(job_key(j), "finished")
            if starts and finished:
                lat[j] = float(finished) - min(starts)
        hit = {j for k in kill_log for j in k["jobs"]}
        attempts = [int(s["attempts"] or 0) for s in final.values()]
    return {"jobs": jobs, "kills": len(kill_log), "kills_wanted": kills, "jobs_hit": len(hit),
            "kill_steps": sorted(k["step"] for k in kill_log),
            "succeeded": sum(s["status"] == "succeeded" for s in final.values()),
            "lost_or_duplicated": len(problems), "problems": dict(list(problems.items())[:5]),
            "pending_left": pending, "stream_left": left,
            "max_attempts_seen": max(attempts), "attempts_histogram": {a: attempts.count(a) for a in set(attempts)},
            "takeover_s": {"n": len(delays), "median": round(statistics.median(delays), 3) if delays else None,
                           "p95": round(_pct(delays, 0.95), 3), "max": round(max(delays, default=0), 3)},
            "run_s": {"hit_median": round(statistics.median([lat[j] for j in hit if j in lat]), 3) if hit else None,
                      "untouched_median": round(statistics.median([lat[j] for j in lat if j not in hit]), 3),
                      "hit_max": round(max([lat[j] for j in hit if j in lat], default=0), 3)}}


@pytest.mark.slow
@pytest.mark.timeout(600 + 5 * env_int("REL_KILL_JOBS", 40))
def test_sigkill_campaign_two_workers_noop(tmp_path):
    """Full size: REL_KILL_JOBS=200 REL_KILLS=50."""
    jobs, kills = env_int("REL_KILL_JOBS", 40), env_int("REL_KILLS", 10)
    res = _kill_campaign(tmp_path, model="kill", jobs=jobs, kills=kills, body={"steps": 20},
                         extra_env={"CLUSCA_VISIBILITY_TIMEOUT_S": "2", "CLUSCA_MAX_BATCH": "2",
                                    "CLUSCA_MAX_ATTEMPTS": "3"}, check_image=None)
    report(f"sigkill_noop_{jobs}_{kills}", res)
    assert res["kills"] == kills, res
    assert res["succeeded"] == jobs and res["lost_or_duplicated"] == 0, res
    assert res["pending_left"] == 0 and res["stream_left"] == 0, res
    # Takeover: the visibility timeout (2 s) plus one reclaim period (0.5 s) while the other worker is
    # alive; longer only when both workers died together and a fresh one had to start.
    assert res["takeover_s"]["median"] < 4 and res["takeover_s"]["max"] < 30, res


@pytest.mark.slow
def test_sigkill_campaign_builtin_model(tmp_path):
    """The same with the real (torch) built-in model: a re-run after takeover gives the same image."""
    if shapes_weights() is None:
        pytest.skip("built-in model weights not present")
    jobs, kills = env_int("REL_KILL_JOBS_SHAPES", 12), env_int("REL_KILLS_SHAPES", 1)
    refs: dict[int, bytes] = {}

    def check(r, job_id, i):
        evs = [e["type"] for e in events(r, job_id)]
        problems = []
        if r.hget(job_key(job_id), "status") != b"succeeded" or evs.count("finished") != 1:
            problems.append(f"not succeeded exactly once: {evs}")
        refs[i] = r.hget(images_key(job_id), "0")
        return problems

    body = {"steps": 50, "cache": {"preset": "balanced"}}
    res = _kill_campaign(tmp_path / "campaign", model="shapes", jobs=jobs, kills=kills, body=body,
                         extra_env={"CLUSCA_VISIBILITY_TIMEOUT_S": "3", "CLUSCA_MAX_BATCH": "1",
                                    "CLUSCA_MAX_ATTEMPTS": "3"}, check_image=check, min_step=0)
    report(f"sigkill_shapes_{jobs}_{kills}", res)
    assert res["succeeded"] == jobs and res["lost_or_duplicated"] == 0 and res["pending_left"] == 0, res
    assert res["kills"] >= 1, res
    # Unbatched runs are deterministic: every job's stored image equals the request run alone, undisturbed.
    with stack(tmp_path / "alone", extra_env={"CLUSCA_MAX_BATCH": "1"}, shapes=True) as svc:
        svc.start_worker("shapes")
        _, url = svc.start_api()
        with httpx.Client(base_url=url, timeout=120) as c:
            for i in range(jobs):
                alone = c.post("/generate", json={"model": "shapes", "prompt": f"job {i}", "seed": 1000 + i,
                                                  **body}).json()
                assert base64.b64decode(alone["images"][0]) == refs[i], f"job {i} differs after takeover"


@pytest.mark.slow
def test_redis_outage_under_load(tmp_path):
    """Redis (AOF on) goes away for REL_OUTAGE_S seconds while clients keep submitting."""
    outage_s = env_float("REL_OUTAGE_S", 10.0)
    with stack(tmp_path, persistent=True) as svc:
        workers = [svc.start_worker("slow", worker_id=f"o{i}") for i in range(2)]
        _, url = svc.start_api()
        log: list[dict] = []
        stop = threading.Event()

        def load() -> None:
            i = 0
            with httpx.Client(base_url=url, timeout=30) as c:
                while not stop.is_set():
                    t0 = time.time()
                    try:
                        resp = c.post("/generate", json={"model": "slow", "prompt": f"o{i}", "seed": i},
                                      headers={"Prefer": "respond-async"})
                        entry = {"i": i, "t0": t0, "t1": time.time(), "status": resp.status_code,
                                 "body": resp.json(), "retry_after": resp.headers.get("retry-after")}
                    except httpx.HTTPError as exc:
                        entry = {"i": i, "t0": t0, "t1": time.time(), "status": None, "body": repr(exc)}
                    log.append(entry)
                    i += 1
                    time.sleep(0.05)

        threading.Thread(target=load, daemon=True).start()
        time.sleep(2.0)
        t_down = time.time()
        svc.redis.proc.send_signal(signal.SIGTERM)
        svc.redis.proc.wait(10)
        svc.redis.proc = None
        time.sleep(outage_s)
        with httpx.Client(base_url=url, timeout=10) as c:
            ready_during = c.get("/readyz").status_code
        t_up = time.time()
        svc.redis.start()
        time.sleep(3.0)
        stop.set()
        time.sleep(0.5)
        r = svc.redis_client()
        # Workers find Redis again on their own (same processes, fresh heartbeats).
        wait_until(lambda: all(float(r.zscore(workers_key("slow"), f"o{i}") or 0) > t_up for i in range(2)),
                   timeout=20, what="worker heartbeats after the restart")
        assert all(w.poll() is None for w in workers)
        accepted = [e for e in log if e["status"] == 202]
        ids = [e["body"]["id"] for e in accepted]
        final = wait_terminal(r, ids, timeout=120)
        problems = {e["body"]["id"]: p for e in accepted if (p := ledger_problems(r, e["body"]["id"], f"o{e['i']}", e["i"]))}
        during = [e for e in log if e["t0"] > t_down + 0.2 and e["t1"] < t_up]
        res = {"outage_s": outage_s, "requests": len(log), "accepted": len(accepted),
               "accepted_before_outage": sum(e["t1"] < t_down for e in accepted),
               "accepted_after_outage": sum(e["t0"] > t_up for e in accepted),
               "answered_during_outage": len(during), "statuses": sorted({str(e["status"]) for e in log}),
               "slowest_answer_s": round(max(e["t1"] - e["t0"] for e in log), 3),
               "succeeded": sum(s["status"] == "succeeded" for s in final.values()), "lost": len(problems),
               "readyz_during_outage": ready_during}
        report("redis_outage", res)
        assert during, res
        for e in during:
            assert e["status"] == 503, e
            assert e["body"]["error"]["code"] == "unavailable" and e["body"]["error"]["message"], e
            assert int(e["retry_after"]) > 0, e
        assert not [e for e in log if e["status"] is None or e["status"] >= 500 and e["status"] != 503], res
        assert res["slowest_answer_s"] < 8, res
        assert ready_during == 503
        assert res["accepted_before_outage"] > 0 and res["accepted_after_outage"] > 0, res
        assert not problems, problems
        assert res["succeeded"] == len(ids)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["graceful", "crash"])
def test_redis_restart_with_aof_loses_no_accepted_job(tmp_path, sig):
    """Queued, running and finished jobs all survive a Redis restart (AOF, fsync every second)."""
    with stack(tmp_path, persistent=True) as svc:
        _, url = svc.start_api()
        worker = svc.start_worker("slow", worker_id="aof-a")
        with httpx.Client(base_url=url, timeout=30) as c:
            done_before = submit(c, model="slow", prompt="early", seed=1, steps=2)
            wait_until(lambda: c.get(f"/jobs/{done_before}").json()["status"] == "succeeded", what="first job")
            running = submit(c, model="slow", prompt="running", seed=2, steps=40)
            queued = [submit(c, model="idle", prompt=f"q{i}", seed=i) for i in range(20)]
            wait_until(lambda: c.get(f"/jobs/{running}").json()["step"] >= 2, what="job running")
        restart_redis(svc, down_s=1.0, sig=sig)
        r = svc.redis_client()
        assert r.xlen(stream_key("idle")) == 20
        idle_worker = svc.start_worker("idle")
        st = wait_terminal(r, [done_before, running, *queued], timeout=60)
        assert all(s["status"] == "succeeded" for s in st.values()), st
        for i, j in enumerate(queued):
            assert ledger_problems(r, j, f"q{i}", i) == []
        assert ledger_problems(r, running, "running", 2) == []
        assert ledger_problems(r, done_before, "early", 1) == []
        assert worker.poll() is None and idle_worker.poll() is None


@pytest.mark.slow
def test_frozen_redis_is_a_quick_503_not_a_hang(tmp_path):
    """A Redis that accepts connections but never answers (SIGSTOP) must not hang clients."""
    with stack(tmp_path) as svc:
        svc.start_worker("noop")
        _, url = svc.start_api()
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.post("/generate", json={"prompt": "before"}).status_code == 200
            svc.redis.proc.send_signal(signal.SIGSTOP)
            try:
                for path, body in (("/generate", {"prompt": "x"}), ("/jobs/" + "0" * 32, None)):
                    t0 = time.monotonic()
                    resp = c.request("POST" if body else "GET", path, json=body)
                    took = time.monotonic() - t0
                    assert resp.status_code == 503, resp.text
                    assert resp.json()["error"]["code"] == "unavailable" and took < 12, took
            finally:
                svc.redis.proc.send_signal(signal.SIGCONT)
            wait_until(lambda: c.post("/generate", json={"prompt": "after"}).status_code == 200, timeout=30,
                       interval=0.5, what="service back after Redis resumed")


def test_api_restart_jobs_in_flight_finish_and_are_fetchable(tmp_path):
    with stack(tmp_path) as svc:
        svc.start_worker("slow")
        api, url = svc.start_api()
        with httpx.Client(base_url=url, timeout=30) as c:
            ids = [submit(c, model="slow", prompt=f"a{i}", seed=i) for i in range(6)]
            wait_until(lambda: c.get(f"/jobs/{ids[0]}").json()["step"] >= 1, what="first job running")
        sync_outcome: dict = {}

        def sync_call() -> None:
            try:
                with httpx.Client(base_url=url, timeout=30) as c2:
                    sync_outcome["resp"] = c2.post("/generate", json={"model": "slow", "prompt": "sync", "seed": 99},
                                                   headers={"Idempotency-Key": "sync-1"})
            except httpx.HTTPError as exc:
                sync_outcome["error"] = exc

        t = threading.Thread(target=sync_call)
        t.start()
        r = svc.redis_client()
        wait_until(lambda: r.keys(IDEM_PATTERN), what="sync request queued")
        api.send_signal(signal.SIGKILL)
        api.wait(10)
        t.join(30)
        assert "error" in sync_outcome, "the killed API still answered"
        _, url2 = svc.start_api()
        with httpx.Client(base_url=url2, timeout=30) as c:
            again = c.post("/generate", json={"model": "slow", "prompt": "sync", "seed": 99},
                           headers={"Idempotency-Key": "sync-1"})
            assert again.status_code == 200 and again.json()["status"] == "succeeded", again.text
            assert again.json()["attempts"] == 1
            sync_id = again.json()["id"]
            for j in ids:
                final = wait_until(lambda: (x := c.get(f"/jobs/{j}").json())["status"] == "succeeded" and x,
                                   what=f"job {j}")
                assert final["attempts"] == 1
                img = c.get(f"/jobs/{j}/images/0")
                assert img.status_code == 200 and img.headers["content-type"] == "image/png"
        for i, j in enumerate(ids):
            assert ledger_problems(r, j, f"a{i}", i) == []
        assert ledger_problems(r, sync_id, "sync", 99) == []


def test_raising_pipeline_fails_its_job_only_and_worker_keeps_serving(tmp_path):
    """A simulated out-of-memory fails that job with its reason; batch mates and later jobs succeed."""
    with stack(tmp_path, extra_env={"CLUSCA_MAX_BATCH": "4", "CLUSCA_BATCH_WAIT_MS": "200"}) as svc:
        _, url = svc.start_api()
        with httpx.Client(base_url=url, timeout=30) as c:
            # Queued before any worker exists, so the worker reads them as one batch.
            good1 = submit(c, model="failing", prompt="fine one", seed=1)
            bad = submit(c, model="failing", prompt="explode", seed=2)
            good2 = submit(c, model="failing", prompt="fine two", seed=3)
            worker = svc.start_worker("failing")
            r = svc.redis_client()
            st = wait_terminal(r, [good1, bad, good2], timeout=30)
            failed = c.get(f"/jobs/{bad}").json()
            assert failed["status"] == "failed" and "out of memory" in failed["error"], failed
            assert failed["attempts"] == 1, "a failure that the pipeline reported is not retried"
            assert st[good1]["status"] == st[good2]["status"] == "succeeded", st
            assert ledger_problems(r, good1, "fine one", 1) == [] and ledger_problems(r, good2, "fine two", 3) == []
            # The same worker process goes on serving, failure after failure.
            for k in range(5):
                resp = c.post("/generate", json={"model": "failing", "prompt": "explode", "seed": k})
                assert resp.status_code == 500 and "out of memory" in resp.json()["error"]
                ok = c.post("/generate", json={"model": "failing", "prompt": f"next {k}", "seed": k})
                assert ok.status_code == 200 and ok.json()["status"] == "succeeded"
            assert worker.poll() is None
            alive = c.get("/models").json()
            assert {m["name"]: m["workers_alive"] for m in alive["models"]}["failing"] == 1


def test_reclaim_finds_a_dead_workers_jobs_behind_many_live_ones():
    """Takeover must not wait for the live jobs ahead of the dead worker's ones in the pending list."""
    import redis as redis_lib

    from service.broker.embedded import EmbeddedRedis
    from service.broker.consumer import WorkerQueue
    from service.broker.keys import new_job_id, stream_key

    with EmbeddedRedis() as srv:
        r = redis_lib.Redis.from_url(srv.url)

        def consumer(name: str) -> WorkerQueue:
            return WorkerQueue(r, worker_id=name, models=["m"], ttl_s=60, visibility_timeout_s=0.2, max_attempts=3)

        live, dead, rescuer = consumer("live"), consumer("dead"), consumer("rescuer")
        live.ensure_groups()
        for _ in range(60):
            r.xadd(stream_key("m"), {"job": new_job_id("m")})
        held = live.read(50, block_ms=0)
        lost = dead.read(10, block_ms=0)
        assert len(held) == 50 and len(lost) == 10
        time.sleep(0.3)
        found = []
        for _ in range(6):  # the worker loop calls reclaim every visibility/4; a few rounds suffice
            live.touch(held)
            found += rescuer.reclaim(4)
        assert sorted(d.job_id for d in found) == sorted(d.job_id for d in lost)
