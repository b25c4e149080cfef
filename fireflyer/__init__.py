"""fireflyer: a Kubernetes operator for DeepSeek's open infrastructure."""

__version__ = "0.1.0"
