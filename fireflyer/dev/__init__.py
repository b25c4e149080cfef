"""A local control plane built from Go modules, with kwok-simulated GPU/RDMA nodes."""
