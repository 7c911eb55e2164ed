"""Hugging Face transformers integration: attention registration, conversion, O(1) cache."""
