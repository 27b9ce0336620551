"""The Lua source of the job store's scripts: what each does to a job's keys, in one step.

``scripts.py`` registers them and builds each call (the order of KEYS and ARGV below is written
there once, next to the typed function that makes it).
"""

# Moves a queued job to running under a new run id, and gives that run the job's lease; first,
# whatever it answers, takes the id off the RQ intermediate list it was taken into (KEYS[6],
# when given: until this step, a worker killed after taking the job leaves it there, for the
# janitor to queue again). KEYS: job hash, events, lease, running set, token ids[, intermediate
# list]. ARGV: worker, now, maxlen, event data, run id, lease ms, job id. Returns {answer, ids}:
# the answer is "running" (also to this start sent again), "cancel" (a cancel was asked before it
# started), "taken" (another run holds a live lease), "missing", or the job's final status; ids
# are the token ids an earlier run stored, read in the same step (only when the job has output: a
# new job's start reads nothing), and counted in the hash's stored_tokens, which every output
# write then checks and keeps.
START = """
if KEYS[6] then redis.call('LREM', KEYS[6], 1, ARGV[7]) end
local job = redis.call('HMGET', KEYS[1], 'status', 'cancel', 'started_at', 'attempts', 'completion_tokens')
local status = job[1]
if not status then return {'missing', {}} end
if status ~= 'queued' and status ~= 'running' then return {status, {}} end
if job[2] then return {'cancel', {}} end
local ids = {}
if (tonumber(job[5]) or 0) > 0 then ids = redis.call('LRANGE', KEYS[5], 0, -1) end
if status == 'running' then
  local holder = redis.call('GET', KEYS[3])
  -- This very start, sent again after its reply was lost (a dropped connection): it holds the job.
  if holder == ARGV[5] then return {'running', ids} end
  if holder then return {'taken', {}} end
end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'run', ARGV[5],
  'started_at', job[3] or ARGV[2], 'attempts', (tonumber(job[4]) or 0) + 1, 'stored_tokens', #ids)
redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[6])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[7])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'event', 'started', 'data', ARGV[4])
return {'running', ids}
"""

# What the scripts that write a run's output share (KEYS[1..7]: job hash, events, text, token
# ids, lease, running set, and the model's RQ queue list when given).
# stored(field): how many token ids the job has in Redis: its hash's stored_tokens, set by its
# start and kept by every write in the same step as the ids (so a failover that loses a write
# loses both), or, for a run an older version started, the list's length.
# hand_back(): Redis lost the last writes of this run (a failover): the job goes back to its
# queue's front in the same step, as a handback does, to be continued from what Redis kept (not
# a lost attempt). add_text(): the delta event (data "": none) and the text appended; true when
# the append created the text.
OUTPUT = """
local function stored(field)
  return tonumber(field) or redis.call('LLEN', KEYS[4])
end
local function hand_back(attempts_field, job_id, maxlen)
  local attempts = (tonumber(attempts_field) or 1) - 1
  redis.call('HSET', KEYS[1], 'status', 'queued', 'attempts', attempts)
  redis.call('HDEL', KEYS[1], 'run')
  redis.call('DEL', KEYS[5])
  redis.call('ZREM', KEYS[6], job_id)
  if KEYS[7] then redis.call('LPUSH', KEYS[7], job_id) end
  local data = cjson.encode({requeued = true, attempt = attempts})
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'event', 'queued', 'data', data)
end
local function add_text(maxlen, data, text)
  if data ~= '' then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'event', 'delta', 'data', data)
  end
  return text ~= '' and redis.call('APPEND', KEYS[3], text) == #text
end
"""

