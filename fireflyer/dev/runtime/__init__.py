"""The dev cluster's local pod runtime: nodes whose pods run as processes on this machine."""
