"""Semi-supervised methods trained from scratch, without a teacher (family ``ssl``)."""
