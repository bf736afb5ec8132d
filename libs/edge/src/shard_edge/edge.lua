-- The shard's edge, per request: sends an inference straight to a node when the edge can decide
-- everything the router would, and leaves everything else on its route to the router.
--
-- A ModelInfer takes the direct path when it comes from a client rather than the gateway (which
-- names its own clients), carries no credentials or a key that works now (its secret's SHA-256
-- is the one the control plane lists), names a model the control plane lists here (those with
-- no response cache or answer verification: their rules need the router) that the caller may
-- use (public, or private to the key's principal, or the key is an admin's) and names no
-- sequence. The edge reads the model and version from the body as Triton will
-- (grpc_message.lua), picks the version by the deployment's weights when the request names none
-- (and writes it into the request, so the node runs that version), and names the version's
-- cluster in `x-shard-cluster`, which the direct route follows, and the caller and model in the
-- headers the direct route's rate limits read. Anything unusual (a malformed or compressed
-- body, an unknown model or version, a key that is not one, a caller the model refuses) goes to
-- the router, which answers it with its own errors. A request of a sequence (a `sequence_id`
-- parameter) takes the version its id draws and the version's sequence cluster, which hashes
-- the id (`x-shard-sequence`) onto a node, so every request of the sequence meets the same
-- state.
--
-- Route metadata (filter_metadata["envoy.filters.http.lua"] on the route ModelInfer first
-- matches): per model `m/<name>`: `cluster` and `sequences` (prefixes: the cluster, and the
-- sequence cluster, of version v is prefix .. v),
-- `ready` (version → true), `draw` (a list of {version, cumulative weight}), `public`, `owner`
-- and, for a model with a rate of its own, `cost` (what a request takes from its bucket); per
-- key `k/<key id>`: `id`, `sha256`, `principal`, `admin`, `infer` (may run inference on private
-- models), `expires` (Unix seconds, 0: never) and `cost` (none: not limited); and `proxies`
-- (the SPIFFE IDs whose calls are the router's to judge).

local bit = require("bit")

local SERVICE = "/inference.GRPCInferenceService/"
local INFER = SERVICE .. "ModelInfer"
local STREAM = SERVICE .. "ModelStreamInfer"
-- The edge's own request headers: never a client's.
local CLUSTER = "x-shard-cluster"
local DIRECT = "x-shard-direct"
local KEY = "x-shard-key"
local KEY_COST = "x-shard-key-cost"
local MODEL = "x-shard-model"
local MODEL_COST = "x-shard-model-cost"
local SEQUENCE = "x-shard-sequence"
local EDGE_HEADERS = { CLUSTER, DIRECT, KEY, KEY_COST, MODEL, MODEL_COST, SEQUENCE }
local ROUTER_ONLY = { "shard-canary-node", "grpc-encoding" }
-- Keys as the shard writes them: "shard_" .. 12 characters of key id .. "_" .. the secret.
local SECRET_PREFIX = "shard_"
local KEY_ID_CHARS = 12
-- The digests of secrets seen to match, per worker, so a key's SHA-256 is computed once.
local MAX_DIGESTS = 10000
local digests, digest_count = {}, 0

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

local function to_hex(bytes)
  return (string.gsub(bytes, ".", function(c)
    return string.format("%02x", string.byte(c))
  end))
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

-- FNV-1a (32 bits) of `bytes`, as a number in [0, 1). (Its prime is 2^24 + 403: the product
-- is taken in two parts, each exact in a double.)
local function unit_hash(bytes)
  local hash = bit.tobit(2166136261)
  for i = 1, #bytes do
    hash = bit.bxor(hash, string.byte(bytes, i))
    hash = bit.tobit(bit.lshift(hash, 24) + hash * 403)
  end
  return (hash % 4294967296) / 4294967296
end

-- A version from `choices` by weight: at random, or by `at` (in [0, 1)) when it is given.
local function draw(choices, at)
  local total = choices[#choices][2]
  at = (at or math.random()) * total
  for _, choice in ipairs(choices) do
    if at < choice[2] then
      return choice[1]
    end
  end
  return choices[#choices][1]
end

-- The key an `authorization` value carries when it is one that works now, or nil.
local function key_of(metadata, authorization)
  local scheme, secret = string.match(authorization, "^(%S+) (.+)$")
  if scheme == nil or string.lower(scheme) ~= "bearer" then
    return nil
  end
  local id_end = #SECRET_PREFIX + KEY_ID_CHARS
  if string.sub(secret, 1, #SECRET_PREFIX) ~= SECRET_PREFIX
    or string.sub(secret, id_end + 1, id_end + 1) ~= "_" then
    return nil
  end
  local key = metadata:get("k/" .. string.sub(secret, #SECRET_PREFIX + 1, id_end))
  if key == nil then
    return nil
  end
  if digests[secret] ~= key.sha256 then
    if sha256_hex(secret) ~= key.sha256 then
      return nil
    end
    if digest_count >= MAX_DIGESTS then
      digests, digest_count = {}, 0
    end
    digests[secret] = key.sha256
    digest_count = digest_count + 1
  end
  if key.expires > 0 and os.time() >= key.expires then
    return nil
  end
  return key
end

-- Whether `key` (nil: anonymous) may run `model`, as the router's ModelAccess.check decides.
local function may_use(model, key)
  if model.public then
    return true
  end
  return key ~= nil and key.infer and (key.admin or key.principal == model.owner)
end

local function route(handle)
  local headers = handle:headers()
  local forged = false
  for _, name in ipairs(EDGE_HEADERS) do
    if headers:get(name) ~= nil then
      headers:remove(name)
      forged = true
    end
  end
  if forged then
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
  if fields == nil or fields.name == "" then
    return
  end
  local metadata = handle:metadata()
  local model = metadata:get("m/" .. fields.name)
  if model == nil then
    return
  end
  headers = handle:headers()
  local key = nil
  local authorization = headers:get("authorization")
  if authorization ~= nil then
    key = key_of(metadata, authorization)
    if key == nil then
      return
    end
  end
  if not may_use(model, key) then
    return
  end
  -- A sequence's requests all take one version (drawn by its id) and one node (the sequence
  -- cluster hashes its id onto the version's nodes).
  local sequence = fields.sequence
  local version = fields.version
  if version == "" then
    version = draw(model.draw, sequence and unit_hash(sequence))
    with_version(body, version)
  elseif not model.ready[version] then
    return
  end
  headers = handle:headers()
  if sequence then
    headers:add(CLUSTER, model.sequences .. version)
    headers:add(SEQUENCE, to_hex(sequence))
  else
    headers:add(CLUSTER, model.cluster .. version)
  end
  local log = handle:streamInfo():dynamicMetadata()
  log:set("shard", "model", fields.name)
  log:set("shard", "version", version)
  if key == nil then
    headers:add(DIRECT, "anonymous")
  else
    headers:add(DIRECT, "key")
    log:set("shard", "principal", key.principal)
    if key.cost ~= nil then
      headers:add(KEY, key.id)
      headers:add(KEY_COST, string.format("%d", key.cost))
    end
  end
  if model.cost ~= nil then
    headers:add(MODEL, fields.name)
    headers:add(MODEL_COST, string.format("%d", model.cost))
  end
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
