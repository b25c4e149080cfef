-- Argo CD health of a fireflyer.dev TrainingJob. Healthy: Succeeded, or Ready (every pod of the
-- attempt running). Degraded: Failed (restart.maxRestarts used up), or Degraded True (the last
-- attempt failed and the job is restarting, or the cluster lacks room). Progressing otherwise.
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
local phase = obj.status.phase
local conditions = obj.status.conditions
local ready = find(conditions, "Ready")
local degraded = find(conditions, "Degraded")
local progress = ""
if obj.status.step ~= nil then
  progress = "step " .. tostring(obj.status.step)
end
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "Succeeded" .. (progress ~= "" and (" at " .. progress) or "")
  return hs
end
if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = (degraded and degraded.message) or obj.status.lastFailure or "Failed"
  return hs
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = "Running" .. (progress ~= "" and (", " .. progress) or "")
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
