"""GPU kernels the workloads embed: paged MLA decode, FP8 block-scaled GEMM, expert-parallel
dispatch/combine. Each has a torch reference that defines correctness and runs on CPU; Triton is
imported only when a GPU backend is used."""
