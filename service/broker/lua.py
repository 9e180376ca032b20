"""The queue's Lua scripts, rendered with the job contract's names and caps.

Each state change that must not race (enqueue, start, finish, cancel, release) is one
script, run atomically by Redis. The scripts are written with ``$name`` placeholders for
every status, event type, the consumer group and the event-stream cap, filled in from
:mod:`service.contract` once at import: a status renamed there is renamed here too, and
no script can spell one differently from the Python side.
"""

from __future__ import annotations

from string import Template

from service import contract as c

# Placeholder -> value. ``$is_terminal`` is a Lua expression over a local ``st``.
NAMES: dict[str, str] = {
    "group": c.GROUP, "events_maxlen": str(c.EVENTS_MAXLEN),
    "queued": c.QUEUED, "running": c.RUNNING, "succeeded": c.SUCCEEDED, "failed": c.FAILED,
    "cancelled": c.CANCELLED,
    "ev_queued": "queued", "ev_started": "started", "ev_failed": c.FINAL_EVENT[c.FAILED], "ev_cancelled": c.FINAL_EVENT[c.CANCELLED],
    "is_terminal": "(" + " or ".join(f"st == '{s}'" for s in c.TERMINAL) + ")",
}

# KEYS: stream (the job's lane), the model's other lane's stream, job, events[, idem] (every key
#       in the model's slot: see service.broker.keys)
# ARGV: job_id, now, request_json, model, max_queue, ttl, steps, queued_event_json, fingerprint
# The depth limit counts both lanes: it bounds what the model holds, whichever lane it waits in.
# A key already used for another request (another fingerprint) is refused: 'mismatch'.
# The job id is drawn once per call, so finding its record means this very script ran
# already: a client that lost the reply and sent the script again (redis-py's cluster
# client does so on a dropped connection). Answering as the first run did keeps that
# resend from queueing the job twice.
ENQUEUE = """
if redis.call('EXISTS', KEYS[3]) == 1 then return {'ok', ARGV[1]} end
if KEYS[5] then
  local existing = redis.call('GET', KEYS[5])
  if existing then
    local id, fp = string.match(existing, '^(%S+) ?(%S*)$$')
    if id == nil then id, fp = existing, '' end
    if fp ~= '' and ARGV[9] ~= '' and fp ~= ARGV[9] then return {'mismatch', id} end
    return {'dup', id}
  end
end
local depth = redis.call('XLEN', KEYS[1]) + redis.call('XLEN', KEYS[2])
if depth >= tonumber(ARGV[5]) then return {'full', tostring(depth)} end
redis.call('HSET', KEYS[3], 'id', ARGV[1], 'model', ARGV[4], 'status', '$queued', 'request', ARGV[3],
           'created', ARGV[2], 'step', '0', 'steps', ARGV[7], 'attempts', '0')
redis.call('EXPIRE', KEYS[3], ARGV[6])
redis.call('XADD', KEYS[4], '*', 'e', ARGV[8])
redis.call('EXPIRE', KEYS[4], ARGV[6])
redis.call('XADD', KEYS[1], '*', 'job', ARGV[1])
if KEYS[5] then redis.call('SET', KEYS[5], ARGV[1] .. ' ' .. ARGV[9], 'EX', ARGV[6]) end
return {'ok', ARGV[1]}
"""

# KEYS: job, events, done, stream
# ARGV: worker, now, max_attempts, ttl, entry_id
START = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then
  redis.call('XACK', KEYS[4], '$group', ARGV[5]); redis.call('XDEL', KEYS[4], ARGV[5])
  return {'gone'}
end
if $is_terminal then
  redis.call('XACK', KEYS[4], '$group', ARGV[5]); redis.call('XDEL', KEYS[4], ARGV[5])
  return {'done', st}
end
local n = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
local now = tonumber(ARGV[2])
if n > tonumber(ARGV[3]) then
  local reason = 'gave up after ' .. (n - 1) .. ' attempts: the workers running it stopped responding'
  redis.call('HSET', KEYS[1], 'status', '$failed', 'finished', ARGV[2], 'error', reason)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', $events_maxlen, '*', 'e',
             cjson.encode({type='$ev_failed', error=reason, t=now}))
  redis.call('RPUSH', KEYS[3], '$failed')
  for _, k in ipairs({KEYS[1], KEYS[2], KEYS[3]}) do redis.call('EXPIRE', k, ARGV[4]) end
  redis.call('XACK', KEYS[4], '$group', ARGV[5]); redis.call('XDEL', KEYS[4], ARGV[5])
  return {'exhausted', reason}
end
redis.call('HSET', KEYS[1], 'status', '$running', 'started', ARGV[2], 'worker', ARGV[1], 'step', '0')
redis.call('XADD', KEYS[2], 'MAXLEN', '~', $events_maxlen, '*', 'e',
           cjson.encode({type='$ev_started', worker=ARGV[1], attempt=n, t=now}))
