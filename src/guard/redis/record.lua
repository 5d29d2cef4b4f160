-- KEYS[1]: the session hash. ARGV: tokens, spend nanos, idle ttl ms. Creates the session if it
-- expired meanwhile.
if redis.call('HEXISTS', KEYS[1], 'first') == 0 then
  redis.call('HSET', KEYS[1], 'first', string.format('%d', now_ms()))
end
redis.call('HINCRBY', KEYS[1], 'tokens', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'spend', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
