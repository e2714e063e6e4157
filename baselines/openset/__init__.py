"""Open-set SSL: semi-supervised methods that detect and drop or down-weight outliers (family ``openset``)."""
