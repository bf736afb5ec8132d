-- The gRPC door (the router's port), per request: a ModelInfer goes straight to a node when the
-- door can decide everything the router would (door.lua), and everything else to the router.
--
-- A ModelInfer takes the direct path when it comes from a client rather than the gateway (which
-- names its own clients), carries no header of the shard's own nor compression, and door_plan
-- admits it. The door reads the model, version and sequence id from the body as Triton will
-- (grpc_message.lua); when the request names no version, the version drawn is written into the
-- request (so the node runs it). Anything unusual (a malformed or compressed body) goes to the
-- router, which answers it with its own errors.
--
-- Route metadata, besides door.lua's: `proxies` (the SPIFFE IDs whose calls are the router's to
-- judge).

local SERVICE = "/inference.GRPCInferenceService/"
local INFER = SERVICE .. "ModelInfer"
local STREAM = SERVICE .. "ModelStreamInfer"
local ROUTER_ONLY = { "shard-canary-node", "grpc-encoding" }
-- What a node gets of a client's headers: how to read the call, its deadline, its trace. (Envoy
-- finds no route for a request without x-forwarded-proto, which it sets itself.)
local PASSED = {
  ["content-type"] = true, ["content-length"] = true, ["te"] = true, ["grpc-timeout"] = true,
  ["grpc-accept-encoding"] = true, ["x-request-id"] = true, ["x-forwarded-proto"] = true,
  ["traceparent"] = true, ["tracestate"] = true,
}
local INVALID_ARGUMENT = 3

local function from_proxy(handle, proxies)
  local connection = handle:streamInfo():downstreamSslConnection()
  if connection == nil then
    return false
  end
  local uris = connection:uriSanPeerCertificate()
  for _, uri in ipairs(uris) do
    for _, proxy in ipairs(proxies) do
      if uri == proxy then
        return true
      end
    end
  end
  return false
end

-- A varint's bytes, for a length below 2^31.
local function varint_bytes(value)
  local out = {}
  while value >= 128 do
    out[#out + 1] = string.char(value % 128 + 128)
    value = math.floor(value / 128)
  end
  out[#out + 1] = string.char(value)
  return table.concat(out)
end

-- The request with field 2 (the version) appended: the last occurrence wins, so the node runs
-- `version`. The gRPC frame's length grows with it.
local function with_version(body, version)
  local size = body:length()
  local field = "\18" .. varint_bytes(#version) .. version
  local length = size - 5 + #field
  local prefix = string.char(
    0,
    math.floor(length / 16777216) % 256,
    math.floor(length / 65536) % 256,
    math.floor(length / 256) % 256,
    length % 256
  )
  body:setBytes(prefix .. body:getBytes(5, size - 5) .. field)
end

local function route_inference(handle, headers)
  for _, name in ipairs(ROUTER_ONLY) do
    if headers:get(name) ~= nil then
      return
    end
  end
  if from_proxy(handle, handle:metadata():get("proxies")) then
    return
  end
  -- Credentials that are not a working key are the router's to judge: no body is read for them.
  local authorization = headers:get("authorization")
  if authorization ~= nil and not door_admits_caller(handle, authorization) then
    return
  end
  -- Reading the body yields to Envoy: objects taken from the handle before it are stale after.
  local body = handle:body()
  if body == nil then
    return
  end
  local fields, why, broken_frame = grpc_routing_fields(body, true)
  if broken_frame then
    grpc_refuse(handle, INVALID_ARGUMENT, why)
    return
  end
  if fields == nil or fields.name == "" then
    return
  end
  local plan = door_plan(handle, fields.name, fields.version, fields.sequence)
  if plan == nil then
    return
  end
  if plan.drawn then
    with_version(body, plan.version)
  end
  door_send(handle, plan, PASSED)
end

local function route(handle)
  local headers = door_strip(handle)
  local path = headers:get(":path")
  if path == INFER then
    return route_inference(handle, headers)
  end
  -- Every other request of the service is one message: one that is not (a truncated frame, say)
  -- is refused here rather than left to hang in the router's gRPC server.
  if string.sub(path, 1, #SERVICE) == SERVICE and path ~= STREAM then
    local body = handle:body()
    if body ~= nil then
      local _, why, broken_frame = grpc_routing_fields(body, false)
      if broken_frame then
        grpc_refuse(handle, INVALID_ARGUMENT, why)
      end
    end
  end
end

function envoy_on_request(handle)
  door_run(handle, route)
end
