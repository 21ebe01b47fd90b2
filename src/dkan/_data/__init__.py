"""The data layer: run the missing input steps, then turn tables and features into model tensors."""
