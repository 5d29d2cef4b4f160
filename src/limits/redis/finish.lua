-- Settle, release or replay. KEYS: 5 per subject. ARGV: ticket, cost nanos; then per subject:
-- tpm (0 = none), tokens to give back (negative = charge more), period code.
local n = #KEYS / 5
local ticket, cost = ARGV[1], ARGV[2]
local now_ms, now_s = clock()
for i = 1, n do
  local k = (i - 1) * 5
  local a = 2 + (i - 1) * 3
  local tpm, back, kind = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local amt = redis.call('HGET', KEYS[k + 4], ticket)
  if amt then
    redis.call('HDEL', KEYS[k + 4], ticket)
    redis.call('HINCRBY', KEYS[k + 4], '=sum', '-' .. amt)
  end
  redis.call('ZREM', KEYS[k + 3], ticket)
  if cost ~= '0' then
    roll(KEYS[k + 5], kind, now_s)
    redis.call('HINCRBY', KEYS[k + 5], 'spent', cost)
  end
  if tpm > 0 and back ~= 0 then
    local level = bucket(KEYS[k + 2], tpm, now_ms) + back
    if level > tpm then level = tpm end
    save_bucket(KEYS[k + 2], tpm, level, now_ms)
  end
end
return 1
