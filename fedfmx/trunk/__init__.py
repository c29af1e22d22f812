"""The frozen pretrained trunk: its names, its taps and the on-disk cache of its features."""
