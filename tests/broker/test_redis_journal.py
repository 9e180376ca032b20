"""The loss journal on disk (CLUSCA_RECONCILE_JOURNAL): jobs a stopped API process had not checked
yet are checked by the next one, against a real Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support import ROOT, wait_until
from service.broker import ack_log, connect as redis_conn
from service.broker.ack_log import AckLog
from service.contract import JobRequest
from service.broker.keys import job_key
from service.broker.producer import JobQueue
from service.broker.reconcile import AckJournal

REQ = JobRequest(prompt="p", width=16, height=16, steps=2, guidance=0.0, seed=1, cache={"mode": "off"})

# A process that confirms jobs into a journal on disk and dies before checking any (SIGKILL-like).
CONFIRM_AND_DIE = """
import asyncio, os, sys
from service.broker import connect as redis_conn
from service.broker.ack_log import AckLog
from service.contract import JobRequest
from service.broker.producer import JobQueue
from service.broker.reconcile import AckJournal

async def main(url, directory, n):
    r = redis_conn.async_client(url)
    q = JobQueue(r, max_queue=1000, ttl_s=600, journal=AckJournal(60, disk=AckLog(directory, url)))
    for _ in range(n):
        job_id, _ = await q.enqueue("durable", JobRequest("p", 16, 16, 2, 0.0, 1, {"mode": "off"}))
        print(job_id, flush=True)
    os._exit(0)  # no close, no check: what a crash leaves

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def _confirm_in_a_process_that_dies(url: str, directory: Path, n: int) -> list[str]:
    out = subprocess.run([sys.executable, "-c", CONFIRM_AND_DIE, url, str(directory), str(n)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def _check_all(url: str, journal: AckJournal) -> list[str]:
    async def go():
        r = redis_conn.async_client(url)
        try:
            return [j.id for j in await journal.check(r)]
        finally:
            await r.aclose()

    return asyncio.run(go())


def _die(log: AckLog) -> None:
    """What the death of its process does to a journal: the files stay, the lock is released."""
    os.close(log._fd)
    os.close(log._lock_fd)
    log._fd = -1


def _lines_on_disk(directory: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in directory.glob("acks-*.log"))


def test_a_restarted_process_checks_the_jobs_a_crashed_one_confirmed(service, tmp_path):
    ids = _confirm_in_a_process_that_dies(service.redis_url, tmp_path, 4)
    r = service.redis_client()
    r.delete(job_key(ids[2]))  # a failover to a replica that never saw it

    journal = AckJournal(settle_s=0.05, disk=AckLog(tmp_path, service.redis_url))
    assert journal.adopted == 4 and journal.pending == 4
    time.sleep(0.1)  # past the settle time
    assert _check_all(service.redis_url, journal) == [ids[2]]
    assert journal.checked == 4 and journal.pending == 0
    journal.close()
    assert not list(tmp_path.iterdir()), "a journal with nothing left to check leaves no files"
    for j in ids:
        r.delete(job_key(j))


def test_jobs_not_yet_settled_wait_for_their_time_after_a_restart(service, tmp_path):
    ids = _confirm_in_a_process_that_dies(service.redis_url, tmp_path, 2)
    journal = AckJournal(settle_s=30, disk=AckLog(tmp_path, service.redis_url))
    assert journal.adopted == 2 and _check_all(service.redis_url, journal) == [] and journal.pending == 2
    journal.close()
    # Still unchecked at a clean stop: the next process takes them over again.
    again = AckJournal(settle_s=30, disk=AckLog(tmp_path, service.redis_url))
    assert again.adopted == 2
    again.close()
    service.redis_client().delete(*[job_key(j) for j in ids])


def test_a_live_process_keeps_its_journal_and_other_redis_servers_are_apart(service, tmp_path):
    url = service.redis_url
    alive = AckJournal(settle_s=30, disk=AckLog(tmp_path, url))
    alive.add("0" * 32, "durable")
    other_redis = AckJournal(settle_s=30, disk=AckLog(tmp_path, "redis://elsewhere:6379/0"))
    other_redis.add("1" * 32, "durable")
    _die(other_redis.disk)
    second = AckJournal(settle_s=30, disk=AckLog(tmp_path, url))
    assert second.adopted == 0, "neither a live process's journal nor another Redis's is taken over"
    assert alive.pending == 1 and _lines_on_disk(tmp_path) == 2
    for j in (alive, second):
        j.close()


def test_a_torn_or_garbled_line_is_skipped_and_the_rest_is_checked(service, tmp_path):
    ids = _confirm_in_a_process_that_dies(service.redis_url, tmp_path, 3)
    seg = next(tmp_path.glob("acks-*.1.log"))
    with seg.open("a") as f:
        f.write("not a line at all\n")
        f.write(f"{time.time()!r} {ids[0][:20]}")  # the write a crash cut short: no newline
    service.redis_client().delete(job_key(ids[1]))
    journal = AckJournal(settle_s=0.05, disk=AckLog(tmp_path, service.redis_url))
    assert journal.adopted == 3
    time.sleep(0.1)
    assert _check_all(service.redis_url, journal) == [ids[1]]
    journal.close()
    service.redis_client().delete(*[job_key(j) for j in ids])


def test_entries_older_than_the_result_ttl_are_dropped_unchecked(tmp_path):
    url = "redis://127.0.0.1:1/0"
    first = AckLog(tmp_path, url)
    first.append(time.time() - 7200, "2" * 32, "durable")  # may have expired: gone would not mean lost
    first.append(time.time() - 10, "3" * 32, "durable")
    _die(first)
    journal = AckJournal(settle_s=5, disk=AckLog(tmp_path, url), max_age_s=3600)
    assert journal.adopted == 1 and journal.pending == 1
    journal.close()


def test_checked_segments_are_deleted_so_the_disk_stays_bounded(service, tmp_path, monkeypatch):
    monkeypatch.setattr(ack_log, "SEGMENT_LINES", 10)

    async def go():
        r = redis_conn.async_client(service.redis_url)
        journal = AckJournal(settle_s=0.0, disk=AckLog(tmp_path, service.redis_url))
        q = JobQueue(r, max_queue=1000, ttl_s=60, journal=journal)
        ids, peak = [], 0
        for _ in range(12):
            for _ in range(7):
                ids.append((await q.enqueue("durable", REQ))[0])
            peak = max(peak, _lines_on_disk(tmp_path) - journal.pending)
            await journal.check(r)
            assert journal.pending == 0
            assert len(list(tmp_path.glob("acks-*.log"))) <= 2
        await r.delete(*[job_key(j) for j in ids])
        await r.aclose()
        journal.close()
        return peak

    checked_but_on_disk = asyncio.run(go())
    assert checked_but_on_disk <= 2 * 10


def test_the_api_reports_after_a_restart_a_loss_its_predecessor_had_not_checked(service, tmp_path):
    env = {"CLUSCA_RECONCILE_JOURNAL": str(tmp_path / "acks"), "CLUSCA_RECONCILE_SETTLE_S": "60"}
    proc, url = service.start_api(env)
    with httpx.Client(base_url=url, timeout=10) as c:
        ids = [c.post("/generate", json={"prompt": f"r{i}", "model": "orphan"},
                      headers={"Prefer": "respond-async"}).json()["id"] for i in range(3)]
    service.stop(proc, sig=signal.SIGKILL)
    r = service.redis_client()
    r.delete(job_key(ids[0]))

    proc, url = service.start_api({**env, "CLUSCA_RECONCILE_SETTLE_S": "0.2"})
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            body = wait_until(lambda: (lambda b: b if b["checked"] >= 3 else None)(c.get("/admin/lost-jobs").json()),
                              timeout=15, what="the adopted jobs checked")
            assert [x["id"] for x in body["lost"]] == [ids[0]] and body["lost"][0]["model"] == "orphan"
            assert 'clusca_jobs_lost_total{model="orphan"} 1.0' in c.get("/metrics").text
    finally:
        service.stop(proc)
        r.delete(*[job_key(j) for j in ids])


def test_a_journal_left_by_a_process_that_stopped_later_is_taken_over_while_running(service, tmp_path):
    # A rolling restart: the new process starts while the old one still holds its journal.
    url = service.redis_url
    old = AckJournal(settle_s=30, disk=AckLog(tmp_path, url))
    old.add("4" * 32, "durable")
    new = AckJournal(settle_s=30, disk=AckLog(tmp_path, url))
    assert new.adopted == 0
    old.close()  # stopped with a job unchecked: its files stay
    assert new.adopt_orphans() == 1 and new.pending == 1 and new.adopted == 1
    assert new.adopt_orphans() == 0, "taken over once"
    new.close()
