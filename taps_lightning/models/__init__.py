"""Multi-task models over one backbone: TAPS, the baselines, progressive adapters; building and counting."""
