"""Custom torch ops (musc_edge namespace) for LNAMD pooling and MSM."""
