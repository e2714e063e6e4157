"""Images as uint8 tensors, the split builder and the batch augmentation pipeline."""
