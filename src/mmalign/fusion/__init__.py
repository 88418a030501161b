"""Multimodal classification: fusion modules, a classifier over any encoders, and its training objective."""
