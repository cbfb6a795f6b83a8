-- Create or change a key record, keeping the plan's set of keys in step, atomically with the
-- check that the plan exists (a plan deleted meanwhile is never assigned).
-- KEYS[1] the key's record, KEYS[2] the set of all key ids.
-- ARGV[1] the registry prefix, ARGV[2] the key id, ARGV[3] 'create' or 'update',
-- ARGV[4] the plan the record will have ('' for no change of plan on update),
-- ARGV[5..] field, value, field, value, ...
-- Returns 'ok', 'not_found' (update of a missing record), 'exists' (create over one) or
-- 'no_plan'.
local prefix, key_id, mode, plan = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local exists = redis.call('EXISTS', KEYS[1]) == 1
if mode == 'update' and not exists then
  return 'not_found'
end
if mode == 'create' and exists then
  return 'exists'
end
if plan ~= '' and plan ~= 'default' and
    redis.call('EXISTS', prefix .. ':plan:' .. plan) == 0 then
  return 'no_plan'
end
if plan ~= '' then
  local old = redis.call('HGET', KEYS[1], 'plan')
  if not old or old == '' then
    old = 'default'
  end
  redis.call('SREM', prefix .. ':plan-keys:' .. old, key_id)
  redis.call('SADD', prefix .. ':plan-keys:' .. plan, key_id)
end
if #ARGV > 4 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 5))
end
redis.call('SADD', KEYS[2], key_id)
return 'ok'
