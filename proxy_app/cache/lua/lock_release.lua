-- Release a load lock we still hold: delete it when the result was stored, else leave a short
-- "pass" marker so that waiters elsewhere stop waiting and load for themselves.
-- KEYS[1] lock; ARGV[1] our token, ARGV[2] "deleted" or "pass", ARGV[3] marker expiry (ms).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if ARGV[2] == 'pass' then
  redis.call('SET', KEYS[1], 'pass', 'PX', ARGV[3])
else
  redis.call('DEL', KEYS[1])
end
return 1
