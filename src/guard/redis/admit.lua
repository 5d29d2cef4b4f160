-- KEYS[1]: the session hash. ARGV: max_turns, max_tokens, max_spend nanos, max wall clock ms
-- ('' = none), idle ttl ms. Loads or creates the session (first = now), renews its TTL, refuses
-- when a ceiling is reached (used >= limit; order turns, tokens, spend, wall clock), otherwise
-- counts one turn. Returns: ok (1/0), ceiling (1..4, 0 if ok), used, turns, tokens, spend, age ms.
local now = now_ms()
local h = redis.call('HMGET', KEYS[1], 'turns', 'tokens', 'spend', 'first')
local turns, tokens, spend = tonumber(h[1]) or 0, tonumber(h[2]) or 0, tonumber(h[3]) or 0
local first = tonumber(h[4])
if not first then
  first = now
  redis.call('HSET', KEYS[1], 'first', string.format('%d', now))
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
local age = math.max(0, now - first)
local used = {turns, tokens, spend, age}
for i = 1, 4 do
  local limit = tonumber(ARGV[i])
  if limit and used[i] >= limit then
    return {0, i, used[i], turns, tokens, spend, age}
  end
end
turns = redis.call('HINCRBY', KEYS[1], 'turns', 1)
return {1, 0, 0, turns, tokens, spend, age}
