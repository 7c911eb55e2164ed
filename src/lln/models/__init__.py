"""Models with a pluggable attention: encoder classifier and causal decoder LM."""
