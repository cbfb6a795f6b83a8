-- Store one cache entry and list it in its request target's index, atomically.
-- KEYS[1] entry key, KEYS[2] (optional) index set; ARGV[1] value, ARGV[2] expiry (ms).
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if KEYS[2] then
  redis.call('SADD', KEYS[2], KEYS[1])
  -- The index lives as long as its longest-lived entry.
  if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then
    redis.call('PEXPIRE', KEYS[2], ARGV[2])
  end
end
return 1