# A running job's new output, written only by the run that holds it, and only once: ARGV[7] is
# how many token ids the job had stored before this write, so a round trip that is sent again
# (its reply was lost) finds them already there and writes nothing twice.
# The text and the token ids live as long as the job's hash: each gets its TTL from the hash
# once, when a write creates it (a finished job's end sets them all again).
# KEYS: job hash, events, text, tokens, lease, running set, and the model's RQ queue list. ARGV:
# run id, maxlen, delta event data (or "": no event), text (or ""), prompt tokens, completion
# tokens, token ids stored before, job id, then the new token ids.
# Returns 0, 1 (a cancel was asked), -1 (this run no longer holds the job: stop, write nothing),
# or -2 (fewer token ids are stored than this run wrote: a failover lost its last writes; the job
# is handed back, to be continued from what Redis kept).
DELTA = (
    OUTPUT
    + """
local job = redis.call('HMGET', KEYS[1], 'run', 'status', 'cancel', 'attempts', 'stored_tokens')
if job[1] ~= ARGV[1] or job[2] ~= 'running' then return -1 end
local before = tonumber(ARGV[7])
local have = stored(job[5])
if have < before then
  hand_back(job[4], ARGV[8], ARGV[2])
  return -2
end
if have == before then
  local ttl
  local function live_as_the_job(key)
    ttl = ttl or redis.call('PTTL', KEYS[1])
    if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
  end
  if add_text(ARGV[2], ARGV[3], ARGV[4]) then live_as_the_job(KEYS[3]) end
  redis.call('HSET', KEYS[1], 'prompt_tokens', ARGV[5], 'completion_tokens', ARGV[6],
    'stored_tokens', before + #ARGV - 8)
  for first = 9, #ARGV, 4000 do  -- in parts: Lua unpacks at most about 8,000 values at once
    redis.call('RPUSH', KEYS[4], unpack(ARGV, first, math.min(first + 3999, #ARGV)))
  end
  if #ARGV >= 9 and before == 0 then live_as_the_job(KEYS[4]) end
end
if job[3] then return 1 end
return 0
"""
)

# Renews a run's lease. KEYS: job hash, lease. ARGV: run id, lease ms. Returns 1, 0 when the
# run no longer holds the job (it was handed to another worker), or -1 when the job's record is
# gone (it expired, or Redis lost its data): in both cases the run must stop.
RENEW = """
local run = redis.call('HGET', KEYS[1], 'run')
if run == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return 1
end
if not run and redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return 0
"""

# The start of every script that ends a job (KEYS[1..3]: job hash, events, text): it answers
# "missing" or the final status already there, else defines finish() for the rest to call.
ENDING = """
local job = redis.call('HMGET', KEYS[1], 'status', 'run', 'cancel', 'attempts', 'stored_tokens')
local status = job[1]
if not status then return 'missing' end
if status == 'finished' or status == 'failed' or status == 'canceled' then return status end
local function finish(status, event, data, ttl, maxlen, first_field)
  redis.call('HSET', KEYS[1], 'status', status, unpack(ARGV, first_field))
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'event', event, 'data', data)
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ttl) end
end
"""

# Writes a job's final state once, from the run that holds it (or from no run: run id ""), with
# the run's last output in the same step: its delta event and text (its token ids are not
# stored: they go with the job's end), once Redis holds exactly the token ids the run knows it
# stored. Fewer: a failover lost some. More: an earlier write whose reply was lost did apply, and
# this output may repeat part of it. Either way the job is handed back instead ("requeued"), to
# be continued from what Redis holds, so its text has neither a hole nor a repeat.
# KEYS: job hash, events, text, tokens, lease, running set[, the model's RQ queue list].
# ARGV: status, event name, event data, ttl, maxlen, run id, job id, the last output's delta
# event data (or ""), its text (or ""), token ids the run stored (or "": no check), then
# field/value pairs. Returns "ok", "requeued", "lost" (another run holds the job), "missing",
# or the final status already there.
FINISH = (
    OUTPUT
    + ENDING
    + """
if ARGV[6] ~= '' and job[2] ~= ARGV[6] then return 'lost' end
if ARGV[10] ~= '' and stored(job[5]) ~= tonumber(ARGV[10]) then
  hand_back(job[4], ARGV[7], ARGV[5])
  return 'requeued'
end
add_text(ARGV[5], ARGV[8], ARGV[9])
finish(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], 11)
redis.call('DEL', KEYS[4], KEYS[5])
redis.call('ZREM', KEYS[6], ARGV[7])
return 'ok'
"""
)

