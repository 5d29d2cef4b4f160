-- KEYS[1]: the session hash. Returns turns, tokens, spend, age ms; or nothing if it is gone.
local h = redis.call('HMGET', KEYS[1], 'turns', 'tokens', 'spend', 'first')
local first = tonumber(h[4])
if not first then return {} end
return {tonumber(h[1]) or 0, tonumber(h[2]) or 0, tonumber(h[3]) or 0, math.max(0, now_ms() - first)}
