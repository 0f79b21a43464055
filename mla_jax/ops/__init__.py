"""Ops with several implementations (reference, XLA, kernels), each chosen in one place by the target."""
