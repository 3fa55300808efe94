"""Evaluation: speed measures of PASTA decoding against a sequential baseline, reports."""
