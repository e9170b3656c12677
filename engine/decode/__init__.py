"""How a MAR model is sampled: the step loop, the schedules, per-request randomness and the
decoding policies (exact MAR, MARché) that turn tokens into conditions."""
