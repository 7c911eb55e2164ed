"""`lln bench`: time and peak memory of every attention vs sequence length, and decoding."""
