-- Check a client API key, its scopes and allowed addresses, and charge one request to every
-- limit and the quota of its plan, in one atomic step.
-- KEYS[1] the key's record (hash), KEYS[2] (optional) a cache entry to read along when the
-- request is allowed.
-- ARGV[1] SHA-256 hex of the presented key, ARGV[2] the key id, ARGV[3] the registry prefix,
-- ARGV[4] the default plan's limits ("max:windowMs;..."), ARGV[5] the method, ARGV[6] the
-- path under /api/v1, ARGV[7] the client address as 32 hex digits (IPv4 mapped into IPv6) or
-- '', ARGV[8]/ARGV[9] the current UTC day's id and the ms until the next, ARGV[10]/ARGV[11]
-- the same for the month, ARGV[12] 'auto' (charge, unless the plan makes cache hits free:
-- then only look, and say 'deferred') or 'charge' (charge whatever the plan says).
-- Returns {outcome} for unknown, revoked, expired, forbidden_scope and ip_not_allowed; else
-- {outcome, plan, limits, quota, retry_after_ms, quota_used, quota_reset_ms, cache entry or
-- false, expires_at_ms (0: never), restricted (1 when scopes or addresses limit the key),
-- remaining_1, reset_ms_1, remaining_2, reset_ms_2, ...}, one pair per limit, with outcome ok,
-- deferred, limited or quota_exceeded. Only a key whose hash matches is ever
-- charged, so a wrong secret cannot spend somebody else's limit.
-- The plan, rate and quota keys are named here from the prefix: one Redis (or one Sentinel
-- master) holds them all; this is not written for Redis Cluster.
local record = redis.call('HMGET', KEYS[1], 'hash', 'revoked', 'expiresAtMs', 'plan', 'limits',
  'quota', 'scopeMethods', 'scopePrefixes', 'allowedNets', 'lastUsedAtMs', 'owner')
local stored, presented = record[1], ARGV[1]
if not stored or #stored ~= #presented then
  return {'unknown'}
end
-- Compare every character, whatever the first difference: constant time.
local difference = 0
for i = 1, #stored do
  difference = difference + math.abs(string.byte(stored, i) - string.byte(presented, i))
end
if difference ~= 0 then
  return {'unknown'}
end
if record[2] == '1' then
  return {'revoked'}
end
-- Redis' clock, not the callers': every worker and replica judges by the same time.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
if record[3] and record[3] ~= '' and now >= tonumber(record[3]) then
  return {'expired'}
end
-- Last use, at most a minute stale: one write per key and minute, not one per request.
if now - (tonumber(record[10]) or 0) >= 60000 then
  redis.call('HSET', KEYS[1], 'lastUsedAtMs', now)
end

-- Scopes: ",GET,HEAD," and path prefixes, one per line; a prefix covers whole segments.
local methods = record[7]
if methods and methods ~= '' and not string.find(methods, ',' .. ARGV[5] .. ',', 1, true) then
  return {'forbidden_scope'}
