-- KEYS: 5 per subject. ARGV per subject: tpm, period code. Returns per subject: in flight,
-- spent, reserved, period start, period end, tokens remaining, token reset ms (-1 = no tpm).
local n = #KEYS / 5
local now_ms, now_s = clock()
local out = {}
for i = 1, n do
  local k = (i - 1) * 5
  local tpm, kind = tonumber(ARGV[(i - 1) * 2 + 1]), tonumber(ARGV[(i - 1) * 2 + 2])
  purge(KEYS[k + 3], KEYS[k + 4], now_ms)
  local spent = roll(KEYS[k + 5], kind, now_s)
  local start, stop = period_bounds(kind, now_s)
  local reserved = math.max(0, tonumber(redis.call('HGET', KEYS[k + 4], '=sum')) or 0)
  local rem, reset = -1, -1
  if tpm > 0 then
    local level = bucket(KEYS[k + 2], tpm, now_ms)
    rem = math.max(0, math.floor(level))
    reset = math.max(0, math.ceil((tpm - level) * 60000 / tpm))
  end
  local row = {redis.call('ZCARD', KEYS[k + 3]), spent, reserved, start, stop, rem, reset}
  for _, x in ipairs(row) do out[#out + 1] = x end
end
return out
