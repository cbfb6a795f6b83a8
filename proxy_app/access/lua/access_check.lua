-- Check a client API key and charge one request to its rate limit, in one atomic step.
-- KEYS[1] the key's record (hash), KEYS[2] its rate-limit state (GCRA theoretical arrival
-- time, in ms), KEYS[3] (optional) a cache entry to read along when the request is allowed.
-- ARGV[1] SHA-256 hex of the presented key, ARGV[2] limit (requests), ARGV[3] window (ms).
-- Returns {outcome, remaining, reset_ms, retry_after_ms[, cache entry or false]}; outcome is
-- one of "ok", "unknown", "revoked", "expired", "limited". Only a key whose hash matches is
-- ever charged, so a wrong secret cannot spend somebody else's limit.
local record = redis.call('HMGET', KEYS[1], 'hash', 'revoked', 'expiresAtMs')
local stored, presented = record[1], ARGV[1]
if not stored or #stored ~= #presented then
  return {'unknown', 0, 0, 0}
end
-- Compare every character, whatever the first difference: constant time.
local difference = 0
for i = 1, #stored do
  difference = difference + math.abs(string.byte(stored, i) - string.byte(presented, i))
end
if difference ~= 0 then
  return {'unknown', 0, 0, 0}
end
if record[2] == '1' then
  return {'revoked', 0, 0, 0}
end
-- Redis' clock, not the callers': every worker and replica judges by the same time.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
if record[3] and record[3] ~= '' and now >= tonumber(record[3]) then
  return {'expired', 0, 0, 0}
end
-- GCRA: each request moves the theoretical arrival time (tat) one interval on; a request is
-- allowed while tat stays within one window of now. Bursts up to the limit, never more.
local limit, window = tonumber(ARGV[2]), tonumber(ARGV[3])
local interval = window / limit
local tat = tonumber(redis.call('GET', KEYS[2])) or now
if tat < now then
  tat = now
end
local new_tat = tat + interval
-- A microsecond of slack keeps float rounding from refusing the limit-th request.
if new_tat - now > window + 0.001 then
  return {'limited', 0, math.ceil(tat - now), math.ceil(new_tat - window - now)}
end
redis.call('SET', KEYS[2], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now))
local remaining = math.floor((window - (new_tat - now)) / interval + 0.001)
if KEYS[3] then
  -- The cache entry this request will want: read now, saving the proxy a round trip.
  return {'ok', remaining, math.ceil(new_tat - now), 0, redis.call('GET', KEYS[3])}
end
return {'ok', remaining, math.ceil(new_tat - now), 0}
