-- Helpers shared by the limit scripts (prepended to each). Money stays in integer strings
-- (HINCRBY) and is compared as doubles, exact up to 2^53 nano-dollars ($9 million).
local DAY = 86400
local function int(x) return string.format('%d', math.floor(x)) end
local function fmt(x) return string.format('%.3f', x) end
local function fdiv(a, b) return math.floor(a / b) end
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = fdiv(y, 400)
  local yoe = y - era * 400
  local mp = m + 9
  if m > 2 then mp = m - 3 end
  local doy = fdiv(153 * mp + 2, 5) + d - 1
  local doe = yoe * 365 + fdiv(yoe, 4) - fdiv(yoe, 100) + doy
  return era * 146097 + doe - 719468
end
local function civil_from_days(z)
  z = z + 719468
  local era = fdiv(z, 146097)
  local doe = z - era * 146097
  local yoe = fdiv(doe - fdiv(doe, 1460) + fdiv(doe, 36524) - fdiv(doe, 146096), 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + fdiv(yoe, 4) - fdiv(yoe, 100))
  local mp = fdiv(5 * doy + 2, 153)
  local m = mp - 9
  if mp < 10 then m = mp + 3 end
  if m <= 2 then y = y + 1 end
  return y, m
end
-- Period codes: 0 total, 1 daily, 2 weekly (Monday), 3 monthly; UTC. Returns start, end (-1 = none).
local function period_bounds(kind, now_s)
  local day = fdiv(now_s, DAY)
  if kind == 1 then return day * DAY, (day + 1) * DAY end
  if kind == 2 then local s = (day - (day + 3) % 7) * DAY; return s, s + 7 * DAY end
  if kind == 3 then
    local y, m = civil_from_days(day)
    local s = days_from_civil(y, m, 1) * DAY
    if m == 12 then y = y + 1; m = 1 else m = m + 1 end
    return s, days_from_civil(y, m, 1) * DAY
  end
  return -1, -1
end
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000, tonumber(t[1])
end
-- Frees tickets whose replica never settled them, with their reservations.
local function purge(inflight, res, now_ms)
  local dead = redis.call('ZRANGEBYSCORE', inflight, '-inf', int(now_ms), 'LIMIT', 0, 256)
  for _, t in ipairs(dead) do
    local amt = redis.call('HGET', res, t)
    if amt then
      redis.call('HDEL', res, t)
      redis.call('HINCRBY', res, '=sum', '-' .. amt)
    end
    redis.call('ZREM', inflight, t)
  end
end
-- Spend of the current period; a new period (by the server's clock) starts from zero.
local function roll(budget, kind, now_s)
  local start, stop = period_bounds(kind, now_s)
  local h = redis.call('HMGET', budget, 'p', 'spent')
  local p = tonumber(h[1])
  local spent = h[2] or '0'
  if p ~= start then
    if p == nil or start > p then spent = '0' end
    redis.call('HSET', budget, 'p', int(start), 'spent', spent)
    if stop > 0 then
      redis.call('PEXPIREAT', budget, int((stop + DAY) * 1000))
    else
      redis.call('PERSIST', budget)
    end
  end
  return tonumber(spent) or 0
end
-- Token bucket: up to tpm tokens, refilled at tpm per minute; may go negative (debt).
local function bucket(key, tpm, now_ms)
  local h = redis.call('HMGET', key, 'level', 'ts')
  local level = tonumber(h[1]) or tpm
  local ts = tonumber(h[2]) or now_ms
  if now_ms > ts then level = level + (now_ms - ts) * tpm / 60000 end
  if level > tpm then level = tpm end
  return level
end
local function save_bucket(key, tpm, level, now_ms)
  redis.call('HSET', key, 'level', fmt(level), 'ts', fmt(now_ms))
  -- Once full again the bucket is indistinguishable from a missing one.
  redis.call('PEXPIRE', key, int((tpm - level) * 60000 / tpm + 1000))
end
