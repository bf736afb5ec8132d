-- The node's gate, per request: what a caller the mesh vouches for may ask of this node's Triton.
--
-- Envoy has already checked the caller's certificate (the mesh's CA, in date, and its URI SAN one
-- of the callers this listener takes). The router and the gateway check permissions themselves:
-- their calls pass. A client's certificate (issued by the registry to an API key) carries its
-- SPIFFE ID and one `urn:shard:model:<name>` URI per model its key may use; such a caller may
-- ask only a few unary methods, each for one of those models. The model is read from the gRPC
-- body as Triton will read it (the last `name`/`model_name` field, field 1), so the check and
-- Triton never disagree on which model a request is for.
--
-- Route metadata (filter_metadata["envoy.filters.http.lua"]) says who is who:
--   services: the SPIFFE IDs whose calls pass; model_prefix: the model URI prefix.

local SERVICE = "/inference.GRPCInferenceService/"
-- Method → whether its request names a model in field 1.
local CLIENT_METHODS = {
  [SERVICE .. "ServerLive"] = false,
  [SERVICE .. "ServerReady"] = false,
  [SERVICE .. "ModelReady"] = true,
  [SERVICE .. "ModelMetadata"] = true,
  [SERVICE .. "ModelConfig"] = true,
  [SERVICE .. "ModelInfer"] = true,
}
local INVALID_ARGUMENT, PERMISSION_DENIED = 3, 7

local function refuse(handle, code, message)
  handle:respond({
    [":status"] = "200",
    ["content-type"] = "application/grpc",
    ["grpc-status"] = tostring(code),
    ["grpc-message"] = message,
  }, "")
end

-- A protobuf varint at `at` of at most `max_bytes` bytes: its value and the position after it,
-- or nil when it runs past `size` or past `max_bytes`.
local function varint(body, at, size, max_bytes)
  local value, scale = 0, 1
  for _ = 1, max_bytes do
    if at >= size then
      return nil
    end
    local byte = string.byte(body:getBytes(at, 1))
    at = at + 1
    value = value + (byte % 128) * scale
    if byte < 128 then
      return value, at
    end
    scale = scale * 128
  end
  return nil
end

-- Protobuf's C++ parser (Triton's) reads a tag as a 32-bit varint of at most five bytes, and a
-- length as one below 2^31: anything it would read differently (truncating the high bits, say)
-- is refused here, so the two never see different fields.
local TWO_32, TWO_31 = 4294967296, 2147483648

-- The model a unary request names: its last field 1 (as protobuf parsers take it), or nil and
-- why not.
local function named_model(body)
  local size = body:length()
  if size < 5 then
    return nil, "the request is not a gRPC message"
  end
  local header = body:getBytes(0, 5)
  if string.byte(header, 1) ~= 0 then
    return nil, "a node takes no compressed requests from clients"
  end
  local length = 0
  for i = 2, 5 do
    length = length * 256 + string.byte(header, i)
  end
  if length ~= size - 5 then
    return nil, "the request is not exactly one gRPC message"
  end
  local at, name = 5, nil
  while at < size do
    local key
    key, at = varint(body, at, size, 5)
    if key == nil or key >= TWO_32 then
      return nil, "the request message is malformed"
    end
    local field, wire = math.floor(key / 8), key % 8
    if field == 0 or (field == 1 and wire ~= 2) then
      return nil, "the request message is malformed"
    end
    if wire == 0 then
      local _, after = varint(body, at, size, 10)
      at = after
    elseif wire == 1 then
      at = at + 8
    elseif wire == 5 then
      at = at + 4
    elseif wire == 2 then
      local length_ = nil
      length_, at = varint(body, at, size, 5)
      if length_ == nil or length_ >= TWO_31 or at + length_ > size then
        return nil, "the request message is malformed"
      end
      if field == 1 then
        name = length_ > 0 and body:getBytes(at, length_) or ""
      end
      at = at + length_
    else
      return nil, "the request message is malformed"
    end
    if at == nil or at > size then
      return nil, "the request message is malformed"
    end
  end
  if name == nil or name == "" then
    return nil, "the request names no model"
  end
  return name
end

-- Whether the call may go on; refuses it (answering the caller) when not.
local function admit(handle)
  local uris = handle:streamInfo():downstreamSslConnection():uriSanPeerCertificate()
  local services = handle:metadata():get("services")
  if #uris == 1 then
    for _, service in ipairs(services) do
      if uris[1] == service then
        return
      end
    end
  end
  local method = handle:headers():get(":path")
  local names_model = CLIENT_METHODS[method]
  if names_model == nil then
    refuse(handle, PERMISSION_DENIED, "a client certificate may not call this method at a node")
    return
  end
  if not names_model then
    return
  end
  -- Reading the body yields to Envoy: objects taken from the handle before it are stale after.
  local body = handle:body()
  if body == nil then
    refuse(handle, INVALID_ARGUMENT, "the request has no message")
    return
  end
  local name, why = named_model(body)
  if name == nil then
    refuse(handle, INVALID_ARGUMENT, why)
    return
  end
  local wanted = handle:metadata():get("model_prefix") .. name
  for i = 2, #uris do
    if uris[i] == wanted then
      return
    end
  end
  refuse(handle, PERMISSION_DENIED, "the client certificate does not allow the model this request names")
end

-- Envoy lets a request through when its script fails: fail closed instead.
function envoy_on_request(handle)
  local ok, failure = pcall(admit, handle)
  if not ok then
    handle:logErr(tostring(failure))
    refuse(handle, 13, "the node gate could not check this request")
  end
end
