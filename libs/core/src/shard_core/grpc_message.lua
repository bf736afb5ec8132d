-- Reading a KServe request's routing fields out of a gRPC body, in an Envoy Lua filter, exactly as
-- Triton's C++ protobuf parser will read them, so a check made here and Triton never disagree on
-- which model (or version) a request is for. Shared by the node gate and the edge (Envoy's Lua
-- filter takes one source: the Python side puts this file before each filter's own).
--
-- Protobuf's C++ parser reads a tag as a 32-bit varint of at most five bytes, and a length as one
-- below 2^31; the last occurrence of a singular field wins. Anything it would read differently
-- (truncating the high bits, say) is refused here.

local TWO_32, TWO_31 = 4294967296, 2147483648
local WINDOW = 256

-- A reader over a buffer instance: bytes come from a window copied out of Envoy's buffer, so
-- walking the fields does not copy one byte at a time.
local function reader(body, size)
  local window, first, last = "", 0, 0 -- window holds bytes [first, last)
  local self = { size = size }
  function self.byte(at)
    if at < first or at >= last then
      first = at
      last = math.min(size, at + WINDOW)
      window = body:getBytes(first, last - first)
    end
    return string.byte(window, at - first + 1)
  end
  function self.bytes(at, length)
    if length == 0 then
      return ""
    end
    if at >= first and at + length <= last then
      return string.sub(window, at - first + 1, at - first + length)
    end
    return body:getBytes(at, length)
  end
  return self
end

-- A varint at `at` of at most `max_bytes` bytes: its value and the position after it, or nil when
-- it runs past the end or past `max_bytes`.
local function varint(read, at, max_bytes)
  local value, scale = 0, 1
  for _ = 1, max_bytes do
    if at >= read.size then
      return nil
    end
    local byte = read.byte(at)
    at = at + 1
    value = value + (byte % 128) * scale
    if byte < 128 then
      return value, at
    end
    scale = scale * 128
  end
  return nil
end

-- Walks the fields of the message in [at, stop): calls `on_bytes(field, at, length)` for each
-- length-delimited field. Returns true, or nil and why the message is malformed. A field in
-- `strings` must be length-delimited.
local function walk(read, at, stop, strings, on_bytes)
  while at < stop do
    local key
    key, at = varint(read, at, 5)
    if key == nil or key >= TWO_32 then
      return nil
    end
    local field, wire = math.floor(key / 8), key % 8
    if field == 0 or (strings[field] and wire ~= 2) then
      return nil
    end
    if wire == 0 then
      local _, after = varint(read, at, 10)
      at = after
    elseif wire == 1 then
      at = at + 8
    elseif wire == 5 then
      at = at + 4
    elseif wire == 2 then
      local length
      length, at = varint(read, at, 5)
      if length == nil or length >= TWO_31 or at + length > stop then
        return nil
      end
      on_bytes(field, at, length)
      at = at + length
    else
      return nil
    end
    if at == nil or at > stop then
      return nil
    end
  end
  return true
end

local NAME_FIELDS = { [1] = true, [2] = true }
local ENTRY_FIELDS = { [1] = true, [2] = true }

-- Whether `body` is exactly one gRPC message (as every unary request is): nil and why not.
local function framing_error(read)
  if read.size < 5 then
    return "the request is not a gRPC message"
  end
  local length = 0
  for i = 1, 4 do
    length = length * 256 + read.byte(i)
  end
  if length ~= read.size - 5 then
    return "the request is not exactly one gRPC message"
  end
  return nil
end

-- The routing fields of a unary request in `body` (one uncompressed gRPC message): a table with
-- `name` and `version` (fields 1 and 2 of every KServe request that names a model; "" when
-- absent) and `sequence` (when its parameters, field 4 of ModelInferRequest, carry a
-- `sequence_id`: the bytes of its value, the last one's as protobuf reads a map; else false);
-- or nil, why not, and whether the body is not even one gRPC message.
function grpc_routing_fields(body, parameters)
  local read = reader(body, body:length())
  local broken_frame = framing_error(read)
  if broken_frame ~= nil then
    return nil, broken_frame, true
  end
  if read.byte(0) ~= 0 then
    return nil, "the request is compressed", false
  end
  local size = read.size
  local found = { name = "", version = "", sequence = false }
  local broken = false
  local ok = walk(read, 5, size, NAME_FIELDS, function(field, at, field_length)
    if field == 1 then
      found.name = read.bytes(at, field_length)
    elseif field == 2 then
      found.version = read.bytes(at, field_length)
    elseif field == 4 and parameters then
      -- A map entry: its key is field 1 (the last one wins, as for any message).
      local key, value = "", ""
      local entry_ok = walk(read, at, at + field_length, ENTRY_FIELDS, function(entry_field, from, n)
        if entry_field == 1 then
          key = read.bytes(from, n)
        elseif entry_field == 2 then
          value = read.bytes(from, n)
        end
      end)
      if not entry_ok then
        broken = true
      elseif key == "sequence_id" then
        found.sequence = value
      end
    end
  end)
  if not ok or broken then
    return nil, "the request message is malformed", false
  end
  return found
end

-- Answers the call with a gRPC status and message, ending it here.
function grpc_refuse(handle, code, message)
  handle:respond({
    [":status"] = "200",
    ["content-type"] = "application/grpc",
    ["grpc-status"] = tostring(code),
    ["grpc-message"] = message,
  }, "")
end