local f = redis.call('HMGET', KEYS[1], 'request', 'created', 'cancel')
return {'ok', f[1], f[2], f[3] or '', tostring(n)}
"""

# KEYS: job, events, images, done, stream
# ARGV: status, now, result_json, error, ttl, entry_id, event_json, step ('' for none), n_progress,
#       progress_event_1 .. progress_event_n, img0, img1, ...
# The job's last progress events travel with its outcome: one round trip, and they still come
# before the final event.
FINISH = """
local st = redis.call('HGET', KEYS[1], 'status')
redis.call('XACK', KEYS[5], '$group', ARGV[6]); redis.call('XDEL', KEYS[5], ARGV[6])
if (not st) or $is_terminal then return 0 end
local first_img = 10 + tonumber(ARGV[9])
for i = 10, first_img - 1 do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', $events_maxlen, '*', 'e', ARGV[i])
end
if ARGV[8] ~= '' then redis.call('HSET', KEYS[1], 'step', ARGV[8]) end
if #ARGV >= first_img then
  for i = first_img, #ARGV do redis.call('HSET', KEYS[3], tostring(i - first_img), ARGV[i]) end
  redis.call('EXPIRE', KEYS[3], ARGV[5])
end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished', ARGV[2], 'result', ARGV[3], 'error', ARGV[4])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', $events_maxlen, '*', 'e', ARGV[7])
redis.call('RPUSH', KEYS[4], ARGV[1])
for _, k in ipairs({KEYS[1], KEYS[2], KEYS[4]}) do redis.call('EXPIRE', k, ARGV[5]) end
return 1
"""

# KEYS: job, events, done ; ARGV: now, ttl
CANCEL = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if st == '$queued' then
  redis.call('HSET', KEYS[1], 'status', '$cancelled', 'finished', ARGV[1], 'error', 'cancelled by the client')
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', $events_maxlen, '*', 'e',
             cjson.encode({type='$ev_cancelled', t=tonumber(ARGV[1])}))
  redis.call('RPUSH', KEYS[3], '$cancelled')
  for _, k in ipairs(KEYS) do redis.call('EXPIRE', k, ARGV[2]) end
  return '$cancelled'
end
if st == '$running' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
  return 'cancelling'
end
return st
"""

# Put a delivered but never started job back at the end of its stream (graceful shutdown):
# the stream it was delivered from, so a long job goes back to the long lane.
# KEYS: stream, job ; ARGV: entry_id, job_id
RELEASE = """
redis.call('XACK', KEYS[1], '$group', ARGV[1]); redis.call('XDEL', KEYS[1], ARGV[1])
local st = redis.call('HGET', KEYS[2], 'status')
if st == '$queued' then redis.call('XADD', KEYS[1], '*', 'job', ARGV[2]) return 1 end
return 0
"""

# Put a job this worker started back at the end of its stream, unrun (the worker is stopping): queued
# again, and the attempt it used given back, since the job did nothing wrong. A job whose client asked
# to cancel it is cancelled instead. A job that is no longer this worker's (finished, or taken over
# after the visibility timeout) is left alone: 0.
# KEYS: stream, job, events, done ; ARGV: entry_id, job_id, worker, now, ttl
REQUEUE = """
local st = redis.call('HGET', KEYS[2], 'status')
if st ~= '$running' or redis.call('HGET', KEYS[2], 'worker') ~= ARGV[3] then return 0 end
redis.call('XACK', KEYS[1], '$group', ARGV[1]); redis.call('XDEL', KEYS[1], ARGV[1])
local now = tonumber(ARGV[4])
if redis.call('HGET', KEYS[2], 'cancel') == '1' then
  redis.call('HSET', KEYS[2], 'status', '$cancelled', 'finished', ARGV[4], 'error', 'cancelled by the client')
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', $events_maxlen, '*', 'e', cjson.encode({type='$ev_cancelled', t=now}))
  redis.call('RPUSH', KEYS[4], '$cancelled')
  for _, k in ipairs({KEYS[2], KEYS[3], KEYS[4]}) do redis.call('EXPIRE', k, ARGV[5]) end
  return 2
end
redis.call('HINCRBY', KEYS[2], 'attempts', -1)
redis.call('HSET', KEYS[2], 'status', '$queued', 'step', '0')
redis.call('HDEL', KEYS[2], 'started', 'worker')
redis.call('XADD', KEYS[3], 'MAXLEN', '~', $events_maxlen, '*', 'e',
           cjson.encode({type='$ev_queued', requeued=true, t=now}))
redis.call('XADD', KEYS[1], '*', 'job', ARGV[2])
return 1
"""

TEMPLATES: dict[str, str] = {"enqueue": ENQUEUE, "start": START, "finish": FINISH, "cancel": CANCEL,
                             "release": RELEASE, "requeue": REQUEUE}


def render(template: str) -> str:
    """``template`` with every placeholder filled in; an unknown placeholder is a KeyError."""
    return Template(template).substitute(NAMES)


SCRIPTS: dict[str, str] = {name: render(t) for name, t in TEMPLATES.items()}
