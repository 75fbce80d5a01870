"""Redis (or Valkey) state store: one store for every process and instance pointed at the same server.

Layout under ``prefix`` (a namespace or queue name ``n`` is written as ``len(n):n``, so no name can collide with
another's keys):

- documents: ``{p}d:{ns}:{key}`` strings (canonical JSON, ``PX`` for a TTL), indexed per namespace by the sorted set
  ``{p}i:{ns}`` (score 0, members ordered by bytes, so a prefix scan is one ``ZRANGEBYLEX``); the members of documents
  that expired are dropped by a sweep of the namespaces written with a TTL every ``SWEEP_S`` (one process at a time:
  the marker ``{p}sw:{ns}``), so a namespace nobody scans (kept Responses items, the cache) does not grow for good;
- logs: the stream ``{p}l:{ns}`` (``XADD``/``XREVRANGE``/``XTRIM``; followed with ``XREAD``);
- queues: one stream per flow with the consumer group ``work`` (``XREADGROUP``, ``XAUTOCLAIM``, ``XACK``):
  ``{p}q:{name}`` for the flow ``""``, ``{p}q:{name}:{bytes(flow)}:{flow}`` for the others, whose names are in the
  set ``{p}qf:{name}``. The turns: the list ``{p}qr:{name}`` is the ring of flow groups with entries to give, each
  group's list ``{p}qg:{name}:{bytes(group)}:{group}`` the ring of its flows, the set ``{p}qa:{name}`` the flows in
  a ring, ``{p}qp:{name}`` the flows given entries since a reclaim last found them holding none, and ``{p}qv:{name}``
  marks a queue whose flows are in rings. ``{p}qb:{name}``, a stream of one entry that every enqueue replaces, wakes
  blocked takers. An entry's id is the stream entry's id, then ``@`` and its flow when that is not ``""``;
- counters: ``{p}c:{ns}:{key}`` strings holding a number (``PEXPIRE`` for their window), changed only by one Lua
  script per :meth:`RedisStore.count` call;
- slots: the hash ``{p}h:{pool}``, one field per holder (process): its slots held and when it lapses (a new key
  name: the sorted set ``{p}s:{pool}`` of one lease per call that came before it is left to expire).

Everything that must be atomic is one command, a ``MULTI`` block or a Lua script, never a read then a write.
Every command is bounded by ``timeout_s`` (one retry on a fresh connection, for a server that restarted); a server
that does not answer raises :class:`scillm_core.errors.StateUnavailable` (503), never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from scillm_core.errors import StateUnavailable
from scillm_core.state import LOG_FIELD, Count, Counted, Inserted, flow_group

if TYPE_CHECKING:
    from scillm_core.state import Change

__all__ = ["RedisStore", "safe_url"]

GROUP = "work"
TAKE_LOOKS = 64  # a take looks at most at 2 x how many it wants + this many flows (each look gives or removes one)
MAX_BLOCK_S = 5.0  # one blocking read waits at most this long; callers loop
MAX_CONNECTIONS = 256  # per client of one process
SWEEP_S = 600.0  # a namespace written with a TTL has its expired documents' index members dropped at most this often
SWEEP_ROWS = 1000  # index members one step of the sweep checks (one script call: other commands wait for one step)


def _lex_range(prefix: str) -> tuple[bytes, bytes]:
    """The ``ZRANGEBYLEX`` bounds of the index members starting with ``prefix`` (every member: no prefix); no UTF-8
    key holds the byte 0xff, so ``prefix + 0xff`` is past all of them."""
    return (b"[" + prefix.encode(), b"[" + prefix.encode() + b"\xff") if prefix else (b"-", b"+")


_STREAM_ID = re.compile(r"[0-9]{1,19}(-[0-9]{1,19})?", re.ASCII)  # a stream entry id (64-bit parts): a log cursor

_CAS = """
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == '' then
  if cur then return 0 end
elseif cur ~= ARGV[1] then
  return 0
end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[4])
else
  if ARGV[3] ~= '0' then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) else redis.call('SET', KEYS[1], ARGV[2]) end
  redis.call('ZADD', KEYS[2], 0, ARGV[4])
end
return 1
"""

# An insert into a capped prefix. KEYS: the document, its namespace's index; ARGV: value, TTL ms, index member, the
# prefix's range in the index (ZRANGEBYLEX form), cap, the document key of the namespace's index members. Returns
# {1} (stored), {0, current} (a document is there) or {2} (the prefix holds cap documents). Members whose document
# expired still sit in the index until a scan meets them: at the cap they are checked and dropped, then counted again.
_INSERT = """
local cur = redis.call('GET', KEYS[1])
if cur then return {0, cur} end
local cap = tonumber(ARGV[6])
local held = redis.call('ZLEXCOUNT', KEYS[2], ARGV[4], ARGV[5])
if held >= cap then
  for _, member in ipairs(redis.call('ZRANGEBYLEX', KEYS[2], ARGV[4], ARGV[5])) do
    if redis.call('EXISTS', ARGV[7] .. member) == 0 then
      redis.call('ZREM', KEYS[2], member)
      held = held - 1
    end
  end
  if held >= cap then return {2} end
