"""What a MAR model is: architectures, the transformer, the DiffLoss head and its diffusion
schedule, tokenizers (KL-16 VAE, pixel patches) and strict, safe checkpoint loading."""
