"""Robustness evaluation of trained models: the evaluate stage and its reports."""