end
if ARGV[2] ~= '0' then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) else redis.call('SET', KEYS[1], ARGV[1]) end
redis.call('ZADD', KEYS[2], 0, ARGV[3])
return {1}
"""

# A step of the sweep of a namespace's index: KEYS the index; ARGV where to go on from (ZRANGEBYLEX form), how many
# members, the document key of the namespace's index members. Drops the members whose document is gone (expired);
# returns how many it dropped, then the last member it looked at (none: the index is done).
_SWEEP = """
local members = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], '+', 'LIMIT', 0, tonumber(ARGV[2]))
local dropped = 0
for _, member in ipairs(members) do
  if redis.call('EXISTS', ARGV[3] .. member) == 0 then
    redis.call('ZREM', KEYS[1], member)
    dropped = dropped + 1
  end
end
if #members < tonumber(ARGV[2]) then return {dropped} end
return {dropped, members[#members]}
"""

# Queues from before flow rings (a stream per flow and the set of flows) have their flows put in rings, and in the set
# of flows given entries (entries a consumer of that version took are reclaimed), by the first enqueue, take or
# reclaim that finds no mark on the queue (and a new queue is marked, with nothing to put). The mark lapses after ten
# minutes, so that flows an instance of the version before enqueues during a rolling upgrade join the rings too.
_ADOPT = """
local function adopt(mark, flows, active, groups, prefix, given, nameless)
  if not redis.call('SET', mark, 1, 'NX', 'PX', 600000) then return end
  local all = redis.call('SMEMBERS', flows)
  if redis.call('EXISTS', nameless) == 1 then all[#all + 1] = '' end
  for _, flow in ipairs(all) do
    redis.call('SADD', given, flow)
    if redis.call('SADD', active, flow) == 1 then
      local cut = string.find(flow, '/', 1, true)
      local group = cut and string.sub(flow, 1, cut) or flow
      local ring = prefix .. #group .. ':' .. group
      redis.call('RPUSH', ring, flow)
      if redis.call('LLEN', ring) == 1 then redis.call('RPUSH', groups, group) end
    end
  end
end
"""

# An enqueue: KEYS the flow's stream, the queue's set of flows, its doorbell, its set of flows in a ring, its ring of
# groups, the group's ring of flows, its rings' mark, its set of flows given entries, the stream of no flow; ARGV the
# flow ("" for none: a flow like the others, whose stream has no name suffix), its group, the prefix of groups' rings'
# keys, then the entries. A flow not in its group's ring joins it at the
# back, and a group whose ring was empty joins the ring of groups. The group is made whenever missing (a drained
# flow's stream is deleted).
_ENQUEUE = _ADOPT + """
adopt(KEYS[7], KEYS[2], KEYS[4], KEYS[5], ARGV[3], KEYS[8], KEYS[9])
if ARGV[1] ~= '' then redis.call('SADD', KEYS[2], ARGV[1]) end
if redis.call('SADD', KEYS[4], ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[6], ARGV[1])
  if redis.call('LLEN', KEYS[6]) == 1 then redis.call('RPUSH', KEYS[5], ARGV[2]) end
end
redis.pcall('XGROUP', 'CREATE', KEYS[1], 'work', '0', 'MKSTREAM')
local ids = {}
for i = 4, #ARGV do ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', 'v', ARGV[i]) end
redis.call('XADD', KEYS[3], 'MAXLEN', '1', '*', 'n', #ids)
return ids
"""

# A take, round robin over the ring of groups and, in each group's turn, over its ring of flows (both rings turn
# with every entry given, so the turns are the same for every process and instance): KEYS the doorbell, the set of
# flows, the set of flows in a ring, the ring of groups, the set of flows given entries, the stream of no flow, the
# mark of a queue whose flows are in rings (a queue from before rings gets its flows put in them once); ARGV
# the consumer, how many, the prefix of flow streams' keys and of groups' rings' keys, and how many flows to look at
# at most. A flow with nothing left to give leaves its ring (a group whose ring empties leaves the ring of groups),
# and the queue when its stream is empty (every entry acknowledged), so each look either gives an entry or removes a
# flow: a take costs what it gives, however many flows wait. Returns the doorbell's last id (to block on from there),
# 1 when the looks ran out before enough was given (flows are left to look at: take again at once), else 0, then per
# entry its flow, id and value.
_TAKE = _ADOPT + """
local out = {redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1], 0}
out[1] = out[1] and out[1][1] or '0-0'
local want, looks, taken = tonumber(ARGV[2]), tonumber(ARGV[5]), 0
adopt(KEYS[7], KEYS[2], KEYS[3], KEYS[4], ARGV[4], KEYS[5], KEYS[6])
local function give(flow, key)
  local got = redis.pcall('XREADGROUP', 'GROUP', 'work', ARGV[1], 'COUNT', 1, 'STREAMS', key, '>')
  if type(got) == 'table' and got[1] and #got[1][2] > 0 then
    local entry = got[1][2][1]
    out[#out + 1] = flow
    out[#out + 1] = entry[1]
    out[#out + 1] = entry[2][2]
    taken = taken + 1
    return true
  end
  return false
end
while taken < want and looks > 0 do
  local group = redis.call('LMOVE', KEYS[4], KEYS[4], 'LEFT', 'RIGHT')
  if not group then break end
  local ring = ARGV[4] .. #group .. ':' .. group
  while looks > 0 do
    local flow = redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
    if not flow then break end
    looks = looks - 1
    local key = flow == '' and KEYS[6] or ARGV[3] .. #flow .. ':' .. flow
    if give(flow, key) then
      redis.call('SADD', KEYS[5], flow)
      break
    end
    redis.call('RPOP', ring)
    redis.call('SREM', KEYS[3], flow)
    if redis.call('XLEN', key) == 0 then
      redis.call('DEL', key)
      redis.call('SREM', KEYS[2], flow)
      redis.call('SREM', KEYS[5], flow)
    end
  end
  if redis.call('LLEN', ring) == 0 then redis.call('RPOP', KEYS[4]) end
end
if taken < want and looks <= 0 then out[2] = 1 end
return out
"""

# A reclaim: KEYS the set of flows given entries, the set of flows, the stream of no flow, the set of flows in a ring,
# the ring of groups, the rings' mark; ARGV the consumer, the idle time in ms, how many, the prefix of flow streams'
# keys, of groups' rings' keys. Entries held longer than the idle time by anyone pass to the consumer (XAUTOCLAIM,
# through a flow's held entries until enough: one call looks at only 10 x COUNT of them, and the idle ones may be
# behind entries a live consumer keeps touching), from the flows given entries only (bounded by the entries taken
# since the last reclaim and those still held, not by the flows waiting); a flow holding nothing leaves that set,
# and the queue when its stream is empty. Returns per entry its flow, id and value.
_RECLAIM = _ADOPT + """
local out, want = {}, tonumber(ARGV[3])
adopt(KEYS[6], KEYS[2], KEYS[4], KEYS[5], ARGV[5], KEYS[1], KEYS[3])
local function claim(flow, key)
  local start = '0-0'
  repeat
    local got = redis.pcall('XAUTOCLAIM', key, 'work', ARGV[1], ARGV[2], start, 'COUNT', want - #out / 3)
    if type(got) ~= 'table' or got.err then return end
    for _, entry in ipairs(got[2]) do
      if entry[2] then
        out[#out + 1] = flow
        out[#out + 1] = entry[1]
        out[#out + 1] = entry[2][2]
      end
    end
    start = got[1]
  until start == '0-0' or #out / 3 >= want
end
for _, flow in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = flow == '' and KEYS[3] or ARGV[4] .. #flow .. ':' .. flow
  if #out / 3 < want then claim(flow, key) end
  local held = redis.pcall('XPENDING', key, 'work')
  if type(held) ~= 'table' or held.err or held[1] == 0 then
    redis.call('SREM', KEYS[1], flow)
    if redis.call('XLEN', key) == 0 then
      redis.call('DEL', key)
      redis.call('SREM', KEYS[2], flow)
    end
  end
end
return out
"""

# Only entries the consumer still holds are touched: one reclaimed by another process stays with it (and none of a
# group that went with Redis's data).
_TOUCH = """
local n = 0
for i = 2, #ARGV do
  local p = redis.pcall('XPENDING', KEYS[1], 'work', ARGV[i], ARGV[i], 1)
  if type(p) == 'table' and p[1] and p[1][2] == ARGV[1] then
    redis.call('XCLAIM', KEYS[1], 'work', ARGV[1], 0, ARGV[i], 'JUSTID')
    n = n + 1
  end
end
return n
"""


# A counting semaphore counted per holder (a process): the hash field of each holder is "<slots held> <expiry in
# server ms>". ARGV: holder, held, want, limit, TTL ms; returns how many were taken.
_HOLD = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local held, want, limit, ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local others = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local n, expiry = string.match(fields[i + 1], '^(%d+) (%d+)$')
  if tonumber(expiry) <= now then
    redis.call('HDEL', KEYS[1], fields[i])
  elseif fields[i] ~= ARGV[1] then
    others = others + tonumber(n)
  end
end
local taken = math.max(0, math.min(want, limit - others - held))
if held + taken > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], (held + taken) .. ' ' .. (now + ttl))
  redis.call('PEXPIRE', KEYS[1], ttl * 2)
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return taken
"""

_HELD = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local held = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 2, #fields, 2 do
  local n, expiry = string.match(fields[i], '^(%d+) (%d+)$')
  if tonumber(expiry) > now then held = held + tonumber(n) end
end
return held
"""

# A commit: per change three keys (document, its namespace's index, its log) and five arguments (expected, value,
# TTL in ms, index member, log record); then one key per flow stream with entries to acknowledge, and per such
# stream the number of its entries then their ids. Each change is a compare-and-set of its own, as _CAS.
_COMMIT = """
local n = tonumber(ARGV[1])
local done = {}
for i = 1, n do
  local doc, index, log = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local a = 1 + 5 * (i - 1)
  local expected, value, ttl, member, record = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  local cur = redis.call('GET', doc)
  local same
  if expected == '' then same = not cur else same = (cur == expected) end
  if same then
    if value == '' then
      redis.call('DEL', doc)
      redis.call('ZREM', index, member)
    else
      if ttl ~= '0' then redis.call('SET', doc, value, 'PX', ttl) else redis.call('SET', doc, value) end
      redis.call('ZADD', index, 0, member)
    end
    if record ~= '' then redis.call('XADD', log, '*', 'v', record) end
    done[i] = 1
  else
    done[i] = 0
  end
end
local a = 2 + 5 * n
for k = 3 * n + 1, #KEYS do
  local last = a + tonumber(ARGV[a])
  for first = a + 1, last, 1000 do
    local ids = {}
    for i = first, math.min(first + 999, last) do ids[#ids + 1] = ARGV[i] end
    -- a queue whose group went with Redis's data has nothing left to acknowledge
    pcall(redis.call, 'XACK', KEYS[k], 'work', unpack(ids))
    redis.call('XDEL', KEYS[k], unpack(ids))
  end
  a = last + 1
end
return done
"""

_APPEND = """
for i = 1, #ARGV do redis.call('XADD', KEYS[1], '*', 'v', ARGV[i]) end
return #ARGV
"""

# StateStore.count: ARGV[1] is the groups as JSON, [[[key index, delta, limit or -1 (none), ttl ms or 0], ...],
# ...]; KEYS are the counters. Each group is checked against the values after the groups before it and applied
# all or nothing; the reply is, per group, 1 or 0 then each change's value (as text: a Lua number would come back
# as an integer).
_COUNT = """
local groups = cjson.decode(ARGV[1])
local values, ttls, dirty = {}, {}, {}
for i = 1, #KEYS do values[i] = tonumber(redis.call('GET', KEYS[i]) or '0') or 0 end
local out = {}
for _, group in ipairs(groups) do
  local after = {}
  local fits = true
  for _, c in ipairs(group) do
    local k = c[1]
    after[k] = (after[k] or values[k]) + c[2]
    if c[3] >= 0 and c[2] > 0 and after[k] > c[3] then fits = false end
  end
  out[#out + 1] = fits and 1 or 0
  for _, c in ipairs(group) do
    out[#out + 1] = string.format('%.17g', fits and after[c[1]] or values[c[1]])
  end
  if fits then
    for _, c in ipairs(group) do
      local k = c[1]
      if c[2] ~= 0 or c[4] > 0 then dirty[k] = true end
      if c[4] > 0 then ttls[k] = c[4] end
    end
    for k, v in pairs(after) do values[k] = v end
  end
end
for k in pairs(dirty) do
  redis.call('SET', KEYS[k], string.format('%.17g', values[k]), 'KEEPTTL')
  if ttls[k] then redis.call('PEXPIRE', KEYS[k], ttls[k]) end
end
return out
"""


def safe_url(url: str) -> str:
    """The URL without credentials (``redis://:secret@host`` -> ``redis://[redacted]@host``)."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "[redacted]@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest


def _name(kind: str, prefix: str, name: str) -> str:
    return f"{prefix}{kind}:{len(name)}:{name}"


def _dump(value: Mapping[str, Any]) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)  # canonical: compare-and-set compares bytes


class _Lane:
    """A connection of its own for calls that come one at a time by design, sit on every request's path and are safe
    to repeat: a provider's slot group commit (each call states the holder's whole count, so a call whose reply was
    lost and is sent again leaves the same state). Each call is sent and read directly, without the pool's per-call
    checks, which cost the client about as much CPU again as the round trip itself (bench/README.md, Scale out). A
    broken connection (a restarted server) is replaced and the call sent once more; a call abandoned halfway
    (cancelled, timed out) drops the connection, so its reply can never be read as the next call's. Counter calls
    add deltas, so they are not repeatable and stay on the pool."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.conn: Any = None
        self.lock = asyncio.Lock()

    async def call(self, *args: Any) -> Any:
        from redis.exceptions import ConnectionError, ResponseError, TimeoutError

        async with self.lock:
            for attempt in (1, 2):
                if self.conn is None:
                    self.conn = self.store.redis.connection_pool.make_connection()
                conn = self.conn
                try:
                    await conn.send_command(*args)  # connects (and authenticates) first when it must
                    return await conn.read_response()
                except ResponseError:
                    raise  # an error reply: the connection is still in step
                except (ConnectionError, TimeoutError, OSError):
                    await self.drop()
                    if attempt == 2:
                        raise
                except BaseException:
                    await self.drop()
                    raise

    async def script(self, source: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """``EVALSHA``, loading the script first when the server does not have it (a restarted Redis)."""
        from redis.exceptions import NoScriptError

        sha = self.store.script(source).sha
        try:
            return await self.call("EVALSHA", sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.call("SCRIPT", "LOAD", source)
            return await self.call("EVALSHA", sha, len(keys), *keys, *args)

    async def drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)


class RedisStore:
    def __init__(self, url: str, *, prefix: str = "scillm:", timeout_s: float = 2.0) -> None:
        self.url = url
        self.prefix = prefix
        self.timeout_s = timeout_s
        self._client: Any = None
        self._blocking: Any = None
        self._scripts: dict[str, Any] = {}
        self._slots = _Lane(self)  # hold_slots' calls (each provider's group commit)
        self._expiring: set[str] = set()  # namespaces this process wrote documents with a TTL to: swept
        self.next_sweep = time.monotonic() + SWEEP_S
        self.sweeper: asyncio.Task[int] | None = None

    # -- connection ------------------------------------------------------------------------------------------------

    def _connect(self, socket_timeout: float) -> Any:
        import redis.asyncio as aioredis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # A bounded pool that waits (up to the command timeout) for a free connection under a burst, instead of
        # redis-py's default of failing at once past 100 connections.
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url, max_connections=MAX_CONNECTIONS, timeout=self.timeout_s, socket_timeout=socket_timeout,
            socket_connect_timeout=self.timeout_s, retry=Retry(NoBackoff(), 1), decode_responses=False)
        return aioredis.Redis(connection_pool=pool)

    @property
    def redis(self) -> Any:
        if self._client is None:
            self._client = self._connect(self.timeout_s)
        return self._client

    @property
    def blocking(self) -> Any:
        """A second client for blocking reads, whose socket timeout outlasts the longest block."""
        if self._blocking is None:
            self._blocking = self._connect(self.timeout_s + MAX_BLOCK_S)
        return self._blocking

    def script(self, source: str) -> Any:
        found = self._scripts.get(source)
        if found is None:
            found = self._scripts[source] = self.redis.register_script(source)
        return found

    @contextlib.contextmanager
    def unavailable(self) -> Iterator[None]:
        """Redis errors as one clear 503 naming the server (never its password)."""
        from redis.exceptions import ConnectionError, ResponseError, TimeoutError

        try:
            yield
        except ResponseError:
            raise
        except (ConnectionError, TimeoutError, OSError) as exc:
            raise StateUnavailable(f"the state store (Redis at {safe_url(self.url)}) did not answer: "
                                   f"{type(exc).__name__}") from None

    # -- documents -------------------------------------------------------------------------------------------------

    def _doc(self, namespace: str, key: str) -> str:
        return _name("d", self.prefix, namespace) + ":" + key

    def _index(self, namespace: str) -> str:
        return _name("i", self.prefix, namespace)

    async def get(self, namespace: str, key: str) -> dict[str, Any] | None:
        with self.unavailable():
            raw = await self.redis.get(self._doc(namespace, key))
        return orjson.loads(raw) if raw is not None else None  # type: ignore[no-any-return]

    async def put(self, namespace: str, key: str, value: Mapping[str, Any], *, ttl_s: float | None = None) -> None:
        await self.put_many(namespace, [(key, value)], ttl_s=ttl_s)

    async def put_many(self, namespace: str, documents: Sequence[tuple[str, Mapping[str, Any]]], *,
                       ttl_s: float | None = None) -> None:
        if not documents:
            return
        ttl_ms = max(1, int(ttl_s * 1000)) if ttl_s else None
        with self.unavailable():
            async with self.redis.pipeline(transaction=True) as pipe:
                for key, value in documents:
                    pipe.set(self._doc(namespace, key), _dump(value), px=ttl_ms)
                pipe.zadd(self._index(namespace), {key: 0 for key, _ in documents})
                await pipe.execute()
        if ttl_s:
            self._sweep_when_due(namespace)

    async def compare_and_set(self, namespace: str, key: str, expected: Mapping[str, Any] | None,
                              value: Mapping[str, Any] | None, *, ttl_s: float | None = None) -> bool:
        args = [_dump(expected) if expected is not None else b"", _dump(value) if value is not None else b"",
                max(1, int(ttl_s * 1000)) if ttl_s else 0, key]
        with self.unavailable():
            done = await self.script(_CAS)(keys=[self._doc(namespace, key), self._index(namespace)], args=args)
        if ttl_s and value is not None:
            self._sweep_when_due(namespace)
        return bool(done)

    async def insert(self, namespace: str, key: str, value: Mapping[str, Any], *, prefix: str, cap: int,
                     ttl_s: float | None = None) -> Inserted:
        if not key.startswith(prefix) or not prefix:
            raise ValueError("insert: the key must start with a non-empty prefix")
        low, high = _lex_range(prefix)
        args = [_dump(value), max(1, int(ttl_s * 1000)) if ttl_s else 0, key, low, high, cap, self._doc(namespace, "")]
        with self.unavailable():
            done = await self.script(_INSERT)(keys=[self._doc(namespace, key), self._index(namespace)], args=args)
        if ttl_s:
            self._sweep_when_due(namespace)
        if done[0] == 1:
            return Inserted(True)
        return Inserted(False, orjson.loads(done[1]) if done[0] == 0 else None)

    async def get_many(self, namespace: str, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        if not keys:
            return []
        with self.unavailable():
            raws = await self.redis.mget([self._doc(namespace, key) for key in keys])
        return [orjson.loads(raw) if raw is not None else None for raw in raws]

    async def commit(self, changes: Sequence[Change], ack: tuple[str, Sequence[str]] | None = None) -> list[bool]:
        keys: list[str] = []
        args: list[Any] = [len(changes)]
        for change in changes:
            doc = self._doc(change.namespace, change.key)
            keys += [doc, self._index(change.namespace), self._log(change.log) if change.log else doc]
            args += [_dump(change.expected) if change.expected is not None else b"",
                     _dump(change.value) if change.value is not None else b"",
                     max(1, int(change.ttl_s * 1000)) if change.ttl_s else 0, change.key,
                     orjson.dumps(change.record) if change.log and change.record is not None else b""]
        if ack and ack[1]:
            for key, ids in self._by_stream(ack[0], ack[1]).items():
                keys.append(key)
                args += [len(ids), *ids]
        if len(args) == 1:
            return []
        with self.unavailable():
            done = await self.script(_COMMIT)(keys=keys, args=args)
        for namespace in {c.namespace for c in changes if c.ttl_s and c.value is not None}:
            self._sweep_when_due(namespace)
        return [bool(x) for x in done]

    def _sweep_when_due(self, namespace: str) -> None:
        """Note a namespace written with a TTL, and start a sweep in the background when the last one is
        ``SWEEP_S`` old (no caller waits for it)."""
        self._expiring.add(namespace)
        if time.monotonic() >= self.next_sweep and (self.sweeper is None or self.sweeper.done()):
            self.next_sweep = time.monotonic() + SWEEP_S
            self.sweeper = asyncio.ensure_future(self.sweep())
            self.sweeper.add_done_callback(lambda task: task.cancelled() or task.exception())

    async def sweep(self) -> int:
        """Drop the index members whose document expired, in the namespaces this process wrote documents with a TTL
        to, ``SWEEP_ROWS`` members per step; a namespace another process swept in the last ``SWEEP_S`` is left
        alone. How many members went. (Expired documents are Redis's to delete; their index members stayed until
        a scan met them, and a namespace nobody scans grew by one member per document for good.)"""
        dropped = 0
        for namespace in sorted(self._expiring):
            index, stem = self._index(namespace), self._doc(namespace, "")
            with self.unavailable():
                if not await self.redis.set(_name("sw", self.prefix, namespace), b"1", nx=True,
                                            px=int(SWEEP_S * 1000)):
                    continue
                after: bytes = b"-"
                while True:
                    step = await self.script(_SWEEP)(keys=[index], args=[after, SWEEP_ROWS, stem])
                    dropped += int(step[0])
                    if len(step) < 2:
                        break
                    after = b"(" + step[1]
                if not await self.redis.exists(index):  # nothing left in it (a batch's leases): no more sweeps
                    self._expiring.discard(namespace)  # until it is written with a TTL again
        return dropped

    async def delete(self, namespace: str, key: str) -> bool:
        with self.unavailable():
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._doc(namespace, key))
                pipe.zrem(self._index(namespace), key)
                deleted, _ = await pipe.execute()
        return bool(deleted)

    async def scan(self, namespace: str, prefix: str = "", limit: int = 1000) -> list[tuple[str, dict[str, Any]]]:
        """Keys from the namespace's index in byte order, values in one ``MGET`` per page; index members whose
        document expired are dropped from the index as they are met."""
        index = self._index(namespace)
        low, high = _lex_range(prefix)
        found: list[tuple[str, dict[str, Any]]] = []
        offset = 0
        with self.unavailable():
            while len(found) < limit:
                page = min(max(limit - len(found), 100), 10_000)
                keys = await self.redis.zrangebylex(index, low, high, start=offset, num=page)
                if not keys:
                    break
                offset += len(keys)
                values = await self.redis.mget([self._doc(namespace, k.decode()) for k in keys])
                gone = [k for k, v in zip(keys, values, strict=True) if v is None]
                found += [(k.decode(), orjson.loads(v)) for k, v in zip(keys, values, strict=True) if v is not None]
                if gone:
                    await self.redis.zrem(index, *gone)
                    offset -= len(gone)
                if len(keys) < page:
                    break
        return found[:limit]

    # -- logs ------------------------------------------------------------------------------------------------------

    def _log(self, namespace: str) -> str:
        return _name("l", self.prefix, namespace)

    async def append(self, namespace: str, record: Mapping[str, Any]) -> None:
        with self.unavailable():
            await self.redis.xadd(self._log(namespace), {b"v": orjson.dumps(record)})

    async def append_many(self, namespace: str, records: Sequence[Mapping[str, Any]]) -> None:
        if not records:
            return
        with self.unavailable():  # one script call for the batch: one command to encode, atomic
            await self.script(_APPEND)(keys=[self._log(namespace)], args=[orjson.dumps(r) for r in records])

    async def tail(self, namespace: str, limit: int = 100, *, since: float | None = None, until: float | None = None,
                   match: Mapping[str, str | int | float | bool | None] | None = None) -> list[dict[str, Any]]:
        """The time window is the entries' ids (the server's clock, to the millisecond); ``match`` is checked here,
        reading the window newest first a page at a time until ``limit`` records matched."""
        for name in match or ():
            if not LOG_FIELD.match(name):
                raise ValueError(f"log field names are plain identifiers, not {name[:80]!r}")
        high = f"({math.ceil(until * 1000)}-0" if until is not None else "+"
        low = f"{math.ceil(since * 1000)}-0" if since is not None else "-"
        found: list[dict[str, Any]] = []
        with self.unavailable():
            while len(found) < limit:
                page = limit if not match else max(limit, 500)
                entries = await self.redis.xrevrange(self._log(namespace), max=high, min=low, count=page)
                for _, fields in entries:
                    record = orjson.loads(fields[b"v"])
                    if all(record.get(k) == v and (v is not None or record.get(k) is None)
                           for k, v in (match or {}).items()):
                        found.append(record)
                        if len(found) == limit:
                            break
                if len(entries) < page:
                    break
                high = "(" + entries[-1][0].decode()
        return found[::-1]

    # -- counters --------------------------------------------------------------------------------------------------

    async def count(self, namespace: str, groups: Sequence[Sequence[Count]]) -> list[Counted]:
        """Every group in one script call: atomic with respect to every other client, one round trip."""
        keys: dict[str, int] = {}
        encoded = [[[keys.setdefault(c.key, len(keys) + 1), c.delta, -1 if c.limit is None else c.limit,
                     max(1, int(c.ttl_s * 1000)) if c.ttl_s else 0] for c in group] for group in groups]
        if not keys:
            return [Counted(True, ()) for _ in groups]
        stem = _name("c", self.prefix, namespace) + ":"
        with self.unavailable():
            reply = await self.script(_COUNT)(keys=[stem + key for key in keys], args=[orjson.dumps(encoded)])
        out: list[Counted] = []
        at = 0
        for group in groups:
            out.append(Counted(bool(reply[at]), tuple(float(v) for v in reply[at + 1:at + 1 + len(group)])))
            at += 1 + len(group)
        return out

    def peek(self, namespace: str, key: str) -> float | None:
        return None  # every read is a round trip: callers use count()

    async def trim(self, namespace: str, keep: int | None = None, *, before: float | None = None) -> int:
        key = self._log(namespace)
        with self.unavailable():
            async with self.redis.pipeline(transaction=False) as pipe:
                if before is not None:  # entry ids are the server's milliseconds
                    pipe.xtrim(key, minid=f"{max(0, math.floor(before * 1000))}-0", approximate=False)
                if keep is not None:
                    pipe.xtrim(key, maxlen=max(0, keep), approximate=False)
                return sum(int(n) for n in await pipe.execute())

    async def expire_log(self, namespace: str, ttl_s: float | None) -> None:
        with self.unavailable():
            if ttl_s is None:
                await self.redis.persist(self._log(namespace))
            else:
                await self.redis.pexpire(self._log(namespace), max(1, int(ttl_s * 1000)))

    async def follow(self, namespace: str, after: str = "", limit: int = 100,
                     block_s: float = 0.0) -> list[tuple[str, dict[str, Any]]]:
        if after and not _STREAM_ID.fullmatch(after):
            raise ValueError(f"not a log cursor: {after[:40]!r}")
        block = int(min(block_s, MAX_BLOCK_S) * 1000)
        with self.unavailable():
            client = self.blocking if block else self.redis
            answer = await client.xread({self._log(namespace): after or "0-0"}, count=limit, block=block or None)
        return [(entry_id.decode(), orjson.loads(fields[b"v"])) for _, entries in answer or ()
                for entry_id, fields in entries]

    # -- queues ----------------------------------------------------------------------------------------------------

    def _stream(self, queue: str, flow: str) -> str:
        key = _name("q", self.prefix, queue)
        return f"{key}:{len(flow.encode())}:{flow}" if flow else key  # a byte length, as the scripts count

    def _queue_keys(self, queue: str) -> dict[str, str]:
        return {kind: _name(kind, self.prefix, queue) for kind in ("qb", "qf", "qa", "qr", "qp", "qg", "qv")}

    def _by_stream(self, queue: str, ids: Sequence[str]) -> dict[str, list[str]]:
        """Entry ids grouped by their flow's stream, as stream entry ids."""
        streams: dict[str, list[str]] = {}
        for entry_id in ids:
            stream_id, _, flow = entry_id.partition("@")
            streams.setdefault(self._stream(queue, flow), []).append(stream_id)
        return streams

    async def _flows(self, queue: str) -> list[str]:
        """The queue's flows: ``""``, then the others. (A flow's group is made by each enqueue; every reader takes a
        missing one, a new queue's or one Redis lost, as a flow with nothing in it.)"""
        return ["", *sorted(m.decode() for m in await self.redis.smembers(_name("qf", self.prefix, queue)))]

    async def enqueue(self, queue: str, entries: Sequence[Mapping[str, Any]], *, flow: str = "") -> list[str]:
        if not entries:
            return []
        names = self._queue_keys(queue)
        group = flow_group(flow)
        with self.unavailable():
            keys = [self._stream(queue, flow), names["qf"], names["qb"], names["qa"], names["qr"],
                    f"{names['qg']}:{len(group.encode())}:{group}", names["qv"], names["qp"], self._stream(queue, "")]
            ids = await self.script(_ENQUEUE)(keys=keys, args=[flow, group, names["qg"] + ":",
                                                               *(orjson.dumps(e) for e in entries)])
        at = "@" + flow if flow else ""
        return [entry_id.decode() + at for entry_id in ids]

    def _entries(self, answer: Sequence[Any], start: int) -> list[tuple[str, dict[str, Any]]]:
        """A script's ``flow, id, value`` triples as (entry id, entry)."""
        found = []
        for n in range(start, len(answer), 3):
            flow = answer[n].decode()
            found.append((answer[n + 1].decode() + ("@" + flow if flow else ""), orjson.loads(answer[n + 2])))
        return found

    async def take(self, queue: str, consumer: str, count: int, *,
                   block_s: float = 0.0) -> list[tuple[str, dict[str, Any]]]:
        deadline = time.monotonic() + min(block_s, MAX_BLOCK_S)
        names = self._queue_keys(queue)
        keys = [names["qb"], names["qf"], names["qa"], names["qr"], names["qp"], self._stream(queue, ""), names["qv"]]
        args = [consumer, count, self._stream(queue, "") + ":", names["qg"] + ":", 2 * count + TAKE_LOOKS]
        with self.unavailable():
            while True:
                answer = await self.script(_TAKE)(keys=keys, args=args)
                taken = self._entries(answer, 2)
                if not taken and int(answer[1]):
                    continue  # the looks went to flows given out already (each now gone from its ring): look on
                left = deadline - time.monotonic()
                if taken or left <= 0:
                    return taken
                # nothing yet: wait for the next enqueue's ring (any flow, any process), then take again
                bell = answer[0].decode() if isinstance(answer[0], bytes) else str(answer[0])
                await self.blocking.xread({keys[0]: bell}, count=1, block=max(1, int(left * 1000)))

    async def reclaim(self, queue: str, consumer: str, idle_s: float,
                      count: int) -> list[tuple[str, dict[str, Any]]]:
        names = self._queue_keys(queue)
        with self.unavailable():
            answer = await self.script(_RECLAIM)(
                keys=[names["qp"], names["qf"], self._stream(queue, ""), names["qa"], names["qr"], names["qv"]],
                args=[consumer, max(0, int(idle_s * 1000)), count, self._stream(queue, "") + ":", names["qg"] + ":"])
        return self._entries(answer, 0)

    async def touch(self, queue: str, consumer: str, ids: Sequence[str]) -> int:
        touched = 0
        with self.unavailable():
            for key, stream_ids in self._by_stream(queue, ids).items():
                touched += int(await self.script(_TOUCH)(keys=[key], args=[consumer, *stream_ids]))
        return touched

    async def ack(self, queue: str, ids: Sequence[str]) -> None:
        from redis.exceptions import ResponseError

        with self.unavailable():
            for key, stream_ids in self._by_stream(queue, ids).items():
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.xack(key, GROUP, *stream_ids)
                    pipe.xdel(key, *stream_ids)
                    with contextlib.suppress(ResponseError):  # a group that went with Redis's data
                        await pipe.execute()

    async def queue_depth(self, queue: str) -> dict[str, int]:
        from redis.exceptions import ResponseError

        length = claimed = 0
        with self.unavailable():
            for flow in await self._flows(queue):
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.xlen(self._stream(queue, flow))
                    pipe.xpending(self._stream(queue, flow), GROUP)
                    try:
                        flow_length, pending = await pipe.execute()
                    except ResponseError:
                        continue  # drained meanwhile
                length += int(flow_length)
                claimed += int(pending["pending"])
        return {"waiting": max(length - claimed, 0), "claimed": claimed}

    # -- slots -------------------------------------------------------------------------------------------------------

    async def hold_slots(self, pool: str, holder: str, held: int, want: int, limit: int, ttl_s: float) -> int:
        with self.unavailable():
            return int(await self._slots.script(_HOLD, [_name("h", self.prefix, pool)],
                                                [holder, held, want, limit, max(1, int(ttl_s * 1000))]))

    async def slots_held(self, pool: str) -> int:
        with self.unavailable():
            return int(await self.script(_HELD)(keys=[_name("h", self.prefix, pool)]))

    # -- health ----------------------------------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": "redis", "url": safe_url(self.url), "key_prefix": self.prefix}
        started = time.perf_counter()
        try:
            with self.unavailable():
                await self.redis.ping()
            out.update(reachable=True, latency_ms=round((time.perf_counter() - started) * 1000, 2))
        except StateUnavailable as exc:
            out.update(reachable=False, error=exc.message)
        return out

    async def close(self) -> None:
        if self.sweeper is not None and not self.sweeper.done():
            self.sweeper.cancel()
            await asyncio.wait({self.sweeper})
        await self._slots.drop()
        for client in (self._client, self._blocking):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()
                    await client.connection_pool.disconnect()  # a pool passed in is not closed with its client
        self._client = self._blocking = None
