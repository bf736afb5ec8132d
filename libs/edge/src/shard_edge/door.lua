-- What every front door of the shard decides in Envoy, per inference request: whether the caller
-- may take the direct path to a node (its key, the model's rules), which version and node group it
-- takes, and the headers the direct route and its rate limits read. The door's own script (the
-- gRPC door's grpc_door.lua, the REST door's rest_door.lua) reads the request and calls these.
--
-- Route metadata (filter_metadata["envoy.filters.http.lua"] on the door's inference route): per
-- model `m/<name>`: `cluster` and `sequences` (prefixes: the cluster, and the sequence cluster,
-- of version v is prefix .. v), `ready` (version → true), `draw` (a list of {version, cumulative
-- weight}), `public`, `owner` and, for a model with a rate of its own, `cost` (what a request
-- takes from its bucket); per key `k/<key id>`: `id`, `sha256`, `principal`, `admin`, `infer`
-- (may run inference on private models), `expires` (Unix seconds, 0: never) and `cost` (none: not
-- limited).

local bit = require("bit")

-- The door's own request headers (every x-shard-* header is the door's: never a client's).
local DOOR_PREFIX = "x-shard-"
local CLUSTER = "x-shard-cluster"
local KEY = "x-shard-key"
local KEY_COST = "x-shard-key-cost"
local MODEL = "x-shard-model"
local MODEL_COST = "x-shard-model-cost"
local SEQUENCE = "x-shard-sequence"
-- Keys as the shard writes them: "shard_" .. 12 characters of key id .. "_" .. the secret.
local SECRET_PREFIX = "shard_"
local KEY_ID_CHARS = 12
-- The digests of secrets seen to match, per worker, so a key's SHA-256 is computed once.
local MAX_DIGESTS = 10000
local digests, digest_count = {}, 0

local function to_hex(bytes)
  return (string.gsub(bytes, ".", function(c)
    return string.format("%02x", string.byte(c))
  end))
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

-- Removes the door's headers from a request (a client may have sent them); the request headers.
function door_strip(handle)
  local headers = handle:headers()
  local forged = {}
  for name, _ in pairs(headers) do
    if string.sub(name, 1, #DOOR_PREFIX) == DOOR_PREFIX then
      forged[#forged + 1] = name
    end
  end
  for _, name in ipairs(forged) do
    headers:remove(name)
  end
  if #forged > 0 then
    handle:clearRouteCache()
  end
  return headers
end

-- Whether `authorization` carries a key that works now (else the Python service judges it).
function door_admits_caller(handle, authorization)
  return key_of(handle:metadata(), authorization) ~= nil
end

-- The model `name` and the caller's key (nil: anonymous) when the direct path may take a request
-- of it from its caller, by its headers alone (an anonymous caller or a key that works now, and a
-- model it may use); nil when the door's Python service must judge it.
local function admitted(handle, name)
  local metadata = handle:metadata()
  local model = metadata:get("m/" .. name)
  if model == nil then
    return nil
  end
  local key = nil
  local authorization = handle:headers():get("authorization")
  if authorization ~= nil then
    key = key_of(metadata, authorization)
    if key == nil then
      return nil
    end
  end
  if not may_use(model, key) then
    return nil
  end
  return model, key
end

-- Whether the direct path may take a request of model `name` from its caller, by its headers: a
-- door asks before it reads a body, so a request the Python service must judge costs no parsing.
function door_admits(handle, name)
  return admitted(handle, name) ~= nil
end

-- For a request of model `name` (the version it named, "" for none; its sequence id's bytes, or
-- false): a table {model, key, version, drawn, sequence} when the direct path may take it, or nil
-- when the door's Python service must judge it (unknown model or version, a key that is not one,
-- a caller the model refuses). `drawn`: the version was drawn here, and the door must tell the
-- node. A sequence's requests all take the version its id draws.
function door_plan(handle, name, version, sequence)
  local model, key = admitted(handle, name)
  if model == nil then
    return nil
  end
  local drawn = version == ""
  if drawn then
    version = draw(model.draw, sequence and unit_hash(sequence))
  elseif not model.ready[version] then
    return nil
  end
  return { name = name, model = model, key = key, version = version, drawn = drawn,
    sequence = sequence }
end

-- Every header but those in `passed` (and pseudo-headers, and the door's own): a node is run by
-- a stranger, and learns of a request only what it needs to answer it.
local function keep_only(headers, passed)
  local dropped = {}
  for name, _ in pairs(headers) do
    if string.sub(name, 1, 1) ~= ":" and not passed[name]
      and string.sub(name, 1, #DOOR_PREFIX) ~= DOOR_PREFIX then
      dropped[#dropped + 1] = name
    end
  end
  for _, name in ipairs(dropped) do
    headers:remove(name)
  end
end

-- Sends the request down the direct route `plan` (from door_plan) chose: the version's cluster
-- (for a sequence, its sequence cluster, which hashes the id onto a node), the caller and model
-- for the rate limits, and who and what for the access log. Of the client's headers, only those
-- in `passed` (name → true) go on to the node.
function door_send(handle, plan, passed)
  local headers = handle:headers()
  keep_only(headers, passed)
  if plan.sequence then
    headers:add(CLUSTER, plan.model.sequences .. plan.version)
    headers:add(SEQUENCE, to_hex(plan.sequence))
  else
    headers:add(CLUSTER, plan.model.cluster .. plan.version)
  end
  local log = handle:streamInfo():dynamicMetadata()
  log:set("shard", "model", plan.name)
  log:set("shard", "version", plan.version)
  local key = plan.key
  if key ~= nil then
    log:set("shard", "principal", key.principal)
    if key.cost ~= nil then
      headers:add(KEY, key.id)
      headers:add(KEY_COST, string.format("%d", key.cost))
    end
  end
  if plan.model.cost ~= nil then
    headers:add(MODEL, plan.name)
    headers:add(MODEL_COST, string.format("%d", plan.model.cost))
  end
  handle:clearRouteCache()
end

-- Runs `route(handle)`; a failure leaves the request on its way to the door's Python service,
-- which checks everything itself: the direct route needs headers only door_send sets, last.
function door_run(handle, route)
  local ok, failure = pcall(route, handle)
  if not ok then
    handle:logErr(tostring(failure))
  end
end
