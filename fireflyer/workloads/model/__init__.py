"""DeepSeek-V3 in torch: config, layers, checkpoint loading and `fireflyer model init`."""
