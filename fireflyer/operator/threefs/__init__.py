"""ThreeFSCluster controller."""
