"""`fireflyer router`: the OpenAI API in front of a deployment's units (policies, health, retries)."""
