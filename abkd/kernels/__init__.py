"""Fast implementations of the α-β divergence: the chunked PyTorch path, the Triton kernel and the fused-linear variant."""
