-- Argo CD health of a fireflyer.dev ExpertPlacement. It has no conditions: Healthy once a unit of
-- its role reports running its generation (status.appliedUnits), Progressing until then. A
-- placement that does not fit its role is never applied: the InferenceDeployment's EplbHealthy
-- condition says why.
local hs = {status = "Progressing"}
local generation = tostring((obj.spec or {}).generation)
local applied = (obj.status or {}).appliedUnits or 0
if applied > 0 then
  hs.status = "Healthy"
  hs.message = "Generation " .. generation .. " runs on " .. tostring(applied) .. " unit(s)"
  local b = (obj.status or {}).balancedness
  if b ~= nil then
    hs.message = hs.message .. ", balancedness " .. tostring(b)
  end
  return hs
end
hs.message = "No unit reports running generation " .. generation .. " yet"
return hs
