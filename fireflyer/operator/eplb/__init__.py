"""The EPLB controller: collect expert load, rebalance, publish ExpertPlacement generations."""
