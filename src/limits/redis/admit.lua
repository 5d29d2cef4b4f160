-- KEYS: 5 per subject (rpm, tpm, inflight, res, budget).
-- ARGV: ticket, est_tokens, reserve nanos, ttl ms; then per subject: rpm, tpm, max_parallel
-- (0 = none), budget nanos ('' = none), period code.
-- Returns: ok(1/0), refusal kind (1 rpm, 2 tpm, 3 parallel, 4 budget), subject index (1-based),
-- retry ms, limit, used, requested, period end; then per subject the request and token windows
-- (limit, remaining, reset ms; -1 = none).
local n = #KEYS / 5
local ticket, est, reserve, ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local reserve_n = tonumber(reserve)
local now_ms, now_s = clock()
local out = {1, 0, 0, 0, 0, 0, 0, -1}
for j = 1, 6 * n do out[8 + j] = -1 end
local function key(i, j) return KEYS[(i - 1) * 5 + j] end
local function arg(i, j) return ARGV[4 + (i - 1) * 5 + j] end
local function win(i, k, lim, rem, reset)
  local b = 8 + (i - 1) * 6 + k * 3
  out[b + 1] = lim; out[b + 2] = math.max(0, math.floor(rem)); out[b + 3] = math.max(0, math.ceil(reset))
end
local function refuse(kind, i, retry_ms, limit, used, requested, pend)
  out[1] = 0; out[2] = kind; out[3] = i; out[4] = math.max(0, math.ceil(retry_ms))
  out[5] = limit; out[6] = math.max(0, used); out[7] = requested; out[8] = pend
  return out
end
-- 1. Requests (GCRA): consumed in order; a refused request still counts as an attempt.
for i = 1, n do
  local rpm = tonumber(arg(i, 1))
  if rpm > 0 then
    local per = 60000 / rpm
    local tat = tonumber(redis.call('GET', key(i, 1))) or now_ms
    if tat < now_ms then tat = now_ms end
    local new_tat = tat + per
    if new_tat - now_ms > 60000 + 0.01 then
      win(i, 0, rpm, 0, tat - now_ms)
      return refuse(1, i, new_tat - now_ms - 60000, rpm, rpm, 1, -1)
    end
    redis.call('SET', key(i, 1), fmt(new_tat), 'PX', int(new_tat - now_ms + 1))
    win(i, 0, rpm, (now_ms + 60000 - new_tat) / per + 0.0001, new_tat - now_ms)
  end
end
-- 2. Tokens, checked for every subject before any is charged.
local levels = {}
for i = 1, n do
  local tpm = tonumber(arg(i, 2))
  if tpm > 0 then
    local level = bucket(key(i, 2), tpm, now_ms)
    levels[i] = level
    win(i, 1, tpm, level, (tpm - level) * 60000 / tpm)
    local need = math.min(est, tpm)
    if level < need then
      return refuse(2, i, (need - level) * 60000 / tpm, tpm, tpm - math.max(0, math.floor(level)), est, -1)
    end
  end
end
-- 3. Requests in flight (expired tickets first give back their slot and reservation).
for i = 1, n do
  purge(key(i, 3), key(i, 4), now_ms)
  local maxp = tonumber(arg(i, 3))
  if maxp > 0 then
    local cur = redis.call('ZCARD', key(i, 3))
    if cur >= maxp then return refuse(3, i, 1000, maxp, cur, 1, -1) end
  end
end
-- 4. Budget: spent + live reservations + this one must fit.
for i = 1, n do
  local kind = tonumber(arg(i, 5))
  local spent = roll(key(i, 5), kind, now_s)
  local budget = arg(i, 4)
  if budget ~= '' then
    local reserved = math.max(0, tonumber(redis.call('HGET', key(i, 4), '=sum')) or 0)
    local used = spent + reserved
    if used + reserve_n > tonumber(budget) then
      local _, stop = period_bounds(kind, now_s)
      return refuse(4, i, 0, tonumber(budget), used, reserve_n, stop)
    end
  end
end
-- Everything fits: charge tokens, take a slot, reserve.
for i = 1, n do
  if levels[i] then
    local tpm = tonumber(arg(i, 2))
    local level = levels[i] - est
    save_bucket(key(i, 2), tpm, level, now_ms)
    win(i, 1, tpm, level, (tpm - level) * 60000 / tpm)
  end
  redis.call('ZADD', key(i, 3), int(now_ms + ttl), ticket)
  if reserve_n > 0 then
    redis.call('HSET', key(i, 4), ticket, reserve)
    redis.call('HINCRBY', key(i, 4), '=sum', reserve)
  end
  -- Both expire together, long after every ticket in them.
  redis.call('PEXPIRE', key(i, 3), int(ttl + 60000))
  redis.call('PEXPIRE', key(i, 4), int(ttl + 60000))
end
return out
