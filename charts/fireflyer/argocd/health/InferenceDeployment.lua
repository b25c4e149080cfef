-- Argo CD health of a fireflyer.dev InferenceDeployment, from the conditions the operator writes.
-- Healthy: Ready (every unit and the router). Degraded: Degraded is True (a unit is being recreated,
-- units do not fit the cluster, or the spec is invalid). Progressing: anything else, including a
-- spec the operator has not observed yet.
local hs = {status = "Progressing", message = "Waiting for the operator"}
local function find(conditions, type_)
  for _, c in ipairs(conditions or {}) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end
if obj.status == nil then
  return hs
end
local generation = obj.metadata.generation
if generation ~= nil and obj.status.observedGeneration ~= generation then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end
local conditions = obj.status.conditions
local ready = find(conditions, "Ready")
local degraded = find(conditions, "Degraded")
local eplb = find(conditions, "EplbHealthy")
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = "Prefill " .. tostring(obj.status.prefillReady) .. ", decode " .. tostring(obj.status.decodeReady)
  if eplb ~= nil and eplb.status == "False" then
    hs.message = hs.message .. "; EPLB: " .. (eplb.message or eplb.reason or "")
  end
  return hs
end
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = degraded.message or degraded.reason or "Degraded"
  return hs
end
if ready ~= nil then
  hs.message = ready.message or ready.reason or hs.message
end
return hs
