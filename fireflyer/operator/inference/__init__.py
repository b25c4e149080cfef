"""The InferenceDeployment controller: observe → plan → apply → status."""
