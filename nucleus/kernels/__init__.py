"""Hand-written kernels for the hot paths torch does not cover, each with a torch twin it must match."""
