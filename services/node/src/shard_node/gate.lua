-- The node's gate, per request: what a caller the mesh vouches for may ask of this node's Triton.
--
-- Envoy has already checked the caller's certificate (the mesh's CA, in date, and its URI SAN one
-- of the callers this listener takes). The router and the gateway check permissions themselves:
-- their calls pass. A client's certificate (issued by the registry to an API key) carries its
-- SPIFFE ID and one `urn:shard:model:<name>` URI per model its key may use; such a caller may
-- ask only a few unary methods, each for one of those models. The model is read from the gRPC
-- body as Triton will read it (`grpc_routing_fields`, in grpc_message.lua, which Envoy runs
-- before this file), so the check and Triton never disagree on which model a request is for.
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
    grpc_refuse(handle, PERMISSION_DENIED, "a client certificate may not call this method at a node")
    return
  end
  if not names_model then
    return
  end
  -- Reading the body yields to Envoy: objects taken from the handle before it are stale after.
  local body = handle:body()
  if body == nil then
    grpc_refuse(handle, INVALID_ARGUMENT, "the request has no message")
    return
  end
  local fields, why = grpc_routing_fields(body, false)
  if fields == nil then
    grpc_refuse(handle, INVALID_ARGUMENT, why)
    return
  end
  local name = fields.name
  if name == "" then
    grpc_refuse(handle, INVALID_ARGUMENT, "the request names no model")
    return
  end
  local wanted = handle:metadata():get("model_prefix") .. name
  for i = 2, #uris do
    if uris[i] == wanted then
      return
    end
  end
  grpc_refuse(handle, PERMISSION_DENIED, "the client certificate does not allow the model this request names")
end

-- Envoy lets a request through when its script fails: fail closed instead.
function envoy_on_request(handle)
  local ok, failure = pcall(admit, handle)
  if not ok then
    handle:logErr(tostring(failure))
    grpc_refuse(handle, 13, "the node gate could not check this request")
  end
end