end
local prefixes = record[8]
if prefixes and prefixes ~= '' then
  local path, inside = ARGV[6], false
  for prefix in string.gmatch(prefixes, '[^\n]+') do
    if path == prefix or (string.sub(path, 1, #prefix) == prefix and
        (string.sub(prefix, -1) == '/' or string.sub(path, #prefix + 1, #prefix + 1) == '/')) then
      inside = true
      break
    end
  end
  if not inside then
    return {'forbidden_scope'}
  end
end
-- Allowed networks: "hex/bits,..." over 128-bit addresses, compared a hex digit at a time.
local nets = record[9]
if nets and nets ~= '' then
  local address, inside = ARGV[7], false
  if address ~= '' then
    for net, bits in string.gmatch(nets, '(%x+)/(%d+)') do
      bits = tonumber(bits)
      local whole = math.floor(bits / 4)
      if string.sub(address, 1, whole) == string.sub(net, 1, whole) then
        local rest = bits - whole * 4
        if rest == 0 then
          inside = true
          break
        end
        local step = 2 ^ (4 - rest)
        local digit = whole + 1
        if math.floor(tonumber(string.sub(address, digit, digit), 16) / step) ==
            math.floor(tonumber(string.sub(net, digit, digit), 16) / step) then
          inside = true
          break
        end
      end
    end
  end
  if not inside then
    return {'ip_not_allowed'}
  end
end

-- The plan, then the key's own limits and quota over it.
local prefix = ARGV[3]
local plan = record[4]
if not plan or plan == '' then
  plan = 'default'
end
local limits, quota, hits_free, shared = ARGV[4], '', '0', '0'
if plan ~= 'default' then
  local stored_plan = redis.call('HMGET', prefix .. ':plan:' .. plan, 'limits', 'quota',
    'cacheHitsFree', 'shareByOwner')
  if stored_plan[1] then
    limits, quota = stored_plan[1], stored_plan[2] or ''
    hits_free, shared = stored_plan[3] or '0', stored_plan[4] or '0'
  else
    plan = 'default' -- deleted under the key: the settings' limit, never no limit at all
  end
end
if record[5] and record[5] ~= '' then
  limits = record[5]
end
if record[6] and record[6] ~= '' then
  quota = record[6]
end
local subject = ARGV[2]
if shared == '1' then
  subject = 'owner:' .. (record[11] or '')
end
local charge = ARGV[12] == 'charge' or hits_free ~= '1'

-- Quota: a counter per UTC day or month, which expires a minute after its period.
local quota_max, period = string.match(quota, '^(%d+):(%a+)$')
local quota_key, quota_used, quota_reset = nil, 0, 0
if quota_max then
  quota_max = tonumber(quota_max)
  local period_id, reset = ARGV[8], tonumber(ARGV[9])
  if period == 'month' then
    period_id, reset = ARGV[10], tonumber(ARGV[11])
  end
  quota_key = prefix .. ':quota:' .. subject .. ':' .. period_id
  quota_used = tonumber(redis.call('GET', quota_key)) or 0
  quota_reset = reset
end

-- GCRA per limit: each request moves the theoretical arrival time (tat) one interval on; a
-- request is allowed while every tat stays within one window of now. Nothing is charged
-- unless every limit and the quota allow it.
local states, updates = {}, {}
local limited, retry_after = false, 0
for maximum, window in string.gmatch(limits, '(%d+):(%d+)') do
  maximum, window = tonumber(maximum), tonumber(window)
  local interval = window / maximum
  local rate_key = prefix .. ':rate:' .. subject .. ':' .. maximum .. ':' .. window
  local tat = tonumber(redis.call('GET', rate_key)) or now
  if tat < now then
    tat = now
  end
  local new_tat = tat + interval
  if not charge then
    states[#states + 1] = math.floor((window - (tat - now)) / interval + 0.001)
    states[#states + 1] = math.ceil(tat - now)
  elseif new_tat - now > window + 0.001 then
    -- A microsecond of slack keeps float rounding from refusing the limit-th request.
    limited = true
    retry_after = math.max(retry_after, math.ceil(new_tat - window - now))
    states[#states + 1] = 0
    states[#states + 1] = math.ceil(tat - now)
  else
    states[#states + 1] = math.floor((window - (new_tat - now)) / interval + 0.001)
    states[#states + 1] = math.ceil(new_tat - now)
    updates[#updates + 1] = {rate_key, new_tat}
  end
end

local outcome = 'ok'
if not charge then
  outcome = 'deferred'
elseif quota_key and quota_used >= quota_max then
  outcome, retry_after = 'quota_exceeded', quota_reset
elseif limited then
  outcome = 'limited'
else
  for _, update in ipairs(updates) do
    local ttl = math.max(1, math.ceil(update[2] - now))
    redis.call('SET', update[1], string.format('%.3f', update[2]), 'PX', ttl)
  end
  if quota_key then
    quota_used = redis.call('INCR', quota_key)
    if quota_used == 1 then
      redis.call('PEXPIRE', quota_key, quota_reset + 60000)
    end
  end
end

local entry = false
if KEYS[2] and (outcome == 'ok' or outcome == 'deferred') then
  -- The cache entry this request will want: read now, saving the proxy a round trip.
  entry = redis.call('GET', KEYS[2])
end
local restricted = 0
if (methods and methods ~= '') or (prefixes and prefixes ~= '') or (nets and nets ~= '') then
  restricted = 1
end
local reply = {outcome, plan, limits, quota, retry_after, quota_used, quota_reset, entry,
  tonumber(record[3]) or 0, restricted}
for i = 1, #states do
  reply[#reply + 1] = states[i]
end
return reply
