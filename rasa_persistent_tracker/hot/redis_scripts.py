"""The hot state's Lua scripts: each is one atomic step on one conversation's
keys (``KEYS[1]`` its record ``<prefix>:h:{id}``, ``KEYS[2]`` its outbox
``<prefix>:o:{id}``, or a quarantine key with the same hash tag), so they run
unchanged on Redis Cluster. ``hot_state.RedisHotState`` calls them.

Of an outbox entry the scripts read only its leading sequence number
(``entry_header.LUA_SEQ``).
"""
from rasa_persistent_tracker.hot.entry_header import LUA_SEQ

LOAD = """
local ok, r = pcall(redis.call, 'HMGET', KEYS[1], 'v', 'd')
-- Servers without redis.sha1hex (some Redis look-alikes) always send the record.
if ok and r[2] and ARGV[1] ~= '' and redis.sha1hex and redis.sha1hex(r[2]) == ARGV[1] then
  return {'hash', r[1], false, '0', 1}
end
local t = redis.call('TYPE', KEYS[1])['ok']
local okl, last = pcall(redis.call, 'LINDEX', KEYS[2], -1)
local seq = '0'
if okl and last then seq = string.match(last, '<SEQ>') or '0' end
if t ~= 'hash' then return {t, false, false, seq, 0} end
return {t, r[1], r[2], seq, 0}
"""

# KEYS: record, outbox, a fresh quarantine key, then the conversation's
# tombstone keys (one per key the tombstone may be named under).
# ARGV: expected version ('' any), payload, record TTL ms, outbox entry ('' none),
# outbox TTL ms, save token, '1' if a missing record must not count as the
# expected version, '1' if the payload is a record restored from SQL.
# Returns {new version, 'ok'|'applied', outbox moved aside 0|1}, {-1, stored
# version} on a version conflict, {-2|-3, reason} for an unusable record,
# {-4, 'missing'} for a missing record that was expected, {-5, floor} for a
# missing record whose tombstone refuses this commit (the conversation was
# erased after the tracker was read).
# 'applied': this token's save is already in (a retry whose first reply was lost).
COMMIT = """
local t = redis.call('TYPE', KEYS[1])['ok']
if t == 'hash' and ARGV[6] ~= '' and redis.call('HGET', KEYS[1], 't') == ARGV[6] then
  return {tonumber(redis.call('HGET', KEYS[1], 'v')), 'applied', 0}
end
if t ~= 'none' and t ~= 'hash' then return {-2, t} end
local cur = 0
if t == 'hash' then
  cur = tonumber(redis.call('HGET', KEYS[1], 'v'))
  if cur == nil then return {-3, 'version'} end
end
local floor = nil
if t == 'none' then
  for i = 4, #KEYS do
    local f = tonumber(redis.call('GET', KEYS[i]) or '')
    if f and (floor == nil or f > floor) then floor = f end
  end
end
if ARGV[1] ~= '' then
  local expected = tonumber(ARGV[1])
  if t == 'hash' and cur ~= expected then return {-1, cur} end
  -- Erased: a tracker read before the erasure (its record expected, or its
  -- version at or below the floor) never brings the conversation back.
  -- A record restored from SQL at or below the floor was read before it.
  if floor and (ARGV[7] == '1' or (expected > 0 and expected <= floor)
                or (ARGV[8] == '1' and expected <= floor)) then
    return {-5, floor}
  end
  if t == 'none' and ARGV[7] == '1' then return {-4, 'missing'} end
  if t == 'none' then cur = expected end
end
-- A new conversation under an erased one's id counts on from the floor, so
-- no version of it equals one a tracker of the erased conversation holds.
if floor and cur < floor then cur = floor end
-- An outbox of the wrong type is moved aside (kept, like any unreadable
-- value) so this and every later save can queue its rows.
local moved = 0
local ot = redis.call('TYPE', KEYS[2])['ok']
if ot ~= 'none' and ot ~= 'list' then
  redis.call('RENAME', KEYS[2], KEYS[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[5])
  moved = 1
end
local new = cur + 1
redis.call('HSET', KEYS[1], 'v', new, 'd', ARGV[2], 't', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if ARGV[4] ~= '' then
  redis.call('RPUSH', KEYS[2], ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
return {new, 'ok', moved}
"""

LOAD = LOAD.replace("<SEQ>", LUA_SEQ)

# KEYS: record, outbox, then the tombstone keys. ARGV: floor (at least),
# tombstone TTL ms, version the record must have ('' any; '0' none).
# Returns {floor, record removed 0|1, outbox entries removed}, or {-1, version}
# when the record is not at the required version (nothing changed).
ERASE = """
local t = redis.call('TYPE', KEYS[1])['ok']
local v = 0
if t == 'hash' then v = tonumber(redis.call('HGET', KEYS[1], 'v') or '') or 0 end
if ARGV[3] ~= '' and (v ~= tonumber(ARGV[3]) or (ARGV[3] == '0' and t ~= 'none')) then
  return {-1, v}
end
local floor = math.max(tonumber(ARGV[1]), v)
for i = 3, #KEYS do
  local f = tonumber(redis.call('GET', KEYS[i]) or '')
  if f and f > floor then floor = f end
end
for i = 3, #KEYS do
  redis.call('SET', KEYS[i], floor, 'PX', ARGV[2])
end
local entries = 0
if redis.call('TYPE', KEYS[2])['ok'] == 'list' then entries = redis.call('LLEN', KEYS[2]) end
local removed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
return {floor, removed, entries}
"""

TOMBSTONE = """
local floor = nil
for i = 1, #KEYS do
  local f = tonumber(redis.call('GET', KEYS[i]) or '')
  if f and (floor == nil or f > floor) then floor = f end
end
return floor
"""

QUARANTINE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('RENAME', KEYS[1], KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 1
"""

QUARANTINE_ENTRY = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return redis.call('LREM', KEYS[2], 1, ARGV[1])
"""

ACK = """
local n = 0
while true do
  local head = redis.call('LINDEX', KEYS[1], 0)
  if not head then break end
  local seq = tonumber(string.match(head, '<SEQ>') or '')
  -- An unreadable head stays: delivery quarantines it when it reads it.
  if seq == nil or seq > tonumber(ARGV[1]) then break end
  redis.call('LPOP', KEYS[1])
  n = n + 1
end
return n
"""

ACK = ACK.replace("<SEQ>", LUA_SEQ)

PENDING = """
local ok, entries = pcall(redis.call, 'LRANGE', KEYS[2], 0, tonumber(ARGV[1]))
if not ok then entries = {} end
local t = redis.call('TYPE', KEYS[1])['ok']
if t ~= 'hash' then return {entries, false, false} end
local r = redis.call('HMGET', KEYS[1], 'v', 'd')
return {entries, r[1], r[2]}
"""
