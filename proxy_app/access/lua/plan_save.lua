-- Create a plan, or replace an existing one, atomically with the check that it exists or not.
-- KEYS[1] the plan's record, KEYS[2] the set of plan names.
-- ARGV[1] 'create' or 'replace', ARGV[2] the plan's name, ARGV[3..] field, value, ...
-- Returns 1 when stored, 0 when a plan to create exists or a plan to replace does not.
local exists = redis.call('EXISTS', KEYS[1]) == 1
if (ARGV[1] == 'create') == exists then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('SADD', KEYS[2], ARGV[2])
return 1
