"""GPU kernels (Triton). Each module imports triton itself; import them lazily, on CUDA only."""
