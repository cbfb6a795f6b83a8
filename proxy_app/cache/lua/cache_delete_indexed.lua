-- Delete every entry listed in an index set, and the set itself; returns how many entries went.
-- KEYS[1] index set. (The entries' names come from the set: single-instance Redis only.)
local members = redis.call('SMEMBERS', KEYS[1])
local deleted = 0
for first = 1, #members, 500 do
  local last = math.min(first + 499, #members)
  deleted = deleted + redis.call('DEL', unpack(members, first, last))
end
redis.call('DEL', KEYS[1])
return deleted
