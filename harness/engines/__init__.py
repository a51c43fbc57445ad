"""Inference engines run for real: their own logs read into records (llama.cpp on the CPU)."""
