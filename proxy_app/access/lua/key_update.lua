-- Set fields of an existing key record; a record that does not exist is not created.
-- KEYS[1] the key's record; ARGV field, value, field, value, ...
-- Returns 1 when the record existed, else 0.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