# Hands a running job back to its queue: its worker died (no lease; run id "") or is stopping
# (its own run id). KEYS: job hash, events, text, tokens, lease, running set, and the model's RQ
# queue list: the job id goes back on its front in the same step, so a process killed before
# RQ's own re-enqueue cannot leave the job queued with nothing to run it, and no worker can take
# the id before the job is queued again (and failed, its attempts spent).
# ARGV: job id, maxlen, ttl, attempts allowed, event data for a failure, the time (a cancel's
# finished_at), then the failure's field/value pairs... and, last, the run id. An end here keeps
# the job's text and events for the TTL and drops its token ids, as FINISH does.
# Returns "requeued", "alive" (the lease is live), "lost", "failed" (attempts used up),
# "canceled" (a cancel was pending), "missing", or the final status already there.
REQUEUE = (
    # Not running (ended, or its hash gone: expired, lost with Redis's data): off the running set,
    # or the janitor would find it there, without a lease, at every round.
    """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then redis.call('ZREM', KEYS[6], ARGV[1]) end
"""
    + ENDING
    + """
local run = ARGV[#ARGV]
if status ~= 'running' then return status end
if run ~= '' then
  if job[2] ~= run then return 'lost' end
  redis.call('HINCRBY', KEYS[1], 'attempts', -1)  -- a handback is not a lost attempt
elseif redis.call('EXISTS', KEYS[5]) == 1 then return 'alive' end
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('DEL', KEYS[5])
local function ended(status, fields, event, data)
  redis.call('HSET', KEYS[1], 'status', status, unpack(fields))
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'event', event, 'data', data)
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
  redis.call('DEL', KEYS[4])
end
if job[3] then  -- as a cancel its run would have ended (the fields and event of ended_canceled)
  local done = tonumber(redis.call('HGET', KEYS[1], 'completion_tokens') or '0')
  local fields = {'finish_reason', 'canceled', 'finished_at', ARGV[6]}
  ended('canceled', fields, 'canceled', cjson.encode({completion_tokens = done}))
  return 'canceled'
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if run == '' and attempts >= tonumber(ARGV[4]) then
  ended('failed', {unpack(ARGV, 7, #ARGV - 1)}, 'error', ARGV[5])
  return 'failed'
end
redis.call('HSET', KEYS[1], 'status', 'queued')
redis.call('HDEL', KEYS[1], 'run')
if KEYS[7] then redis.call('LPUSH', KEYS[7], ARGV[1]) end
local data = cjson.encode({requeued = true, attempt = attempts})
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'event', 'queued', 'data', data)
return 'requeued'
"""
)

# Cancels a job. KEYS: job hash, events, text, the model's RQ queue list, its intermediate list.
# ARGV: job id, event data, ttl, maxlen, '1' when a front withdraws the job (no replica had it in
# time: marked so whether or not it had ended, for FORGET) else '0', then field/value pairs to set.
# A job that no run holds (status queued: in its queue, taken by a worker that has not started
# it, or stranded by one that died) is taken off both lists and ends canceled here ("ok"): START
# is the only way from queued to running, and it finds the job final and leaves it. A running
# job gets its cancel flag for the worker running it ("running"). Returns "missing" or the final
# status if the job had already ended.
CANCEL = (
    """
if ARGV[5] == '1' and redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'withdrawn', '1')
end
"""
    + ENDING
    + """
redis.call('HSET', KEYS[1], 'cancel', '1')
if status == 'running' then return 'running' end
redis.call('LREM', KEYS[4], 1, ARGV[1])
redis.call('LREM', KEYS[5], 1, ARGV[1])
finish('canceled', 'canceled', ARGV[2], ARGV[3], ARGV[4], 6)
return 'ok'
"""
)


