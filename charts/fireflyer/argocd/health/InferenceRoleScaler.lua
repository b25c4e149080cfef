-- Argo CD health of a fireflyer.dev InferenceRoleScaler (the operator creates one per role of an
-- InferenceDeployment). Healthy once the role runs as many ready units as it asks for
-- (status.readyReplicas = spec.replicas); Progressing while units are added, removed or starting.
local hs = {status = "Progressing"}
local want = (obj.spec or {}).replicas or 0
local status = obj.status or {}
local have = status.replicas or 0
local ready = status.readyReplicas or 0
hs.message = tostring(ready) .. "/" .. tostring(want) .. " units ready"
if have == want and ready == want then
  hs.status = "Healthy"
  return hs
end
hs.message = hs.message .. ", " .. tostring(have) .. " planned"
return hs
