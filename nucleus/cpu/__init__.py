"""The CPU path for GGUF models: the C forward pass over the file's own blocks, without torch."""
