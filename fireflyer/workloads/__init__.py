"""The programs our pods run: the DeepSeek-V3 model, the inference engine (`fireflyer serve`)."""
