"""The TAPS layer itself: gate, fused autograd, layers, task-specific norms, injection into a backbone."""
