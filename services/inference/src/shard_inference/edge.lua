-- The shard's edge, per request: sends an inference straight to a node when the edge can decide
-- everything the router would, and leaves everything else on its route to the router.
--
-- A ModelInfer takes the direct path when it carries no credentials and no header of the
-- shard's own, names a model the control plane lists here (public models, with no model rate
-- limit, response cache or answer verification: their rules need the router), names no sequence
-- and comes from a client rather than the gateway (which names its own clients). The edge reads
-- the model and version from the body as Triton will (grpc_message.lua), picks the version by
-- the deployment's weights when the request names none (and writes it into the request, so the
-- node runs that version), and names the version's cluster in `x-shard-cluster`, which the
-- direct route follows. Anything unusual (a malformed or compressed body, an unknown model or
-- version) goes to the router, which answers it with its own errors.
--
-- Route metadata (filter_metadata["envoy.filters.http.lua"] on the route ModelInfer first
-- matches), per model `m/<name>`: `cluster` (a prefix: the cluster of version v is prefix .. v),
-- `ready` (version → true) and `draw` (a list of {version, cumulative weight}); and `proxies`
-- (the SPIFFE IDs whose calls are the router's to judge).

local SERVICE = "/inference.GRPCInferenceService/"
local INFER = SERVICE .. "ModelInfer"
local STREAM = SERVICE .. "ModelStreamInfer"
-- The edge's own request headers: never a client's.
local CLUSTER = "x-shard-cluster"
local DIRECT = "x-shard-direct"
local ROUTER_ONLY = { "authorization", "shard-canary-node", "grpc-encoding" }

local INVALID_ARGUMENT = 3
local route_inference -- below

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

local function draw(choices)
  local total = choices[#choices][2]
  local at = math.random() * total
  for _, choice in ipairs(choices) do
    if at < choice[2] then
      return choice[1]
    end
  end
  return choices[#choices][1]
end

local function route(handle)
  local headers = handle:headers()
  if headers:get(CLUSTER) ~= nil or headers:get(DIRECT) ~= nil then
    headers:remove(CLUSTER)
    headers:remove(DIRECT)
    handle:clearRouteCache()
  end
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

route_inference = function(handle, headers)
  for _, name in ipairs(ROUTER_ONLY) do
    if headers:get(name) ~= nil then
      return
    end
  end
  if from_proxy(handle, handle:metadata():get("proxies")) then
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
  if fields == nil or fields.sequence or fields.name == "" then
    return
  end
  local model = handle:metadata():get("m/" .. fields.name)
  if model == nil then
    return
  end
  local version = fields.version
  if version == "" then
    version = draw(model.draw)
    with_version(body, version)
  elseif not model.ready[version] then
    return
  end
  headers = handle:headers()
  headers:add(CLUSTER, model.cluster .. version)
  headers:add(DIRECT, "anonymous")
  handle:clearRouteCache()
end

-- A failure here leaves the request on its way to the router, which checks everything itself:
-- the direct route needs headers only this script sets, and it sets them last.
function envoy_on_request(handle)
  local ok, failure = pcall(route, handle)
  if not ok then
    handle:logErr(tostring(failure))
  end
end