# Creates a job: the front's whole submit, in one step. KEYS: job hash, events, RQ job hash, the
# model's RQ queue list, RQ's set of queues, and (when the caller's key has a concurrency
# quota) the key's active set. ARGV: job id, most jobs queued (0: no limit), seconds the job's
# records live, maxlen, queued event data, the quota's limit, now, seconds the active set
# lives, how many items the job hash's field/value pairs take (n), then those n items and RQ's
# job's field/value pairs. Returns {"queued", the job's place in its queue (0: next)},
# {"full", jobs queued} or {"quota", 0}. A call sent again (a connection that dropped before
# the reply, a request with the same Idempotency-Key) finds the job created and answers
# {"exists", its fingerprint}, writing nothing.
SUBMIT = """
-- Sent again (its reply was lost, or with its Idempotency-Key): created already. The front
-- compares what was asked (its fingerprint, '' without a key) and shows the job as it is.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'exists', redis.call('HGET', KEYS[1], 'fingerprint') or ''}
end
local limit = tonumber(ARGV[2])
if limit > 0 then
  local queued = redis.call('LLEN', KEYS[4])
  if queued >= limit then return {'full', queued} end
end
if KEYS[6] then
  if redis.call('ZCARD', KEYS[6]) >= tonumber(ARGV[6]) then return {'quota', 0} end
  redis.call('ZADD', KEYS[6], ARGV[7], ARGV[1])
  redis.call('EXPIRE', KEYS[6], ARGV[8])
end
local n = tonumber(ARGV[9])
redis.call('HSET', KEYS[1], unpack(ARGV, 10, 9 + n))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'event', 'queued', 'data', ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[3], unpack(ARGV, 10 + n))
local queued = redis.call('RPUSH', KEYS[4], ARGV[1])
if queued == 1 then redis.call('SADD', KEYS[5], KEYS[4]) end  -- a queue new (or emptied) since
return {'queued', queued - 1}
"""

# Moves up to ARGV[1] ids from the head of a model's RQ queue (KEYS[1]) to the tail of its
# intermediate list (KEYS[2]), one LMOVE each as RQ's dequeue does, stopping at an empty queue:
# a worker with free slots takes what fits in one round trip. Returns the ids moved.
TAKE = """
local taken = {}
for i = 1, tonumber(ARGV[1]) do
  local id = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not id then break end
  taken[i] = id
end
return taken
"""

# KEYS: a queue list, its intermediate list; ARGV: '1' to push an id on neither list too (a
# plain RQ worker's take leaves it on none) else '0', then job ids taken from it, in their order.
# Each id still in the intermediate list goes back to the queue's head, in order; one a janitor
# queued again meanwhile is left where it is (never twice on the queue). Returns how many went back.
PUT_BACK = """
local pushed = 0
for i = #ARGV, 2, -1 do
  if redis.call('LREM', KEYS[2], 1, ARGV[i]) == 1
      or (ARGV[1] == '1' and not redis.call('LPOS', KEYS[1], ARGV[i])) then
    redis.call('LPUSH', KEYS[1], ARGV[i])
    pushed = pushed + 1
  end
end
return pushed
"""

# Forgets a job a front withdrew (no replica had it in time: its request was answered 503), once
# it has ended, so that its Idempotency-Key, sent again, makes it anew. KEYS: job hash, events,
# text, token ids, RQ's job hash, the response record, RQ's canceled registry; ARGV: the job id.
# Returns 1 (forgotten), 0 (not a withdrawn job) or -1 (withdrawn, not yet ended: its run stops).
FORGET = """
if redis.call('HGET', KEYS[1], 'withdrawn') ~= '1' then return 0 end
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'canceled' and status ~= 'failed' and status ~= 'finished' then return -1 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
redis.call('ZREM', KEYS[7], ARGV[1])
return 1
"""
