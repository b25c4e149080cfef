-- Argo CD health of a fireflyer.dev ThreeFSCluster. Healthy: Ready (every service up, every chain
-- serving). Degraded: Degraded True (services down, chains not serving, a storage node being
-- replaced). Progressing otherwise (bootstrapping).
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
local chains = obj.status.chains
local serving = ""
if chains ~= nil then
  serving = tostring(chains.serving or 0) .. "/" .. tostring(chains.total or 0) .. " chains serving"
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = serving
  return hs
end
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  local why = degraded.message
  if why == nil or why == "" then
    why = (ready and ready.message ~= "" and ready.message) or degraded.reason or "Degraded"
  end
  hs.message = why .. (serving ~= "" and ("; " .. serving) or "")
  return hs
end
hs.message = (obj.status.phase or "") .. ((ready and ready.message and ready.message ~= "") and (": " .. ready.message) or "")
return hs
