-- Delete a plan unless keys are on it, atomically with that count.
-- KEYS[1] the plan's record, KEYS[2] the set of its keys, KEYS[3] the set of plan names.
-- ARGV[1] the plan's name. Returns -n when n keys use it, 1 when deleted, 0 when unknown.
local used = redis.call('SCARD', KEYS[2])
if used > 0 then
  return -used
end
local deleted = redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[3], ARGV[1])
return deleted
