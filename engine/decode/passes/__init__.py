"""The eager passes of a decoding step: the full transformer pass, MARché's lazy pass and the
head's DDPM loop (their units: `engine/decode/units/`)."""
