"""Distillers: a frozen teacher's knowledge transferred on labelled and unlabelled images (family ``distill``)."""
