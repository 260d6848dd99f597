"""Fused kernels of the compute path (Pallas): flash attention over the unified mask."""
