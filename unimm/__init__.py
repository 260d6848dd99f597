"""unimm: JAX/TPU-native training of unified multimodal (understanding + generation) models."""

__version__ = "0.1.0"
