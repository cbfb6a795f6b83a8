-- KEYS[1] any key, ARGV[1] any value. Returns ARGV[1] .. KEYS[1].
return ARGV[1] .. KEYS[1]
