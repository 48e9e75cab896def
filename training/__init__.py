"""Offline training and export of the MobileNetV2 models served by this project."""
