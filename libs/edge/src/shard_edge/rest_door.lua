-- The REST door (the gateway's port), per request: Triton's REST inference goes straight to a
-- node when the door can decide everything the gateway would (door.lua), and everything else to
-- the gateway.
--
-- POST /v2/models/<name>[/versions/<version>]/infer takes the direct path when the name and
-- version are plain (no escapes, no query), the body is not compressed, and door_plan admits it.
-- Triton takes the model and version from the path, as the door does. When the path names no
-- version, the door writes the version it drew into the path. A request of a sequence (a
-- `sequence_id` in the JSON header's parameters) takes the version and node its id hashes to.
-- The door reads the JSON header (checked_sequence) and takes only requests the gateway would
-- accept as they are: anything malformed or unusual (a syntax error, a key twice, an escape, a
-- datatype, shape or data that do not agree, binary sizes that do not add up) is the gateway's
-- to answer with an error naming the field, where Triton would answer some with a 500.

local INFER = "^/v2/models/([^/?%%]+)/infer$"
local INFER_VERSION = "^/v2/models/([^/?%%]+)/versions/([^/?%%]+)/infer$"
local HEADER_LENGTH = "inference-header-content-length"
-- The largest JSON header the door reads (a binary request's is a few hundred bytes); a larger
-- one (JSON tensors) is the gateway's to read: parsing here builds a table per element.
local MAX_JSON = 64 * 1024
-- What a node gets of a client's headers: how to read the body and the answer, its trace. (Envoy
-- finds no route for a request without x-forwarded-proto, which it sets itself.)
local PASSED = {
  ["content-type"] = true, ["content-length"] = true, [HEADER_LENGTH] = true,
  ["accept"] = true, ["accept-encoding"] = true, ["x-request-id"] = true,
  ["x-forwarded-proto"] = true, ["traceparent"] = true, ["tracestate"] = true,
}

-- A JSON reader for request headers without escapes (the door leaves those to the gateway):
-- strict RFC 8259 otherwise. Objects are tables with OBJECT set, arrays tables with ARRAY set and
-- `n` elements; numbers keep their text in `INTEGER` form when they are integers.
local OBJECT, ARRAY, NUMBER = {}, {}, {}
local NULL = {}

local function json_reader(text)
  local at = 1
  local value -- below

  local function space()
    at = string.find(text, "[^ \t\r\n]", at) or #text + 1
  end

  local function literal(word, result)
    if string.sub(text, at, at + #word - 1) ~= word then
      error("bad literal")
    end
    at = at + #word
    return result
  end

  local function number()
    local from = at
    local sign, digits = string.match(text, "^(%-?)(%d+)", at)
    if digits == nil or (#digits > 1 and string.sub(digits, 1, 1) == "0") then
      error("bad number")
    end
    at = at + #sign + #digits
    local integer = true
    local fraction = string.match(text, "^%.(%d+)", at)
    if fraction ~= nil then
      at = at + 1 + #fraction
      integer = false
    elseif string.sub(text, at, at) == "." then
      error("bad number")
    end
    local exponent = string.match(text, "^[eE][+-]?%d+", at)
    if exponent ~= nil then
      at = at + #exponent
      integer = false
    elseif string.find(text, "^[eE]", at) then
      error("bad number")
    end
    return { [NUMBER] = true, number = tonumber(string.sub(text, from, at - 1)),
      integer = integer, text = string.sub(text, from, at - 1) }
  end

  local function text_value()
    local stop = string.find(text, '"', at + 1, true)
    if stop == nil then
      error("unterminated string")
    end
    local found = string.sub(text, at + 1, stop - 1)
    if string.find(found, "[%z\1-\31]") then
      error("control character in a string")
    end
    at = stop + 1
    return found
  end

  local function array()
    local out = { [ARRAY] = true, n = 0 }
    at = at + 1
    space()
    if string.sub(text, at, at) == "]" then
      at = at + 1
      return out
    end
    while true do
      out.n = out.n + 1
      out[out.n] = value()
      space()
      local c = string.sub(text, at, at)
      at = at + 1
      if c == "]" then
        return out
      elseif c ~= "," then
        error("bad array")
      end
    end
  end

  local function object()
    local out = { [OBJECT] = true }
    at = at + 1
    space()
    if string.sub(text, at, at) == "}" then
      at = at + 1
      return out
    end
    while true do
      space()
      if string.sub(text, at, at) ~= '"' then
        error("bad object key")
      end
      local key = text_value()
      if out[key] ~= nil then
        error("a key twice") -- parsers differ on which one wins
      end
      space()
      if string.sub(text, at, at) ~= ":" then
        error("bad object")
      end
      at = at + 1
      out[key] = value()
      space()
      local c = string.sub(text, at, at)
      at = at + 1
      if c == "}" then
        return out
      elseif c ~= "," then
        error("bad object")
      end
    end
  end

  value = function()
    space()
    local c = string.sub(text, at, at)
    if c == "{" then
      return object()
    elseif c == "[" then
      return array()
    elseif c == '"' then
      return text_value()
    elseif c == "t" then
      return literal("true", true)
    elseif c == "f" then
      return literal("false", false)
    elseif c == "n" then
      return literal("null", NULL)
    end
    return number()
  end

  local document = value()
  space()
  if at <= #text then
    error("text after the JSON")
  end
  return document
end

local function is_object(v)
  return type(v) == "table" and v[OBJECT] == true
end

local function is_array(v)
  return type(v) == "table" and v[ARRAY] == true
end

local function is_number(v)
  return type(v) == "table" and v[NUMBER] == true
end

local function is_integer(v)
  return is_number(v) and v.integer
end

-- The JSON type each datatype's elements take; unsigned ones also take no sign.
local ELEMENTS = {
  BOOL = "boolean", BYTES = "string",
  UINT8 = "unsigned", UINT16 = "unsigned", UINT32 = "unsigned", UINT64 = "unsigned",
  INT8 = "integer", INT16 = "integer", INT32 = "integer", INT64 = "integer",
  FP16 = "number", FP32 = "number", FP64 = "number",
}

local function element_ok(v, kind)
  if kind == "boolean" then
    return type(v) == "boolean"
  elseif kind == "string" then
    return type(v) == "string"
  elseif kind == "number" then
    return is_number(v)
  elseif kind == "integer" then
    return is_integer(v)
  end
  return is_integer(v) and v.number >= 0
end

-- The elements of a JSON tensor's data (flat or nested), all of `kind`: their count, or nil.
local function count_elements(data, kind)
  if not is_array(data) then
    return element_ok(data, kind) and 1 or nil
  end
  local total = 0
  for i = 1, data.n do
    local n = count_elements(data[i], kind)
    if n == nil then
      return nil
    end
    total = total + n
  end
  return total
end

local function parameters_ok(parameters)
  if parameters == nil then
    return true
  end
  if not is_object(parameters) then
    return false
  end
  for _, v in pairs(parameters) do
    if v ~= true and not (type(v) == "boolean" or type(v) == "string" or is_number(v)) then
      return false
    end
  end
  return true
end

-- The binary bytes an input takes (0 for JSON data), or nil when the input is not one Triton and
-- the gateway read alike.
local function input_bytes(input)
  if not is_object(input) or type(input.name) ~= "string" or input.name == "" then
    return nil
  end
  local kind = ELEMENTS[input.datatype]
  if kind == nil or not is_array(input.shape) or not parameters_ok(input.parameters) then
    return nil
  end
  local elements = 1
  for i = 1, input.shape.n do
    local d = input.shape[i]
    if not is_integer(d) or d.number < 0 then
      return nil
    end
    elements = elements * d.number
  end
  local size = input.parameters and input.parameters.binary_data_size
  if size ~= nil then
    if not is_integer(size) or size.number < 0 or input.data ~= nil then
      return nil
    end
    return size.number
  end
  if input.data == nil or count_elements(input.data, kind) ~= elements then
    return nil
  end
  return 0
end

local TOP = { id = true, parameters = true, inputs = true, outputs = true }

-- The sequence id of a well-formed request (its text; false for none), or nil when the request
-- is malformed or unusual: the gateway answers those (Triton would answer some with a 500).
-- `json` is the request's JSON header, `binary` the byte count after it.
local function checked_sequence(json, binary)
  if string.find(json, "\\", 1, true) then
    return nil
  end
  local ok, document = pcall(json_reader, json)
  if not ok or not is_object(document) then
    return nil
  end
  for key, _ in pairs(document) do
    if key ~= OBJECT and not TOP[key] then
      return nil
    end
  end
  if (document.id ~= nil and type(document.id) ~= "string")
    or not parameters_ok(document.parameters) then
    return nil
  end
  local inputs = document.inputs
  if not is_array(inputs) or inputs.n == 0 then
    return nil
  end
  local claimed = 0
  for i = 1, inputs.n do
    local size = input_bytes(inputs[i])
    if size == nil then
      return nil
    end
    claimed = claimed + size
  end
  if claimed ~= binary then
    return nil
  end
  local outputs = document.outputs
  if outputs ~= nil then
    if not is_array(outputs) then
      return nil
    end
    for i = 1, outputs.n do
      local output = outputs[i]
      if not is_object(output) or type(output.name) ~= "string"
        or not parameters_ok(output.parameters) then
        return nil
      end
    end
  end
  local sequence = document.parameters and document.parameters.sequence_id
  if sequence == nil then
    return false
  end
  if is_integer(sequence) then
    return sequence.text
  elseif type(sequence) == "string" then
    return '"' .. sequence .. '"'
  end
  return nil
end

local function route(handle)
  local headers = door_strip(handle)
  if headers:get(":method") ~= "POST" or headers:get("content-encoding") ~= nil then
    return
  end
  local path = headers:get(":path")
  local name, version = string.match(path, INFER_VERSION)
  if name == nil then
    name = string.match(path, INFER)
    version = ""
    if name == nil then
      return
    end
  end
  local length_text = headers:get(HEADER_LENGTH)
  if length_text ~= nil and not string.match(length_text, "^%d+$") then
    return
  end
  -- A model the caller may not use, or credentials that are not a working key: the gateway's,
  -- and no body is read for it here.
  if not door_admits(handle, name) then
    return
  end
  local header_length = length_text and tonumber(length_text)
  -- Reading the body yields to Envoy: objects taken from the handle before it are stale after.
  local body = handle:body()
  if body == nil then
    return
  end
  local size = body:length()
  local json_length = header_length or size
  if json_length > size or json_length > MAX_JSON then
    return
  end
  local sequence = checked_sequence(body:getBytes(0, json_length), size - json_length)
  if sequence == nil then
    return
  end
  local plan = door_plan(handle, name, version, sequence)
  if plan == nil then
    return
  end
  if plan.drawn then
    handle:headers():replace(":path", "/v2/models/" .. name .. "/versions/" .. plan.version
      .. "/infer")
  end
  door_send(handle, plan, PASSED)
end

function envoy_on_request(handle)
  door_run(handle, route)
end
