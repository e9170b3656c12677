"""The digits data set and the reproducible training script of the shipped model."""
