-- The cross-replica request rate to the upstream, one call per upstream request.
-- KEYS[1] the shared rate state (GCRA theoretical arrival time, in ms); ARGV[1] requests allowed
-- per second. Returns 0 when this request may go (and counts it), else the ms until one may.
local limit = tonumber(ARGV[1])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
-- GCRA: each request moves the theoretical arrival time (tat) one interval on; a request goes
-- while tat stays within one second of now: at most `limit` in any second, never more.
local window = 1000
local interval = window / limit
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then
  tat = now
end
local new_tat = tat + interval
if new_tat - now > window + 0.001 then
  return math.max(1, math.ceil(new_tat - window - now))
end
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now))
return 0
