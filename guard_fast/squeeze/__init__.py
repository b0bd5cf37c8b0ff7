"""Squeeze: train the teacher on real data with a GUARD regularizer or a baseline objective."""
