"""The passes of a decoding step as units per bucket (static, compiled or CUDA graphs),
mirroring `engine/decode/passes/` file for file."""
